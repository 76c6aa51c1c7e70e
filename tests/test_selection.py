"""The selection contract of ``select_topk`` (method "dsa") against a brute-force oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_index_jax.kernels import dsa_topk
from sparse_index_jax.kernels.ranking import ranking_keys
from sparse_index_jax import Selection, select_topk

from selection_oracle import check_contract, int_inputs, oracle


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_matches_brute_force_exactly(data):
    B = data.draw(st.integers(1, 2))
    S = data.draw(st.integers(1, 40))
    T = data.draw(st.integers(1, S))
    H = data.draw(st.integers(1, 4))
    d = data.draw(st.integers(1, 8))
    topk = data.draw(st.integers(1, 48))
    ragged = data.draw(st.booleans())
    kv_lengths = np.array([data.draw(st.integers(0, S)) for _ in range(B)] if ragged else [S] * B, np.int32)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    q, k, w = int_inputs(rng, B, T, S, H, d)
    q_positions = None
    if data.draw(st.booleans()):
        q_positions = rng.integers(-1, S + 2, (B, T)).astype(np.int32)  # arbitrary, even out of range
    sel = select_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), topk=topk, q_positions=q_positions,
                      kv_lengths=kv_lengths if ragged else None,
                      query_chunk=data.draw(st.integers(1, 16)), key_chunk=data.draw(st.integers(1, 16)))
    qp = q_positions if q_positions is not None else kv_lengths[:, None] - T + np.arange(T)[None]
    scores = np.asarray(dsa_topk.index_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)))
    np.testing.assert_array_equal(np.asarray(sel.indices), oracle(scores, qp, kv_lengths, topk))
    check_contract(sel, qp, kv_lengths, S, topk)


def test_continuous_inputs_are_exact_top_k():
    """Float inputs: every selected score >= every unselected eligible score (to float32 rounding)."""
    rng = np.random.default_rng(1)
    B, T, S, H, d, topk = 2, 96, 96, 8, 32, 16
    q = rng.standard_normal((B, T, H, d)).astype(np.float32)
    k = rng.standard_normal((B, S, d)).astype(np.float32)
    w = rng.standard_normal((B, T, H)).astype(np.float32)
    sel = select_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), topk=topk, query_chunk=32, key_chunk=40)
    check_contract(sel, np.arange(T)[None], np.full(B, S), S, topk)
    scores = np.einsum("bthd,bsd->bths", q.astype(np.float64), k)
    scores = np.einsum("bths,bth->bts", np.maximum(scores, 0), w)
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    for b, t in np.ndindex(B, T):
        chosen = idx[b, t][valid[b, t]]
        rest = np.setdiff1d(np.arange(t + 1), chosen)
        if len(rest):
            assert scores[b, t, chosen].min() >= scores[b, t, rest].max() - 1e-5
        assert np.all(np.diff(scores[b, t, chosen]) <= 1e-5), "best first"


def test_fewer_keys_than_topk_selects_all_and_pads():
    rng = np.random.default_rng(2)
    q, k, w = (jnp.asarray(a) for a in int_inputs(rng, 1, 5, 5, 2, 4))
    sel = select_topk(q, k, w, topk=8)
    assert sel.indices.shape == (1, 5, 8)
    for t in range(5):
        assert sorted(np.asarray(sel.indices[0, t, : t + 1]).tolist()) == list(range(t + 1))
        assert np.all(np.asarray(sel.indices[0, t, t + 1:]) == -1)
        assert not np.any(np.asarray(sel.valid[0, t, t + 1:]))


def test_ties_go_to_the_lower_position():
    """All scores equal (w = 0): the earliest positions are kept, in increasing order."""
    q = jnp.ones((1, 12, 2, 4))
    k = jnp.ones((1, 12, 4))
    w = jnp.zeros((1, 12, 2))
    sel = select_topk(q, k, w, topk=4, key_chunk=5)
    for t in range(12):
        expected = list(range(min(4, t + 1))) + [-1] * max(0, 4 - t - 1)
        assert np.asarray(sel.indices[0, t]).tolist() == expected


def test_negative_zero_ties_with_positive_zero():
    """ReLU plateaus give +0.0 and -0.0 (negative head weights): they must tie, broken by position."""
    keys = ranking_keys(jnp.array([0.0, -0.0, 0.0, -0.0]), jnp.ones(4, bool))
    assert len(set(np.asarray(keys).tolist())) == 1


def test_nan_and_inf_scores_are_defined():
    """NaN ranks as -inf (kept only when slots remain), +inf ranks first, -inf stays eligible."""
    d = 2
    k = np.ones((1, 6, d), np.float32)
    k[0, 1] = np.nan
    k[0, 2] = np.inf
    k[0, 3] = -1.0  # score 0 after ReLU
    q = np.ones((1, 1, 1, d), np.float32)
    w = np.ones((1, 1, 1), np.float32)
    sel = select_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), topk=6, q_positions=np.array([5]))
    assert np.asarray(sel.indices[0, 0]).tolist() == [2, 0, 4, 5, 3, 1]
    assert bool(np.all(sel.valid))
    sel = select_topk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(-w), topk=6, q_positions=np.array([5]))
    # negative weight: key 3 scores 0, keys 0/4/5 tie at -2 (by position), then key 2 (+inf * -1 = -inf)
    # ties with key 1 (NaN ranks as -inf), so the lower position, 1, comes first
    assert np.asarray(sel.indices[0, 0]).tolist() == [3, 0, 4, 5, 1, 2]


def test_ragged_decode_rows():
    """Decode (T = 1) against a cache with per-row lengths: the query sits at position length - 1."""
    rng = np.random.default_rng(3)
    q, k, w = (jnp.asarray(a) for a in int_inputs(rng, 3, 1, 20, 2, 4))
    lengths = np.array([1, 7, 20], np.int32)
    sel = select_topk(q, k, w, topk=4, kv_lengths=lengths)
    check_contract(sel, (lengths - 1)[:, None], lengths, 20, 4)
    assert np.asarray(sel.valid.sum(-1)).ravel().tolist() == [1, 4, 4]
    empty = select_topk(q, k, w, topk=4, kv_lengths=np.array([0, 0, 0]))
    assert not np.any(np.asarray(empty.valid)) and np.all(np.asarray(empty.indices) == -1)


def test_fp8_key_scale_multiplies_scores():
    rng = np.random.default_rng(4)
    q, k, w = int_inputs(rng, 1, 10, 10, 2, 4, lo=0, hi=3)
    scale = rng.uniform(0.1, 2.0, (1, 10)).astype(np.float32)
    q8, k8 = jnp.asarray(q, jnp.float8_e4m3fn), jnp.asarray(k, jnp.float8_e4m3fn)
    sel = select_topk(q8, k8, jnp.asarray(w), topk=3, k_scale=jnp.asarray(scale))
    scores = np.asarray(dsa_topk.index_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w))) * scale[:, None, :]
    np.testing.assert_array_equal(np.asarray(sel.indices), oracle(scores, np.arange(10)[None], np.array([10]), 3))


def test_deterministic_under_jit_and_chunking():
    rng = np.random.default_rng(5)
    q, k, w = (jnp.asarray(a) for a in int_inputs(rng, 2, 33, 33, 3, 5))
    lengths = jnp.array([33, 20])
    f = jax.jit(lambda q, k, w, n: select_topk(q, k, w, topk=7, kv_lengths=n, query_chunk=8, key_chunk=16))
    a, b = f(q, k, w, lengths), f(q, k, w, lengths)
    c = select_topk(q, k, w, topk=7, kv_lengths=lengths, query_chunk=33, key_chunk=33)
    for x in (b, c):
        np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(x.indices))
        np.testing.assert_array_equal(np.asarray(a.valid), np.asarray(x.valid))


def test_selection_mask_and_counts():
    sel = Selection(jnp.array([[[2, 0, -1]]], jnp.int32), jnp.array([[[True, True, False]]]))
    assert np.asarray(sel.to_mask(4)).tolist() == [[[True, False, True, False]]]
    assert np.asarray(sel.counts()).tolist() == [[2]]
    assert sel.topk == 3


def _args(B=1, T=4, S=6, H=2, d=3):
    return jnp.zeros((B, T, H, d)), jnp.zeros((B, S, d)), jnp.zeros((B, T, H))


@pytest.mark.parametrize("change, kwargs, message", [
    ({"q": jnp.zeros((4, 2, 3))}, {}, "q must have shape [B, T, H, d]"),
    ({"k": jnp.zeros((1, 6, 5))}, {}, "k must have shape [B=1, S, d=3]"),
    ({"k": jnp.zeros((2, 6, 3))}, {}, "k must have shape [B=1, S, d=3]"),
    ({"w": jnp.zeros((1, 4, 3))}, {}, "w must have shape [B, T, H] = (1, 4, 2)"),
    ({"k": jnp.zeros((1, 0, 3))}, {}, "S = 0"),
    ({"q": jnp.zeros((1, 0, 2, 3)), "w": jnp.zeros((1, 0, 2))}, {}, "q has an empty dimension"),
    ({}, {"topk": 0}, "topk must be a positive int"),
    ({}, {"topk": -3}, "topk must be a positive int"),
    ({}, {"topk": 2.5}, "topk must be a positive int"),
    ({}, {"kv_lengths": jnp.array([7])}, "kv_lengths must lie in [0, S=6]"),
    ({}, {"kv_lengths": jnp.array([-1])}, "kv_lengths must lie in [0, S=6]"),
    ({}, {"kv_lengths": jnp.array([3, 3])}, "kv_lengths must be an int array of shape [B]"),
    ({}, {"kv_lengths": jnp.array([3.0])}, "kv_lengths must be an int array of shape [B]"),
    ({}, {"q_positions": jnp.arange(5)}, "q_positions must be an int array of shape [T]"),
    ({}, {"k_scale": jnp.ones((1, 5))}, "k_scale must be a float [B, S]"),
    ({}, {"method": "nope"}, "unknown method 'nope'"),
    ({}, {"block_size": 4}, "takes no option(s) ['block_size']"),
    ({}, {"method": "hisa", "num_blocks": 1}, "num_blocks must be >= 2"),
    ({}, {"method": "hisa", "num_blocks": 3, "block_size": 4, "topk": 9}, "(num_blocks - 1) * block_size = 8 < topk=9"),
    ({}, {"method": "misa", "active_heads": 3}, "active_heads=3 exceeds the 2 indexer heads"),
    ({}, {"method": "misa_h", "active_heads": 1, "candidates": 1}, "candidates=1 must be >= topk=2"),
    ({}, {"method": "hisa", "block_sums": jnp.zeros((1, 2, 3))}, "block_sums must be float32"),
    ({}, {"implementation": "cuda"}, "implementation must be one of"),
    ({}, {"query_chunk": 0}, "query_chunk must be a positive int"),
])
def test_bad_input_is_named(change, kwargs, message):
    q, k, w = _args()
    args = {"q": q, "k": k, "w": w, **change}
    kwargs = {"topk": 2, **kwargs}
    with pytest.raises((ValueError, TypeError)) as err:
        select_topk(args["q"], args["k"], args["w"], **kwargs)
    assert message in str(err.value)


def test_integer_activations_are_rejected_with_dtype():
    q, k, w = _args()
    with pytest.raises(TypeError, match="q must be a floating dtype"):
        select_topk(q.astype(jnp.int32), k, w, topk=2)


def test_backend_choice_says_why():
    q, k, w = _args()
    with pytest.raises(ValueError, match="implementation must be one of"):
        select_topk(q, k, w, topk=2, implementation="pallas")  # now two backends: triton, mosaic_tpu
    expected = "triton" if jax.default_backend() == "gpu" else "xla"
    assert f"auto picked {expected!r}" in dsa_topk.backend_for("auto").reason
