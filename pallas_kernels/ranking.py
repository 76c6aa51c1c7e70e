"""The deterministic ranking key: the tie rule of every selection op, in one place.

A float32 score is mapped to an int32 whose integer order equals the float order (-0.0 and +0.0
equal, NaN ranked as -inf), and keys that are not eligible (future or past ``kv_lengths``) get
``INELIGIBLE_KEY`` (INT32_MIN), below every eligible key, -inf included. ``lax.top_k`` on those keys
returns the larger key first and, among equal keys, the lower index first, so: higher score wins, an
exact tie goes to the lower position, eligibility never depends on the score's value. The kernels
compare the same keys, so every implementation keeps the same rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INELIGIBLE_KEY = np.int32(np.iinfo(np.int32).min)  # numpy scalar: kernels may not capture jax arrays


def ordered_keys(scores: jax.Array) -> jax.Array:
    """int32 keys whose integer order is the float order of ``scores``; also used inside kernels."""
    s = scores.astype(jnp.float32)
    s = jnp.where(s != s, -jnp.inf, s)  # NaN ranks as -inf
    s = jnp.where(s == 0, 0.0, s)  # -0.0 -> +0.0 so both zeros tie
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    return jnp.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def ranking_keys(scores: jax.Array, eligible: jax.Array) -> jax.Array:
    """int32 keys ordered like ``scores`` (float32); ineligible entries get ``INELIGIBLE_KEY``."""
    return jnp.where(eligible, ordered_keys(scores), INELIGIBLE_KEY)


def top_k_by_key(keys: jax.Array, topk: int, *, return_keys: bool = False):
    """Top-``topk`` along the last axis of int32 ``keys``: (indices int32 with -1 padding, valid bool),
    plus the selected keys (INELIGIBLE_KEY on padding) with ``return_keys``.

    When the axis is shorter than ``topk`` the result is padded; slots whose key is ineligible are
    padding too. Order: best first, ties by lower index, padding last.
    """
    n = keys.shape[-1]
    kk = min(topk, n)
    values, idx = jax.lax.top_k(keys, kk)
    valid = values != INELIGIBLE_KEY
    idx = jnp.where(valid, idx.astype(jnp.int32), -1)
    if kk < topk:
        pad = [(0, 0)] * (keys.ndim - 1) + [(0, topk - kk)]
        idx = jnp.pad(idx, pad, constant_values=-1)
        valid = jnp.pad(valid, pad, constant_values=False)
        values = jnp.pad(values, pad, constant_values=INELIGIBLE_KEY)
    return (idx, valid, values) if return_keys else (idx, valid)
