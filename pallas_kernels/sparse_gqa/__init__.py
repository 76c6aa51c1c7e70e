"""Sparse GQA attention over selected keys (the Llama-family retrofit): the entry point over its implementations.

Implementations (names: ``dispatch.py``): ``xla`` (``reference.py``, gather-based) and ``triton``
(``triton.py``: the sparse MLA kernels on [value | key] rows per KV group; forward, lean deterministic
backward, head-mean probabilities; q in bfloat16, float16 or float32). There is no TPU kernel: on TPU
``auto`` takes ``xla``. Tile sizes: ``block_sizes=MlaTritonBlockSizes(...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.dispatch import Backend, Op
from sparse_index_jax.kernels.inputs import check_positive_int
from sparse_index_jax.kernels.sparse_gqa.reference import grouped, softmax_out, sparse_gqa_reference
from sparse_index_jax.kernels.sparse_gqa.triton import sparse_gqa_triton
from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes

__all__ = ["OP", "sparse_gqa", "backend_for", "sparse_gqa_reference", "grouped", "softmax_out"]

_TRITON_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

OP = Op("sparse_gqa", {"xla": sparse_gqa_reference, "triton": sparse_gqa_triton},
        block_sizes={"triton": MlaTritonBlockSizes})


def _refusals(q_dtype) -> dict[str, str]:
    if jnp.dtype(q_dtype) not in _TRITON_DTYPES:
        return {"triton": f"its kernels take q in bfloat16, float16 or float32, not {jnp.dtype(q_dtype).name}"}
    return {}


def backend_for(implementation: str = "auto", *, q_dtype=jnp.bfloat16) -> Backend:
    """The implementation a call with ``implementation`` (q of ``q_dtype``) would use here, with the reason."""
    return OP.backend_for(implementation, _refusals(q_dtype))


def sparse_gqa(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, valid: jax.Array, *, scale: float,
               implementation: str = "auto", query_chunk: int = 256, return_probs: bool = False,
               block_sizes: MlaTritonBlockSizes | None = None):
    """Each query attends to the keys its selection lists: q [B, T, Hq, d], k and v [B, S, Hkv, d],
    indices/valid [B, T, K].

    Returns (out [B, T, Hq, d] in q's dtype, head-mean probabilities of each slot [B, T, K] float32 with
    ``return_probs``, else None); a query with no valid slot gets zeros. ``query_chunk`` bounds the memory of
    the xla implementation and of the triton backward.
    """
    op = OP.name
    grouped(q, k, v, op)
    B, T = q.shape[:2]
    if indices.shape != valid.shape or indices.shape[:2] != (B, T) or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{op}: indices (int) and valid must be [B, T, K] = [{B}, {T}, K], got "
                         f"{indices.shape} {indices.dtype} and {valid.shape}")
    if valid.dtype != jnp.bool_:
        raise ValueError(f"{op}: valid must be a bool array, got {valid.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    query_chunk = check_positive_int(op, "query_chunk", query_chunk)
    backend = OP.backend_for(implementation, _refusals(q.dtype))
    return OP.run(backend, q, k, v, indices.astype(jnp.int32), valid, scale=float(scale), query_chunk=query_chunk,
                  return_probs=return_probs, block_sizes=block_sizes)
