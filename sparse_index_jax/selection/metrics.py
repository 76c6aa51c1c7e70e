"""How close one selection is to another, and how much attention a selection covers.

All functions work per query row on the index lists (O(T * k log k)), never on [T, S] masks, and
ignore padding slots. A row where both sets are empty counts as a perfect match (IoU 1, recall 1);
a row whose reference is empty has recall 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_index_jax.selection.contract import Selection

_BIG = jnp.iinfo(jnp.int32).max


def _sorted_valid(sel: Selection) -> jax.Array:
    return jnp.sort(jnp.where(sel.valid, sel.indices, _BIG), axis=-1)


def intersection_counts(a: Selection, b: Selection) -> jax.Array:
    """[B, T] number of positions selected by both (indices are unique per row by contract)."""
    if a.indices.shape[:2] != b.indices.shape[:2]:
        raise ValueError(f"intersection_counts: selections cover different queries: {a.indices.shape[:2]} vs "
                         f"{b.indices.shape[:2]}")
    sorted_b = _sorted_valid(b)
    pos = jax.vmap(jax.vmap(jnp.searchsorted))(sorted_b, jnp.where(a.valid, a.indices, -1))
    found = jnp.take_along_axis(sorted_b, jnp.minimum(pos, sorted_b.shape[-1] - 1), axis=-1) == a.indices
    return jnp.sum(found & a.valid, axis=-1)


def iou(a: Selection, b: Selection) -> jax.Array:
    """[B, T] |a ∩ b| / |a ∪ b| per query."""
    inter = intersection_counts(a, b)
    union = a.counts() + b.counts() - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def recall(selection: Selection, reference: Selection) -> jax.Array:
    """[B, T] fraction of the reference's positions that ``selection`` also selected."""
    inter = intersection_counts(selection, reference)
    n = reference.counts()
    return jnp.where(n > 0, inter / jnp.maximum(n, 1), 1.0)


def attention_mass_recall(selection: Selection, probs: jax.Array) -> jax.Array:
    """[B, T] share of an attention distribution ``probs`` [B, T, S] (or [B, T, H, S], averaged over heads)
    that falls on the selected positions."""
    if probs.ndim == 4:
        probs = jnp.mean(probs, axis=2)
    if probs.ndim != 3 or probs.shape[:2] != selection.indices.shape[:2]:
        raise ValueError(f"attention_mass_recall: probs must be [B, T, S] or [B, T, H, S] over the selection's "
                         f"queries {selection.indices.shape[:2]}, got {probs.shape}")
    picked = jnp.take_along_axis(probs, jnp.maximum(selection.indices, 0), axis=-1)
    return jnp.sum(jnp.where(selection.valid, picked, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Mean IoU and recall of one selection against a reference, over the rows given by ``rows``."""

    iou: float
    recall: float
    rows: int

    @classmethod
    def of(cls, selection: Selection, reference: Selection, rows: jax.Array | None = None) -> "Agreement":
        """``rows`` [B, T] bool picks which query rows count (default: all)."""
        per_iou, per_recall = iou(selection, reference), recall(selection, reference)
        if rows is None:
            rows = jnp.ones(per_iou.shape, bool)
        n = int(jnp.sum(rows))
        mean = lambda x: float(jnp.sum(jnp.where(rows, x, 0.0)) / max(n, 1))
        return cls(mean(per_iou), mean(per_recall), n)


def per_layer(selections: list[Selection], references: list[Selection]) -> list[Agreement]:
    """Agreement layer by layer (lists of one Selection per layer)."""
    if len(selections) != len(references):
        raise ValueError(f"per_layer: {len(selections)} selections vs {len(references)} references")
    return [Agreement.of(s, r) for s, r in zip(selections, references)]
