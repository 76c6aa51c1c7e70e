"""Plain-JAX sparse MLA over a selection: the ``xla`` implementation and the oracle for kernels.

MQA form (FlashMLA's interface): every query head attends to the same selected cache rows.
q [B,T,Hq,Dk] (absorbed query: latent part then rope part), kv [B,S,Dk] (cache rows: latent then
rope key), the value is the first ``v_dim`` columns of each row. For each query only its k selected
rows are gathered, so the work is O(T*k), never O(T*S). Queries run in chunks of ``query_chunk``;
peak extra memory in bytes is about

    B * query_chunk * k * (Dk * itemsize(kv) + 4 * 2 * Hq)

(the gathered rows plus float32 logits and probabilities). A query with no valid slot returns zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import map_query_chunks


def gather_rows(kv: jax.Array, indices: jax.Array) -> jax.Array:
    """kv [B,S,D], indices [B,T,k] (-1 allowed) -> [B,T,k,D]; padding slots read row 0 (masked later)."""
    return jax.vmap(lambda rows, idx: rows[jnp.maximum(idx, 0)])(kv, indices)


def attend(q: jax.Array, rows: jax.Array, valid: jax.Array, *, scale: float, v_dim: int,
           return_probs: bool = False, axis_name: str | None = None):
    """Softmax attention of q [B,T,H,D] over its own rows [B,T,k,D] (or rows shared by every query, [B,k,D])
    where valid [B,T,k]; float32 out.

    With ``return_probs`` also the attention probabilities averaged over heads, [B,T,k] float32.
    With ``axis_name`` (inside ``shard_map``) each device holds part of every query's rows and the
    partial softmaxes are combined exactly: the row maximum by ``pmax``, sums and values by ``psum``.
    """
    reduce_max, reduce_sum = ((lambda x: jax.lax.pmax(x, axis_name), lambda x: jax.lax.psum(x, axis_name))
                              if axis_name is not None else (lambda x: x, lambda x: x))
    own = "btkd" if rows.ndim == 4 else "bkd"
    logits = jnp.einsum(f"bthd,{own}->bthk", q, rows, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
    # The shift needs no gradient (softmax ignores it); stopping it before pmax keeps pmax, which has no
    # derivative rule, out of differentiation in the context-parallel case.
    row_max = reduce_max(jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # all-padding rows: no NaN
    p = jnp.exp(logits - row_max)
    denom = reduce_sum(jnp.sum(p, axis=-1, keepdims=True))
    out = reduce_sum(jnp.einsum(f"bthk,{own[:-1]}v->bthv", p.astype(rows.dtype), rows[..., :v_dim],
                                preferred_element_type=jnp.float32))
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    if return_probs:
        return out / safe_denom, jnp.mean(p / safe_denom, axis=2)
    return out / safe_denom


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "query_chunk", "return_probs"))
def sparse_mla_reference(q, kv, indices, valid, *, scale: float, v_dim: int, query_chunk: int,
                         return_probs: bool = False):
    """out [B,T,Hq,v_dim] in q.dtype (and, with ``return_probs``, head-mean probabilities [B,T,k] float32)."""

    @jax.checkpoint  # backward recomputes a chunk's gather instead of keeping every chunk's rows
    def one_chunk(q_c, idx_c, valid_c):
        rows = gather_rows(kv, idx_c).astype(q.dtype)  # cast the k gathered rows, never the whole cache
        return attend(q_c, rows, valid_c, scale=scale, v_dim=v_dim, return_probs=return_probs)

    out = map_query_chunks(one_chunk, query_chunk, (q, 0), (indices, -1), (valid, False))
    if return_probs:
        return out[0].astype(q.dtype), out[1]
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "query_chunk", "return_probs"))
def dense_mla(q, kv, q_positions, *, scale: float, v_dim: int, query_chunk: int, return_probs: bool = False):
    """Causal MLA over every key s <= q_positions[b, t] (the dense baseline and the distillation warm-up), without
    a selection: no [T, S] index array, and per chunk of queries only [B, chunk, Hq, S] float32 logits, so memory
    is O(chunk * S) at any length (also in backward: each chunk is recomputed). Outputs as ``sparse_mla_reference``
    with slot s = key s (probabilities [B, T, S])."""
    keys = jnp.arange(kv.shape[1], dtype=jnp.int32)

    rows = kv.astype(q.dtype)

    @jax.checkpoint
    def one_chunk(q_c, pos):
        valid = keys[None, None, :] <= pos[:, :, None]                                  # [B, chunk, S]
        return attend(q_c, rows, valid, scale=scale, v_dim=v_dim, return_probs=return_probs)

    out = map_query_chunks(one_chunk, query_chunk, (q, 0), (q_positions, -1))
    if return_probs:
        return out[0].astype(q.dtype), out[1]
    return out.astype(q.dtype)
