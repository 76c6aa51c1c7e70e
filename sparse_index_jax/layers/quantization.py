"""The indexer's inference-precision path: Hadamard rotation and fp8 e4m3 quantisation (DeepSeek-V3.2)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.lru_cache(maxsize=None)
def _hadamard_matrix(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_rotate(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh-Hadamard transform of the last axis (power of two), scale n^-0.5, in float32.

    Leaves dot products unchanged in exact arithmetic; spreads outliers before fp8 quantisation.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard_rotate: the last axis must be a power of two, got {n}")
    h = jnp.asarray(_hadamard_matrix(n) * np.float32(n ** -0.5))
    return jnp.einsum("...i,ij->...j", x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)


def quantize_fp8(x: jax.Array, scale_fmt: str = "plain") -> tuple[jax.Array, jax.Array]:
    """float8_e4m3fn quantisation with one scale per vector (the last axis). The official indexer uses groups
    of 128 values, i.e. one group per vector for its head_dim of 128 (DeepSeek-V3.2 and GLM-5 alike); for
    other head dims this is one scale per head vector, which is what lets the q scale fold into w.

    ``amax = max(|x|, 1e-4)``; ``scale = amax / 448`` (``plain``) or ``2^ceil(log2(amax / 448))``
    (``ue8m0``). Returns (x_fp8, scale) with ``x ~= x_fp8 * scale``; scale has the last axis dropped.
    """
    if scale_fmt not in ("plain", "ue8m0"):
        raise ValueError(f"quantize_fp8: scale_fmt must be 'plain' or 'ue8m0', got {scale_fmt!r}")
    xf = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), 1e-4)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
    q = jnp.clip(xf / scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q, scale
