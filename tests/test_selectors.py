"""HISA, MISA and MISA-H: the invariants that tie them to DSA, causality, decode == prefill, the contract.

Integer-valued activations make every score exact in float32, so "equals DSA" can be asserted
bit for bit (including the order of ties) whatever summation order each path uses.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_index_jax.kernels.block_pooling import append_block_sums, pool_block_sums
from sparse_index_jax.kernels.misa_topk import route_heads
from sparse_index_jax import select_topk

from selection_oracle import check_contract, int_inputs

METHOD_OPTIONS = {
    "dsa": {},
    "hisa": {"block_size": 4, "num_blocks": 4},
    "misa": {"block_size": 4, "active_heads": 2},
    "misa_h": {"block_size": 4, "active_heads": 1, "candidates": 10},
}

# (B, S, H, d, topk). Shapes are fixed per case so jit compiles once and hypothesis varies the data,
# kv_lengths and positions (traced values). The last case has fewer keys than topk.
SHAPES = [(1, 13, 3, 4, 5), (2, 24, 2, 3, 8), (2, 6, 2, 2, 9)]


def equal(a, b):
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    np.testing.assert_array_equal(np.asarray(a.valid), np.asarray(b.valid))


def lengths(data, B, S):
    return np.array([data.draw(st.integers(0, S), label="kv_length") for _ in range(B)], np.int32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [3, 7])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_exact_configurations_equal_dsa(shape, block, data):
    """HISA with num_blocks*block_size >= S, MISA with every head, MISA-H with candidates >= S are DSA."""
    B, S, H, d, topk = shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    q, k, w = int_inputs(rng, B, S, S, H, d)
    kv = lengths(data, B, S)
    ref = select_topk(q, k, w, topk=topk, kv_lengths=kv)
    num_blocks = max(-(-S // block), -(-topk // block) + 1, 2)
    equal(select_topk(q, k, w, topk=topk, kv_lengths=kv, method="hisa", block_size=block,
                      num_blocks=num_blocks, query_chunk=5), ref)
    equal(select_topk(q, k, w, topk=topk, kv_lengths=kv, method="misa", block_size=block, active_heads=H,
                      query_chunk=4, key_chunk=5), ref)
    equal(select_topk(q, k, w, topk=topk, kv_lengths=kv, method="misa_h", block_size=block, active_heads=1,
                      candidates=max(S, topk)), ref)


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_hisa_keeps_every_dsa_choice_among_its_candidates(shape, data):
    """A DSA top-k token in the first or the query's own block (always HISA candidates) is in HISA's top-k."""
    B, S, H, d, topk = shape
    block = 2
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    q, k, w = int_inputs(rng, B, S, S, H, d)
    dsa = np.asarray(select_topk(q, k, w, topk=topk).indices)
    hisa = np.asarray(select_topk(q, k, w, topk=topk, method="hisa", block_size=block,
                                  num_blocks=-(-topk // block) + 1).indices)
    for b, t in np.ndindex(B, S):
        forced = [s for s in dsa[b, t] if s >= 0 and (s < block or s // block == t // block)]
        assert set(forced) <= set(hisa[b, t].tolist())


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
@pytest.mark.parametrize("shape", SHAPES[:2])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_causal_and_contract(method, shape, data):
    """Changing keys after position t never changes row t; the contract holds for every method."""
    B, S, H, d, topk = shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    q, k, w = int_inputs(rng, B, S, S, H, d)
    opts = METHOD_OPTIONS[method]
    kv = lengths(data, B, S)
    positions = rng.integers(-1, S + 1, (B, S)).astype(np.int32)
    sel = select_topk(q, k, w, topk=topk, method=method, kv_lengths=kv, q_positions=positions, **opts)
    check_contract(sel, positions, kv, S, topk)
    sel = select_topk(q, k, w, topk=topk, method=method, **opts)
    check_contract(sel, np.arange(S)[None], np.full(B, S), S, topk)
    t = data.draw(st.integers(0, S - 1), label="t")
    k2 = k.copy()
    k2[:, t + 1:] = rng.integers(-9, 10, k2[:, t + 1:].shape)
    sel2 = select_topk(q, k2, w, topk=topk, method=method, **opts)
    np.testing.assert_array_equal(np.asarray(sel.indices)[:, : t + 1], np.asarray(sel2.indices)[:, : t + 1])


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_decode_step_by_step_equals_prefill(method):
    """Each query alone against a cache that grows one key at a time (pooled sums updated incrementally)
    selects what the prefill selected; cache slots past the length hold garbage that must be ignored."""
    rng = np.random.default_rng(7)
    B, S, H, d, topk = 2, 27, 3, 4, 5
    q, k, w = int_inputs(rng, B, S, S, H, d)
    opts = dict(METHOD_OPTIONS[method])
    prefill = select_topk(q, k, w, topk=topk, method=method, **opts)
    cache = rng.integers(-9, 10, (B, S, d)).astype(np.float32)  # garbage beyond each length
    block = opts.get("block_size", 4)
    sums = jnp.zeros((B, -(-S // block), d), jnp.float32)
    for t in range(S):
        cache[:, t] = k[:, t]
        sums = append_block_sums(sums, jnp.asarray(k[:, t:t + 1]), None, jnp.full((B,), t), block)
        extra = {"block_sums": sums} if method != "dsa" else {}
        step = select_topk(q[:, t:t + 1], cache, w[:, t:t + 1], topk=topk, method=method,
                           kv_lengths=np.full(B, t + 1, np.int32), **opts, **extra)
        np.testing.assert_array_equal(np.asarray(step.indices)[:, 0], np.asarray(prefill.indices)[:, t])


def test_incremental_block_sums_equal_pooled():
    rng = np.random.default_rng(8)
    k = jnp.asarray(rng.standard_normal((2, 23, 4)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, (2, 23)), jnp.float32)
    lengths = jnp.array([23, 11])
    sums = jnp.zeros((2, 5, 4), jnp.float32)
    sums = append_block_sums(sums, k[:, :9], scale[:, :9], jnp.zeros(2, jnp.int32), 5)
    sums = append_block_sums(sums, k[:, 9:], scale[:, 9:], jnp.full(2, 9), 5)
    # row 1 only has 11 valid keys: rebuild its sums from those alone
    row1 = append_block_sums(jnp.zeros((1, 5, 4)), k[1:, :11], scale[1:, :11], jnp.zeros(1, jnp.int32), 5)
    np.testing.assert_allclose(sums[0], pool_block_sums(k, scale, lengths, 5)[0], rtol=1e-6)
    np.testing.assert_allclose(row1[0], pool_block_sums(k, scale, lengths, 5)[1], rtol=1e-6)


def test_misa_router_ignores_future_keys_of_the_own_block():
    """The public code's block mean leaks future keys of the query's block into routing; ours must not."""
    rng = np.random.default_rng(9)
    B, S, H, d = 1, 16, 4, 4
    q, k, w = int_inputs(rng, B, S, S, H, d)
    lengths = jnp.full((B,), S, jnp.int32)
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    route = lambda keys: np.asarray(route_heads(
        jnp.asarray(q), jnp.asarray(w), jnp.asarray(keys), None, pos, lengths,
        pool_block_sums(jnp.asarray(keys), None, lengths, 8), block_size=8, active_heads=2, query_chunk=4))
    base = route(k)
    k2 = k.copy()
    k2[:, 3:8] = 50 * rng.standard_normal((B, 5, d))  # future of query 2, same block
    np.testing.assert_array_equal(route(k2)[:, :3], base[:, :3])


def test_misa_routes_the_energetic_heads():
    """One head aligned with the keys, the others orthogonal/negative: the router must pick it."""
    B, S, H, d = 1, 32, 4, 4
    k = np.tile(np.array([1.0, 0, 0, 0], np.float32), (B, S, 1))
    q = np.zeros((B, S, H, d), np.float32)
    q[:, :, 2, 0] = 3.0   # head 2 sees the keys
    q[:, :, 0, 0] = -3.0  # head 0 is ReLU-dead on them
    q[:, :, 1, 1] = 3.0   # head 1 is orthogonal
    w = np.ones((B, S, H), np.float32)
    heads = route_heads(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), None, jnp.arange(S)[None],
                        jnp.full((B,), S), pool_block_sums(jnp.asarray(k), None, jnp.full((B,), S), 8),
                        block_size=8, active_heads=1, query_chunk=8)
    assert np.all(np.asarray(heads) == 2)
