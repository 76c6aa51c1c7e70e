"""Sparse MLA attention over selected cache rows: the entry point over its implementations.

Implementations (names: ``dispatch.py``): ``xla`` (``reference.py``, gather-based), ``triton``
(``triton.py``: forward kernel with an online softmax over gathered rows, custom-VJP backward of three
kernels, deterministic, dq in q's dtype; q in bfloat16, float16 or float32), ``mosaic_tpu``
(``mosaic_tpu.py``: row DMAs driven by scalar-prefetched ids + online softmax; the backward is the
reference's; no ``return_probs``). ``auto`` skips an
implementation that cannot serve the call and says so in ``backend_for``'s reason. Tile sizes:
``block_sizes=MlaTritonBlockSizes(...)`` (triton) or ``MlaTpuBlockSizes(...)`` (mosaic_tpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.dispatch import Backend, Op
from sparse_index_jax.kernels.inputs import check_positive_int
from sparse_index_jax.kernels.sparse_mla.mosaic_tpu import MlaTpuBlockSizes, sparse_mla_mosaic_tpu
from sparse_index_jax.kernels.sparse_mla.reference import attend, dense_mla, gather_rows, sparse_mla_reference
from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes, candidate_block_sizes, sparse_mla_triton

__all__ = ["OP", "sparse_mla", "dense_mla", "backend_for", "sparse_mla_reference", "gather_rows", "attend",
           "MlaTritonBlockSizes", "candidate_block_sizes", "MlaTpuBlockSizes"]

_TRITON_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)  # of q; kv may be any float (rows cast after the gather)

OP = Op("sparse_mla", {"xla": sparse_mla_reference, "triton": sparse_mla_triton, "mosaic_tpu": sparse_mla_mosaic_tpu},
        block_sizes={"triton": MlaTritonBlockSizes, "mosaic_tpu": MlaTpuBlockSizes})


def _refusals(q_dtype, return_probs: bool) -> dict[str, str]:
    out = {}
    if jnp.dtype(q_dtype) not in _TRITON_DTYPES:
        out["triton"] = f"its kernels take q in bfloat16, float16 or float32, not {jnp.dtype(q_dtype).name}"
    if return_probs:
        out["mosaic_tpu"] = "its kernel does not return probabilities (return_probs=True)"
    return out


def backend_for(implementation: str = "auto", *, q_dtype=jnp.bfloat16, return_probs: bool = False) -> Backend:
    """The implementation a call with ``implementation`` (q of ``q_dtype``, ``return_probs``) would use here,
    with the reason."""
    return OP.backend_for(implementation, _refusals(q_dtype, return_probs))


def sparse_mla(q: jax.Array, kv: jax.Array, indices: jax.Array, valid: jax.Array, *, scale: float, v_dim: int,
               implementation: str = "auto", query_chunk: int = 64, return_probs: bool = False,
               block_sizes: MlaTritonBlockSizes | MlaTpuBlockSizes | None = None):
    """Attention of q [B,T,Hq,Dk] over the rows of kv [B,S,Dk] named by indices/valid [B,T,k].

    Returns [B,T,Hq,v_dim] in q's dtype; the value of a row is its first ``v_dim`` columns. With
    ``return_probs`` returns (out, probs) where probs [B,T,k] float32 are the attention probabilities
    of each slot averaged over heads (the indexer distillation target). ``query_chunk`` bounds the
    memory of the xla implementation and of the triton backward.
    """
    op = OP.name
    if q.ndim != 4:
        raise ValueError(f"{op}: q must have shape [B, T, Hq, Dk], got {q.shape}")
    B, T, _, D = q.shape
    if kv.ndim != 3 or kv.shape[0] != B or kv.shape[2] != D:  # kv may be stored in another float dtype
        raise ValueError(f"{op}: kv must have shape [B={B}, S, Dk={D}] to match q {q.shape}, got {kv.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (B, T) or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{op}: indices must be an int array [B={B}, T={T}, k], got {indices.shape} {indices.dtype}")
    if valid.shape != indices.shape or valid.dtype != jnp.bool_:
        raise ValueError(f"{op}: valid must be a bool array of shape {indices.shape}, got {valid.shape} {valid.dtype}")
    for name, x in (("q", q), ("kv", kv)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    v_dim = check_positive_int(op, "v_dim", v_dim)
    if v_dim > D:
        raise ValueError(f"{op}: v_dim={v_dim} exceeds the row width Dk={D}")
    query_chunk = check_positive_int(op, "query_chunk", query_chunk)
    backend = OP.backend_for(implementation, _refusals(q.dtype, return_probs))
    return OP.run(backend, q, kv, indices.astype(jnp.int32), valid, scale=float(scale), v_dim=v_dim,
                  query_chunk=query_chunk, return_probs=return_probs, block_sizes=block_sizes)
