"""Plain-JAX reference of MISA (mixture of indexer heads) and its hierarchical variant MISA-H.

Per query t (last eligible key ``L = min(t, kv_length - 1)``, own block ``L // B``):

1. Router: ``E[t, h] = sum_b |w[t, h]| ReLU(q[t, h] . kbar[b])`` over the blocks fully before the own
   block (block means) plus the own block's CAUSAL partial mean (keys ``own * B .. L`` only). The
   public code pools the whole own block during prefill, letting future keys steer routing; we don't.
2. The ``active_heads`` heads with the largest E are routed (ties: lower head index), then put back
   in increasing head order, so with ``active_heads == H`` the scan below is exactly DSA's.
3. MISA: flat DSA scan with only the routed heads, top-k.
   MISA-H: the routed scan keeps ``candidates`` keys, which are re-scored with ALL heads (the exact
   DSA score) and the top-k kept. With ``candidates >= S`` the result is DSA's.

Work per query: ``d * (H * S / B + active_heads * S)`` (+ ``H * d * candidates`` for MISA-H).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import block_means, dequantized, head_block_logits, last_eligible, refine_topk
from pallas_kernels.common import map_query_chunks, ranking_keys, top_k_by_key
from pallas_kernels.dsa_topk.reference import dsa_topk_reference


def route_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, *, block_size: int, active_heads: int,
                query_chunk: int) -> jax.Array:
    """[B, T, active_heads] int32 routed head ids per query, in increasing order."""
    B, T, H, d = q.shape
    S = k.shape[1]
    means, counts = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    block_ids = jnp.arange(M, dtype=jnp.int32)
    offsets = jnp.arange(block_size, dtype=jnp.int32)

    def one_query_chunk(q_c, w_c, pos_c):
        last = last_eligible(pos_c, kv_lengths)                          # [B, c]
        own = jnp.where(last >= 0, last // block_size, -1)
        before = (block_ids < own[..., None]) & (counts[:, None, :] > 0)  # [B, c, M]
        energy = jnp.einsum("bchm,bcm->bch", head_block_logits(q_c, means), before.astype(jnp.float32))
        # The own block's causal partial mean: keys own*B .. last, gathered per query.
        own_pos = jnp.maximum(own, 0)[..., None] * block_size + offsets  # [B, c, B]
        mask = own_pos <= last[..., None]
        own_pos = jnp.minimum(own_pos, S - 1)
        rows = jax.vmap(lambda kb, p: kb[p])(k, own_pos)  # gather first: never a dequantised copy of all keys
        rows = dequantized(rows, None if k_scale is None else jax.vmap(lambda s, p: s[p])(k_scale, own_pos))
        partial = jnp.sum(jnp.where(mask[..., None], rows, 0.0), axis=2) / jnp.maximum(
            jnp.sum(mask, axis=-1), 1)[..., None]
        own_logit = jax.nn.relu(jnp.einsum("bchd,bcd->bch", q_c.astype(jnp.float32), partial))
        energy = (energy + jnp.where((last >= 0)[..., None], own_logit, 0.0)) * jnp.abs(w_c.astype(jnp.float32))
        heads, _ = top_k_by_key(ranking_keys(energy, jnp.ones_like(energy, bool)), active_heads)
        return jnp.sort(heads, axis=-1)

    return map_query_chunks(one_query_chunk, query_chunk, (q, 0), (w, 0), (q_positions, -1))


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "active_heads", "candidates", "query_chunk",
                                             "key_chunk"))
def misa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                        active_heads: int, candidates: int | None, query_chunk: int,
                        key_chunk: int) -> tuple[jax.Array, jax.Array]:
    """MISA (``candidates=None``) or MISA-H: (indices [B,T,topk] int32 -1 padded, valid)."""
    heads = route_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, block_size=block_size,
                        active_heads=active_heads, query_chunk=query_chunk)
    q_routed = jnp.take_along_axis(q, heads[..., None], axis=2)
    w_routed = jnp.take_along_axis(w, heads, axis=2)
    first = dsa_topk_reference(q_routed, k, w_routed, k_scale, q_positions, kv_lengths,
                               topk=topk if candidates is None else candidates, query_chunk=query_chunk,
                               key_chunk=key_chunk)
    if candidates is None:
        return first
    S = k.shape[1]
    cand, cand_ok = first
    # Increasing position order for the re-rank, so ties go to the lower position.
    cand = jnp.sort(jnp.where(cand_ok, cand, S), axis=-1)
    cand_ok = cand < S
    cand = jnp.where(cand_ok, cand, -1)

    def rerank(q_c, w_c, cand_c, ok_c):
        return refine_topk(q_c, w_c, k, k_scale, cand_c, ok_c, topk)

    return map_query_chunks(rerank, query_chunk, (q, 0), (w, 0), (cand, -1), (cand_ok, False))
