"""Exact top-k of long int32 key rows on GPU (Pallas, Triton lowering): a radix select.

Reference: ``ranking.top_k_by_key`` (``lax.top_k`` on the same keys). The result is the same set under
the same tie rule (higher key first, equal keys: lower position first) and the kernel never drops a
candidate: it finds the exact k-th largest key, then emits every key above it and as many of the keys
equal to it as are still needed, lowest positions first. There are no histogram bins that can
overflow, so there is nothing to truncate.

One program per row, streaming the row in tiles of ``tile`` keys:

* 8 counting passes, one per 4-bit digit of the key (most significant first). Pass r counts, for each
  of the 16 digit values, the keys whose higher digits equal the prefix found so far; the digit where
  the running count from the top reaches the number still wanted extends the prefix. After 8 passes
  the prefix IS the k-th largest key and the count left over is how many keys equal to it to take.
* 1 emitting pass: keys above the threshold, and the first ``wanted`` keys equal to it, are written in
  position order (a prefix sum inside each tile gives each one its output slot).

Once the keys still matching the prefix number at most ``bucket`` (8192), the next pass also copies
them into a per-row scratch bucket and the remaining counting passes read only that. Compute is 16
comparisons per key per pass. Output slots are in POSITION order; the caller orders the k winners by
key (a sort of k, not of the row).

Only the first ``limits[row]`` keys of a row take part (a causal prefix: what lies beyond may be
uninitialised), and keys equal to ``INELIGIBLE_KEY`` never do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from sparse_index_jax.kernels.chunking import round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.radix_select import BINS, ROUNDS, digit_hits, narrow_prefix, output_columns, padding_slots
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def _select_kernel(limit_ref, keys_ref, out_ref, bucket_ref, *, topk: int, tile: int, out_tile: int,
                   out_len: int, cap: int, barrier: bool):
    b, t = pl.program_id(0), pl.program_id(1)
    n = limit_ref[b, t]
    n_tiles = (n + tile - 1) // tile
    lane = jax.lax.iota(jnp.int32, tile)

    def load(j):
        key = keys_ref[b, t, pl.ds(j * tile, tile)]
        ok = (j * tile + lane < n) & (key != INELIGIBLE_KEY)
        return key, ok

    # Radix select (``digit_hits``, ``narrow_prefix``). Once the keys still matching the prefix number at
    # most ``cap``, the next full pass also copies them to ``bucket_ref`` and the remaining passes read
    # only that bucket.
    prefix = jnp.int32(0)
    wanted = selected = jnp.int32(0)
    in_bucket = jnp.int32(0)          # keys in the bucket; 0 = not compacted (yet)
    matching = n                      # keys matching the prefix (an upper bound before round 0)
    for r in range(ROUNDS):
        compact = (r > 0) & (in_bucket == 0) & (matching <= cap) & (matching > 0)
        if barrier and r > 1:
            pl_triton.debug_barrier()  # bucket writes of the last pass are visible to every thread

        def count_keys(key, ok, carry, prefix=prefix, r=r):
            counts, n_ok = carry  # per lane: the cross-lane sums happen once per pass, not per tile
            hits, match = digit_hits(key, ok, prefix, r)
            return (counts + hits, n_ok + ok.astype(jnp.int32)), match

        def full_pass(j, carry, compact=compact, count_keys=count_keys):
            counts, n_ok, written = carry
            key, ok = load(j)
            (counts, n_ok), match = count_keys(key, ok, (counts, n_ok))
            keep = match & compact
            slot = written + jnp.cumsum(keep.astype(jnp.int32)) - 1
            bucket_ref[b, t, jnp.where(keep, slot, cap)] = key
            return counts, n_ok, written + jnp.sum(keep.astype(jnp.int32))

        def bucket_pass(j, carry, count_keys=count_keys, in_bucket=in_bucket):
            counts, n_ok, written = carry
            key = bucket_ref[b, t, pl.ds(j * tile, tile)]
            (counts, n_ok), _ = count_keys(key, j * tile + lane < in_bucket, (counts, n_ok))
            return counts, n_ok, written

        zeros = (jnp.zeros((BINS, tile), jnp.int32), jnp.zeros((tile,), jnp.int32), jnp.int32(0))
        carry = jax.lax.fori_loop(0, jnp.where(in_bucket > 0, 0, n_tiles), full_pass, zeros)
        counts, n_ok, written = jax.lax.fori_loop(0, (in_bucket + tile - 1) // tile, bucket_pass, carry)
        in_bucket = jnp.where(compact, written, in_bucket)
        counts, n_ok = jnp.sum(counts, axis=1), jnp.sum(n_ok)
        if r == 0:
            wanted = jnp.minimum(n_ok, topk)
            selected = wanted
        prefix, wanted, matching = narrow_prefix(counts, wanted, prefix, r)

    threshold = prefix ^ INELIGIBLE_KEY  # the k-th largest key; ``wanted`` keys equal to it are still to take

    def emit(j, carry):
        written, equal_seen = carry
        key, ok = load(j)
        above = ok & (key > threshold)
        equal = ok & (key == threshold)
        equal_rank = equal_seen + jnp.cumsum(equal.astype(jnp.int32))
        take = above | (equal & (equal_rank <= wanted))
        slot = written + jnp.cumsum(take.astype(jnp.int32)) - 1
        out_ref[b, t, jnp.where(take, slot, out_len - 1)] = jnp.where(take, j * tile + lane, -1)
        return written + jnp.sum(take.astype(jnp.int32)), equal_seen + jnp.sum(equal.astype(jnp.int32))

    # Slots past the selected count get -1; they are disjoint from the emitted ones, so the two writes
    # need no ordering. Lanes with nothing to write aim at the spare last column ``out_len - 1``.
    for slots in padding_slots(selected, out_tile, out_len):
        out_ref[b, t, slots] = jnp.full((out_tile,), -1, jnp.int32)
    jax.lax.fori_loop(0, n_tiles, emit, (jnp.int32(0), jnp.int32(0)))


def radix_topk_rows(keys: jax.Array, limits: jax.Array, topk: int, *, tile: int = DsaTritonBlockSizes.radix_tile,
                    bucket: int = DsaTritonBlockSizes.radix_bucket, num_warps: int = DsaTritonBlockSizes.num_warps,
                    interpret: bool | None = None) -> jax.Array:
    """Positions [B, R, topk] int32 (position order, -1 padded) of the top-``topk`` keys of each row of
    ``keys`` [B, R, n] int32 among its first ``limits`` [B, R] entries, ignoring ``INELIGIBLE_KEY``.

    ``n`` must be a multiple of ``tile`` (a power of two). Same set as ``top_k_by_key`` on the masked row.
    """
    B, R, n = keys.shape
    if n % tile or tile & (tile - 1):
        raise ValueError(f"radix_topk_rows: row length {n} must be a multiple of tile={tile} (a power of two)")
    out_tile, out_len = output_columns(topk)
    interpret = triton_interpret(interpret)
    cap = round_up(bucket, tile)
    kernel = functools.partial(_select_kernel, topk=topk, tile=tile, out_tile=out_tile, out_len=out_len, cap=cap,
                               barrier=not interpret)
    out, _ = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, R, out_len), jnp.int32),
                   jax.ShapeDtypeStruct((B, R, cap + tile), jnp.int32)),  # bucket (+ a spare column)
        grid=(B, R),
        compiler_params=triton_params(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="radix_topk",
    )(limits.astype(jnp.int32), keys)
    return out[:, :, :topk]
