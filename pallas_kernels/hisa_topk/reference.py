"""Plain-JAX reference of HISA (hierarchical indexing): block filter, then token refinement.

Per query t (last eligible key ``L = min(t, kv_length - 1)``, own block ``L // B``):

1. Block score ``J[t, b] = sum_h w[t, h] ReLU(q[t, h] . kbar[b])`` for the blocks fully before the
   own block, ``kbar`` the block mean (DSA formula and scalings on the representatives).
2. Keep ``m = num_blocks`` blocks: the first block (attention sink) and the own block (local context)
   are forced (their score is +inf), the best others fill the rest. Fewer eligible blocks: keep all.
3. Score the tokens of the kept blocks (positions <= L) with the flat DSA formula; top-k.

The own block's mean is never used (the block is forced), so no future key can reach a decision.
With ``num_blocks * block_size >= S`` every block is kept and the result is DSA's. The entry point
requires ``(num_blocks - 1) * block_size >= topk`` (the HISA paper states ``m * B >= k``): the own block
can hold a single eligible token, and only then are ``min(topk, #eligible)`` candidates guaranteed. Work per query:
``H * d * (S / B + m * B)``. Peak extra memory per query chunk c: the gathered candidates,
``c * m * B * (itemsize(k) * d + 4 * H)`` bytes, plus ``4 * c * H * S / B`` for block logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.block_pooling import block_means, head_block_logits, last_eligible
from sparse_index_jax.kernels.candidate_topk import refine_topk
from sparse_index_jax.kernels.chunking import map_query_chunks
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, POS_INF_KEY, ordered_keys, top_k_by_key

FORCED_KEY = POS_INF_KEY  # ordered_keys(+inf): the first and the own block rank before any other


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "num_blocks", "query_chunk", "return_keys"))
def hisa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                        num_blocks: int, query_chunk: int, key_offset=0, return_keys: bool = False):
    """(indices, valid[, ranking keys]). ``block_sums``, positions and lengths are global; ``k`` may be the
    shard of keys starting at ``key_offset`` (context parallelism: the block choice is the same on every
    shard, each refines the kept tokens it holds)."""
    B, T, H, d = q.shape
    means, counts = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    m = min(num_blocks, M)

    def one_query_chunk(q_c, w_c, pos_c):
        cand_pos, cand_ok = candidate_positions(q_c, w_c, means, counts, last_eligible(pos_c, kv_lengths),
                                                block_size=block_size, num_blocks=m)
        return refine_topk(q_c, w_c, k, k_scale, cand_pos, cand_ok, topk, key_offset=key_offset,
                           return_keys=return_keys)

    return map_query_chunks(one_query_chunk, query_chunk, (q, 0), (w, 0), (q_positions, -1))


def candidate_positions(q_c, w_c, means, counts, last, *, block_size: int, num_blocks: int):
    """Steps 1-2 for a chunk of queries: their candidate positions [B,c,num_blocks*block_size] (increasing)
    and which are candidates; ``means``/``counts`` from ``block_means``, ``last`` [B,c] the last eligible keys."""
    own = jnp.where(last >= 0, last // block_size, -1)
    scores = jnp.einsum("bchm,bch->bcm", head_block_logits(q_c, means), w_c.astype(jnp.float32))
    kept = kept_blocks(block_ranking_keys(ordered_keys(scores), own, counts), num_blocks)
    return block_candidates(kept, last, means.shape[1], block_size)


def block_ranking_keys(block_keys: jax.Array, own: jax.Array, counts: jax.Array) -> jax.Array:
    """Step 2's ranking: block score keys [B,c,M] (``ordered_keys``) -> the first and own blocks forced to
    FORCED_KEY, blocks after the own block or empty (``counts`` [B,M] == 0) INELIGIBLE_KEY; own [B,c]."""
    block_ids = jnp.arange(block_keys.shape[-1], dtype=jnp.int32)
    forced = (block_ids == 0) | (block_ids == own[..., None])
    eligible = (block_ids <= own[..., None]) & (counts[:, None, :] > 0)
    return jnp.where(eligible, jnp.where(forced, FORCED_KEY, block_keys), INELIGIBLE_KEY)


def kept_blocks(keys: jax.Array, m: int) -> jax.Array:
    """The ``m`` best blocks of ``block_ranking_keys`` in increasing block order, M where fewer are eligible."""
    M = keys.shape[-1]
    kept, ok = top_k_by_key(keys, m)
    # Increasing block order -> candidates in increasing position -> ties go to the lower position.
    return jnp.sort(jnp.where(ok, kept, M), axis=-1)


def block_candidates(kept: jax.Array, last: jax.Array, num_blocks: int, block_size: int):
    """Kept blocks [B,c,m] (``num_blocks`` = none) -> their tokens' positions [B,c,m*block_size], in increasing
    order, and which are candidates (a real block, position <= the query's ``last`` eligible key)."""
    B, c, m = kept.shape
    offsets = jnp.arange(block_size, dtype=jnp.int32)
    positions = (jnp.minimum(kept, num_blocks - 1)[..., None] * block_size + offsets).reshape(B, c, m * block_size)
    ok = jnp.repeat(kept < num_blocks, block_size, axis=-1) & (positions <= last[..., None])
    return positions, ok
