"""Sparse attention over gathered rows on GPU: Pallas kernels with the Triton lowering (``triton``).

Two ops run on these kernels. **Sparse MLA** (this package's op): q [B,T,Hq,Dk], kv [B,S,Dk],
indices/valid [B,T,k]; out [B,T,Hq,v_dim] in q's dtype, the value of a row is its first v_dim columns,
and a query with no valid slot gives zeros (``reference.py`` is the oracle). **Sparse GQA** (the Llama
retrofit, ``kernels/sparse_gqa``): every query head scores only the key part of its group's rows.
Both are one layout here: rows [B, S, G, W] = [value piece | key piece] per KV group (MLA: G = 1, the
row itself; GQA: v and k of group g side by side), q [B, T, G * Hgp, ...] with each group's heads padded
to ``Hgp``. MLA queries score both pieces (``_Geometry.mla``), GQA queries only the key piece.

Work: the forward costs 2*Hq*k*(Dk + v_dim) FLOPs per query (logits over the Dk-wide rows, values
over their first v_dim columns): 0.57 GFLOP per query for DeepSeek (Hq=128, k=2048, 576/512). The
backward recomputes the logits and does four more products (dp, dq, the key and the value gradient):
2*Hq*k*(3*Dk + 2*v_dim) per query. Both read k*Dk cache bytes per query and head block.

Forward design (FlashMLA's shape, in Triton): one program per (head block, query, batch) -- the head
block varies fastest in launch order, so the programs sharing one query's rows run together and the
second gather hits L2. Heads are the matmul M dimension (``block_h`` = 64: acc [64, 512] float32 is
128 KB of registers over 8 warps, and M = 64 is one wgmma tile per warpgroup). The program loops over
the k selected slots in blocks of ``block_k``: it gathers the rows with an int index vector (padding
slots read row 0 and are masked to -inf), takes logits = q @ rows^T in float32 on tensor cores (two
bf16 dots, the 512-wide and the 64-wide piece, both with every dimension >= 16), and runs an online
softmax (running max m and sum l per head) with acc += p @ rows[:, :v_dim], p cast to the compute
dtype (bf16) first so the value product is a tensor-core dot too. It writes out = acc / l and the
logsumexp m + log(l) per (query, head) for the backward. float32 inputs use precision HIGHEST on
every dot, which the Triton lowering turns into IEEE products (DEFAULT/HIGH would be TF32). The
forward holds nothing per query beyond its output and logsumexp, so a 256K-token prefill needs only
its inputs and outputs (q and out: 72 GiB for DeepSeek's shape at 256K in bf16).

Shared memory (Triton: num_stages copies of each tile loaded in the pipelined loop, plus dot operands
staged from registers and layout-conversion scratch; sm_90 limit ``SMEM_LIMIT``, 232,448 bytes per
block), for a padded row width W = 576 in bf16 (``smem_estimate``; heads/rows/stages below). Forward
~ q [block_h, W] + num_stages * rows [block_k, W] + p and logits scratch [block_h, block_k] (2 + 4
bytes): 64/32/3 196,608; 64/32/2 159,744; 64/64/2 would be 245,760 -- too much, so the 64-row tile
runs unpipelined (64/64/1: 172,032, the default: the fastest of ``candidate_block_sizes()`` in the
sweep recorded in docs/kernels.md). Fewer, larger row tiles halve the online-softmax rescales of acc
and double the logits product's N, at the cost of pipelining the gathers.

Triton wants power-of-2 shapes, so a row is handled as two column pieces loaded and multiplied
separately: the value part [0, v_dim) (512 for DeepSeek) and the rest [v_dim, Dk) (the 64-wide rope
key), each a power of 2 of at least 16. Other widths are zero-padded up to that in the wrapper (a copy
of the cache: only for shapes that are not DeepSeek/GLM-like). Heads are padded to a multiple of
the largest head block (zero queries) and k to a multiple of the row blocks (padding slots).

Backward (``jax.custom_vjp``), lean and deterministic: no float atomics, no per-head-block buffer, dq
written once in q's dtype. delta = sum(dout * out) per head in XLA; then, for each chunk of
``query_chunk`` queries (a ``fori_loop``; the chunk bounds the two buffers below):

1. ``sparse_mla_bwd_dq``, one program per (head block, query, batch): recomputes p = exp(s - lse),
   dp = dout @ v^T, ds = p * (dp - delta), accumulates dq = scale * ds @ rows over the k blocks in
   float32 registers and writes it in q's dtype straight into the full dq (aliased, in place). It also
   writes p and ds in the compute dtype, [B, chunk, heads, k] (what the next products would cast them
   to anyway): 1 MB per query for 128 heads and k = 2048 in bf16.
2. ``sparse_mla_bwd_slots``, one program per (slot block, query, batch x group): the row gradient of
   each slot, p^T @ dout on the value columns plus scale * ds^T @ q, summed over ALL the heads that
   share the row (the loop runs over head blocks, the sum stays in float32 registers), written once in
   the compute dtype: [B, G, chunk, k, W], 2.4 MB per query for DeepSeek's shape (the old kernel wrote
   float32 per head block: 18.9 MB per query).
3. ``sparse_mla_bwd_reduce``, one program per distinct row of the chunk: the chunk's slots are sorted
   by row (a stable XLA sort, so equal rows keep query-then-slot order), and each program adds its
   row's slot gradients in that fixed order in float32 and then adds the sum to the float32 dkv (aliased,
   in place). Every row is written by exactly one program per chunk: the result does not depend on
   scheduling, run after run.

Backward shared memory: kernel 1 uses q and dout as loop-invariant operands on both sides of products
(A of q @ rows^T and dout @ rows^T), rows twice (B transposed for the logits, B plain for dq), plus the
p and ds tile stores: ~ 2 * (q + dout) [block_h, W and v] + num_stages * 2 * rows [block_k, W]
+ 2 * p, ds [block_h, block_k]. Kernel 2 stages q, dout, p and ds per step: num_stages * (q + dout
+ p + ds) plus the transposed-operand scratch of p^T and ds^T. ``smem_estimate`` returns all three.

``return_probs``: the head-mean probabilities [B,T,k] come from a light second kernel that recomputes
the logits with the saved logsumexp (the logits product again, no value product). They are a
distillation target and carry no gradient (callers stop it anyway).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_index_jax.kernels.chunking import next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.triton_block_sizes import check_tiles

__all__ = ["MlaTritonBlockSizes", "candidate_block_sizes", "smem_estimate", "sparse_mla_triton", "RowLayout",
           "attend_rows"]

_MIN_DOT = 16  # tensor-core products need every dimension >= 16
SMEM_LIMIT = 232_448  # sm_90 (H100) shared memory per block, bytes
_NEG = -1e30  # start of the running max: finite, so an all-padding block gives exp(-inf) = 0, not NaN


@dataclasses.dataclass(frozen=True)
class MlaTritonBlockSizes:
    """Tile sizes and Triton launch parameters; every block size a power of 2, at least 16.

    ``block_h`` heads per program (the M of the products; fewer heads use the next power of 2),
    ``block_k`` selected rows per loop step. ``bwd_*`` are the same for the backward's dq kernel, which
    holds dq [block_h, Dk] in float32 besides q and dout and uses q, dout and the rows on both sides of
    products, so it takes fewer heads, fewer rows and no pipelining. ``dkv_*`` tile the slot-gradient
    kernel: ``dkv_block_k`` slots per program (the M of its products, its float32 accumulator is
    [dkv_block_k, Dk]) and ``dkv_block_h`` heads per step of its loop over heads (the products' K).
    Shared memory: module docstring and ``smem_estimate``.
    """

    # Forward and dq defaults: the fastest of ``candidate_block_sizes()`` for DeepSeek's shape (Hq = 128,
    # 576/512, k = 2048) in the sweep recorded in docs/kernels.md. The dkv tiles are not timed on a GPU yet.
    block_h: int = 64
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 1
    bwd_block_h: int = 32
    bwd_block_k: int = 16
    bwd_num_warps: int = 4
    bwd_num_stages: int = 1
    dkv_block_h: int = 32
    dkv_block_k: int = 32
    dkv_num_warps: int = 4
    dkv_num_stages: int = 2

    def __post_init__(self):
        check_tiles(self, ("block_h", "block_k", "bwd_block_h", "bwd_block_k", "dkv_block_h", "dkv_block_k"))


def smem_estimate(bs: MlaTritonBlockSizes, *, width: int = 576, v_dim: int = 512,
                  itemsize: int = 2) -> tuple[int, int, int]:
    """(forward, dq kernel, slot-gradient kernel) shared-memory estimates in bytes for the padded row ``width``.

    Forward: q tile + num_stages gathered row tiles + p and logits scratch. dq kernel, worst case: q and
    dout staged twice (both sides of products), rows twice per stage, the p and ds tile stores. Slot
    kernel: num_stages copies of its q, dout, p and ds tiles plus the transposed p and ds operands.
    """
    fwd = (bs.block_h * width * itemsize + bs.num_stages * bs.block_k * width * itemsize
           + bs.block_h * bs.block_k * (itemsize + 4))
    hb, bk = bs.bwd_block_h, bs.bwd_block_k
    dq = (2 * (hb * width + hb * v_dim) * itemsize + bs.bwd_num_stages * 2 * bk * width * itemsize
          + 2 * hb * bk * itemsize)
    hb, bk = bs.dkv_block_h, bs.dkv_block_k
    slots = (bs.dkv_num_stages * (hb * width + hb * v_dim + 2 * hb * bk) * itemsize + 2 * hb * bk * itemsize)
    return fwd, dq, slots


def candidate_block_sizes() -> list[MlaTritonBlockSizes]:
    """Block sizes worth timing on an H100 for DeepSeek's shape (Hq=128, 576/512, k=2048, bf16), default first.

    Every one is estimated (``smem_estimate``) to fit the 232,448-byte shared-memory limit. Forward:
    64 heads (one wgmma M tile per warpgroup) with 8 warps, trading row-tile size against pipeline
    depth: 64 rows unpipelined (default: halves the online-softmax rescales of acc and doubles the
    logits product's N), 32 rows x 3 stages, 16 rows x 4 stages, and 32 rows x 2 stages.
    64 rows x 2 stages (~246 KB) does not fit. dq kernel: 32 heads / 16 rows / 1 stage with 8 or 4
    warps, and 16 heads / 32 rows. Slot kernel: 32 or 64 slots, 32 or 16 heads per step.
    """
    return [
        MlaTritonBlockSizes(),
        MlaTritonBlockSizes(block_k=32, num_stages=3, bwd_num_warps=8, dkv_block_k=64, dkv_num_warps=8),
        MlaTritonBlockSizes(block_k=16, num_stages=4, bwd_block_h=16, bwd_block_k=32, bwd_num_warps=4,
                            dkv_block_h=16, dkv_num_stages=3),
        MlaTritonBlockSizes(block_k=32, num_stages=2, dkv_block_k=64, dkv_block_h=16, dkv_num_warps=8),
    ]


def _pow2(n: int) -> int:
    return max(_MIN_DOT, next_pow2(n))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """What a row holds and who scores it, before padding (the op's own shapes).

    ``groups`` KV groups of ``group_heads`` query heads each; a row is ``v_dim`` value columns then
    ``rest`` more columns (MLA: the rope key; GQA: the whole key). ``mla``: queries score the value
    columns too (their width is v_dim + rest); otherwise queries are ``rest`` wide and score the key only.
    """

    groups: int
    group_heads: int
    v_dim: int
    rest: int
    mla: bool


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shapes of one call, padded for Triton."""

    layout: RowLayout
    v_pad: int  # value piece width (power of 2)
    r_pad: int  # rest piece width (power of 2, 0 when it is absent)
    k_pad: int  # slots, padded to a multiple of every row block
    queries: int  # T: the backward's last chunk clamps its reads to it
    scale: float
    compute_dtype: str
    blocks: MlaTritonBlockSizes
    interpret: bool  # part of the static key: a lowering for CUDA from a CPU host must not reuse interpreted traces

    @property
    def width(self) -> int:
        return self.v_pad + self.r_pad

    @property
    def op(self) -> str:
        """The kernels' name prefix (what a GPU profile shows): the op they serve."""
        return "sparse_mla" if self.layout.mla else "sparse_gqa"

    @property
    def q_width(self) -> int:
        return self.width if self.layout.mla else self.r_pad

    def head_block(self, block_h: int) -> int:
        return min(block_h, _pow2(self.layout.group_heads))

    @property
    def group_pad(self) -> int:
        """Heads per group after padding: a multiple of every kernel's head block (all powers of 2)."""
        bs = self.blocks
        return round_up(self.layout.group_heads,
                        max(self.head_block(b) for b in (bs.block_h, bs.bwd_block_h, bs.dkv_block_h)))

    @property
    def heads_pad(self) -> int:
        return self.layout.groups * self.group_pad

    @property
    def precision(self):  # float32 inputs: IEEE products, not TF32
        return jax.lax.Precision.HIGHEST if self.compute_dtype == "float32" else None

    @property
    def cdt(self):
        """The dtype q, rows and probabilities are cast to for the dots (q's)."""
        return jnp.dtype(self.compute_dtype)


def _pad_cols(x: jax.Array, v_dim: int, g: _Geometry) -> jax.Array:
    """[..., v_dim + rest] -> [..., v_pad + r_pad]: each piece zero-padded at its end (a no-op for 512 + 64)."""
    rest = x.shape[-1] - v_dim
    if g.v_pad == v_dim and g.r_pad == rest:
        return x
    last = x.ndim - 1
    pieces = [pad_axis(x[..., :v_dim], last, g.v_pad)] + ([pad_axis(x[..., v_dim:], last, g.r_pad)] if rest else [])
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


# --------------------------------------------------------------------------------------------------
# kernels (refs are whole arrays; program ids pick the (head block, query, batch) they work on)
# --------------------------------------------------------------------------------------------------

def _load_query(ref, b, t, heads, g: _Geometry):
    """Value piece (MLA only, else None) and rest piece (None when absent) of a [B,T,H,q_width] ref."""
    qv = ref[b, t, heads, pl.ds(0, g.v_pad)].astype(g.cdt) if g.layout.mla else None
    qr = ref[b, t, heads, pl.ds(g.v_pad if g.layout.mla else 0, g.r_pad)].astype(g.cdt) if g.r_pad else None
    return qv, qr


def _gather_rows(rows_ref, idx_ref, b, grp, t, j, bk, g: _Geometry):
    """Rows of group ``grp`` named by slots [j*bk, (j+1)*bk): (in-slot mask [bk], value piece, rest piece)."""
    idx = idx_ref[b, t, pl.ds(j * bk, bk)]
    ok = idx >= 0
    rows = jnp.maximum(idx, 0)  # padding reads row 0, masked below
    rv = rows_ref[b, rows, grp, pl.ds(0, g.v_pad)].astype(g.cdt)
    rr = rows_ref[b, rows, grp, pl.ds(g.v_pad, g.r_pad)].astype(g.cdt) if g.r_pad else None
    return ok, rv, rr


def _dot(a, b, g: _Geometry, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (either side transposed) into float32: ``pl.dot``'s lowering, without its deprecated alias."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=g.precision, preferred_element_type=jnp.float32)


def _logits(qv, qr, rv, rr, g: _Geometry):
    """scale * q @ rows^T in float32, [heads, bk], over the pieces the query scores."""
    parts = [_dot(x, r, g, trans_b=True) for x, r in ((qv, rv), (qr, rr)) if x is not None]
    return functools.reduce(jnp.add, parts) * g.scale


def _head_block_of(h, block_h: int, g: _Geometry):
    """(heads slice, KV group, in-group offset) of head block ``h`` for head blocks of ``block_h``."""
    hb = g.head_block(block_h)
    return pl.ds(h * hb, hb), (h * hb) // g.group_pad, (h * hb) % g.group_pad


def _fwd_kernel(q_ref, rows_ref, idx_ref, o_ref, lse_ref, *, g: _Geometry, n_blocks: int):
    bk = g.blocks.block_k
    h, t, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads, grp, _ = _head_block_of(h, g.blocks.block_h, g)
    hb = g.head_block(g.blocks.block_h)
    qv, qr = _load_query(q_ref, b, t, heads, g)

    def step(j, carry):
        m, l, acc = carry
        ok, rv, rr = _gather_rows(rows_ref, idx_ref, b, grp, t, j, bk, g)
        s = jnp.where(ok[None, :], _logits(qv, qr, rv, rr, g), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(g.cdt), rv, g)
        return m_new, l, acc

    init = (jnp.full((hb,), _NEG, jnp.float32), jnp.zeros((hb,), jnp.float32),
            jnp.zeros((hb, g.v_pad), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
    has = l > 0
    safe = jnp.where(has, l, 1.0)
    o_ref[b, t, heads, :] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[b, t, heads] = jnp.where(has, m + jnp.log(safe), 0.0)  # empty query: every p is masked anyway


def _probs_kernel(q_ref, rows_ref, idx_ref, lse_ref, p_ref, *, g: _Geometry, n_blocks: int):
    bk = g.blocks.block_k
    h, t, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads, grp, first = _head_block_of(h, g.blocks.block_h, g)
    hb = g.head_block(g.blocks.block_h)
    qv, qr = _load_query(q_ref, b, t, heads, g)
    lse = lse_ref[b, t, heads]
    real = (first + jax.lax.broadcasted_iota(jnp.int32, (hb, 1), 0)) < g.layout.group_heads  # padded: no mass

    def step(j, carry):
        ok, rv, rr = _gather_rows(rows_ref, idx_ref, b, grp, t, j, bk, g)
        s = _logits(qv, qr, rv, rr, g)
        p = jnp.where(ok[None, :] & real, jnp.exp(s - lse[:, None]), 0.0)
        p_ref[b, t, h, pl.ds(j * bk, bk)] = jnp.sum(p, axis=0)
        return carry

    jax.lax.fori_loop(0, n_blocks, step, 0)


def _bwd_dq_kernel(start_ref, q_ref, rows_ref, idx_ref, do_ref, lse_ref, delta_ref, _dq_in, dq_ref, p_ref, ds_ref,
                   *, g: _Geometry, n_blocks: int):
    """Kernel 1 of the backward (module docstring): dq in place, p and ds of the chunk's queries."""
    bk = g.blocks.bwd_block_k
    h, tc, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads, grp, _ = _head_block_of(h, g.blocks.bwd_block_h, g)
    t = start_ref[0] + tc
    live = t < g.queries  # the last chunk's tail: reads clamped, p and ds masked, dq not written
    t = jnp.minimum(t, g.queries - 1)
    qv, qr = _load_query(q_ref, b, t, heads, g)
    do = do_ref[b, t, heads, :].astype(g.cdt)
    lse = lse_ref[b, t, heads]
    delta = delta_ref[b, t, heads]

    def step(j, carry):
        dqv, dqr = carry
        ok, rv, rr = _gather_rows(rows_ref, idx_ref, b, grp, t, j, bk, g)
        s = _logits(qv, qr, rv, rr, g)
        p = jnp.where(ok[None, :] & live, jnp.exp(s - lse[:, None]), 0.0)  # [hb, bk]
        dp = _dot(do, rv, g, trans_b=True)
        ds = (p * (dp - delta[:, None])).astype(g.cdt)
        slots = pl.ds(j * bk, bk)
        p_ref[b, tc, heads, slots] = p.astype(g.cdt)
        ds_ref[b, tc, heads, slots] = ds
        if qv is not None:
            dqv = dqv + _dot(ds, rv, g)
        if qr is not None:
            dqr = dqr + _dot(ds, rr, g)
        return dqv, dqr

    hb = g.head_block(g.blocks.bwd_block_h)
    init = (jnp.zeros((hb, g.v_pad), jnp.float32), jnp.zeros((hb, g.r_pad or _MIN_DOT), jnp.float32))
    dqv, dqr = jax.lax.fori_loop(0, n_blocks, step, init)

    @pl.when(live)
    def _():
        if qv is not None:
            dq_ref[b, t, heads, pl.ds(0, g.v_pad)] = (dqv * g.scale).astype(dq_ref.dtype)
        if qr is not None:
            dq_ref[b, t, heads, pl.ds(g.v_pad if g.layout.mla else 0, g.r_pad)] = (dqr * g.scale).astype(dq_ref.dtype)


def _bwd_slots_kernel(start_ref, q_ref, do_ref, p_ref, ds_ref, dslot_ref, *, g: _Geometry):
    """Kernel 2: each slot's row gradient summed over every head of its group, in float32 registers."""
    hb, bk = g.head_block(g.blocks.dkv_block_h), g.blocks.dkv_block_k
    j, tc, bg = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, grp = bg // g.layout.groups, bg % g.layout.groups
    t = jnp.minimum(start_ref[0] + tc, g.queries - 1)  # the tail's p and ds are 0: its slots get 0
    slots = pl.ds(j * bk, bk)

    def step(i, carry):
        accv, accr = carry
        heads = pl.ds(grp * g.group_pad + i * hb, hb)
        p = p_ref[b, tc, heads, slots]
        ds = ds_ref[b, tc, heads, slots]
        qv, qr = _load_query(q_ref, b, t, heads, g)
        accv = accv + _dot(p, do_ref[b, t, heads, :].astype(g.cdt), g, trans_a=True)
        if qv is not None:
            accv = accv + g.scale * _dot(ds, qv, g, trans_a=True)
        if qr is not None:
            accr = accr + g.scale * _dot(ds, qr, g, trans_a=True)
        return accv, accr

    init = (jnp.zeros((bk, g.v_pad), jnp.float32), jnp.zeros((bk, g.r_pad or _MIN_DOT), jnp.float32))
    accv, accr = jax.lax.fori_loop(0, g.group_pad // hb, step, init)
    dslot_ref[b, grp, tc, slots, pl.ds(0, g.v_pad)] = accv.astype(dslot_ref.dtype)
    if g.r_pad:
        dslot_ref[b, grp, tc, slots, pl.ds(g.v_pad, g.r_pad)] = accr.astype(dslot_ref.dtype)


def _bwd_reduce_kernel(bounds_ref, keys_ref, order_ref, dslot_ref, _dkv_in, dkv_ref, *, g: _Geometry,
                       entries: int, rows: int):
    """Kernel 3: one distinct row of the chunk; adds its slots' gradients in sorted order, then into dkv."""
    i, bg = pl.program_id(0), pl.program_id(1)
    b, grp = bg // g.layout.groups, bg % g.layout.groups
    first, end = bounds_ref[b, i], bounds_ref[b, i + 1]
    row = keys_ref[b, jnp.minimum(first, entries - 1)]

    @pl.when((first < end) & (row < rows))  # past the last distinct row, or the padding slots' row
    def _():
        def add(e, acc):
            accv, accr = acc
            slot = order_ref[b, e]
            accv = accv + dslot_ref[b, grp, slot, pl.ds(0, g.v_pad)].astype(jnp.float32)
            if g.r_pad:
                accr = accr + dslot_ref[b, grp, slot, pl.ds(g.v_pad, g.r_pad)].astype(jnp.float32)
            return accv, accr

        init = (jnp.zeros((g.v_pad,), jnp.float32), jnp.zeros((g.r_pad or _MIN_DOT,), jnp.float32))
        accv, accr = jax.lax.fori_loop(first, end, add, init)
        dkv_ref[b, row, grp, pl.ds(0, g.v_pad)] = dkv_ref[b, row, grp, pl.ds(0, g.v_pad)] + accv
        if g.r_pad:
            dkv_ref[b, row, grp, pl.ds(g.v_pad, g.r_pad)] = dkv_ref[b, row, grp, pl.ds(g.v_pad, g.r_pad)] + accr


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded: q [B,T,G*Hgp,q_width], rows [B,S,G,width], idx [B,T,k_pad])
# --------------------------------------------------------------------------------------------------

def _grid(g: _Geometry, block_h: int, B: int, T: int) -> tuple[int, int, int]:
    return (g.heads_pad // g.head_block(block_h), T, B)


def _forward(q, rows, idx, g: _Geometry):
    B, T, Hp, _ = q.shape
    bs = g.blocks
    return pl.pallas_call(
        functools.partial(_fwd_kernel, g=g, n_blocks=g.k_pad // bs.block_k),
        out_shape=(jax.ShapeDtypeStruct((B, T, Hp, g.v_pad), q.dtype),
                   jax.ShapeDtypeStruct((B, T, Hp), jnp.float32)),
        grid=_grid(g, bs.block_h, B, T),
        compiler_params=triton_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=g.interpret,
        name=f"{g.op}_fwd",
    )(q, rows, idx)


def _head_mean_probs(q, rows, idx, lse, g: _Geometry):
    B, T, _, _ = q.shape
    bs = g.blocks
    grid = _grid(g, bs.block_h, B, T)
    partial = pl.pallas_call(
        functools.partial(_probs_kernel, g=g, n_blocks=g.k_pad // bs.block_k),
        out_shape=jax.ShapeDtypeStruct((B, T, grid[0], g.k_pad), jnp.float32),
        grid=grid,
        compiler_params=triton_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=g.interpret,
        name=f"{g.op}_probs",
    )(q, rows, idx, lse)
    return jnp.sum(partial, axis=2) / (g.layout.groups * g.layout.group_heads)


def _bwd_dq(start, q, rows, idx, do, lse, delta, dq, g: _Geometry, chunk: int):
    B, _, Hp, _ = q.shape
    bs = g.blocks
    buf = jax.ShapeDtypeStruct((B, chunk, Hp, g.k_pad), g.cdt)
    return pl.pallas_call(
        functools.partial(_bwd_dq_kernel, g=g, n_blocks=g.k_pad // bs.bwd_block_k),
        out_shape=(jax.ShapeDtypeStruct(dq.shape, dq.dtype), buf, buf),
        grid=_grid(g, bs.bwd_block_h, B, chunk),
        input_output_aliases={7: 0},
        compiler_params=triton_params(num_warps=bs.bwd_num_warps, num_stages=bs.bwd_num_stages),
        interpret=g.interpret,
        name=f"{g.op}_bwd_dq",
    )(start, q, rows, idx, do, lse, delta, dq)


def _bwd_slots(start, q, do, p, ds, g: _Geometry):
    B, chunk, _, _ = p.shape
    bs = g.blocks
    G = g.layout.groups
    return pl.pallas_call(
        functools.partial(_bwd_slots_kernel, g=g),
        out_shape=jax.ShapeDtypeStruct((B, G, chunk, g.k_pad, g.width), g.cdt),
        grid=(g.k_pad // bs.dkv_block_k, chunk, B * G),
        compiler_params=triton_params(num_warps=bs.dkv_num_warps, num_stages=bs.dkv_num_stages),
        interpret=g.interpret,
        name=f"{g.op}_bwd_slots",
    )(start, q, do, p, ds)


def _row_segments(idx_chunk: jax.Array, rows: int):
    """The chunk's slots sorted by row: (bounds [B, n+1], sorted rows [B, N], slot order [B, N]).

    Distinct row i's slots are order[bounds[i]:bounds[i+1]]; padding slots sort last as row ``rows``;
    bounds past the last distinct row are N (empty). n = min(N, rows + 1) bounds the distinct rows.
    """
    B = idx_chunk.shape[0]
    keys = jnp.where(idx_chunk >= 0, idx_chunk, rows).reshape(B, -1)
    N = keys.shape[1]
    order = jnp.argsort(keys, axis=1, stable=True).astype(jnp.int32)  # equal rows keep query-then-slot order
    keys = jnp.take_along_axis(keys, order, axis=1)
    first = jnp.concatenate([jnp.ones((B, 1), bool), keys[:, 1:] != keys[:, :-1]], axis=1)
    n = min(N, rows + 1)
    bounds = jax.vmap(lambda f: jnp.nonzero(f, size=n, fill_value=N)[0])(first).astype(jnp.int32)
    return jnp.concatenate([bounds, jnp.full((B, 1), N, jnp.int32)], axis=1), keys, order


def _bwd_reduce(bounds, keys, order, dslot, dkv, g: _Geometry):
    B, G, chunk, k_pad, W = dslot.shape
    return pl.pallas_call(
        functools.partial(_bwd_reduce_kernel, g=g, entries=chunk * k_pad, rows=dkv.shape[1]),
        out_shape=jax.ShapeDtypeStruct(dkv.shape, dkv.dtype),
        grid=(bounds.shape[1] - 1, B * G),
        input_output_aliases={4: 0},
        compiler_params=triton_params(num_warps=4, num_stages=1),
        interpret=g.interpret,
        name=f"{g.op}_bwd_reduce",
    )(bounds, keys, order, dslot.reshape(B, G, chunk * k_pad, W), dkv)


# --------------------------------------------------------------------------------------------------
# differentiable core on padded arrays
# --------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attend(q, rows, idx, g: _Geometry, query_chunk: int):
    """(out [B,T,Hp,v_pad] in q's dtype, logsumexp [B,T,Hp] float32: not differentiable, internal)."""
    return _forward(q, rows, idx, g)


def _attend_fwd(q, rows, idx, g, query_chunk):
    out, lse = _forward(q, rows, idx, g)
    return (out, lse), (q, rows, idx, out, lse)


def _attend_bwd(g, query_chunk, res, cotangents):
    q, rows, idx, out, lse = res
    dout, _ = cotangents  # the logsumexp only feeds stop-gradient'ed probabilities
    B, T = q.shape[:2]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,T,Hp]
    do = dout.astype(q.dtype)
    chunk = min(query_chunk, T)
    n_chunks = -(-T // chunk)
    idx_tail = pad_axis(idx, 1, n_chunks * chunk, -1)  # the last chunk's missing queries select nothing

    def one_chunk(c, carry):
        dq, dkv = carry
        start = c * chunk
        first = jnp.reshape(start, (1,))  # the chunk's first query, as the kernels read it
        dq, p, ds = _bwd_dq(first, q, rows, idx, do, lse, delta, dq, g, chunk)
        dslot = _bwd_slots(first, q, do, p, ds, g)
        segments = _row_segments(jax.lax.dynamic_slice_in_dim(idx_tail, start, chunk, axis=1), rows.shape[1])
        return dq, _bwd_reduce(*segments, dslot, dkv, g)

    dq, dkv = jax.lax.fori_loop(0, n_chunks, one_chunk, (jnp.zeros_like(q), jnp.zeros(rows.shape, jnp.float32)))
    return dq, dkv.astype(rows.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


# --------------------------------------------------------------------------------------------------
# the implementations
# --------------------------------------------------------------------------------------------------

def attend_rows(q, rows, indices, valid, *, layout: RowLayout, scale: float, query_chunk: int,
                return_probs: bool, block_sizes: MlaTritonBlockSizes, interpret: bool):
    """The kernels on the op's own shapes; call under ``jax.jit`` with everything but the arrays static.

    q [B, T, G, Hg, Dq] (Dq = v_dim + rest when ``layout.mla``, else rest), rows [B, S, G, v_dim + rest]
    (value columns first), indices/valid [B, T, k]. Returns out [B, T, G, Hg, v_dim] in q's dtype (and
    with ``return_probs`` the head-mean probabilities [B, T, k] float32). Nothing is copied when the
    pieces are already powers of 2 and the heads fill their blocks (DeepSeek's and GLM-5's shapes).
    """
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"sparse attention triton: q must be bfloat16, float16 or float32, got {q.dtype}")
    B, T, G, Hg, _ = q.shape
    S, k = rows.shape[1], indices.shape[-1]
    bs = block_sizes
    step = max(bs.block_k, bs.bwd_block_k, bs.dkv_block_k)  # all powers of 2: a multiple of each
    g = _Geometry(layout=layout, v_pad=_pow2(layout.v_dim), r_pad=_pow2(layout.rest) if layout.rest else 0,
                  k_pad=round_up(k, step), queries=T, scale=scale, compute_dtype=jnp.dtype(q.dtype).name,
                  blocks=bs, interpret=interpret)
    # One int array carries both: -1 for padding (and invalid) slots, real indices clipped into the
    # cache like the reference's gather clamps them.
    idx = jnp.where(valid, jnp.clip(indices.astype(jnp.int32), 0, S - 1), -1)
    idx = pad_axis(idx, 2, g.k_pad, -1)
    qp = _pad_cols(q, layout.v_dim, g) if layout.mla else pad_axis(q, 4, g.r_pad)
    qp = pad_axis(qp, 3, g.group_pad).reshape(B, T, g.heads_pad, g.q_width)
    rows = _pad_cols(rows, layout.v_dim, g)
    out, lse = _attend(qp, rows, idx, g, query_chunk)
    out = out.reshape(B, T, G, g.group_pad, g.v_pad)[:, :, :, :Hg, :layout.v_dim]
    if not return_probs:
        return out
    stop = jax.lax.stop_gradient
    probs = _head_mean_probs(stop(qp), stop(rows), idx, stop(lse), g)[:, :, :k]
    return out, probs


def sparse_mla_triton(q, kv, indices, valid, *, scale: float, v_dim: int, query_chunk: int = 64,
                      return_probs: bool = False, block_sizes: MlaTritonBlockSizes | None = None,
                      interpret: bool | None = None):
    """out [B,T,Hq,v_dim] in q.dtype (and, with ``return_probs``, head-mean probabilities [B,T,k] float32).

    ``query_chunk`` queries per step of the backward (bounding its p, ds and slot-gradient buffers, about
    3.4 MB per query for DeepSeek's shape; larger chunks mean fewer sorts and launches); the forward runs
    every query in one launch. ``interpret``: None = as the platform says (``dispatch``).
    """
    return _sparse_mla_triton(q, kv, indices, valid, scale=scale, v_dim=v_dim, query_chunk=query_chunk,
                              return_probs=return_probs, block_sizes=block_sizes or MlaTritonBlockSizes(),
                              interpret=interpret if interpret is not None else triton_interpret())


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "query_chunk", "return_probs", "block_sizes",
                                             "interpret"))
def _sparse_mla_triton(q, kv, indices, valid, *, scale, v_dim, query_chunk, return_probs, block_sizes, interpret):
    B, T, H, D = q.shape
    layout = RowLayout(groups=1, group_heads=H, v_dim=v_dim, rest=D - v_dim, mla=True)
    res = attend_rows(q[:, :, None], kv[:, :, None], indices, valid, layout=layout, scale=scale,
                      query_chunk=query_chunk, return_probs=return_probs, block_sizes=block_sizes, interpret=interpret)
    out = (res[0] if return_probs else res).reshape(B, T, H, v_dim)
    return (out, res[1]) if return_probs else out
