"""Grouped-query attention (Llama-family models) over a Selection, and its dense causal baseline.

Retrofitting DSA onto a GQA model: the lightning indexer picks ``k`` keys per query, shared by every
head (as in DSA), and each query gathers only those k rows of its KV group's keys and values, so the
work is O(T * k) and nothing of size [T, S] is built. The dense path is ordinary causal attention
(query-chunked, O(chunk * S) memory): the baseline, and the teacher of the indexers' dense warm-up.

Shapes: q [B, T, Hq, d], k and v [B, S, Hkv, d] with ``Hq % Hkv == 0`` (query head h reads KV head
``h // (Hq // Hkv)``, as HF's ``repeat_kv``). Softmax in float32. Both paths can also return the
attention probabilities averaged over the query heads, the indexer's distillation target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import map_query_chunks


def _grouped(q: jax.Array, k: jax.Array, v: jax.Array, op: str) -> jax.Array:
    """q [B,T,Hq,d] -> [B,T,Hkv,G,d] after checking the shapes agree."""
    B, T, Hq, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[-1] != d or Hq % k.shape[2]:
        raise ValueError(f"{op}: expected q [B,T,Hq,d] and k, v [B,S,Hkv,d] with Hq divisible by Hkv; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    return q.reshape(B, T, k.shape[2], Hq // k.shape[2], d)


def _softmax_out(logits: jax.Array, mask: jax.Array, v_rows: jax.Array, spec: str, return_probs: bool):
    """Masked float32 softmax over the last axis, then the value sum; probs averaged over heads (axes 2, 3)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)  # a query with no key attends to nothing
    out = jnp.einsum(spec, p.astype(v_rows.dtype), v_rows, preferred_element_type=jnp.float32)
    return out, (jnp.mean(p, axis=(2, 3)) if return_probs else None)


def sparse_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, valid: jax.Array, *,
                         scale: float, query_chunk: int = 256, return_probs: bool = False):
    """Each query attends to the keys its Selection lists: indices/valid [B, T, K].

    Returns out [B, T, Hq, d] in q's dtype, and with ``return_probs`` the head-averaged probabilities of
    each slot [B, T, K] float32 (0 on padding). Peak extra memory ``2 * B * query_chunk * K * Hkv * d``
    elements for the gathered rows.
    """
    qg = _grouped(q, k, v, "sparse_gqa_attention")
    B, T = q.shape[:2]
    if indices.shape != valid.shape or indices.shape[:2] != (B, T):
        raise ValueError(f"sparse_gqa_attention: indices and valid must be [B, T, K] = [{B}, {T}, K], got "
                         f"{indices.shape} and {valid.shape}")

    def one_chunk(qc, idx, ok):
        safe = jnp.maximum(idx, 0)
        k_rows = jax.vmap(lambda kb, i: kb[i])(k, safe)       # [B, c, K, Hkv, d]
        v_rows = jax.vmap(lambda vb, i: vb[i])(v, safe)
        logits = jnp.einsum("bcgrd,bcngd->bcgrn", qc, k_rows, preferred_element_type=jnp.float32) * scale
        return _softmax_out(logits, ok[:, :, None, None, :], v_rows, "bcgrn,bcngd->bcgrd", return_probs)

    out, probs = map_query_chunks(one_chunk, query_chunk, (qg, 0), (indices, -1), (valid, False))
    return out.reshape(q.shape).astype(q.dtype), probs


def dense_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                        query_chunk: int = 256, return_probs: bool = False):
    """Causal attention over every key ``s <= q_positions[b, t]``; q_positions [B, T] int.

    Returns out [B, T, Hq, d] and with ``return_probs`` the head-averaged probabilities [B, T, S] float32,
    slot s = key s (the layout of ``selection.causal_selection``).
    """
    qg = _grouped(q, k, v, "dense_gqa_attention")
    keys = jnp.arange(k.shape[1], dtype=jnp.int32)

    def one_chunk(qc, pos):
        logits = jnp.einsum("bcgrd,bsgd->bcgrs", qc, k, preferred_element_type=jnp.float32) * scale
        mask = (keys[None, None, :] <= pos[:, :, None])[:, :, None, None, :]
        return _softmax_out(logits, mask, v, "bcgrs,bsgd->bcgrd", return_probs)

    out, probs = map_query_chunks(one_chunk, query_chunk, (qg, 0), (q_positions, -1))
    return out.reshape(q.shape).astype(q.dtype), probs
