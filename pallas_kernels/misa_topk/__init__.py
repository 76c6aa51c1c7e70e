"""MISA / MISA-H: a router picks a few indexer heads per query; MISA-H re-ranks with all heads.

Implementations: ``pallas`` (``pallas_gpu.py``: routing in XLA, the DSA kernels on the routed heads, the
gathered re-rank kernel for MISA-H; compiled on GPU, interpreted on CPU; on TPU ``pallas_tpu.py``: the
DSA TPU kernels on the routed heads, the MISA-H re-rank in XLA) and ``xla`` (``reference.py``, plain JAX,
every platform).
"""

from __future__ import annotations

import jax

from pallas_kernels.blocks import check_block_sums, pool_block_sums
from pallas_kernels.common import (Backend, check_indexer_inputs, check_positive_int, choose_backend,
                                   implementations_here)
from pallas_kernels.misa_topk.pallas_gpu import misa_topk_pallas
from pallas_kernels.misa_topk.pallas_tpu import misa_topk_pallas_tpu
from pallas_kernels.misa_topk.reference import misa_topk_reference, route_heads

__all__ = ["misa_topk", "misa_options", "default_candidates", "backend_for", "misa_topk_reference", "route_heads"]

_OP = "misa_topk"
def _implementation(name: str):
    if name == "xla":
        return misa_topk_reference
    return misa_topk_pallas_tpu if jax.default_backend() == "tpu" else misa_topk_pallas


def backend_for(implementation: str = "auto") -> Backend:
    """The implementation a call with ``implementation`` would use here, with the reason."""
    return choose_backend(_OP, implementation, implementations_here(True, has_tpu_kernel=True))


def default_candidates(topk: int) -> int:
    """MISA-H's routed pass keeps 4 * topk candidates unless told otherwise (the paper's setting)."""
    return 4 * topk


def misa_options(topk: int, num_heads: int, active_heads: int = 8, block_size: int = 1024,
                 candidates: int | None = None, query_chunk: int = 64, key_chunk: int = 1024) -> dict:
    """Validated MISA / MISA-H options (shared by the single-device and context-parallel paths)."""
    topk = check_positive_int(_OP, "topk", topk)
    active_heads = check_positive_int(_OP, "active_heads", active_heads)
    block_size = check_positive_int(_OP, "block_size", block_size)
    query_chunk = check_positive_int(_OP, "query_chunk", query_chunk)
    key_chunk = check_positive_int(_OP, "key_chunk", key_chunk)
    if active_heads > num_heads:
        raise ValueError(f"{_OP}: active_heads={active_heads} exceeds the {num_heads} indexer heads of q")
    if candidates is not None:
        candidates = check_positive_int(_OP, "candidates", candidates)
        if candidates < topk:
            raise ValueError(f"{_OP}: candidates={candidates} must be >= topk={topk} (MISA-H re-ranks them to "
                             f"keep topk); the usual choice is 4 * topk")
    return dict(topk=topk, block_size=block_size, active_heads=active_heads, candidates=candidates,
                query_chunk=query_chunk, key_chunk=key_chunk)


def misa_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, active_heads: int = 8,
              block_size: int = 1024, candidates: int | None = None, k_scale: jax.Array | None = None,
              q_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
              block_sums: jax.Array | None = None, implementation: str = "auto", query_chunk: int = 64,
              key_chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """MISA top-k (``candidates=None``) or MISA-H (``candidates`` keys re-ranked with all heads).

    See ``sparse_index_jax.select_topk`` for the contract and ``reference.py`` for the algorithm.
    """
    q_positions, kv_lengths = check_indexer_inputs(_OP, q, k, w, k_scale, q_positions, kv_lengths)
    options = misa_options(topk, q.shape[2], active_heads, block_size, candidates, query_chunk, key_chunk)
    if block_sums is None:
        block_sums = pool_block_sums(k, k_scale, kv_lengths, options["block_size"])
    check_block_sums(_OP, block_sums, k, options["block_size"])
    run = _implementation(backend_for(implementation).name)
    return run(q, k, w, k_scale, q_positions, kv_lengths, block_sums, **options)
