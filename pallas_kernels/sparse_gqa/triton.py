"""Sparse GQA on GPU: the sparse MLA Triton kernels (``sparse_mla/triton.py``) on grouped rows.

Each KV group's row is laid out as [value | key] (``RowLayout(mla=False)``): the kernels gather a slot's
row once per (head block, query) and its group's query heads -- all of them in one head block for
Llama-family models (SmolLM2-135M: 3 heads per group, padded to the 16 a tensor-core product needs) --
score the key piece and sum the value piece, with the same online softmax, the same lean deterministic
backward and the same head-mean probabilities as sparse MLA. Building the rows copies k and v once per
call into [B, S, Hkv, 2d] (12 MB for SmolLM2 at 32K tokens in bf16); the backward splits its row gradient
back into dk and dv.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.dispatch import triton_interpret
from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes, RowLayout, attend_rows

__all__ = ["sparse_gqa_triton"]


def sparse_gqa_triton(q, k, v, indices, valid, *, scale: float, query_chunk: int = 256, return_probs: bool = False,
                      block_sizes: MlaTritonBlockSizes | None = None, interpret: bool | None = None):
    """(out [B, T, Hq, d] in q's dtype, head-mean probabilities [B, T, k] float32 or None); ``reference.py``'s
    contract. ``query_chunk`` queries per step of the backward; ``interpret``: None = as the platform says."""
    return _sparse_gqa_triton(q, k, v, indices, valid, scale=scale, query_chunk=query_chunk,
                              return_probs=return_probs, block_sizes=block_sizes or MlaTritonBlockSizes(),
                              interpret=interpret if interpret is not None else triton_interpret())


@functools.partial(jax.jit, static_argnames=("scale", "query_chunk", "return_probs", "block_sizes", "interpret"))
def _sparse_gqa_triton(q, k, v, indices, valid, *, scale, query_chunk, return_probs, block_sizes, interpret):
    B, T, Hq, d = q.shape
    G = k.shape[2]
    layout = RowLayout(groups=G, group_heads=Hq // G, v_dim=d, rest=d, mla=False)
    rows = jnp.concatenate([v, k.astype(v.dtype)], axis=-1)  # [B, S, G, 2d]: value piece first
    res = attend_rows(q.reshape(B, T, G, Hq // G, d), rows, indices, valid, layout=layout, scale=scale,
                      query_chunk=query_chunk, return_probs=return_probs, block_sizes=block_sizes,
                      interpret=interpret)
    out, probs = res if return_probs else (res, None)
    return out.reshape(B, T, Hq, d), probs
