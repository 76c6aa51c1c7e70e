"""The one selection contract: every selector returns a ``Selection``.

Rules every method and backend keeps:

* **Eligibility** is positional only: key ``s`` is eligible for query ``t`` of row ``b`` when
  ``s <= q_positions[b, t]`` (causal) and ``s < kv_lengths[b]`` (ragged batches, decode caches).
  A score's value never makes a key ineligible.
* **Count**: each query gets ``min(topk, #eligible)`` valid slots. With fewer eligible keys than
  ``topk`` every eligible key is selected (the dense regime) and the remaining slots are padding.
* **Padding**: ``indices == -1`` and ``valid == False``, always after the valid slots.
* **Order and ties**: valid slots are sorted by score, highest first; equal scores are ordered by
  position, the lower position first, and the lower position wins the last slot. Scores compare as
  float32; -0.0 equals +0.0; NaN ranks as -inf; +inf ranks first. Same inputs give the same
  indices on every run and backend.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.dsa_topk import dsa_topk
from pallas_kernels.hisa_topk import hisa_topk
from pallas_kernels.misa_topk import default_candidates, misa_topk


def _misa_h(q, k, w, *, topk, candidates=None, **options):
    return misa_topk(q, k, w, topk=topk, candidates=default_candidates(topk) if candidates is None else candidates,
                     **options)


def _misa(q, k, w, **options):
    return misa_topk(q, k, w, candidates=None, **options)


# method -> (entry point, the options it takes beyond the common arguments)
_METHODS = {
    "dsa": (dsa_topk, ("query_chunk", "key_chunk")),
    "hisa": (hisa_topk, ("block_size", "num_blocks", "block_sums", "query_chunk")),
    "misa": (_misa, ("active_heads", "block_size", "block_sums", "query_chunk", "key_chunk")),
    "misa_h": (_misa_h, ("active_heads", "block_size", "candidates", "block_sums", "query_chunk", "key_chunk")),
}
METHODS = tuple(_METHODS)


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


def select_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, method: str = "dsa",
                q_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                k_scale: jax.Array | None = None, implementation: str = "auto",
                **method_options) -> Selection:
    """Selects the ``topk`` best keys for every query from lightning-indexer activations.

    Args:
      q: [B, T, H, d] indexer queries (after RoPE, optional Hadamard; bf16, f32 or float8_e4m3fn).
      k: [B, S, d] indexer keys, one per token shared by all heads.
      w: [B, T, H] head weights with every scaling folded in (``H^-0.5 * d^-0.5``, and the fp8 q
        scale on the fp8 path), as ``LightningIndexer`` returns them.
      topk: slots per query (k). May exceed S; the extra slots are padding.
      method: ``"dsa"`` (flat scan of every eligible key), ``"hisa"`` (block filter + token refinement),
        ``"misa"`` (routed heads), ``"misa_h"`` (routed heads, then all-head re-rank). See the README for
        when each is exact and what it costs.
      q_positions: [T] or [B, T] int positions of the queries. Default: the last T positions of each
        row, ``kv_lengths - T + arange(T)`` (``arange(T)`` for prefill where T == S).
      kv_lengths: [B] int number of valid keys per row (default S). Must lie in [0, S].
      k_scale: optional [B, S] float32 per-key scale (the fp8 key cache's scale).
      implementation: ``"auto" | "xla" | "pallas"``; see ``pallas_kernels.dsa_topk.backend_for``.
      **method_options: per method --
        dsa: ``query_chunk`` (256), ``key_chunk`` (1024);
        hisa: ``block_size`` (128), ``num_blocks`` (64), ``block_sums``, ``query_chunk`` (32);
        misa: ``active_heads`` (8), ``block_size`` (1024), ``block_sums``, ``query_chunk`` (64), ``key_chunk``;
        misa_h: as misa plus ``candidates`` (4 * topk).
        ``block_sums`` [B, ceil(S/block_size), d] float32 are pooled key sums (a decode cache keeps
        them, see ``DSACache``); computed from ``k`` when omitted.

    Score: ``I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h] . k[s])`` in float32. The module
    docstring states the eligibility, padding and tie rules.

    Memory: queries are processed ``query_chunk`` rows at a time (dsa: against ``key_chunk`` keys
    at a time), so no [T, S, H] and no [T, S] tensor is built. dsa's peak extra memory is
    about ``4 * B * query_chunk * (3 * S + 2 * H * key_chunk)`` bytes; each op's ``reference.py`` in
    ``pallas_kernels`` states its own.
    """
    if method not in _METHODS:
        raise ValueError(f"select_topk: unknown method {method!r}; available: {METHODS}")
    run, accepted = _METHODS[method]
    unknown = set(method_options) - set(accepted)
    if unknown:
        raise TypeError(f"select_topk: method {method!r} takes no option(s) {sorted(unknown)}; "
                        f"it takes {', '.join(accepted)}")
    # Selection is discrete: no gradient flows through it, and none must be traced into its kernels
    # (a Pallas call has no derivative rule) when a loss differentiates the indexer that fed it.
    q, k, w, k_scale = jax.lax.stop_gradient((q, k, w, k_scale))
    indices, valid = run(q, k, w, topk=topk, k_scale=k_scale, q_positions=q_positions, kv_lengths=kv_lengths,
                         implementation=implementation, **method_options)
    return Selection(indices, valid)
