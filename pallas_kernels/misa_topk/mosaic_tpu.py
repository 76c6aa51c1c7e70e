"""MISA and MISA-H on TPU: the ``mosaic_tpu`` implementation (same contract and result as the reference).

1. Routing (``reference.route_heads``, plain XLA: ``H * d * S / B`` per query, a small share of the work).
2. The routed heads' flat scan: the DSA TPU kernels (``dsa_topk.mosaic_tpu``: scoring + threshold
   search + compaction) on the ``active_heads`` routed query heads.
3. MISA-H: the ``candidates`` survivors are re-scored with ALL heads and the best ``topk`` kept
   (``reference.rerank_with_all_heads``, XLA: ``candidates`` rows per query, not S).
"""

from __future__ import annotations

import functools

import jax

from sparse_index_jax.kernels.dispatch import mosaic_tpu_interpret
from sparse_index_jax.kernels.dsa_topk.mosaic_tpu import _dsa_topk_mosaic_tpu
from sparse_index_jax.kernels.misa_topk.reference import rerank_with_all_heads, routed_heads
from sparse_index_jax.kernels.tpu_block_sizes import DsaTpuBlockSizes, dsa_block_sizes


def misa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                         active_heads: int, candidates: int | None = None, query_chunk: int, key_chunk: int,
                         return_keys: bool = False, block_sizes: DsaTpuBlockSizes | None = None,
                         chunk_bytes: int = 1 << 30, interpret=None):
    """(indices, valid[, keys]) as ``misa_topk_reference``; ``query_chunk`` sizes the routing's and the
    re-rank's chunks."""
    del key_chunk
    block_sizes = (block_sizes or dsa_block_sizes()).check()
    return _misa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk,
                                 block_size=block_size, active_heads=active_heads, candidates=candidates,
                                 query_chunk=query_chunk, return_keys=return_keys, block_sizes=block_sizes,
                                 chunk_bytes=chunk_bytes, interpret=mosaic_tpu_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "active_heads", "candidates", "query_chunk",
                                             "return_keys", "block_sizes", "chunk_bytes", "interpret"))
def _misa_topk_mosaic_tpu(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk, block_size, active_heads,
                          candidates, query_chunk, return_keys, block_sizes, chunk_bytes, interpret):
    q_routed, w_routed = routed_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, block_size=block_size,
                                      active_heads=active_heads, query_chunk=query_chunk)
    scan = functools.partial(_dsa_topk_mosaic_tpu, q_routed, k, w_routed, k_scale, q_positions, kv_lengths,
                             block_sizes=block_sizes, chunk_bytes=chunk_bytes, interpret=interpret)
    if candidates is None:
        return scan(topk=topk, return_keys=return_keys)
    idx, valid = scan(topk=candidates)
    return rerank_with_all_heads(q, w, k, k_scale, idx, valid, topk=topk, query_chunk=query_chunk,
                                 return_keys=return_keys)
