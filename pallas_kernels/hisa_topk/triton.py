"""HISA on GPU: the ``triton`` implementation (same contract and result as ``hisa_topk_reference``).

1. Block filter, in a kernel: the fused streaming DSA kernel (``dsa_topk.triton.stream_select``) scores
   the float32 block means (TF32 products on GPU; the reference's float32 einsum is TF32 there too) of
   the blocks strictly between the first and each query's own block, and keeps the best
   ``num_blocks - 2`` in position order; the first and the own block are forced. No [T, S / B] array.
2. Token refinement, in a kernel: the same streaming kernel walks each query's kept blocks
   (``units``, runs of ``block_size`` keys). A program of ``bq`` queries loads every key block that
   some of its queries kept, once, whole and contiguous, scores it for all of them with one
   tensor-core dot, and each query keeps the keys of its own blocks; exact top-k in the kernel, out
   in the contract's order.

Work per query: ``H * d * (S / B + m * B)`` instead of DSA's ``H * d * S`` (a key block kept by
several queries of a program is scored once for all of them; one kept by a single query is scored for
all ``bq``: up to ``bq`` times the work when neighbouring queries disagree). When ``m`` blocks cover
every key (``m * B >= S``), HISA's result is DSA's and the DSA kernel runs instead. Queries run in
chunks whose buffers (``stream_bytes_per_query`` of each pass) fit ``chunk_bytes``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.block_pooling import block_means, last_eligible
from sparse_index_jax.kernels.dispatch import triton_interpret
from sparse_index_jax.kernels.dsa_topk.triton import NO_UNIT, dsa_topk_triton
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
    means, _ = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    select = functools.partial(dsa_topk_triton, query_chunk=0, key_chunk=0, block_sizes=block_sizes,
                               chunk_bytes=chunk_bytes, interpret=interpret)
    if num_blocks >= M:  # every block is kept: HISA is DSA (the reference's documented identity)
        return select(q, k, w, k_scale, q_positions, kv_lengths, topk=topk, return_keys=return_keys)
    last = last_eligible(q_positions, kv_lengths)
    own = jnp.where(last >= 0, last // block_size, -1)
    kept = [jnp.where(own >= 0, 0, NO_UNIT)[..., None], jnp.where(own >= 1, own, NO_UNIT)[..., None]]
    if num_blocks > 2:
        # The block means of blocks 1 .. M-1 as keys; query t may see blocks 1 .. own - 1 (position own - 2).
        best, _ = select(q, means[:, 1:], w, None, own - 2, jnp.full_like(kv_lengths, M - 1), topk=num_blocks - 2,
                         position_order=True)
        kept.append(jnp.where(best >= 0, best + 1, NO_UNIT))
    kept = jnp.sort(jnp.concatenate(kept, axis=-1), axis=-1)
    return select(q, k, w, k_scale, q_positions, kv_lengths, topk=topk, return_keys=return_keys, units=kept,
                  unit=block_size)
