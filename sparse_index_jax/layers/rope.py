"""Rotary position embedding: frequencies (plain, linear, dynamic NTK, Llama 3.1, YaRN) and the two pairings.

``layout="interleaved"`` rotates pairs ``(2i, 2i+1)``; ``layout="half"`` (NeoX) rotates pairs
``(i, i + n/2)``. Both use frequency ``inv_freq[i]`` for pair ``i`` and keep every element where it
was, so a vector's layout does not change, only its values. DeepSeek-V3.2's indexer is ``half``,
GLM-5's indexer is ``interleaved``, and the MLA rope part is ``interleaved`` in both.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sparse_index_jax.layers.config import RopeConfig, RopeLayout


def inverse_frequencies(cfg: RopeConfig, dim: int) -> np.ndarray:
    """[dim // 2] float32 inverse frequencies, following HF transformers' rules for each ``rope_type``.
    ``dynamic`` gives the frequencies of sequences up to ``max_position_embeddings`` (longer ones: see
    ``rotary_cos_sin``)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(cfg.theta) ** exponents
    if cfg.rope_type in ("default", "dynamic"):
        return (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type == "linear":
        return (1.0 / pos_freqs / np.float32(cfg.factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        inv_freq = (1.0 / pos_freqs).astype(np.float32)
        old = cfg.original_max_position_embeddings
        low_wavelen, high_wavelen = old / cfg.low_freq_factor, old / cfg.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(cfg.factor), inv_freq)
        smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(cfg.factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(cfg.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(cfg.factor) * pos_freqs)
    return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def _dynamic_frequencies(cfg: RopeConfig, positions: jnp.ndarray, dim: int) -> jnp.ndarray:
    """HF's dynamic NTK: the base grows with the sequence length ``max(positions) + 1`` once it passes
    ``max_position_embeddings`` (over the whole batch, as HF takes it); shorter sequences get the default."""
    max_pos = cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, jnp.float32(max_pos))
    base = cfg.theta * ((cfg.factor * seq_len / max_pos) - (cfg.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rotary_cos_sin(cfg: RopeConfig, positions: jnp.ndarray, dim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape ``positions.shape + [dim // 2]`` in float32, times YaRN's attention factor."""
    if cfg.rope_type == "dynamic":
        inv_freq = _dynamic_frequencies(cfg, positions, dim)
    else:
        inv_freq = jnp.asarray(inverse_frequencies(cfg, dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = cfg.attention_factor
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, layout: RopeLayout) -> jnp.ndarray:
    """Rotates the last axis of ``x`` ([..., n]) by angles with cos/sin of shape broadcastable to [..., n/2].

    Computed in float32 and cast back to ``x.dtype``.
    """
    n = x.shape[-1]
    if n % 2:
        raise ValueError(f"apply_rope: the rotated width must be even, got {n}")
    xf = x.astype(jnp.float32)
    if layout == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    elif layout == "half":
        x1, x2 = xf[..., : n // 2], xf[..., n // 2:]
    else:
        raise ValueError(f"apply_rope: layout must be 'half' or 'interleaved', got {layout!r}")
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if layout == "interleaved":
        y = jnp.stack([y1, y2], axis=-1).reshape(xf.shape)
    else:
        y = jnp.concatenate([y1, y2], axis=-1)
    return y.astype(x.dtype)
