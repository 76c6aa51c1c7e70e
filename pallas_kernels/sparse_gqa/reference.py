"""Plain-JAX sparse GQA over a selection: the ``xla`` implementation and the oracle for the kernel.

Retrofitting DSA onto a grouped-query model (Llama family): the lightning indexer picks ``k`` keys per
query, shared by every head (as in DSA), and each query gathers only those k rows of its KV group's keys
and values, so the work is O(T * k) and nothing of size [T, S] is built.

Shapes: q [B, T, Hq, d], k and v [B, S, Hkv, d] with ``Hq % Hkv == 0`` (query head h reads KV head
``h // (Hq // Hkv)``, as HF's ``repeat_kv``), indices/valid [B, T, k]. Softmax in float32. Queries run
in chunks of ``query_chunk``: peak extra memory ``2 * B * query_chunk * k * Hkv * d`` elements for the
gathered rows (the backward recomputes a chunk's gather).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import map_query_chunks


def grouped(q: jax.Array, k: jax.Array, v: jax.Array, op: str) -> jax.Array:
    """q [B,T,Hq,d] -> [B,T,Hkv,G,d] after checking the shapes agree."""
    B, T, Hq, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[-1] != d or Hq % k.shape[2]:
        raise ValueError(f"{op}: expected q [B,T,Hq,d] and k, v [B,S,Hkv,d] with Hq divisible by Hkv; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    return q.reshape(B, T, k.shape[2], Hq // k.shape[2], d)


def softmax_out(logits: jax.Array, mask: jax.Array, v_rows: jax.Array, spec: str, return_probs: bool):
    """Masked float32 softmax over the last axis, then the value sum; probs averaged over heads (axes 2, 3)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)  # a query with no key attends to nothing
    out = jnp.einsum(spec, p.astype(v_rows.dtype), v_rows, preferred_element_type=jnp.float32)
    return out, (jnp.mean(p, axis=(2, 3)) if return_probs else None)


@functools.partial(jax.jit, static_argnames=("scale", "query_chunk", "return_probs"))
def sparse_gqa_reference(q, k, v, indices, valid, *, scale: float, query_chunk: int, return_probs: bool = False):
    """(out [B, T, Hq, d] in q's dtype, head-mean probabilities [B, T, k] float32 or None)."""
    qg = grouped(q, k, v, "sparse_gqa")

    @jax.checkpoint  # backward recomputes a chunk's gather instead of keeping every chunk's rows
    def one_chunk(qc, idx, ok):
        safe = jnp.maximum(idx, 0)
        k_rows = jax.vmap(lambda kb, i: kb[i])(k, safe)       # [B, c, K, Hkv, d]
        v_rows = jax.vmap(lambda vb, i: vb[i])(v, safe)
        logits = jnp.einsum("bcgrd,bcngd->bcgrn", qc, k_rows, preferred_element_type=jnp.float32) * scale
        return softmax_out(logits, ok[:, :, None, None, :], v_rows, "bcgrn,bcngd->bcgrd", return_probs)

    out, probs = map_query_chunks(one_chunk, query_chunk, (qg, 0), (indices, -1), (valid, False))
    return out.reshape(q.shape).astype(q.dtype), probs
