"""Independent float64 YaRN frequencies (HF transformers' rule), shared by the indexer and attention oracles."""

from __future__ import annotations

import numpy as np


def np_yarn(rope_dim, theta, factor, orig_max, beta_fast, beta_slow, mscale, mscale_all_dim):
    """(inverse frequencies, cos/sin multiplier, softmax mscale) of the HF / DeepSeek YaRN rule."""
    def corr(rot):
        return rope_dim * np.log(orig_max / (rot * 2 * np.pi)) / (2 * np.log(theta))
    low, high = max(np.floor(corr(beta_fast)), 0), min(np.ceil(corr(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2) - low) / (high - low), 0, 1)
    extra = theta ** (-np.arange(0, rope_dim, 2) / rope_dim)
    inv = extra / factor * ramp + extra * (1 - ramp)
    ms = lambda m: 1.0 if factor <= 1 else 0.1 * m * np.log(factor) + 1.0
    return inv, ms(mscale) / ms(mscale_all_dim), ms(mscale_all_dim)
