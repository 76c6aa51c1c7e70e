"""HISA: block-level coarse filter, then token-level top-k over the kept blocks. One entry point.

Implementations: ``pallas`` (``pallas_gpu.py``: DSA scoring kernel on block means, then gathered
refinement and radix top-k kernels; compiled on GPU, interpreted on CPU; on TPU ``pallas_tpu.py``: the
TPU scoring and threshold-search kernels on block means, then a refinement kernel whose scalar-prefetched
block ids drive the key DMA) and ``xla`` (``reference.py``, plain JAX, every platform).
"""

from __future__ import annotations

import jax

from pallas_kernels.blocks import check_block_sums, pool_block_sums
from pallas_kernels.common import (Backend, check_indexer_inputs, check_positive_int, choose_backend,
                                   implementations_here)
from pallas_kernels.hisa_topk.pallas_gpu import hisa_topk_pallas
from pallas_kernels.hisa_topk.pallas_tpu import hisa_topk_pallas_tpu
from pallas_kernels.hisa_topk.reference import hisa_topk_reference

__all__ = ["hisa_topk", "hisa_options", "backend_for", "hisa_topk_reference"]

_OP = "hisa_topk"
def _implementation(name: str):
    if name == "xla":
        return hisa_topk_reference
    return hisa_topk_pallas_tpu if jax.default_backend() == "tpu" else hisa_topk_pallas


def backend_for(implementation: str = "auto") -> Backend:
    """The implementation a call with ``implementation`` would use here, with the reason."""
    return choose_backend(_OP, implementation, implementations_here(True, has_tpu_kernel=True))


def hisa_options(topk: int, block_size: int = 128, num_blocks: int = 64, query_chunk: int = 32) -> dict:
    """Validated HISA options (shared by the single-device and context-parallel paths)."""
    topk = check_positive_int(_OP, "topk", topk)
    block_size = check_positive_int(_OP, "block_size", block_size)
    num_blocks = check_positive_int(_OP, "num_blocks", num_blocks)
    query_chunk = check_positive_int(_OP, "query_chunk", query_chunk)
    if num_blocks < 2:
        raise ValueError(f"{_OP}: num_blocks must be >= 2 (the first and the query's own block are always kept), "
                         f"got {num_blocks}")
    if (num_blocks - 1) * block_size < topk:
        raise ValueError(
            f"{_OP}: (num_blocks - 1) * block_size = {(num_blocks - 1) * block_size} < topk={topk}. The query's own "
            f"block may hold a single eligible token, so only the other num_blocks - 1 full blocks guarantee topk "
            f"candidates; raise num_blocks or block_size")
    return dict(topk=topk, block_size=block_size, num_blocks=num_blocks, query_chunk=query_chunk)


def hisa_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, block_size: int = 128, num_blocks: int = 64,
              k_scale: jax.Array | None = None, q_positions: jax.Array | None = None,
              kv_lengths: jax.Array | None = None, block_sums: jax.Array | None = None,
              implementation: str = "auto", query_chunk: int = 32) -> tuple[jax.Array, jax.Array]:
    """HISA top-k; see ``sparse_index_jax.select_topk`` for the contract and ``reference.py`` for the algorithm.

    ``block_sums`` [B, ceil(S/block_size), d] float32: pooled key sums kept by a decode cache; computed
    from ``k`` when omitted.
    """
    options = hisa_options(topk, block_size, num_blocks, query_chunk)
    q_positions, kv_lengths = check_indexer_inputs(_OP, q, k, w, k_scale, q_positions, kv_lengths)
    if block_sums is None:
        block_sums = pool_block_sums(k, k_scale, kv_lengths, options["block_size"])
    check_block_sums(_OP, block_sums, k, options["block_size"])
    run = _implementation(backend_for(implementation).name)
    return run(q, k, w, k_scale, q_positions, kv_lengths, block_sums, **options)
