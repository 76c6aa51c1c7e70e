"""HISA on GPU: the ``triton`` implementation (same contract and result as ``hisa_topk_reference``).

1. Block filter: the DSA scoring kernel (``dsa_topk.triton.score_keys``) against the float32
   block means, visiting only the blocks up to each query's own block (TF32 products on GPU; the
   reference's float32 einsum is TF32 there too). First and own block forced, best ``num_blocks`` kept
   (a top-k over S / block_size keys per query, plain XLA).
2. Token refinement: the kept blocks' tokens, in increasing position, go through the gathered-scoring
   kernel and the radix top-k (``candidate_topk_triton.py``).

Work per query: ``H * d * (S / B + m * B)`` instead of DSA's ``H * d * S``. When ``m`` blocks cover
every key (``m * B >= S``), HISA's result is DSA's and the DSA kernels run instead. Queries run in chunks
whose per-query buffers (block keys and candidate keys: about ``4 * (S / B + 3 * m * B)`` bytes a
query) fit ``chunk_bytes``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.block_pooling import block_means, last_eligible
from sparse_index_jax.kernels.candidate_topk_triton import refine_topk_triton
from sparse_index_jax.kernels.chunking import map_query_chunks, next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret
from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton, kernel_layout, query_block, score_keys
from sparse_index_jax.kernels.hisa_topk.reference import block_candidates, block_ranking_keys, kept_blocks
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def hisa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                     num_blocks: int, query_chunk: int, return_keys: bool = False,
                     block_sizes: DsaTritonBlockSizes | None = None, chunk_bytes: int = 1 << 30,
                     interpret: bool | None = None):
    """(indices, valid[, keys]) as ``hisa_topk_reference``; ``query_chunk`` is the reference's knob,
    ``block_sizes`` the kernels' tiles (None: ``DsaTritonBlockSizes()``)."""
    del query_chunk
    return _hisa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk,
                             block_size=block_size, num_blocks=num_blocks, return_keys=return_keys,
                             block_sizes=block_sizes or DsaTritonBlockSizes(), chunk_bytes=chunk_bytes,
                             interpret=triton_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "num_blocks", "return_keys", "block_sizes",
                                             "chunk_bytes", "interpret"))
def _hisa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk, block_size, num_blocks,
                      return_keys, block_sizes, chunk_bytes, interpret):
    B, T, H, d = q.shape
    bs = block_sizes
    means, counts = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    if num_blocks >= M:  # every block is kept: HISA is DSA (the reference's documented identity)
        return dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, topk=topk, query_chunk=0, key_chunk=0,
                               return_keys=return_keys, block_sizes=bs, chunk_bytes=chunk_bytes, interpret=interpret)
    m = num_blocks
    q, w, k, scale, _ = kernel_layout(q, w, k, k_scale, tile=1, min_heads=16)
    block_tile = min(bs.block_k, next_pow2(M))
    block_width = round_up(M, block_tile)
    means = pad_axis(pad_axis(means, 1, block_width), 2, q.shape[-1])
    ones = jnp.ones((B, block_width), jnp.float32)
    last = last_eligible(q_positions, kv_lengths)
    own = jnp.where(last >= 0, last // block_size, -1)
    bq = query_block(q.shape[2], bs.head_queries)
    Tp = round_up(T, bq)
    q, w, last, own = (pad_axis(x, 1, Tp, fill) for x, fill in ((q, 0), (w, 0), (last, -1), (own, -1)))
    per_query = 4 * (block_width + 3 * m * block_size)
    chunk = max(bq, min(Tp, chunk_bytes // (B * per_query)) // bq * bq)

    def one_chunk(q_c, w_c, last_c, own_c):
        keys = score_keys(q_c, w_c, means, ones, own_c + 1, width=block_width, bk=block_tile, bq=bq,
                          num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret)[:, :, :M]
        kept = kept_blocks(block_ranking_keys(keys, own_c, counts), m)
        cand, ok = block_candidates(kept, last_c, M, block_size)
        return refine_topk_triton(q_c, w_c, k, scale, jnp.where(ok, cand, -1), topk, return_keys=return_keys,
                                  interpret=interpret, block_sizes=bs)

    out = map_query_chunks(one_chunk, chunk, (q, 0), (w, 0), (last, -1), (own, -1))
    return jax.tree.map(lambda x: x[:, :T], out)
