"""Plain-JAX reference of DSA scoring + exact top-k: the ``xla`` implementation and the oracle for kernels.

Score of key s for query t (``w`` already holds every scaling: H^-0.5, d^-0.5, fp8 q scales):

    I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h] . k[s])        (float32)

Eligible keys: ``s <= q_positions[t]`` and ``s < kv_lengths``. Queries are processed in chunks of
``query_chunk`` rows and keys in blocks of ``key_chunk``, so nothing of size [T, S, H] or [T, S]
exists at once. Peak extra memory, in bytes, is bounded by about

    4 * B * query_chunk * (3 * S + 2 * H * key_chunk)

(the chunk's float32 scores, int32 ranking keys and top-k workspace, plus one block of per-head logits
and their ReLU). docs/kernels.md records a measurement against this bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import chunk_axis, map_query_chunks
from sparse_index_jax.kernels.inputs import matmul_dtype
from sparse_index_jax.kernels.ranking import ranking_keys, relu, top_k_by_key


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, k_scale: jax.Array | None = None) -> jax.Array:
    """Unmasked scores [B, T, S] float32 for q [B,T,H,d], k [B,S,d], w [B,T,H], k_scale [B,S] or None.

    Materialises [B, T, H, S]: for tests, losses on short rows and kernels' block bodies only.
    """
    dt = matmul_dtype(q, k)
    logits = jnp.einsum("bthd,bsd->bths", q.astype(dt), k.astype(dt), preferred_element_type=jnp.float32)
    scores = jnp.einsum("bths,bth->bts", relu(logits), w.astype(jnp.float32))
    if k_scale is not None:
        scores = scores * k_scale.astype(jnp.float32)[:, None, :]
    return scores


def eligibility(q_positions: jax.Array, kv_lengths: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[B, T, n] bool: key position <= query position and < the row's valid key length."""
    return (key_positions[None, None, :] <= q_positions[:, :, None]) & (
        key_positions[None, None, :] < kv_lengths[:, None, None])


@functools.partial(jax.jit, static_argnames=("topk", "query_chunk", "key_chunk", "return_keys"))
def dsa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, *, topk: int, query_chunk: int,
                       key_chunk: int, return_keys: bool = False):
    """Exact top-k of the DSA scores: (indices [B,T,topk] int32, -1 padded; valid [B,T,topk] bool), and
    with ``return_keys`` the selected ranking keys (what a context-parallel merge compares)."""
    B, T, H, d = q.shape
    S = k.shape[1]
    qc, kc = min(query_chunk, T), min(key_chunk, S)
    if k_scale is None:
        k_scale = jnp.ones((B, S), jnp.float32)
    k_blocks = chunk_axis(k, 1, kc, 0)                           # [nk, B, kc, d]
    s_blocks = chunk_axis(k_scale.astype(jnp.float32), 1, kc, 1)  # [nk, B, kc]
    key_positions = jnp.arange(S, dtype=jnp.int32)

    def one_query_chunk(q_c, w_c, pos_c):  # [B,qc,H,d], [B,qc,H], [B,qc]

        def one_key_block(_, blk):
            return None, index_scores(q_c, blk[0], w_c, blk[1])

        _, scores = jax.lax.scan(one_key_block, None, (k_blocks, s_blocks))  # [nk, B, qc, kc]
        scores = jnp.moveaxis(scores, 0, 2).reshape(B, qc, -1)[:, :, :S]
        keys = ranking_keys(scores, eligibility(pos_c, kv_lengths, key_positions))
        return top_k_by_key(keys, topk, return_keys=return_keys)

    return map_query_chunks(one_query_chunk, qc, (q, 0), (w, 0), (q_positions, -1))
