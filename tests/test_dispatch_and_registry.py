"""One home for each word: the implementation names and ``auto`` (``kernels.dispatch``), the method registry
with its options dataclasses, ``Selector``, and the block sizes that pass through the entry points."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_index_jax import IndexerConfig, IndexerWeights, Selector, select_topk
from sparse_index_jax.kernels import dispatch, dsa_topk, hisa_topk, misa_topk, sparse_mla
from sparse_index_jax.kernels.block_pooling import pool_block_sums
from sparse_index_jax.kernels.options import OptionError
from sparse_index_jax.kernels.sparse_mla import MlaTpuBlockSizes, MlaTritonBlockSizes
from sparse_index_jax.kernels.tpu_block_sizes import DsaTpuBlockSizes
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes
from sparse_index_jax.selection import METHODS
from sparse_index_jax.selection.methods import option_names

SMALL_TPU = DsaTpuBlockSizes(block_q=16, block_k=128, search_rows=8)


def _ints(shape, seed, low=-3, high=4):
    """Small integers as float32: every score is exact, so all implementations must agree bit for bit."""
    return jnp.asarray(np.random.default_rng(seed).integers(low, high, shape), jnp.float32)


def _indexer_inputs(B=1, T=20, S=20, H=2, d=8):
    return _ints((B, T, H, d), 0), _ints((B, S, d), 1), _ints((B, T, H), 2, 0, 3)


# ---- implementation names and auto ------------------------------------------------------------------

def test_pallas_is_refused_with_its_two_new_names():
    q, k, w = _indexer_inputs()
    with pytest.raises(ValueError, match="'triton' \\(GPU kernels\\) or 'mosaic_tpu' \\(TPU kernels\\)"):
        dsa_topk.dsa_topk(q, k, w, topk=4, implementation="pallas")


def test_auto_records_why_it_skipped_an_implementation(monkeypatch):
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    plain = sparse_mla.backend_for(q_dtype=jnp.bfloat16)
    assert plain.name == "triton" and "best of ['triton', 'xla'] on platform 'gpu'" in plain.reason
    fp8 = sparse_mla.backend_for(q_dtype=jnp.float8_e4m3fn)
    assert fp8.name == "xla" and "skipped 'triton': its kernels take q in bfloat16" in fp8.reason
    with pytest.raises(ValueError, match="cannot serve this call: its kernels take q"):
        sparse_mla.backend_for("triton", q_dtype=jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="cannot serve this call on platform 'gpu'"):
        dsa_topk.backend_for("mosaic_tpu")
    monkeypatch.setattr(dispatch, "platform", lambda: "tpu")
    probs = sparse_mla.backend_for(return_probs=True)
    assert probs.name == "xla" and "skipped 'mosaic_tpu': its kernel does not return probabilities" in probs.reason
    assert hisa_topk.backend_for(block_size=64).name == "xla"  # compiled TPU kernels need lane-aligned blocks
    assert hisa_topk.backend_for(block_size=128).name == "mosaic_tpu"


def test_every_op_declares_its_implementations_with_the_dispatch_names():
    for op in (dsa_topk.OP, hisa_topk.OP, misa_topk.OP, sparse_mla.OP):
        assert set(op.implementations) == set(dispatch.IMPLEMENTATIONS), op.name
        assert set(op.block_sizes) <= set(dispatch.IMPLEMENTATIONS) - {"xla"}


# ---- the TPU kernels through the entry points, with block sizes passed through ----------------------

@pytest.mark.skipif(jax.default_backend() != "cpu", reason="TPU interpret mode from the entry points on CPU")
def test_entry_points_run_the_tpu_kernels_interpreted_on_cpu():
    q, k, w = _indexer_inputs(B=2, T=24, S=24)
    lengths = jnp.array([24, 17])
    for method, options in (("dsa", {}), ("hisa", {"block_size": 4, "num_blocks": 3}),
                            ("misa", {"block_size": 4, "active_heads": 1}),
                            ("misa_h", {"block_size": 4, "active_heads": 1, "candidates": 8})):
        want = select_topk(q, k, w, topk=5, method=method, kv_lengths=lengths, implementation="xla", **options)
        got = select_topk(q, k, w, topk=5, method=method, kv_lengths=lengths, implementation="mosaic_tpu",
                          block_sizes=SMALL_TPU, **options)
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices), err_msg=method)
        np.testing.assert_array_equal(np.asarray(got.valid), np.asarray(want.valid), err_msg=method)
    rng = np.random.default_rng(3)
    mq, kv = jnp.asarray(rng.normal(size=(1, 6, 2, 16)), jnp.float32), jnp.asarray(rng.normal(size=(1, 9, 16)),
                                                                                   jnp.float32)
    idx = jnp.asarray(rng.integers(0, 9, (1, 6, 8)), jnp.int32)
    valid = jnp.ones(idx.shape, bool)
    got = sparse_mla.sparse_mla(mq, kv, idx, valid, scale=0.3, v_dim=8, implementation="mosaic_tpu",
                                block_sizes=MlaTpuBlockSizes(block_k=8, query_chunk=4))
    want = sparse_mla.sparse_mla(mq, kv, idx, valid, scale=0.3, v_dim=8, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_block_sizes_must_fit_the_chosen_implementation():
    q, k, w = _indexer_inputs()
    with pytest.raises(ValueError, match="do not fit implementation 'mosaic_tpu', which takes DsaTpuBlockSizes"):
        dsa_topk.dsa_topk(q, k, w, topk=4, implementation="mosaic_tpu", block_sizes=MlaTpuBlockSizes())
    with pytest.raises(ValueError, match="implementation 'triton', which takes DsaTritonBlockSizes"):
        dsa_topk.dsa_topk(q, k, w, topk=4, implementation="triton", block_sizes=SMALL_TPU)
    with pytest.raises(ValueError, match="the xla one takes none"):
        select_topk(q, k, w, topk=4, implementation="xla", block_sizes=SMALL_TPU)
    idx, ok = jnp.zeros((1, 2, 3), jnp.int32), jnp.ones((1, 2, 3), bool)
    with pytest.raises(ValueError, match="takes MlaTritonBlockSizes"):
        sparse_mla.sparse_mla(jnp.zeros((1, 2, 2, 16)), jnp.zeros((1, 4, 16)), idx, ok, scale=1.0, v_dim=8,
                              implementation="triton", block_sizes=MlaTpuBlockSizes())
    assert MlaTritonBlockSizes().block_h == 64
    with pytest.raises(ValueError, match="DsaTritonBlockSizes.radix_tile=24: must be a power of 2 >= 16"):
        DsaTritonBlockSizes(radix_tile=24)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Triton kernels interpreted on CPU")
def test_triton_tiles_pass_through_and_keep_the_result():
    """Smaller tiles than the defaults (more radix tiles per row, a bucket smaller than the row, fewer head
    queries per scoring program): the same indices as the reference, for every method."""
    q, k, w = _indexer_inputs(B=2, T=40, S=40, H=2, d=16)
    lengths = jnp.array([40, 29])
    tiles = DsaTritonBlockSizes(block_k=16, head_queries=16, radix_tile=16, radix_bucket=16)
    for method, options in (("dsa", {}), ("hisa", {"block_size": 4, "num_blocks": 4}),
                            ("misa_h", {"block_size": 4, "active_heads": 1, "candidates": 12})):
        want = select_topk(q, k, w, topk=6, method=method, kv_lengths=lengths, implementation="xla", **options)
        got = select_topk(q, k, w, topk=6, method=method, kv_lengths=lengths, implementation="triton",
                          block_sizes=tiles, **options)
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices), err_msg=method)


# ---- the registry, its options, and Selector --------------------------------------------------------

def test_the_registry_is_the_one_vocabulary_of_the_configs():
    assert list(METHODS) == ["dsa", "hisa", "misa", "misa_h"]
    assert set(IndexerConfig.option_fields()) == set(option_names())
    assert set(IndexerWeights.field_names()) | {"topk", "method"} | set(option_names()) == {
        f.name for f in dataclasses.fields(IndexerConfig)}
    cfg = IndexerConfig(hidden_size=8, q_input_dim=8, n_heads=4, method="hisa", topk=64)
    assert cfg.selector.options == METHODS["hisa"].options()  # option fields left None: the registry's defaults
    assert cfg.selector.block_size == 128 and Selector().block_size is None


def test_one_rule_one_message_wherever_the_value_comes_from():
    rule = "(num_blocks - 1) * block_size = 24 < topk=64"
    q, k, w = _indexer_inputs()
    with pytest.raises(ValueError, match=r"^IndexerConfig\.num_blocks: \(num_blocks - 1\)"):
        IndexerConfig(hidden_size=8, q_input_dim=8, method="hisa", topk=64, block_size=8, num_blocks=4)
    with pytest.raises(OptionError, match=r"^select_topk: \(num_blocks - 1\)") as err:
        select_topk(q, k, w, topk=64, method="hisa", block_size=8, num_blocks=4)
    assert rule in str(err.value) and err.value.field == "num_blocks"
    with pytest.raises(OptionError, match=r"^hisa_topk: \(num_blocks - 1\)"):
        hisa_topk.hisa_topk(q, k, w, topk=64, block_size=8, num_blocks=4)
    with pytest.raises(OptionError, match=r"^\(num_blocks - 1\)"):
        Selector.create("hisa", 64, block_size=8, num_blocks=4)


def test_selector_values():
    s = Selector.create("misa_h", 16, block_size=4, active_heads=2)
    assert s.options.candidates_for(16) == 64 and hash(s) == hash(Selector.create("misa_h", 16, block_size=4,
                                                                                   active_heads=2))
    assert Selector.from_dict(s.as_dict()) == s
    assert s.replace(topk=32).options == s.options  # same method: options kept
    assert s.replace(method="hisa").options == METHODS["hisa"].options()  # a new method starts from its defaults
    with pytest.raises(OptionError, match="method 'dsa' takes no option\\(s\\) \\['num_blocks'\\]"):
        Selector.create("dsa", 16, num_blocks=4)
    with pytest.raises(OptionError, match="unknown method 'flat'"):
        Selector("flat")
    with pytest.raises(OptionError, match="active_heads=3 exceeds the 2 indexer heads"):
        Selector.create("misa", 8, active_heads=3).check_heads(2)


def test_block_sums_are_for_the_block_methods_only():
    q, k, w = _indexer_inputs()
    with pytest.raises(ValueError, match="method 'dsa' pools no blocks"):
        select_topk(q, k, w, topk=4, block_sums=pool_block_sums(k, None, jnp.array([20]), 4))
