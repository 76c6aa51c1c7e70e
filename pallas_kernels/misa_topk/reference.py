"""Plain-JAX reference of MISA (mixture of indexer heads) and its hierarchical variant MISA-H.

Per query t (last eligible key ``L = min(t, kv_length - 1)``, own block ``L // B``):

1. Router: ``E[t, h] = sum_b |w[t, h]| ReLU(q[t, h] . kbar[b])`` over the blocks fully before the own
   block (block means) plus the own block's CAUSAL partial mean (keys ``own * B .. L`` only), taken as
   ``ReLU(sum_s scale_s (q[t, h] . k[s]) / n)``. MISA's public code pools the whole own block during
   prefill, letting future keys steer routing; we don't.
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

from sparse_index_jax.kernels.block_pooling import block_means, head_block_logits, last_eligible
from sparse_index_jax.kernels.candidate_topk import gathered_logits, refine_topk
from sparse_index_jax.kernels.chunking import map_query_chunks, to_shard
from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference
from sparse_index_jax.kernels.ranking import ranking_keys, relu, top_k_by_key


def route_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, *, block_size: int, active_heads: int,
                query_chunk: int, key_offset=0, axis_name: str | None = None) -> jax.Array:
    """[B, T, active_heads] int32 routed head ids per query, in increasing order.

    Context parallelism: ``k`` holds the keys from ``key_offset`` on, ``block_sums`` / positions / lengths
    are global, and the own block's partial sum is completed with a ``psum`` over ``axis_name`` (one
    shard holds the whole block, the others add exact zeros, so every shard routes identically).
    """
    energy = map_query_chunks(
        lambda q_c, w_c, pos_c: head_energies(q_c, w_c, k, k_scale, pos_c, kv_lengths, block_sums,
                                              block_size=block_size, key_offset=key_offset, axis_name=axis_name),
        query_chunk, (q, 0), (w, 0), (q_positions, -1))
    return heads_by_energy(energy, active_heads)


def head_energies(q_c, w_c, k, k_scale, pos_c, kv_lengths, block_sums, *, block_size: int, key_offset=0,
                  axis_name: str | None = None) -> jax.Array:
    """The router's energies [B, c, H] float32 of a chunk of queries (step 1 of the module docstring).

    The own block's term is ``ReLU(q . mean)`` over its keys up to the query's last eligible one, computed
    as ``sum_s scale_s (q . k_s) / n`` (the dot form: per-key products in the keys' dtype, as the
    kernels compute them, and one division)."""
    S = k.shape[1]
    means, counts = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    block_ids = jnp.arange(M, dtype=jnp.int32)
    last = last_eligible(pos_c, kv_lengths)                          # [B, c]
    own = jnp.where(last >= 0, last // block_size, -1)
    before = (block_ids < own[..., None]) & (counts[:, None, :] > 0)  # [B, c, M]
    # A masked sum, not a product with the mask: a NaN or inf mean of a later (or empty) block must not reach
    # the energies (NaN * 0 is NaN).
    energy = jnp.sum(jnp.where(before[:, :, None, :], head_block_logits(q_c, means), 0.0), axis=-1)
    # The own block's causal partial mean: keys own*B .. last, gathered per query.
    own_pos = jnp.maximum(own, 0)[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)  # [B, c, B]
    mask = own_pos <= last[..., None]
    local, in_shard = to_shard(own_pos, key_offset, S)
    logits, scales = gathered_logits(q_c, k, k_scale, local)         # [B, c, H, B], [B, c, B]
    partial = jnp.sum(jnp.where((mask & in_shard)[:, :, None, :], logits * scales[:, :, None, :], 0.0), axis=-1)
    if axis_name is not None:
        partial = jax.lax.psum(partial, axis_name)
    own_logit = relu(partial / jnp.maximum(jnp.sum(mask, axis=-1), 1)[..., None].astype(jnp.float32))
    return (energy + jnp.where((last >= 0)[..., None], own_logit, 0.0)) * jnp.abs(w_c.astype(jnp.float32))


def heads_by_energy(energy: jax.Array, active_heads: int) -> jax.Array:
    """The ``active_heads`` heads of largest energy [B, T, H] (ties: lower head), in increasing order."""
    heads, _ = top_k_by_key(ranking_keys(energy, jnp.ones_like(energy, bool)), active_heads)
    return jnp.sort(heads, axis=-1)


def gather_heads(q: jax.Array, w: jax.Array, heads: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The queries [B,T,A,d] and head weights [B,T,A] of the heads ``heads`` [B,T,A] of each query."""
    return jnp.take_along_axis(q, heads[..., None], axis=2), jnp.take_along_axis(w, heads, axis=2)


def routed_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, **routing) -> tuple[jax.Array, jax.Array]:
    """The queries and head weights of each query's routed heads: q [B,T,active_heads,d], w [B,T,active_heads]
    (``routing``: ``route_heads``' keyword arguments). Every implementation scans these."""
    return gather_heads(q, w, route_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, **routing))


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "active_heads", "candidates", "query_chunk",
                                             "key_chunk", "axis_name", "return_keys"))
def misa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                        active_heads: int, candidates: int | None = None, query_chunk: int, key_chunk: int,
                        key_offset=0, axis_name: str | None = None, return_keys: bool = False):
    """MISA (``candidates=None``) or MISA-H: (indices [B,T,topk] int32 -1 padded, valid[, ranking keys]).

    With ``axis_name`` (inside ``shard_map``), ``k`` is the shard of keys starting at ``key_offset``; the
    result is this shard's part, to be merged by the caller (``sparse_index_jax.context_parallel``).
    """
    S = k.shape[1]
    q_routed, w_routed = routed_heads(q, w, k, k_scale, q_positions, kv_lengths, block_sums, block_size=block_size,
                                      active_heads=active_heads, query_chunk=query_chunk, key_offset=key_offset,
                                      axis_name=axis_name)
    idx, valid, keys = dsa_topk_reference(q_routed, k, w_routed, k_scale, q_positions - key_offset,
                                          jnp.clip(kv_lengths - key_offset, 0, S),
                                          topk=topk if candidates is None else candidates,
                                          query_chunk=query_chunk, key_chunk=key_chunk, return_keys=True)
    idx = jnp.where(valid, idx + key_offset, -1)
    if candidates is None:
        return (idx, valid, keys) if return_keys else (idx, valid)
    if axis_name is not None:  # every shard re-ranks the globally best candidates it holds
        keys = jax.lax.all_gather(keys, axis_name, axis=2, tiled=True)
        idx = jax.lax.all_gather(idx, axis_name, axis=2, tiled=True)
        slot, valid = top_k_by_key(keys, candidates)
        idx = jnp.where(valid, jnp.take_along_axis(idx, jnp.maximum(slot, 0), axis=-1), -1)
    return rerank_with_all_heads(q, w, k, k_scale, idx, valid, topk=topk, query_chunk=query_chunk,
                                 key_offset=key_offset, return_keys=return_keys)


def candidates_in_position_order(idx: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MISA-H's first-pass survivors [B,T,C] sorted by position (-1 padding last), so that the re-rank's
    ties go to the lower position; and which slots hold one."""
    big = jnp.iinfo(jnp.int32).max
    cand = jnp.sort(jnp.where(valid, idx, big), axis=-1)
    ok = cand < big
    return jnp.where(ok, cand, -1), ok


def rerank_with_all_heads(q, w, k, k_scale, idx, valid, *, topk: int, query_chunk: int, key_offset=0,
                          return_keys: bool = False):
    """MISA-H's second pass: the survivors re-scored with every head (the flat DSA score), the best ``topk``
    kept, ``query_chunk`` queries at a time."""
    cand, cand_ok = candidates_in_position_order(idx, valid)

    def rerank(q_c, w_c, cand_c, ok_c):
        return refine_topk(q_c, w_c, k, k_scale, cand_c, ok_c, topk, key_offset=key_offset, return_keys=return_keys)

    return map_query_chunks(rerank, query_chunk, (q, 0), (w, 0), (cand, -1), (cand_ok, False))
