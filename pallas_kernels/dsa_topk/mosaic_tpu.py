"""DSA scoring + exact top-k as Pallas TPU kernels (Mosaic), verified on CPU in TPU interpret mode.

Pallas TPU has no top_k, so selection is split in three exact steps:

1. **Scoring kernel** (grid: batch x query blocks x key blocks). One step scores ``block_q`` queries
   against ``block_k`` keys: per head one MXU matmul [block_q, d] x [d, block_k], ReLU, times the head
   weight, summed in float32; the int32 ranking keys (``ranking.ordered_keys``, INELIGIBLE_KEY where a
   key is in the query's future or past ``kv_lengths``) are written to HBM. Key blocks wholly after a
   query block's last position skip the matmuls.
2. **Threshold search kernel** (grid: batch x row blocks; ``search_rows`` rows of all keys in VMEM):
   the k-th largest key of each row, built bit by bit from the top, 32 passes of "how many keys are
   >= candidate". Exact whatever the distribution: nothing is binned, so nothing can overflow.
3. **Compaction** (XLA): keys above the threshold, plus the lowest-position keys equal to it until k
   are taken, scattered by prefix sum into k slots; then the k winners are ordered by key (ties by
   position). Same indices, same order, same tie rule as the reference.

Memory: the [chunk, S] keys of one query chunk live in HBM (``chunk_bytes``, default 1 GiB). FLOPs
are the reference's: 2 * H * d per (query, key) pair up to the causal limit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_index_jax.kernels.chunking import map_query_chunks, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import mosaic_tpu_interpret
from sparse_index_jax.kernels.inputs import matmul_dtype
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, ordered_keys, relu, top_k_by_key
from sparse_index_jax.kernels.tpu_block_sizes import DsaTpuBlockSizes, dsa_block_sizes

# bit b of a 32-bit word as an int32 (bit 31 is the sign bit)
_BITS = [np.array(1 << b, np.uint32).view(np.int32) for b in range(32)]


def _score_kernel(pos_ref, lim_ref, w_ref, q_ref, k_ref, ks_ref, out_ref, *, heads: int, block_k: int):
    """pos [1,bq,1] (-1: padding row), lim [1,1,1], w [1,H,bq,1], q [1,H,bq,d], k [1,bk,d], ks [1,1,bk]
    -> ranking keys [1,bq,bk]."""
    from jax.experimental import pallas as pl  # noqa: PLC0415

    first_key = pl.program_id(2) * block_k
    pos = pos_ref[0]                                                    # [bq, 1]
    key_pos = first_key + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    eligible = (key_pos <= pos) & (key_pos < lim_ref[0])                # [bq, bk]

    @pl.when(jnp.max(pos) < first_key)  # the whole key block is in every query's future
    def _():
        out_ref[0] = jnp.full(out_ref.shape[1:], INELIGIBLE_KEY, jnp.int32)

    @pl.when(jnp.max(pos) >= first_key)
    def _():
        k = k_ref[0]

        def head(h, acc):
            logits = jax.lax.dot_general(q_ref[0, h], k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)          # [bq, bk]
            return acc + relu(logits) * w_ref[0, h]

        acc = jax.lax.fori_loop(0, heads, head, jnp.zeros(out_ref.shape[1:], jnp.float32))
        out_ref[0] = jnp.where(eligible, ordered_keys(acc * ks_ref[0]), INELIGIBLE_KEY)


def _threshold_kernel(keys_ref, out_ref, *, topk: int):
    """keys [1, rows, S] -> [1, rows, 1]: the largest x with #(keys >= x) >= topk, i.e. the topk-th key."""
    keys = keys_ref[0]
    bits = jnp.zeros(out_ref.shape[1:], jnp.int32)  # the answer's bits in offset order (x ^ INT32_MIN)
    for b in range(31, -1, -1):
        candidate = bits | _BITS[b]
        count = jnp.sum((keys >= (candidate ^ INELIGIBLE_KEY)).astype(jnp.int32), axis=1, keepdims=True)
        bits = jnp.where(count >= topk, candidate, bits)
    out_ref[0] = bits ^ INELIGIBLE_KEY


def score_keys(q, k, w, k_scale, q_positions, kv_lengths, *, block_sizes: DsaTpuBlockSizes, interpret) -> jax.Array:
    """Ranking keys [B, Tp, Sp] int32 of padded queries/keys (Tp, Sp: multiples of the block sizes)."""
    from jax.experimental import pallas as pl  # noqa: PLC0415

    B, T, H, d = q.shape
    S = k.shape[1]
    bq, bk = block_sizes.block_q, block_sizes.block_k
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    dt = matmul_dtype(q, k)
    qt = pad_axis(jnp.swapaxes(q.astype(dt), 1, 2), 2, Tp)                                  # [B,H,Tp,d]
    wt = pad_axis(jnp.swapaxes(w.astype(jnp.float32), 1, 2), 2, Tp)[..., None]              # [B,H,Tp,1]
    kp = pad_axis(k.astype(dt), 1, Sp)
    ks = jnp.ones((B, S), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32)
    ks = pad_axis(ks, 1, Sp, 1.0)[:, None, :]
    pos = pad_axis(q_positions.astype(jnp.int32), 1, Tp, -1)[..., None]
    lim = kv_lengths.astype(jnp.int32).reshape(B, 1, 1)
    return pl.pallas_call(
        functools.partial(_score_kernel, heads=H, block_k=bk),
        grid=(B, Tp // bq, Sp // bk),
        in_specs=[pl.BlockSpec((1, bq, 1), lambda b, i, j: (b, i, 0)),
                  pl.BlockSpec((1, 1, 1), lambda b, i, j: (b, 0, 0)),
                  pl.BlockSpec((1, H, bq, 1), lambda b, i, j: (b, 0, i, 0)),
                  pl.BlockSpec((1, H, bq, d), lambda b, i, j: (b, 0, i, 0)),
                  pl.BlockSpec((1, bk, d), lambda b, i, j: (b, j, 0)),
                  pl.BlockSpec((1, 1, bk), lambda b, i, j: (b, 0, j))],
        out_specs=pl.BlockSpec((1, bq, bk), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, Sp), jnp.int32),
        interpret=interpret,
    )(pos, lim, wt, qt, kp, ks)


def kth_keys(keys: jax.Array, topk: int, *, rows: int, interpret) -> jax.Array:
    """[B, T, S] int32 keys -> [B, T] the topk-th largest key of each row (``rows`` rows per kernel step; T is
    padded to a multiple of it with ineligible rows)."""
    from jax.experimental import pallas as pl  # noqa: PLC0415

    B, T, Sp = keys.shape
    Tp = round_up(T, rows)
    keys = pad_axis(keys, 1, Tp, INELIGIBLE_KEY)
    out = pl.pallas_call(
        functools.partial(_threshold_kernel, topk=topk),
        grid=(B, Tp // rows),
        in_specs=[pl.BlockSpec((1, rows, Sp), lambda b, i: (b, i, 0))],
        out_specs=pl.BlockSpec((1, rows, 1), lambda b, i: (b, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, 1), jnp.int32),
        interpret=interpret,
    )(keys)
    return out[:, :T, 0]


def compact(keys: jax.Array, threshold: jax.Array, topk: int):
    """The top-``topk`` of each row given its topk-th key: (indices, valid, their keys) best first, ties by
    position."""
    above = keys > threshold[..., None]
    tie = (keys == threshold[..., None]) & (keys != INELIGIBLE_KEY)
    need = topk - jnp.sum(above, axis=-1, keepdims=True)
    chosen = above | (tie & (jnp.cumsum(tie, axis=-1) <= need))
    slot = jnp.where(chosen, jnp.cumsum(chosen, axis=-1) - 1, topk)  # unchosen -> out of range: dropped
    positions = jnp.broadcast_to(jnp.arange(keys.shape[-1], dtype=jnp.int32), keys.shape)
    lead = keys.shape[:-1]
    winners = jnp.full(lead + (topk,), -1, jnp.int32)
    scatter = lambda w, s, p: w.at[s].set(p, mode="drop")  # one row; vmapped over the leading axes
    for _ in lead:
        scatter = jax.vmap(scatter)
    winners = scatter(winners, slot, positions)
    winner_keys = jnp.where(winners >= 0, jnp.take_along_axis(keys, jnp.maximum(winners, 0), axis=-1), INELIGIBLE_KEY)
    # winners sit in position order, so top_k_by_key keeps equal keys by position (the tie rule)
    order, valid, ranked = top_k_by_key(winner_keys, topk, return_keys=True)
    return jnp.where(valid, jnp.take_along_axis(winners, jnp.maximum(order, 0), axis=-1), -1), valid, ranked


@functools.partial(jax.jit, static_argnames=("topk", "block_sizes", "chunk_bytes", "interpret", "return_keys"))
def _dsa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, *, topk, block_sizes, chunk_bytes, interpret,
                  return_keys=False):
    B, T = q.shape[:2]
    S = k.shape[1]
    kk = min(topk, S)
    Sp = round_up(S, block_sizes.block_k)
    bq = block_sizes.block_q
    rows_per_chunk = max(bq, (chunk_bytes // (4 * B * Sp)) // bq * bq)

    def one_chunk(q_c, w_c, pos_c):
        c = q_c.shape[1]
        keys = score_keys(q_c, k, w_c, k_scale, pos_c, kv_lengths, block_sizes=block_sizes, interpret=interpret)
        threshold = kth_keys(keys, kk, rows=block_sizes.search_rows, interpret=interpret)
        return compact(keys[:, :c, :S], threshold[:, :c], kk)

    idx, valid, ranked = map_query_chunks(one_chunk, min(rows_per_chunk, round_up(T, block_sizes.block_q)),
                                          (q, 0), (w, 0), (q_positions, -1))
    # fewer candidates than topk: the extra slots are padding
    idx, valid, ranked = pad_axis(idx, 2, topk, -1), pad_axis(valid, 2, topk), pad_axis(ranked, 2, topk, INELIGIBLE_KEY)
    return (idx, valid, ranked) if return_keys else (idx, valid)


def dsa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, *, topk: int, query_chunk: int = 256,
                        key_chunk: int = 1024, block_sizes: DsaTpuBlockSizes | None = None, chunk_bytes: int = 1 << 30,
                        interpret=None, return_keys: bool = False):
    """The TPU implementation behind ``dsa_topk``: (indices, valid[, ranking keys]) as the reference.
    ``query_chunk``/``key_chunk`` belong to the reference and are accepted for a uniform signature.
    ``block_sizes`` default: the current TPU generation's (v5p's off TPU)."""
    del query_chunk, key_chunk
    block_sizes = (block_sizes or dsa_block_sizes()).check()
    return _dsa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, topk=topk, block_sizes=block_sizes,
                         chunk_bytes=chunk_bytes, interpret=mosaic_tpu_interpret(interpret), return_keys=return_keys)
