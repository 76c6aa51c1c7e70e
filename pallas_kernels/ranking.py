"""The deterministic ranking key: the tie rule of every selection op, in one place.

A float32 score is mapped to an int32 whose integer order equals the float order, and keys that are not
eligible (future or past ``kv_lengths``) get ``INELIGIBLE_KEY`` (INT32_MIN), below every eligible key,
-inf and NaN included. ``lax.top_k`` on those keys returns the larger key first and, among equal keys,
the lower index first, so: higher score wins, an exact tie goes to the lower position, eligibility never
depends on the score's value. The kernels compare the same keys, so every implementation keeps the same
rule. Non-finite and zero scores rank as follows (``ordered_keys``):

* +inf above every finite score; -inf below every finite score.
* NaN (any sign or payload) gets exactly -inf's key: tied with -inf, so among NaN and -inf keys the
  lower position wins; below every finite score and +inf, above every ineligible key.
* -0.0, +0.0 and the subnormals (what flush-to-zero hardware and XLA's CPU comparisons treat as zero)
  all get +0.0's key: they tie.

Why integer code: backends disagree on floats. Pallas' Triton lowering turns ``x != x`` into an
unordered compare (true for NaN) but ``max`` into ``maxnumf`` (NaN dropped); Mosaic TPU turns ``!=`` into
an ordered compare (false for NaN, so ``x != x`` never finds a NaN) and ``max`` into ``maximumf`` (NaN
kept); XLA keeps NaN in both. ``ordered_keys`` therefore classifies scores by their bits, and ``relu``
(the score's ReLU, in the references and in every kernel) uses ordered ``<`` / ``>`` only, which all
backends agree on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INELIGIBLE_KEY = np.int32(np.iinfo(np.int32).min)  # numpy scalar: kernels may not capture jax arrays


_ABS = np.int32(0x7FFFFFFF)           # the bits of a float32 without its sign
_INF_BITS = np.int32(0x7F800000)      # |x| bits above this: NaN
_MIN_NORMAL_BITS = np.int32(0x00800000)  # |x| bits below this: zero or subnormal
NEG_INF_KEY = np.int32(np.array(-np.inf, np.float32).view(np.int32) ^ _ABS)  # ordered_keys(-inf) (and NaN)
POS_INF_KEY = _INF_BITS                  # ordered_keys(+inf)


def ordered_keys(scores: jax.Array) -> jax.Array:
    """int32 keys whose integer order is the float order of ``scores``; also used inside kernels.

    NaN -> -inf's key, -0.0 and subnormals -> +0.0's key (module docstring). Integer operations only after
    the bitcast, so every backend computes the same keys whatever its float comparisons do with NaN."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    magnitude = bits & _ABS
    keys = jnp.where(bits < 0, bits ^ _ABS, bits)                 # negative floats: reversed order
    keys = jnp.where(magnitude < _MIN_NORMAL_BITS, 0, keys)       # -0.0 == +0.0 (and subnormals)
    return jnp.where(magnitude > _INF_BITS, NEG_INF_KEY, keys)     # NaN ranks as -inf


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0) that keeps NaN on every backend (the score's ReLU: NaN in q or k gives a NaN score, which
    ranks as -inf). ``jnp.maximum`` would not do: the Triton lowering's ``maxnumf`` returns 0 for NaN.
    Ordered compares only; values (normal numbers) and gradient (0 at x == 0) are ``jax.nn.relu``'s."""
    return jnp.where(x > 0, x, jnp.where(x < 0, jnp.zeros_like(x), x * 0))


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
