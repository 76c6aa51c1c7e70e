"""The indexer distillation loss (DeepSeek-V3.2 report; IndexCache's multi-layer form).

For an F layer l serving layers S(l) (itself and the S layers after it), with p_j[t, :] the attention
probabilities of layer j averaged over heads and I_l[t, :] the indexer scores of layer l, both over
the same key slots (all causal keys in the dense stage, the selected top-k in the sparse stage):

    L_l = mean_{j in S(l)}  mean_t  KL( p_j[t, :] || softmax(I_l[t, :]) )

and the indexer loss is the sum of L_l over F layers. p_j is a target (no gradient flows into it).
We average over query rows t (the report sums): the value no longer grows with the batch or length.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def indexer_kl_rows(targets: jax.Array, scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per query row: (mean over targets of KL(target || softmax(scores)), row has a valid slot).

    targets [m, B, T, k] (rows summing to 1 over valid slots), scores [B, T, k] float32, valid [B, T, k].
    """
    log_q = jnp.where(valid, jax.nn.log_softmax(jnp.where(valid, scores, -jnp.inf), axis=-1), 0.0)
    p = jax.lax.stop_gradient(jnp.where(valid, targets, 0.0))
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)  # [m, B, T]
    has_keys = jnp.any(valid, axis=-1)
    return jnp.where(has_keys, jnp.mean(kl, axis=0), 0.0), has_keys


def indexer_kl(targets: Sequence[jax.Array], scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over ``targets`` (each [B,T,k], rows summing to 1 over valid slots) and over query rows of
    KL(target || softmax(scores)); scores [B,T,k] float32, valid [B,T,k]. Rows without a valid slot count 0."""
    kl, has_keys = indexer_kl_rows(jnp.stack(list(targets)), scores, valid)
    return jnp.sum(kl) / jnp.maximum(jnp.sum(has_keys), 1)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy; logits [B,T,V], targets [B,T] int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
