"""HISA on TPU: the ``mosaic_tpu`` implementation (same contract and result as the reference).

1. Block filter: the DSA scoring kernel (``dsa_topk.mosaic_tpu``) on the float32 block means, a block
   being eligible up to the query's own block; the first and own blocks are forced (+inf); the
   threshold-search kernel and compaction keep ``num_blocks`` blocks, then put them in block order.
2. Refinement kernel (grid: batch x query x kept block): the kept block ids are scalar-prefetched into
   SMEM and drive the key DMA (the BlockSpec's index map reads them), so each step brings exactly one
   kept block of keys into VMEM and scores it with all heads: [H, d] x [d, block] on the MXU, ReLU,
   then the head sum as a [1, H] x [H, block] product. It writes ranking keys per candidate.
3. Top-k of the candidates: threshold search + compaction again; candidates are in increasing
   position, so ties go to the lower position, as everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.block_pooling import block_means, last_eligible
from sparse_index_jax.kernels.chunking import map_query_chunks, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import mosaic_tpu_interpret
from sparse_index_jax.kernels.dsa_topk.mosaic_tpu import compact, kth_keys, score_keys
from sparse_index_jax.kernels.hisa_topk.reference import block_ranking_keys
from sparse_index_jax.kernels.inputs import matmul_dtype
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, ordered_keys, relu
from sparse_index_jax.kernels.tpu_block_sizes import LANES, DsaTpuBlockSizes, dsa_block_sizes


def _refine_kernel(kept_ref, last_ref, q_ref, w_ref, k_ref, ks_ref, out_ref, *, block_size: int):
    """kept [B,c,m] and last [B,c] in SMEM; q [1,1,H,d], w [1,1,1,H], k [1,bs,d], ks [1,1,bs] -> keys [1,1,1,1,bs]."""
    from jax.experimental import pallas as pl  # noqa: PLC0415

    b, t, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block = kept_ref[b, t, j]
    logits = jax.lax.dot_general(q_ref[0, 0], k_ref[0], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)                         # [H, bs]
    scores = jnp.dot(w_ref[0, 0], relu(logits), preferred_element_type=jnp.float32) * ks_ref[0]
    position = block * block_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    ok = (block >= 0) & (position <= last_ref[b, t])
    out_ref[0, 0, 0] = jnp.where(ok, ordered_keys(scores), INELIGIBLE_KEY)


def refine_keys(q, w, k, k_scale, kept, last, *, block_size: int, interpret) -> jax.Array:
    """Ranking keys [B, c, m * block_size] of the kept blocks' tokens (-1 blocks and tokens after ``last``:
    INELIGIBLE_KEY). q [B,c,H,d], w [B,c,H], k [B,S,d], kept [B,c,m] int32 (block order), last [B,c]."""
    from jax.experimental import pallas as pl  # noqa: PLC0415
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    B, c, H, d = q.shape
    m = kept.shape[-1]
    S = k.shape[1]
    Sp = round_up(S, block_size)
    dt = matmul_dtype(q, k)
    kp = pad_axis(k.astype(dt), 1, Sp)
    ks = jnp.ones((B, S), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32)
    ks = pad_axis(ks, 1, Sp, 1.0)[:, None, :]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, c, m),
        in_specs=[pl.BlockSpec((1, 1, H, d), lambda b, t, j, kept, last: (b, t, 0, 0)),
                  pl.BlockSpec((1, 1, 1, H), lambda b, t, j, kept, last: (b, t, 0, 0)),
                  pl.BlockSpec((1, block_size, d), lambda b, t, j, kept, last: (b, jnp.maximum(kept[b, t, j], 0), 0)),
                  pl.BlockSpec((1, 1, block_size), lambda b, t, j, kept, last: (b, 0, jnp.maximum(kept[b, t, j], 0)))],
        out_specs=pl.BlockSpec((1, 1, 1, 1, block_size), lambda b, t, j, kept, last: (b, t, j, 0, 0)))
    keys = pl.pallas_call(
        functools.partial(_refine_kernel, block_size=block_size), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, c, m, 1, block_size), jnp.int32), interpret=interpret,
    )(kept.astype(jnp.int32), last.astype(jnp.int32), q.astype(dt), w.astype(jnp.float32)[:, :, None, :], kp, ks)
    return keys.reshape(B, c, m * block_size)


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "num_blocks", "query_chunk", "block_sizes",
                                             "interpret", "return_keys"))
def _hisa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk, block_size, num_blocks,
                   query_chunk, block_sizes, interpret, return_keys):
    B, T = q.shape[:2]
    means, counts = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    m = min(num_blocks, M)
    nonempty = (kv_lengths + block_size - 1) // block_size
    chunk = round_up(min(query_chunk, T), block_sizes.block_q)
    kk = min(topk, m * block_size)

    def one_chunk(q_c, w_c, pos_c):
        c = q_c.shape[1]
        last = last_eligible(pos_c, kv_lengths)
        own = jnp.where(last >= 0, last // block_size, -1)
        # 1. block filter: DSA scores of the means, eligible up to the own block; first and own forced
        keys = score_keys(q_c, means, w_c, None, own, nonempty, block_sizes=block_sizes, interpret=interpret)[:, :c, :M]
        keys = block_ranking_keys(keys, own, counts)
        kept, kept_ok, _ = compact(keys, kth_keys(keys, m, rows=block_sizes.search_rows, interpret=interpret), m)
        kept = jnp.sort(jnp.where(kept_ok, kept, M), axis=-1)   # block order: candidates in increasing position
        kept = jnp.where(kept < M, kept, -1)
        # 2. refinement of the kept blocks' tokens, 3. top-k of the candidates
        cand = refine_keys(q_c, w_c, k, k_scale, kept, last, block_size=block_size, interpret=interpret)
        slots, valid, ranked = compact(cand, kth_keys(cand, kk, rows=block_sizes.search_rows, interpret=interpret), kk)
        safe = jnp.maximum(slots, 0)
        block = jnp.take_along_axis(kept, safe // block_size, axis=-1)
        positions = jnp.where(valid, block * block_size + safe % block_size, -1)
        return positions, valid, ranked

    idx, valid, ranked = map_query_chunks(one_chunk, chunk, (q, 0), (w, 0), (q_positions, -1))
    # fewer candidates than topk: the extra slots are padding
    idx, valid, ranked = pad_axis(idx, 2, topk, -1), pad_axis(valid, 2, topk), pad_axis(ranked, 2, topk, INELIGIBLE_KEY)
    return (idx, valid, ranked) if return_keys else (idx, valid)


def hisa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                         num_blocks: int, query_chunk: int, block_sizes: DsaTpuBlockSizes | None = None, interpret=None,
                         return_keys: bool = False):
    """(indices, valid[, keys]) as ``hisa_topk_reference``. ``block_size`` is HISA's (lane-aligned: a
    multiple of 128 on a real TPU; any size in interpret mode)."""
    block_sizes = (block_sizes or dsa_block_sizes()).check()
    interpret = mosaic_tpu_interpret(interpret)
    if interpret is False and block_size % LANES:  # compiled: a key block's scales fill whole lanes
        raise ValueError(f"hisa_topk: the TPU kernels need block_size to be a multiple of {LANES} (lanes), got "
                         f"{block_size}; HISA's usual 128 works")
    return _hisa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk,
                                 block_size=block_size, num_blocks=num_blocks, query_chunk=query_chunk,
                                 block_sizes=block_sizes, interpret=interpret, return_keys=return_keys)
