"""Top-k over per-query candidate lists: HISA's token refinement and MISA-H's re-rank (plain JAX).

Each query lists the key positions it may select (``cand_pos``, in increasing position, so that
``lax.top_k``'s lower-index-wins tie rule is the contract's lower-position-wins rule); they are scored
with the flat DSA formula and the best ``topk`` kept. The kernels walk the same lists inside the
streaming DSA kernel (``units`` of ``dsa_topk.triton.stream_select``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import to_shard
from sparse_index_jax.kernels.inputs import matmul_dtype
from sparse_index_jax.kernels.ranking import ranking_keys, relu, top_k_by_key


def gathered_logits(q: jax.Array, k: jax.Array, k_scale: jax.Array | None, positions: jax.Array):
    """Per-head logits of per-query key lists and the keys' scales: q [B,T,H,d], k [B,S,d], k_scale [B,S] or
    None, positions [B,T,C] (-1 allowed: scored as position 0, mask it yourself) -> (logits [B,T,H,C]
    float32 before scaling, scales [B,T,C] float32)."""
    safe = jnp.maximum(positions, 0)
    rows = jax.vmap(lambda kb, p: kb[p])(k, safe)  # [B, T, C, d]
    dt = matmul_dtype(q, rows)
    logits = jnp.einsum("bchd,bcnd->bchn", q.astype(dt), rows.astype(dt), preferred_element_type=jnp.float32)
    if k_scale is None:
        return logits, jnp.ones(positions.shape, jnp.float32)
    return logits, jax.vmap(lambda s, p: s[p])(k_scale.astype(jnp.float32), safe)


def gathered_scores(q: jax.Array, w: jax.Array, k: jax.Array, k_scale: jax.Array | None,
                    positions: jax.Array) -> jax.Array:
    """Flat DSA scores of per-query key lists: q [B,T,H,d], w [B,T,H], k [B,S,d], k_scale [B,S] or None,
    positions [B,T,C] (-1 allowed: scored as position 0, mask it yourself) -> [B,T,C] float32."""
    logits, scales = gathered_logits(q, k, k_scale, positions)
    return jnp.einsum("bchn,bch->bcn", relu(logits), w.astype(jnp.float32)) * scales


def refine_topk(q_c: jax.Array, w_c: jax.Array, k: jax.Array, k_scale: jax.Array | None, cand_pos: jax.Array,
                cand_ok: jax.Array, topk: int, *, key_offset=0, return_keys: bool = False):
    """Top-k of the flat DSA score over per-query candidates.

    q_c [B,c,H,d], w_c [B,c,H], k [B,S,d], k_scale [B,S] or None, cand_pos [B,c,C] int32 in increasing
    order per query, cand_ok [B,c,C] bool (eligible candidates). Returns (positions [B,c,topk] int32
    with -1 padding, valid), and the ranking keys with ``return_keys``. Gathers c*C key rows: memory
    O(c * C * (d + H)).

    ``k`` may be one shard of the keys, holding positions ``key_offset .. key_offset + len(k)``
    (context parallelism): candidates outside it are skipped, positions stay global.
    """
    local, in_shard = to_shard(cand_pos, key_offset, k.shape[1])
    scores = gathered_scores(q_c, w_c, k, k_scale, local)
    idx, valid, keys = top_k_by_key(ranking_keys(scores, cand_ok & in_shard), topk, return_keys=True)
    positions = jnp.where(valid, jnp.take_along_axis(cand_pos, jnp.maximum(idx, 0), axis=-1), -1)
    return (positions, valid, keys) if return_keys else (positions, valid)
