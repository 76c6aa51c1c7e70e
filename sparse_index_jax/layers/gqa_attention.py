"""Grouped-query attention (Llama-family models) over a Selection, and its dense causal baseline.

Retrofitting DSA onto a GQA model: the lightning indexer picks ``k`` keys per query, shared by every
head (as in DSA), and each query gathers only those k rows of its KV group's keys and values, so the
work is O(T * k) and nothing of size [T, S] is built (``kernels.sparse_gqa``: a Triton kernel on GPU,
the gather-based reference elsewhere). The dense path is ordinary causal attention
(query-chunked, O(chunk * S) memory): the baseline, and the teacher of the indexers' dense warm-up.

Shapes: q [B, T, Hq, d], k and v [B, S, Hkv, d] with ``Hq % Hkv == 0`` (query head h reads KV head
``h // (Hq // Hkv)``, as HF's ``repeat_kv``). Softmax in float32. Both paths can also return the
attention probabilities averaged over the query heads, the indexer's distillation target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import map_query_chunks
from sparse_index_jax.kernels.sparse_gqa import grouped, softmax_out, sparse_gqa


def sparse_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, valid: jax.Array, *,
                         scale: float, query_chunk: int = 256, return_probs: bool = False,
                         implementation: str = "auto"):
    """Each query attends to the keys its Selection lists: indices/valid [B, T, K].

    Returns out [B, T, Hq, d] in q's dtype, and with ``return_probs`` the head-averaged probabilities of
    each slot [B, T, K] float32 (0 on padding), else None. ``implementation``: ``kernels.sparse_gqa``'s
    (``auto``: the Triton kernel on GPU, the gather-based reference elsewhere).
    """
    return sparse_gqa(q, k, v, indices, valid, scale=scale, implementation=implementation, query_chunk=query_chunk,
                      return_probs=return_probs)


def dense_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                        query_chunk: int = 256, return_probs: bool = False):
    """Causal attention over every key ``s <= q_positions[b, t]``; q_positions [B, T] int.

    Returns out [B, T, Hq, d] and with ``return_probs`` the head-averaged probabilities [B, T, S] float32,
    slot s = key s (the layout of ``selection.causal_selection``).
    """
    qg = grouped(q, k, v, "dense_gqa_attention")
    keys = jnp.arange(k.shape[1], dtype=jnp.int32)

    def one_chunk(qc, pos):
        logits = jnp.einsum("bcgrd,bsgd->bcgrs", qc, k, preferred_element_type=jnp.float32) * scale
        mask = (keys[None, None, :] <= pos[:, :, None])[:, :, None, None, :]
        return softmax_out(logits, mask, v, "bcgrs,bsgd->bcgrd", return_probs)

    out, probs = map_query_chunks(one_chunk, query_chunk, (qg, 0), (q_positions, -1))
    return out.reshape(q.shape).astype(q.dtype), probs
