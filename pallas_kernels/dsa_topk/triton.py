"""DSA scoring + exact top-k on GPU: Pallas kernels (Triton lowering), the ``triton`` implementation.

Two ways to select, chosen by ``DsaTritonBlockSizes.selection``:

* ``"streaming"`` (default): one fused kernel, ``stream_select``. One program per block of ``bq``
  queries (and, when there are few query blocks, per segment of keys) scores key blocks in position
  order (after a probe of the latest 2k keys that sets the starting threshold) with one tensor-core
  dot each and feeds every query's scores straight into its candidate
  buffer (``streaming_topk_triton.py``): a key enters only if it beats the query's proven threshold,
  so no [T, S] array is ever written and memory is O(T * k). The survivors come out in the contract's
  order (ranked in the kernel); key segments, when there are several, are merged by a radix select
  over their k winners each. The heaviest (latest, causal) query blocks are scheduled first.
  With per-query unit lists (``units``), the same kernel scores only what each query lists: the
  merged walk (HISA's kept blocks: each key block some query of the program needs, loaded once for
  all) or the gathered walk (MISA-H's candidates: one query per program, its candidate rows gathered).
* ``"two_pass"`` (the measured H100 baseline): ``score_keys`` writes every query's int32 ranking keys
  for a chunk of queries ([chunk, S], sized to ``chunk_bytes``), ``radix_topk_rows``
  (``radix_topk_triton.py``) selects each row's top k, and a sort of k per row orders them.

Scoring, in both: keys are the matmul's M and the ``bq * H`` head queries its N (N = 256 for H = 64,
bq = 4); ReLU, head weights and the head sum follow in float32 registers; key blocks past the block's
causal limit are never visited. float8_e4m3fn q and k (the fp8 indexer) stay fp8 into the dot, with
float32 accumulation, DeepGEMM's ``fp8_mqa_logits`` semantics: per-key scale after the dot, float32
head weights, ReLU and head sum in float32. Other fp8 pairs are upcast to bfloat16 (exact).

The top-k needs gathers, scatters and prefix sums over per-thread data, which the Triton lowering
expresses directly; why Triton and not Mosaic GPU, and the measured speed, are in docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_index_jax.kernels.chunking import map_query_chunks, next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.inputs import matmul_dtype
from sparse_index_jax.kernels.radix_select import output_columns, padding_slots
from sparse_index_jax.kernels.radix_topk_triton import radix_topk_rows
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, ordered_keys, relu, top_k_by_key
from sparse_index_jax.kernels.streaming_topk_triton import barrier, compact, kth_largest, rank_survivors
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def _block_scores(k_ref, scale_ref, b, j, q, w, bk: int, bq: int, heads: int, real_heads: int):
    """float32 scores [bk, bq] of key block ``j`` for the program's queries (q [bq*H, d], w [1, bq, H])."""
    keys = pl.ds(j * bk, bk)
    return _scores(k_ref[b, keys, :], scale_ref[b, keys], q, w, bk, bq, heads, real_heads)


def _scores(k_blk, scale, q, w, bk: int, bq: int, heads: int, real_heads: int):
    """float32 scores [bk, bq] of ``bk`` key rows (k_blk [bk, d], their scales [bk]); heads from
    ``real_heads`` on are ``kernel_layout``'s padding and add nothing."""
    # Keys are the matmul's M and head queries its N: the sum over heads then runs along each
    # accumulator row (a few lanes apart), not across the register layout.
    logits = jax.lax.dot_general(k_blk, q.astype(k_blk.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)   # [bk, bq*H], tensor cores
    # ranking.relu, not jnp.maximum: Triton's maxnumf would turn a NaN logit into 0 (the contract: NaN score)
    terms = relu(logits).reshape(bk, bq, heads) * w
    if real_heads < heads:  # a padded head's zero query meets an inf key: 0 * inf = NaN, not the reference's
        terms = jnp.where(jax.lax.iota(jnp.int32, heads)[None, None, :] < real_heads, terms, 0.0)
    return jnp.sum(terms, axis=2) * scale[:, None]


def _program_queries(q_ref, w_ref, b, rows, bq: int, heads: int):
    q = q_ref[b, rows, :, :]                                   # [bq, H, d]
    return q.reshape(bq * heads, q.shape[-1]), w_ref[b, rows, :].reshape(1, bq, heads)


def _score_kernel(limit_ref, q_ref, w_ref, k_ref, scale_ref, out_ref, *, bq: int, heads: int, bk: int,
                  real_heads: int):
    b, i = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bq, bq)
    q, w = _program_queries(q_ref, w_ref, b, rows, bq, heads)
    n_blocks = (jnp.max(limit_ref[b, rows]) + bk - 1) // bk    # causal skip: only blocks someone sees

    def block(j, carry):
        out_ref[b, rows, pl.ds(j * bk, bk)] = ordered_keys(_block_scores(k_ref, scale_ref, b, j, q, w, bk, bq,
                                                                         heads, real_heads)).T
        return carry

    jax.lax.fori_loop(0, n_blocks, block, 0)


def score_keys(q: jax.Array, w: jax.Array, k: jax.Array, k_scale: jax.Array, limits: jax.Array, *,
               width: int, bk: int = DsaTritonBlockSizes.block_k, bq: int | None = None,
               num_warps: int = DsaTritonBlockSizes.num_warps, num_stages: int = DsaTritonBlockSizes.num_stages,
               interpret: bool | None = None, real_heads: int | None = None) -> jax.Array:
    """int32 ranking keys [B, T, width] of every query against keys ``0 .. limits[b, t]`` (later columns
    are not written). q [B,T,H,d], w [B,T,H] f32, k [B,width,d], k_scale [B,width] f32, limits [B,T].
    q is cast to k's dtype in the kernel; float32 products use TF32 on GPU (HISA's block means).

    Shapes must already be kernel-friendly: H, d, bk powers of two, T a multiple of ``bq`` (default
    ``query_block(H)``), ``width`` a multiple of ``bk``. Heads from ``real_heads`` on (None: none) are
    padding and ignored.
    """
    B, T, H, d = q.shape
    bq = bq or query_block(H)
    if T % bq:
        raise ValueError(f"score_keys: T={T} must be a multiple of the query block {bq}")
    kernel = functools.partial(_score_kernel, bq=bq, heads=H, bk=bk, real_heads=real_heads or H)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, T, width), jnp.int32),
        grid=(B, T // bq),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=triton_interpret(interpret),
        name="dsa_score_keys",
    )(limits, q, w, k, k_scale)


def query_block(heads: int, head_queries: int = DsaTritonBlockSizes.head_queries) -> int:
    """Queries per scoring program: enough for ``head_queries`` head queries (the matmul's N)."""
    return max(1, head_queries // heads)


def program_queries(heads: int, T: int, head_queries: int) -> int:
    """Queries per program for T queries of ``heads`` (padded) heads: enough head queries for the dot's N,
    no more than there are queries, and N >= 16 (a tensor-core dot's least)."""
    return min(query_block(heads, head_queries), max(next_pow2(T), -(-16 // heads)))


def kernel_layout(q, w, k, k_scale, *, tile: int, min_heads: int = 1):
    """Pads heads and head dim to powers of two (zero weights / zeros: scores unchanged; at least
    ``min_heads`` heads), keys to a multiple of ``tile``, and casts the matmul operands to one dtype:
    e4m3 q and k stay e4m3 (fp8 tensor cores; head dim padded to >= 32, the fp8 dot's K), other fp8
    pairs go to bfloat16 (exact)."""
    B, T, H, d = q.shape
    S = k.shape[1]
    fp8 = q.dtype == k.dtype == jnp.float8_e4m3fn
    dt = k.dtype if fp8 else matmul_dtype(q, k)
    Hp, dp = max(min_heads, next_pow2(H)), max(32 if fp8 else 16, next_pow2(d))
    width = round_up(S, tile)
    q = pad_axis(pad_axis(q.astype(dt), 2, Hp), 3, dp)
    w = pad_axis(w.astype(jnp.float32), 2, Hp)
    k = pad_axis(pad_axis(k.astype(dt), 1, width), 2, dp)
    scale = jnp.ones((B, S), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32)
    return q, w, k, pad_axis(scale, 1, width, 1.0), width


def order_by_key(keys: jax.Array, positions: jax.Array, topk: int, return_keys: bool):
    """Winners in position order (-1 padded) -> the contract's order: best key first, ties lower first."""
    sel = jnp.where(positions >= 0, jnp.take_along_axis(keys, jnp.maximum(positions, 0), axis=-1),
                    INELIGIBLE_KEY)
    slot, valid, sel_keys = top_k_by_key(sel, topk, return_keys=True)
    idx = jnp.where(valid, jnp.take_along_axis(positions, jnp.maximum(slot, 0), axis=-1), -1)
    return (idx, valid, sel_keys) if return_keys else (idx, valid)


NO_UNIT = jnp.iinfo(jnp.int32).max  # pads a listed kernel's per-query unit lists (after every real unit)


def _stream_kernel(limit_ref, q_ref, w_ref, k_ref, scale_ref, *refs, bq: int, heads: int, bk: int, topk: int,
                   cap: int, tile: int, rank_tile: int, blocks_per_segment: int, probe_blocks: int, out_tile: int,
                   out_len: int, ranked: bool, unit: int, unit_slice: int, sync: bool, real_heads: int):
    units_ref, (idx_ref, key_ref, buf_key_ref, buf_pos_ref) = (refs[0], refs[1:]) if unit else (None, refs)
    b, g = pl.program_id(0), pl.program_id(2)
    i = pl.num_programs(1) - 1 - pl.program_id(1)  # the last (causal: heaviest) query blocks go first
    rows = pl.ds(i * bq, bq)
    q, w = _program_queries(q_ref, w_ref, b, rows, bq, heads)
    limits = limit_ref[b, rows]                                     # [bq]
    n_blocks = (jnp.max(limits) + bk - 1) // bk
    cols = jax.lax.iota(jnp.int32, bq)
    query_rows = i * bq + cols

    def pick(vec, c):  # element c of a [bq] state vector (a masked sum: no dynamic register indexing)
        return jnp.sum(jnp.where(cols == c, vec, 0))

    def put(vec, c, value):
        return jnp.where(cols == c, value, vec)

    def buffer(ref, c):  # query c's [2, cap + spare] buffer: load(half, slots) / store(half, slots, value)
        def access(half, slots, value=None):
            if value is None:
                return ref[b, i * bq + c, g, half, slots]
            ref[b, i * bq + c, g, half, slots] = value
        return access

    def compact_if(c, state, limit):  # query c's buffer holds more than ``limit`` entries: compact it
        def run(_, state):
            count, thr, half = state
            h = pick(half, c)
            tau = compact(buffer(buf_key_ref, c), buffer(buf_pos_ref, c), h, pick(count, c), topk, tile=tile,
                          cap=cap, sync=sync)
            return put(count, c, topk), put(thr, c, tau), put(half, c, 1 - h)
        return jax.lax.fori_loop(0, (pick(state[0], c) > limit).astype(jnp.int32), run, state)

    def insert(positions, scores, eligible, state):  # appends the keys above each query's threshold
        count, thr, half = state
        keys = jnp.where(eligible & (positions[:, None] < limits[None, :]), ordered_keys(scores), INELIGIBLE_KEY)
        take = keys > thr[None, :]
        slots = jnp.where(take, count[None, :] + jnp.cumsum(take.astype(jnp.int32), axis=0) - 1, cap)
        block_rows = jnp.broadcast_to(query_rows[None, :], (bk, bq))
        halves = jnp.broadcast_to(half[None, :], (bk, bq))
        buf_key_ref[b, block_rows, g, halves, slots] = keys
        buf_pos_ref[b, block_rows, g, halves, slots] = jnp.broadcast_to(positions[:, None], (bk, bq))
        return count + jnp.sum(take.astype(jnp.int32), axis=0), thr, half

    def insert_block(j, state, member=True):  # scores key block j (all of it, or the ``member`` keys)
        positions = j * bk + jax.lax.iota(jnp.int32, bk)
        return insert(positions, _block_scores(k_ref, scale_ref, b, j, q, w, bk, bq, heads, real_heads), member,
                      state)

    def insert_rows(positions, state):  # scores the key rows ``positions`` [bk] (gathered; bq == 1)
        safe = jnp.maximum(positions, 0)
        scores = _scores(k_ref[b, safe, :], scale_ref[b, safe], q, w, bk, bq, heads, real_heads)
        return insert(positions, scores, (positions >= 0)[:, None], state)

    def room(state):  # room for a whole block in every buffer; loops over the queries: one copy of the code
        return jax.lax.fori_loop(0, bq, lambda c, st: compact_if(c, st, cap - bk), state)

    zeros = jnp.zeros((bq,), jnp.int32)
    no_threshold = jnp.full((bq,), INELIGIBLE_KEY, jnp.int32)
    if unit == 1:
        state = _gathered_scan(units_ref, b, i, limits, bk, room, insert_rows, (zeros, no_threshold, zeros))
    elif unit:
        state = _merged_scan(units_ref, b, query_rows, n_blocks, bk, unit, unit_slice, room, insert_block,
                             (zeros, no_threshold, zeros))
    else:
        first = g * blocks_per_segment
        last = jnp.minimum(first + blocks_per_segment, n_blocks)
        # Probe: the latest 2k keys of the segment, when it holds more than twice as many, give each query a
        # starting threshold, their k-th largest key (a lower bound on the row's; recent keys score high).
        probe = jnp.where(last - first > 2 * probe_blocks, probe_blocks, 0)
        count = jax.lax.fori_loop(0, probe, lambda s, st: insert_block(last - 1 - s, st),
                                  (zeros, no_threshold, zeros))[0]
        barrier(sync)

        def probe_threshold(c, thr):
            n = pick(count, c)
            lane = jax.lax.iota(jnp.int32, tile)
            load = lambda t: (buffer(buf_key_ref, c)(0, t * tile + lane), t * tile + lane < n)

            def found(_, thr):
                return put(thr, c, kth_largest(load, (n + tile - 1) // tile, tile, jnp.int32(topk))[0] - 1)
            return jax.lax.fori_loop(0, (n >= topk).astype(jnp.int32), found, thr)

        thr = jax.lax.fori_loop(0, bq, probe_threshold, no_threshold)
        barrier(sync)  # the probe's entries are read: the scan below overwrites them
        state = jax.lax.fori_loop(first, last, lambda j, st: insert_block(j, room(st)), (zeros, thr, zeros))

    def finish(c, state):
        state = compact_if(c, state, topk)
        n, half = jnp.minimum(pick(state[0], c), topk), pick(state[2], c)
        row = i * bq + c

        def emit(slots, ok, keys, entries):
            slots = jnp.where(ok, slots, out_len - 1)  # idle lanes write the spare last column
            idx_ref[b, row, g, slots] = buffer(buf_pos_ref, c)(half, entries)
            key_ref[b, row, g, slots] = keys

        rank_survivors(buffer(buf_key_ref, c), half, n, tile=rank_tile, ranked=ranked, emit=emit, sync=sync)
        for slots in padding_slots(n, out_tile, out_len):  # past the survivors (disjoint from the above)
            idx_ref[b, row, g, slots] = jnp.full((out_tile,), -1, jnp.int32)
            key_ref[b, row, g, slots] = jnp.full((out_tile,), INELIGIBLE_KEY, jnp.int32)
        return state

    jax.lax.fori_loop(0, bq, finish, state)


def _merged_scan(units_ref, b, query_rows, n_blocks, bk: int, unit: int, unit_slice: int, room, insert_block,
                 state):
    """The merged walk (units of several keys: HISA's kept blocks): each query may select only the keys of
    the units in its sorted list ``units_ref[b, t, :]``. Key blocks are visited in increasing position, only
    those holding a unit of some query of the program (the union: a block is loaded once for all of them),
    by merging the queries' lists as they go: each query has a pointer to its first unit not yet passed."""
    lanes = jax.lax.iota(jnp.int32, unit_slice)
    offsets = jax.lax.iota(jnp.int32, bk)

    def next_block(ptr, j):  # the first key block from j on holding some query's next unit
        head = jnp.min(units_ref[b, query_rows, ptr])
        return jnp.maximum(j, jnp.where(head < NO_UNIT, head * unit // bk, n_blocks))

    def body(carry):
        j, ptr, state = carry
        listed = units_ref[b, query_rows[:, None], ptr[:, None] + lanes[None, :]]   # [bq, unit_slice]
        unit_of = (j * bk + offsets) // unit
        hits = (unit_of[:, None, None] == listed[None, :, :]).astype(jnp.int32)
        state = insert_block(j, room(state), jnp.sum(hits, axis=2) > 0)           # [bk, bq] membership
        ptr = ptr + jnp.sum((listed < (j + 1) * bk // unit).astype(jnp.int32), axis=1)  # past units ending here
        return next_block(ptr, j + 1), ptr, state

    ptr = jnp.zeros_like(query_rows)
    return jax.lax.while_loop(lambda carry: carry[0] < n_blocks, body, (next_block(ptr, 0), ptr, state))[2]


def _gathered_scan(units_ref, b, i, limits, bk: int, room, insert_rows, state):
    """The gathered walk (single keys: MISA-H's candidates; one query per program): the query's listed
    positions, ``bk`` at a time in increasing order, their key rows gathered (each d contiguous values)
    and scored with one dot. Candidates a few per key block would make the merged walk load nearly every
    block (``bench/walk_sharing.py`` measures it); gathering scores only them."""
    offsets = jax.lax.iota(jnp.int32, bk)

    def tile(s):  # the s-th bk listed positions; -1 for NO_UNIT padding and keys past the query
        positions = units_ref[b, i, s * bk + offsets]
        return jnp.where(positions < limits[0], positions, -1)

    def body(carry):  # the loaded tile rides in the carry: each tile is loaded once
        s, positions, state = carry
        return s + 1, tile(s + 1), insert_rows(positions, room(state))

    return jax.lax.while_loop(lambda carry: jnp.max(carry[1]) >= 0, body, (jnp.int32(0), tile(0), state))[2]


def stream_buffer(topk: int, bk: int, radix_tile: int) -> tuple[int, int]:
    """(compaction tile, cap) of the streaming kernel's per-query buffer: ``cap = 2k + bk`` rounded up to
    the tile, so after a compaction (k entries) a compaction comes at most every k + bk inserts."""
    tile = min(radix_tile, next_pow2(2 * topk + bk))
    return tile, round_up(2 * topk + bk, tile)


def stream_select(q, w, k, scale, limits, *, topk: int, width: int, bq: int, segments: int, ranked: bool,
                  block_sizes: DsaTritonBlockSizes, interpret: bool, units=None, unit: int = 0,
                  real_heads: int | None = None):
    """(positions, keys), each [B, T, segments, topk] int32: every query's top ``topk`` keys among
    ``0 .. limits[b, t]`` within each of ``segments`` equal runs of key blocks, -1 / INELIGIBLE_KEY
    padded; in the contract's order if ``ranked``, else in position order (what ``merge_segments`` and
    MISA-H's candidates take). Kernel layout as ``kernel_layout`` gives it; T a multiple of ``bq``;
    heads from ``real_heads`` on (None: none) are the layout's padding.

    ``units`` [B, T, L] int32 (one segment, no probe): each query selects only among the keys of the
    units it lists, runs of ``unit`` keys (unit u holds keys ``u * unit .. (u + 1) * unit - 1``), listed
    in increasing order and padded with ``NO_UNIT``: HISA's kept blocks (the merged walk over whole key
    blocks), MISA-H's candidates (``unit == 1``: the gathered walk, ``bq == 1``)."""
    B, T, H, _ = q.shape
    bs = block_sizes
    bk = min(bs.block_k, width)
    tile, cap = stream_buffer(topk, bk, bs.radix_tile)
    out_tile, out_len = output_columns(topk)
    blocks_per_segment = -(-width // bk // segments)
    unit_slice = next_pow2(-(-(bk - 1) // unit) + 1) if unit else 0  # most units bk keys can touch
    kernel = functools.partial(
        _stream_kernel, bq=bq, heads=H, bk=bk, topk=topk, cap=cap, tile=tile, rank_tile=min(bs.rank_tile, tile),
        blocks_per_segment=blocks_per_segment, probe_blocks=-(-2 * topk // bk), out_tile=out_tile, out_len=out_len,
        ranked=ranked, unit=unit, unit_slice=unit_slice, sync=not interpret, real_heads=real_heads or H)
    listed = ()
    if unit:
        if segments != 1 or (unit == 1 and bq != 1):
            raise ValueError(f"stream_select: a units list takes one key segment (and single-key units one query "
                             f"per program), got segments={segments}, unit={unit}, bq={bq}")
        listed = (pad_axis(units, 2, units.shape[2] + unit_slice, NO_UNIT),)  # a pointer's slice stays in bounds
    buf = jax.ShapeDtypeStruct((B, T, segments, 2, cap + 16), jnp.int32)  # two halves + spare slots
    out = jax.ShapeDtypeStruct((B, T, segments, out_len), jnp.int32)
    idx, keys, _, _ = pl.pallas_call(
        kernel,
        out_shape=(out, out, buf, buf),
        grid=(B, T // bq, segments),
        compiler_params=triton_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name={0: "dsa_stream_topk", 1: "gathered_stream_topk"}.get(unit, "merged_stream_topk"),
    )(limits, q, w, k, scale, *listed)
    return idx[..., :topk], keys[..., :topk]


def stream_bytes_per_query(topk: int, segments: int, bk: int, block_sizes: DsaTritonBlockSizes) -> int:
    """Device memory of the streaming kernel per query row: buffers and outputs of every segment."""
    _, cap = stream_buffer(topk, bk, block_sizes.radix_tile)
    return segments * 4 * (4 * (cap + 16) + 2 * output_columns(topk)[1])


def key_segments(programs: int, n_blocks: int, topk: int, bk: int, min_programs: int) -> int:
    """Key segments per row: enough programs for the GPU (``min_programs``), each segment at least 2k
    keys (a smaller one would keep all it sees)."""
    if programs >= min_programs:
        return 1
    per_segment = max(-(-n_blocks * programs // min_programs), -(-2 * topk // bk), 1)
    return -(-n_blocks // per_segment)


def winners_in_position_order(slots, keys, return_keys: bool, positions=None):
    """A radix select's winners (``slots`` into ``keys``, position order, -1 padded) as (positions,
    valid[, keys]); ``positions`` maps slots to key positions (None: the slots are the positions)."""
    ok, at = slots >= 0, jnp.maximum(slots, 0)
    chosen = slots if positions is None else jnp.where(ok, jnp.take_along_axis(positions, at, axis=-1), -1)
    if not return_keys:
        return chosen, ok
    return chosen, ok, jnp.where(ok, jnp.take_along_axis(keys, at, axis=-1), INELIGIBLE_KEY)


def merge_segments(positions, keys, topk: int, return_keys: bool, *, position_order: bool,
                   block_sizes: DsaTritonBlockSizes, interpret: bool):
    """Per-segment winners [B, T, G, topk] (position order) -> the row's top ``topk`` in the contract's
    order (or in position order). Segments are in position order, so candidate order is position order
    and the radix select's tie rule (lower candidate first) is the contract's."""
    B, T, G, _ = positions.shape
    positions, keys = positions.reshape(B, T, G * topk), keys.reshape(B, T, G * topk)
    tile = min(block_sizes.radix_tile, next_pow2(G * topk))
    width = round_up(G * topk, tile)
    positions, keys = pad_axis(positions, 2, width, -1), pad_axis(keys, 2, width, INELIGIBLE_KEY)
    slots = radix_topk_rows(keys, jnp.full((B, T), width, jnp.int32), topk, tile=tile,
                            bucket=block_sizes.radix_bucket, interpret=interpret)
    if position_order:  # the radix select emits candidates in candidate (= position) order
        return winners_in_position_order(slots, keys, return_keys, positions)
    slot, valid, *sel = order_by_key(keys, slots, topk, return_keys)
    return (jnp.where(valid, jnp.take_along_axis(positions, jnp.maximum(slot, 0), axis=-1), -1), valid, *sel)


def dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, *, topk: int, query_chunk: int, key_chunk: int,
                    return_keys: bool = False, block_sizes: DsaTritonBlockSizes | None = None,
                    chunk_bytes: int = 1 << 30, interpret: bool | None = None, position_order: bool = False,
                    units: jax.Array | None = None, unit: int = 0):
    """Same contract and result as ``dsa_topk_reference``. ``query_chunk``/``key_chunk`` shape the
    reference's memory; here queries go in chunks whose device memory (streaming: candidate buffers,
    O(chunk * k), but at least ``min_programs`` programs a launch; two-pass: [chunk, S] int32 keys) fits
    ``chunk_bytes``. ``block_sizes``: the kernels'
    tiles and selection (None: ``DsaTritonBlockSizes()``). ``interpret``: None = as the platform says
    (``dispatch.triton_interpret``). ``position_order``: the same winners in increasing position, -1
    padding last (MISA-H's candidates), instead of the contract's order.

    ``units`` [B, T, L] int32 (streaming only): each query selects only among the keys of the units it
    lists (runs of ``unit`` keys, increasing, ``NO_UNIT`` padded; see ``stream_select``): HISA's
    refinement over its kept blocks, MISA-H's re-rank of its candidates."""
    del query_chunk, key_chunk
    block_sizes = block_sizes or DsaTritonBlockSizes()
    if units is not None and (block_sizes.selection != "streaming" or unit < 1):
        raise ValueError(f"dsa_topk_triton: units need selection='streaming' and unit >= 1, got "
                         f"{block_sizes.selection!r} and unit={unit}")
    return _dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, units, topk=topk, return_keys=return_keys,
                            block_sizes=block_sizes, chunk_bytes=chunk_bytes, interpret=triton_interpret(interpret),
                            position_order=position_order, unit=unit)


@functools.partial(jax.jit, static_argnames=("topk", "return_keys", "block_sizes", "chunk_bytes", "interpret",
                                             "position_order", "unit"))
def _dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, units, *, topk, return_keys, block_sizes,
                     chunk_bytes, interpret, position_order, unit):
    B, T, H, d = q.shape
    S = k.shape[1]
    bs = block_sizes
    streaming = bs.selection == "streaming"
    tile = min(bs.block_k if streaming else bs.radix_tile, max(16, next_pow2(S)))  # a dot needs M >= 16
    gathered = unit == 1  # the gathered walk: one query per program, its heads the dot's N (>= 16)
    q, w, k, scale, width = kernel_layout(q, w, k, k_scale, tile=tile, min_heads=16 if gathered else 1)
    Hp = q.shape[2]
    bq = 1 if gathered else program_queries(Hp, T, bs.head_queries)
    limits = jnp.clip(jnp.minimum(q_positions + 1, kv_lengths[:, None]), 0, S).astype(jnp.int32)
    Tp = round_up(T, bq)  # padded query rows have limit 0: nothing eligible, pure padding
    q, w, limits = pad_axis(q, 1, Tp), pad_axis(w, 1, Tp), pad_axis(limits, 1, Tp)
    listed = () if units is None else ((pad_axis(units, 1, Tp, NO_UNIT), NO_UNIT),)

    if streaming:
        bk = min(bs.block_k, width)
        segments = 1 if listed else key_segments(B * Tp // bq, width // bk, topk, bk, bs.min_programs)
        per_query = stream_bytes_per_query(topk, segments, bk, bs) + (4 * units.shape[2] if listed else 0)
        # At least min_programs programs a launch (a GPU needs them), even past chunk_bytes for a large k
        # (MISA-H's 8,192 candidates: ~400 KB of buffers a query).
        chunk = max(bq * min(bs.min_programs, Tp // bq), min(Tp, chunk_bytes // (B * per_query)) // bq * bq)

        def one_chunk(q_c, w_c, lim_c, *units_c):
            idx, keys = stream_select(q_c, w_c, k, scale, lim_c, topk=topk, width=width, bq=bq, segments=segments,
                                      ranked=segments == 1 and not position_order, block_sizes=bs,
                                      interpret=interpret, units=units_c[0] if units_c else None, unit=unit,
                                      real_heads=H)
            if segments > 1:
                return merge_segments(idx, keys, topk, return_keys, position_order=position_order, block_sizes=bs,
                                      interpret=interpret)
            idx, keys = idx[:, :, 0], keys[:, :, 0]
            return (idx, idx >= 0, keys) if return_keys else (idx, idx >= 0)
    else:
        chunk = max(bq, min(Tp, chunk_bytes // (4 * B * width)) // bq * bq)

        def one_chunk(q_c, w_c, lim_c):
            keys = score_keys(q_c, w_c, k, scale, lim_c, width=width, bk=min(bs.block_k, tile), bq=bq,
                              num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret, real_heads=H)
            positions = radix_topk_rows(keys, lim_c, topk, tile=tile, bucket=bs.radix_bucket, interpret=interpret)
            if position_order:
                return winners_in_position_order(positions, keys, return_keys)
            return order_by_key(keys, positions, topk, return_keys)

    out = map_query_chunks(one_chunk, chunk, (q, 0), (w, 0), (limits, 0), *listed)
    return jax.tree.map(lambda x: x[:, :T], out)
