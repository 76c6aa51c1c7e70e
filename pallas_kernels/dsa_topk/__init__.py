"""DSA lightning-indexer scoring + exact top-k: one entry point over its implementations.

Implementations: ``pallas`` (on GPU ``pallas_gpu.py``: fused scoring kernel + radix top-k kernel, also
interpreted on CPU for tests; on TPU ``pallas_tpu.py``: scoring kernel + threshold-search kernel + XLA
compaction, tested in TPU interpret mode) and ``xla`` (``reference.py``, plain JAX, every platform).
``auto`` takes the best one available on the current platform and ``backend_for`` says which and why.
"""

from __future__ import annotations

import jax

from pallas_kernels.common import (Backend, check_indexer_inputs, check_positive_int, choose_backend,
                                   implementations_here)
from pallas_kernels.dsa_topk.pallas_gpu import dsa_topk_pallas
from pallas_kernels.dsa_topk.pallas_tpu import dsa_topk_pallas_tpu
from pallas_kernels.dsa_topk.reference import dsa_topk_reference, eligibility, index_scores

__all__ = ["dsa_topk", "backend_for", "index_scores", "eligibility", "dsa_topk_reference"]

_OP = "dsa_topk"


def _implementation(name: str):
    if name == "xla":
        return dsa_topk_reference
    return dsa_topk_pallas_tpu if jax.default_backend() == "tpu" else dsa_topk_pallas


def backend_for(implementation: str = "auto") -> Backend:
    """The implementation a call with ``implementation`` would use here, with the reason."""
    return choose_backend(_OP, implementation, implementations_here(True, has_tpu_kernel=True))


def dsa_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, k_scale: jax.Array | None = None,
             q_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
             implementation: str = "auto", query_chunk: int = 256, key_chunk: int = 1024
             ) -> tuple[jax.Array, jax.Array]:
    """Top-``topk`` keys per query by DSA score; see ``sparse_index_jax.select_topk`` for the contract."""
    topk = check_positive_int(_OP, "topk", topk)
    query_chunk = check_positive_int(_OP, "query_chunk", query_chunk)
    key_chunk = check_positive_int(_OP, "key_chunk", key_chunk)
    q_positions, kv_lengths = check_indexer_inputs(_OP, q, k, w, k_scale, q_positions, kv_lengths)
    run = _implementation(backend_for(implementation).name)
    return run(q, k, w, k_scale, q_positions, kv_lengths, topk=topk, query_chunk=query_chunk, key_chunk=key_chunk)
