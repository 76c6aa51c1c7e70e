"""The one selection contract: every method and implementation returns a ``Selection``.

Rules every method and backend keeps:

* **Eligibility** is positional only: key ``s`` is eligible for query ``t`` of row ``b`` when
  ``s <= q_positions[b, t]`` (causal) and ``s < kv_lengths[b]`` (ragged batches, decode caches).
  A score's value never makes a key ineligible.
* **Count**: each query gets ``min(topk, #eligible)`` valid slots. With fewer eligible keys than
  ``topk`` every eligible key is selected (the dense regime) and the remaining slots are padding.
* **Padding**: ``indices == -1`` and ``valid == False``, always after the valid slots.
* **Order and ties**: valid slots are sorted by score, highest first; equal scores are ordered by
  position, the lower position first, and the lower position wins the last slot. Scores compare as
  float32 (``kernels.ranking.ordered_keys``): +inf ranks first; -0.0, +0.0 and subnormals are equal;
  NaN (any sign or payload) ranks exactly as -inf, so NaN and -inf keys tie and go by position, after
  every finite score and before the padding. Ineligible keys are never selected, whatever their score.
  A score is NaN when q or k holds a NaN (the ReLU keeps NaN: ``kernels.ranking.relu``), when an inf
  head weight or key scale meets a zero, or when +inf and -inf terms meet. Same inputs give the same
  indices on every run and backend.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """Selected key positions per query: ``indices`` [B,T,k] int32 (-1 = padding), ``valid`` [B,T,k] bool."""

    indices: jax.Array
    valid: jax.Array

    @property
    def topk(self) -> int:
        return self.indices.shape[-1]

    def counts(self) -> jax.Array:
        """[B, T] number of valid slots per query."""
        return jnp.sum(self.valid, axis=-1)

    def to_mask(self, num_keys: int) -> jax.Array:
        """Dense [B, T, num_keys] bool mask of the selected keys. For tests and small inputs only."""
        hit = (self.indices[..., None] == jnp.arange(num_keys)) & self.valid[..., None]
        return jnp.any(hit, axis=-2)


def causal_selection(q_positions: jax.Array, num_keys: int) -> Selection:
    """Every key at a position <= the query's: dense causal attention as a Selection ([B, T, num_keys]).

    For dense baselines and the dense warm-up of indexer training; O(T * S), short rows only.
    """
    keys = jnp.arange(num_keys, dtype=jnp.int32)
    valid = keys[None, None, :] <= q_positions[:, :, None]
    return Selection(jnp.where(valid, keys, -1), valid)
