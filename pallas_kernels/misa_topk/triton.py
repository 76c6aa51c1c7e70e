"""MISA and MISA-H on GPU: the ``triton`` implementation (same contract and result as the reference).

1. Routing (``reference.route_heads``, plain XLA: ``H * d * S / B`` per query, a small share of the work).
2. The routed heads' flat scan: the DSA kernels (``dsa_topk.triton``) on the ``active_heads``
   routed query heads; with few heads a scoring program takes more queries (N = 256 head queries).
3. MISA-H: the ``candidates`` survivors, put in increasing position, are re-scored with ALL heads by
   the gathered-scoring kernel and the radix top-k keeps ``topk`` (``candidate_topk_triton.py``).
"""

from __future__ import annotations

import functools

import jax

from sparse_index_jax.kernels.candidate_topk_triton import refine_topk_triton
from sparse_index_jax.kernels.chunking import map_query_chunks
from sparse_index_jax.kernels.dispatch import triton_interpret
from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton, kernel_layout
from sparse_index_jax.kernels.misa_topk.reference import routed_heads
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def misa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                     active_heads: int, candidates: int | None = None, query_chunk: int, key_chunk: int,
                     return_keys: bool = False, block_sizes: DsaTritonBlockSizes | None = None,
                     chunk_bytes: int = 1 << 30, interpret: bool | None = None):
    """(indices, valid[, keys]) as ``misa_topk_reference``; ``query_chunk`` sizes the routing's chunks,
    ``block_sizes`` are the kernels' tiles (None: ``DsaTritonBlockSizes()``)."""
    del key_chunk
    return _misa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk,
                             block_size=block_size, active_heads=active_heads, candidates=candidates,
                             query_chunk=query_chunk, return_keys=return_keys,
                             block_sizes=block_sizes or DsaTritonBlockSizes(), chunk_bytes=chunk_bytes,
                             interpret=triton_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "active_heads", "candidates", "query_chunk",
                                             "return_keys", "block_sizes", "chunk_bytes", "interpret"))
def _misa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk, block_size, active_heads,
                      candidates, query_chunk, return_keys, block_sizes, chunk_bytes, interpret):
    q_routed, w_routed = routed_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, block_size=block_size,
                                      active_heads=active_heads, query_chunk=query_chunk)
    scan = functools.partial(dsa_topk_triton, q_routed, k, w_routed, k_scale, q_positions, kv_lengths,
                             query_chunk=0, key_chunk=0, block_sizes=block_sizes, chunk_bytes=chunk_bytes,
                             interpret=interpret)
    if candidates is None:
        return scan(topk=topk, return_keys=return_keys)
    cand, _ = scan(topk=candidates, position_order=True)  # the re-rank's ties go to the lower position
    B, T = q.shape[:2]
    q, w, k, scale, _ = kernel_layout(q, w, k, k_scale, tile=1, min_heads=16)
    chunk = max(1, min(T, chunk_bytes // (B * 12 * candidates)))

    def rerank(q_c, w_c, cand_c):
        return refine_topk_triton(q_c, w_c, k, scale, cand_c, topk, return_keys=return_keys, interpret=interpret,
                                  block_sizes=block_sizes)

    return map_query_chunks(rerank, chunk, (q, 0), (w, 0), (cand, -1))
