"""Sparse MLA attention over selected cache rows: one entry point over its implementations.

Implementations: ``pallas`` (on GPU ``pallas_gpu.py``: Triton-lowered forward kernel with an online
softmax over gathered rows, custom-VJP backward kernel, also interpreted on CPU for tests; on TPU
``pallas_tpu.py``: DMA gather of the selected rows + online softmax, backward by the reference; q in
bfloat16, float16 or float32) and ``xla`` (``reference.py``, gather-based, every platform). ``auto``
takes the best one available on the current platform (GPU and TPU: ``pallas``; CPU: ``xla``), and
falls back to ``xla`` for query dtypes the kernel does not take (and, on TPU, for ``return_probs``);
``backend_for`` says which and why.
Tile sizes: ``sparse_mla_pallas(..., block_sizes=BlockSizes(...))``; ``candidate_block_sizes()`` lists
the variants worth timing on an H100.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import Backend, check_positive_int, choose_backend, implementations_here
from pallas_kernels.sparse_mla.pallas_gpu import BlockSizes, candidate_block_sizes, sparse_mla_pallas
from pallas_kernels.sparse_mla.pallas_tpu import MlaTpuBlockSizes, sparse_mla_pallas_tpu
from pallas_kernels.sparse_mla.reference import attend, gather_rows, sparse_mla_reference

__all__ = ["sparse_mla", "backend_for", "sparse_mla_reference", "sparse_mla_pallas", "gather_rows", "attend",
           "BlockSizes", "candidate_block_sizes", "MlaTpuBlockSizes", "sparse_mla_pallas_tpu"]

_OP = "sparse_mla"
_PALLAS_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)  # of q; kv may be any float (rows cast after the gather)


def backend_for(implementation: str = "auto") -> Backend:
    """The implementation a call with ``implementation`` would use here, with the reason."""
    return choose_backend(_OP, implementation, implementations_here(True, has_tpu_kernel=True))


def sparse_mla(q: jax.Array, kv: jax.Array, indices: jax.Array, valid: jax.Array, *, scale: float, v_dim: int,
               implementation: str = "auto", query_chunk: int = 64, return_probs: bool = False):
    """Attention of q [B,T,Hq,Dk] over the rows of kv [B,S,Dk] named by indices/valid [B,T,k].

    Returns [B,T,Hq,v_dim] in q's dtype; the value of a row is its first ``v_dim`` columns. With
    ``return_probs`` returns (out, probs) where probs [B,T,k] float32 are the attention probabilities
    of each slot averaged over heads (the indexer distillation target).
    """
    if q.ndim != 4:
        raise ValueError(f"{_OP}: q must have shape [B, T, Hq, Dk], got {q.shape}")
    B, T, _, D = q.shape
    if kv.ndim != 3 or kv.shape[0] != B or kv.shape[2] != D:  # kv may be stored in another float dtype
        raise ValueError(f"{_OP}: kv must have shape [B={B}, S, Dk={D}] to match q {q.shape}, got {kv.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (B, T) or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{_OP}: indices must be an int array [B={B}, T={T}, k], got {indices.shape} {indices.dtype}")
    if valid.shape != indices.shape or valid.dtype != jnp.bool_:
        raise ValueError(f"{_OP}: valid must be a bool array of shape {indices.shape}, got {valid.shape} {valid.dtype}")
    for name, x in (("q", q), ("kv", kv)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{_OP}: {name} must be floating point, got {x.dtype}")
    v_dim = check_positive_int(_OP, "v_dim", v_dim)
    if v_dim > D:
        raise ValueError(f"{_OP}: v_dim={v_dim} exceeds the row width Dk={D}")
    query_chunk = check_positive_int(_OP, "query_chunk", query_chunk)
    name = backend_for(implementation).name
    if name == "pallas" and q.dtype not in _PALLAS_DTYPES:
        if implementation == "pallas":
            raise TypeError(f"{_OP}: the pallas implementation takes q in bfloat16, float16 or float32, got "
                            f"{q.dtype}; use implementation='xla' or 'auto'")
        name = "xla"
    tpu = jax.default_backend() == "tpu"
    if name == "pallas" and tpu and return_probs:
        if implementation == "pallas":
            raise ValueError(f"{_OP}: the TPU kernel does not return probabilities; use implementation='xla' or "
                             f"'auto' for return_probs=True")
        name = "xla"
    run = {"xla": sparse_mla_reference, "pallas": sparse_mla_pallas_tpu if tpu else sparse_mla_pallas}[name]
    return run(q, kv, indices.astype(jnp.int32), valid, scale=float(scale), v_dim=v_dim, query_chunk=query_chunk,
               return_probs=return_probs)
