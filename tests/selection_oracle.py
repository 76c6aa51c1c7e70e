"""Brute-force selection oracle and contract checks shared by the selection tests."""

from __future__ import annotations

import numpy as np

from sparse_index_jax import Selection


def oracle(scores: np.ndarray, q_positions: np.ndarray, kv_lengths: np.ndarray, topk: int):
    """Brute force on given float32 scores: eligible keys sorted by (-score, position), NaN as -inf."""
    B, T, S = scores.shape
    indices = np.full((B, T, topk), -1, np.int32)
    for b in range(B):
        for t in range(T):
            eligible = [s for s in range(S) if s <= q_positions[b, t] and s < kv_lengths[b]]
            key = lambda s: (-(-np.inf if np.isnan(scores[b, t, s]) else scores[b, t, s]), s)
            chosen = sorted(eligible, key=key)[:topk]
            indices[b, t, : len(chosen)] = chosen
    return indices


def int_inputs(rng, B, T, S, H, d, lo=-2, hi=3):
    """Small integers: every score is exact in float32, so any summation order gives the same value and
    ties are frequent."""
    q = rng.integers(lo, hi, (B, T, H, d)).astype(np.float32)
    k = rng.integers(lo, hi, (B, S, d)).astype(np.float32)
    w = rng.integers(lo, hi, (B, T, H)).astype(np.float32)
    return q, k, w


def check_contract(sel: Selection, q_positions, kv_lengths, S, topk):
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    assert idx.dtype == np.int32 and valid.dtype == bool and idx.shape[-1] == topk
    assert np.array_equal(idx >= 0, valid), "indices are -1 exactly where valid is False"
    # valid slots first, then padding
    assert np.all(np.diff(valid.astype(int), axis=-1) <= 0)
    qp = np.broadcast_to(np.asarray(q_positions), idx.shape[:2])
    eligible = np.clip(np.minimum(qp + 1, np.asarray(kv_lengths)[:, None]), 0, S)
    assert np.array_equal(valid.sum(-1), np.minimum(topk, eligible)), "min(topk, #eligible) valid slots"
    for b, t in np.ndindex(*idx.shape[:2]):
        picked = idx[b, t][valid[b, t]]
        assert len(set(picked.tolist())) == len(picked), "no duplicates"
        assert np.all(picked <= qp[b, t]) and np.all(picked < kv_lengths[b]), "causal and within kv_lengths"
