"""Non-finite and signed-zero scores: every implementation keeps the selection contract's ranking.

The contract (``sparse_index_jax.selection.contract``, ``kernels.ranking``): +inf ranks first, -inf last
among finite scores, NaN exactly as -inf (ties with it by position), -0.0 equal to +0.0, ineligible keys
below all of them. A score is NaN when q or k holds a NaN (the ReLU'd dot is NaN, and the head sum with
it), when an inf head weight meets a zero ReLU (inf * 0), when +inf and -inf terms meet in a head sum or
a dot, or when a key scale is NaN. Here NaN, +inf, -inf and -0.0 are put at random places of small
integer-valued q, k, w and k_scale (finite scores stay exact, so any summation order gives the same
value), with ragged rows and fewer eligible keys than ``topk``, and every implementation that runs on
this machine (``xla``; ``triton`` and ``mosaic_tpu`` interpreted on CPU) must return the reference's
indices for dsa, hisa, misa and misa_h.

Interpreted kernels use jax's float semantics, so they cannot show what a compiled backend does with
NaN (Triton lowers ``max`` to ``maxnumf``, which drops NaN; Mosaic TPU lowers ``!=`` to an ordered
compare, which never finds one). ``test_kernels_use_no_nan_ambiguous_float_ops`` therefore checks the
kernels' own jaxprs: no float op whose NaN behaviour differs between backends may appear in them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sparse_index_jax.kernels.dsa_topk import dsa_topk, index_scores
from sparse_index_jax.kernels.hisa_topk import hisa_topk
from sparse_index_jax.kernels.misa_topk import misa_topk
from sparse_index_jax.kernels.ranking import (INELIGIBLE_KEY, NEG_INF_KEY, POS_INF_KEY, ordered_keys, ranking_keys,
                                              relu, top_k_by_key)
from sparse_index_jax.kernels.tpu_block_sizes import DsaTpuBlockSizes

from selection_oracle import oracle

SPECIALS = (np.nan, np.inf, -np.inf, -0.0)
TPU_SMALL = DsaTpuBlockSizes(block_q=16, block_k=128, search_rows=8)
# B, T, S, H, d, topk: H = 3 is padded to 4 heads in the Triton kernels (a zero query meets inf keys there)
B, T, S, H, D, TOPK = 2, 5, 40, 3, 8, 8
METHODS = {
    "dsa": (dsa_topk, {}),
    "hisa": (hisa_topk, {"block_size": 8, "num_blocks": 3}),        # 5 blocks, 3 kept: the filter prunes
    "misa": (misa_topk, {"block_size": 8, "active_heads": 2}),
    "misa_h": (misa_topk, {"block_size": 8, "active_heads": 1, "candidates": 12}),
}
PALLAS = ("triton", "mosaic_tpu")


# ---------------------------------------------------------------------------------------------- the key


def _float_bits(values):
    return jnp.asarray(np.asarray(values, np.uint32).view(np.float32))


def test_ordered_keys_rank_non_finite_and_zeros():
    nans = _float_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF])  # signs and payloads
    assert np.all(np.asarray(ordered_keys(nans)) == NEG_INF_KEY)
    assert int(ordered_keys(jnp.float32(-jnp.inf))) == NEG_INF_KEY
    assert int(ordered_keys(jnp.float32(jnp.inf))) == POS_INF_KEY
    zeros = _float_bits([0x00000000, 0x80000000, 0x00000001, 0x807FFFFF])  # +-0.0 and subnormals tie
    assert np.all(np.asarray(ordered_keys(zeros)) == 0)
    ladder = jnp.asarray([-np.inf, -3e38, -1.0, -1.2e-38, 0.0, 1.2e-38, 1.0, 3e38, np.inf], jnp.float32)
    assert np.all(np.diff(np.asarray(ordered_keys(ladder)).astype(np.int64)) > 0)
    assert INELIGIBLE_KEY < NEG_INF_KEY


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=40, max_size=40))
def test_ordered_keys_order_is_the_float_order(patterns):
    """Any float32 bit patterns: key order == float order with NaN as -inf and subnormals as 0."""
    x = np.asarray(patterns, np.uint32).view(np.float32)
    want = np.where(np.isnan(x), -np.inf, np.where(np.abs(x) < np.finfo(np.float32).tiny, 0.0, x))
    keys = np.asarray(jax.jit(ordered_keys)(jnp.asarray(x))).astype(np.int64)  # one shape: one compilation
    for i in range(len(x)):
        for j in range(len(x)):
            assert (keys[i] < keys[j]) == (want[i] < want[j]) and (keys[i] == keys[j]) == (want[i] == want[j])


def test_top_k_by_key_places_nan_with_minus_inf_by_position():
    scores = jnp.asarray([[np.nan, -np.inf, 1.0, np.inf, -0.0, 0.0, np.nan, 2.0]], jnp.float32)
    eligible = jnp.asarray([[True] * 7 + [False]])
    idx, valid = top_k_by_key(ranking_keys(scores, eligible), 8)
    # +inf, 1, then the zeros by position, then NaN / -inf / NaN by position, then the ineligible key
    assert np.asarray(idx).tolist() == [[3, 2, 4, 5, 0, 1, 6, -1]]
    assert np.asarray(valid).tolist() == [[True] * 7 + [False]]


def test_relu_keeps_nan_and_matches_jax_relu():
    x = jnp.asarray([np.nan, np.inf, -np.inf, -0.0, 0.0, -2.5, 3.5], jnp.float32)
    got, want = np.asarray(relu(x)), np.asarray(jax.nn.relu(x))
    np.testing.assert_array_equal(got, want)  # NaN where NaN (XLA's max keeps it; Triton's maxnumf would not)
    g = jax.grad(lambda v: jnp.sum(relu(v)))(jnp.asarray([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0, 1.0])  # jax.nn.relu's gradient, 0 at 0


# -------------------------------------------------------------------- no NaN-ambiguous ops in kernels

_AMBIGUOUS = {"max", "min", "ne", "reduce_max", "reduce_min", "argmax", "argmin", "is_finite", "cummax", "cummin"}


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _ambiguous_float_ops(jaxpr, in_kernel=False, found=None):
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if in_kernel and eqn.primitive.name in _AMBIGUOUS and any(
                jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.invars if hasattr(v, "aval")):
            found.append(str(eqn)[:160])
        for sub in _sub_jaxprs(eqn.params):
            _ambiguous_float_ops(sub, in_kernel or eqn.primitive.name == "pallas_call", found)
    return found


def _case(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.integers(-2, 3, (B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.integers(-2, 3, (B, S, D)), jnp.float32)
    w = jnp.asarray(rng.integers(-2, 3, (B, T, H)), jnp.float32)
    k_scale = jnp.asarray(rng.choice([0.5, 1.0, 2.0], (B, S)), jnp.float32)
    return q, k, w, k_scale


@pytest.mark.parametrize("implementation", PALLAS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_kernels_use_no_nan_ambiguous_float_ops(method, implementation):
    """Inside every pallas_call body of the op: no float max/min/!= (their NaN semantics differ by backend:
    Triton maxnumf drops NaN, Mosaic's ordered != never sees one). Scores use ``ranking.relu`` and the
    integer ``ranking.ordered_keys``."""
    fn, options = METHODS[method]
    q, k, w, k_scale = _case()
    extra = {"block_sizes": TPU_SMALL} if implementation == "mosaic_tpu" else {}
    jaxpr = jax.make_jaxpr(lambda q, k, w, s: fn(q, k, w, topk=TOPK, k_scale=s, implementation=implementation,
                                                 **options, **extra))(q, k, w, k_scale)
    assert "pallas_call" in str(jaxpr), "no kernel traced: the check would prove nothing"
    assert _ambiguous_float_ops(jaxpr.jaxpr) == []


# ------------------------------------------------------------------ every implementation vs reference


def _inject(x, spots):
    x = np.array(x)
    flat = x.reshape(-1)
    for at, value in spots:
        flat[at % flat.size] = value
    return jnp.asarray(x)


def _spots(max_size):
    return st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=max_size)


def _faulty_inputs(seed, q_spots, k_spots, w_spots, s_spots, lengths, last):
    q, k, w, k_scale = _case(seed)
    q, k, w, k_scale = _inject(q, q_spots), _inject(k, k_spots), _inject(w, w_spots), _inject(k_scale, s_spots)
    kv_lengths = jnp.asarray(lengths, jnp.int32)
    # ragged rows; the last query positions of each row up to ``last``: early ones see fewer than TOPK keys
    q_positions = jnp.asarray(np.minimum(np.arange(T)[None, :] + np.asarray(last)[:, None] - T + 1, S - 1), jnp.int32)
    return dict(q=q, k=k, w=w, k_scale=k_scale, kv_lengths=kv_lengths, q_positions=q_positions)


_FAULTS = dict(
    seed=st.integers(0, 3),
    q_spots=_spots(3), k_spots=_spots(4), w_spots=_spots(3), s_spots=_spots(2),
    lengths=st.lists(st.integers(0, S), min_size=B, max_size=B),
    last=st.lists(st.integers(0, S - 1), min_size=B, max_size=B),
)


def _assert_same(got, want, label):
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]), err_msg=f"{label}: indices")
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]), err_msg=f"{label}: valid")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_FAULTS)
def test_dsa_reference_ranks_non_finite_scores_as_the_contract_says(seed, q_spots, k_spots, w_spots, s_spots,
                                                                    lengths, last):
    """The reference against a brute-force oracle on its own float32 scores (NaN as -inf, ties by position)."""
    args = _faulty_inputs(seed, q_spots, k_spots, w_spots, s_spots, lengths, last)
    idx, _ = dsa_topk(**args, topk=TOPK, implementation="xla")
    scores = np.asarray(index_scores(args["q"], args["k"], args["w"], args["k_scale"]))
    want = oracle(scores, np.asarray(args["q_positions"]), np.asarray(args["kv_lengths"]), TOPK)
    np.testing.assert_array_equal(np.asarray(idx), want)


def _check_method(method, implementation, data):
    fn, options = METHODS[method]
    args = _faulty_inputs(**{name: data.draw(strategy, label=name) for name, strategy in _FAULTS.items()})
    extra = {"block_sizes": TPU_SMALL} if implementation == "mosaic_tpu" else {}
    want = fn(**args, topk=TOPK, implementation="xla", **options)
    got = fn(**args, topk=TOPK, implementation=implementation, **options, **extra)
    _assert_same(got, want, f"{method}/{implementation}")


# Interpreted kernels compile for tens of seconds each (running them takes milliseconds), so the cases
# share one compilation per (method, implementation) and leave out what another case already runs:
# mosaic_tpu's misa and misa_h are the dsa TPU kernels on the routed heads, with the reference's router and
# re-rank; triton's misa is misa_h's router kernel and routed scan, ranked instead of position-ordered.
KERNEL_CASES = [("dsa", "triton"), ("hisa", "triton"), ("misa_h", "triton"), ("dsa", "mosaic_tpu"),
                ("hisa", "mosaic_tpu")]


@pytest.mark.parametrize("method,implementation", KERNEL_CASES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kernels_rank_non_finite_scores_as_the_reference(method, implementation, data):
    _check_method(method, implementation, data)


@pytest.mark.parametrize("method,implementation", KERNEL_CASES)
def test_kernels_rank_planted_nan_and_inf_keys(method, implementation):
    """Fixed cases against the reference: a NaN in k; a key whose score is +inf for every query of row 0
    (inf in one component that every head's query holds positive: the Triton kernels' padded fourth head,
    a zero query, must not turn it into 0 * inf = NaN); an all-inf key (+inf, -inf or NaN per head); an inf
    head weight (NaN where that head's ReLU is 0), a -inf one, and -0.0 in q and k."""
    fn, options = METHODS[method]
    q, k, w, k_scale = _case(1)
    q, k, w = np.array(q), np.array(k), np.array(w)
    k[0, 3, 0] = np.nan
    k[0, 30, :] = 0.0
    k[0, 30, 0] = np.inf
    q[0, :, :, 0] = 1.0
    w[0] = np.abs(w[0]) + 1.0
    w[0, 4, 1] = np.inf
    k[1, 20, :] = np.inf
    k[1, 7, :] = -0.0
    q[1, 2, 0, :] = -0.0
    w[1, :, 2] = -np.inf
    lengths = jnp.asarray([S, 33], jnp.int32)
    args = dict(q=jnp.asarray(q), k=jnp.asarray(k), w=jnp.asarray(w), k_scale=k_scale, kv_lengths=lengths,
                q_positions=lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32))  # as the property test's call
    extra = {"block_sizes": TPU_SMALL} if implementation == "mosaic_tpu" else {}
    want = fn(**args, topk=TOPK, implementation="xla", **options)
    got = fn(**args, topk=TOPK, implementation=implementation, **options, **extra)
    _assert_same(got, want, f"{method}/{implementation}")
