"""Pallas TPU kernels against the plain-JAX reference, in TPU interpret mode on CPU.

Interpret mode (``pltpu.InterpretParams``) simulates VMEM, SMEM and DMA: out-of-bounds reads raise and
uninitialised memory reads as NaN, so a kernel that reads outside its blocks or skips a write fails
here. Inputs are small integers: every score is exact in float32, so the comparison is exact, and
ties are everywhere (the tie rule is tested, not dodged).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from sparse_index_jax.kernels.block_pooling import pool_block_sums
from sparse_index_jax.kernels.dsa_topk import backend_for
from sparse_index_jax.kernels.dsa_topk.mosaic_tpu import dsa_topk_mosaic_tpu
from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference
from sparse_index_jax.kernels.hisa_topk.mosaic_tpu import hisa_topk_mosaic_tpu
from sparse_index_jax.kernels.hisa_topk.reference import hisa_topk_reference
from sparse_index_jax.kernels.misa_topk.mosaic_tpu import misa_topk_mosaic_tpu
from sparse_index_jax.kernels.misa_topk.reference import misa_topk_reference
from sparse_index_jax.kernels.sparse_mla.mosaic_tpu import MlaTpuBlockSizes, sparse_mla_mosaic_tpu
from sparse_index_jax.kernels.sparse_mla.reference import sparse_mla_reference
from sparse_index_jax.kernels.tpu_block_sizes import DSA_BLOCK_SIZES, DsaTpuBlockSizes, dsa_block_sizes, tpu_generation

SMALL = DsaTpuBlockSizes(block_q=16, block_k=128, search_rows=8)


def _inputs(B, T, S, H, d, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.integers(-2, 3, (B, T, H, d)), dtype)
    k = jnp.asarray(rng.integers(-2, 3, (B, S, d)), dtype)
    w = jnp.asarray(rng.integers(-2, 3, (B, T, H)), jnp.float32)
    positions = jnp.asarray(np.sort(rng.integers(0, S, (B, T)), axis=1), jnp.int32)
    return q, k, w, positions


@pytest.mark.parametrize("B,T,S,H,d,topk,lengths,scaled,dtype", [
    (2, 37, 300, 3, 16, 20, (300, 211), False, jnp.float32),    # ragged T and S, ragged rows
    (1, 16, 128, 2, 8, 200, (128,), False, jnp.float32),        # topk > S: padding slots
    (2, 24, 260, 4, 32, 7, (0, 133), True, jnp.bfloat16),       # an empty row, fp8-style key scales, bf16
    (1, 40, 517, 5, 8, 64, (517,), False, jnp.float32),         # several key blocks, causal skipping
])
def test_dsa_tpu_kernel_equals_reference(B, T, S, H, d, topk, lengths, scaled, dtype):
    q, k, w, positions = _inputs(B, T, S, H, d, dtype=dtype)
    k_scale = jnp.asarray(np.random.default_rng(1).choice([0.5, 1.0, 2.0], (B, S)), jnp.float32) if scaled else None
    lengths = jnp.asarray(lengths, jnp.int32)
    got = dsa_topk_mosaic_tpu(q, k, w, k_scale, positions, lengths, topk=topk, block_sizes=SMALL)
    want = dsa_topk_reference(q, k, w, k_scale, positions, lengths, topk=topk, query_chunk=16, key_chunk=64)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_dsa_tpu_kernel_in_small_query_chunks():
    """A chunk budget of one query block: several chunks, the last one padded with ineligible rows."""
    q, k, w, positions = _inputs(1, 45, 256, 2, 8, seed=3)
    lengths = jnp.asarray([256], jnp.int32)
    got = dsa_topk_mosaic_tpu(q, k, w, None, positions, lengths, topk=9, block_sizes=SMALL, chunk_bytes=16 * 256 * 4)
    want = dsa_topk_reference(q, k, w, None, positions, lengths, topk=9, query_chunk=16, key_chunk=64)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("B,T,S,H,d,topk,block,kept,lengths", [
    (2, 37, 300, 3, 16, 20, 16, 4, (300, 211)),   # ragged T, S and rows; blocks pruned
    (1, 20, 130, 2, 8, 40, 8, 8, (130,)),         # a partial last block
    (2, 11, 64, 2, 8, 100, 16, 3, (0, 50)),       # an empty row; topk > the kept candidates: padding
])
def test_hisa_tpu_kernels_equal_reference(B, T, S, H, d, topk, block, kept, lengths):
    """Block sizes are powers of two, so block means of integer keys are exact and the comparison is too."""
    q, k, w, positions = _inputs(B, T, S, H, d, seed=4)
    lengths = jnp.asarray(lengths, jnp.int32)
    sums = pool_block_sums(k, None, lengths, block)
    options = dict(topk=topk, block_size=block, num_blocks=kept, query_chunk=16)
    got = hisa_topk_mosaic_tpu(q, k, w, None, positions, lengths, sums, block_sizes=SMALL, **options)
    want = hisa_topk_reference(q, k, w, None, positions, lengths, sums, **options)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("candidates", [None, 24])  # MISA, MISA-H
def test_misa_tpu_kernels_equal_reference(candidates):
    q, k, w, positions = _inputs(2, 29, 200, 4, 8, seed=5)
    lengths = jnp.asarray([200, 150], jnp.int32)
    sums = pool_block_sums(k, None, lengths, 16)
    options = dict(topk=12, block_size=16, active_heads=2, candidates=candidates, query_chunk=8, key_chunk=64)
    got = misa_topk_mosaic_tpu(q, k, w, None, positions, lengths, sums, block_sizes=SMALL, **options)
    want = misa_topk_reference(q, k, w, None, positions, lengths, sums, **options)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _mla_inputs(B, T, S, H, D, k, seed=0, kv_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((B, S, D)), kv_dtype)
    valid = rng.random((B, T, k)) < 0.8
    valid[0, min(3, T - 1)] = False                       # a query with nothing selected: zeros
    indices = np.where(valid, rng.integers(0, S, (B, T, k)), -1).astype(np.int32)
    return q, kv, jnp.asarray(indices), jnp.asarray(valid)


@pytest.mark.parametrize("B,T,S,H,D,v_dim,k,kv_dtype", [
    (2, 19, 70, 4, 24, 16, 21, jnp.float32),   # k not a multiple of block_k, T not of query_chunk
    (1, 1, 300, 8, 40, 32, 64, jnp.bfloat16),  # decode: one query, a bf16 cache
])
def test_sparse_mla_tpu_kernel_matches_reference(B, T, S, H, D, v_dim, k, kv_dtype):
    q, kv, indices, valid = _mla_inputs(B, T, S, H, D, k, kv_dtype=kv_dtype)
    blocks = MlaTpuBlockSizes(block_k=8, query_chunk=8)
    got = sparse_mla_mosaic_tpu(q, kv, indices, valid, scale=0.2, v_dim=v_dim, block_sizes=blocks)
    want = sparse_mla_reference(q, kv, indices, valid, scale=0.2, v_dim=v_dim, query_chunk=8)
    np.testing.assert_allclose(got, want, atol=2e-6)  # online vs one-shot softmax: rounding only
    assert not np.asarray(got[0, min(3, T - 1)]).any()


def test_sparse_mla_tpu_is_differentiable_like_the_reference():
    import jax

    q, kv, indices, valid = _mla_inputs(1, 9, 40, 2, 16, 12, seed=1)
    blocks = MlaTpuBlockSizes(block_k=8, query_chunk=4)
    kernel = lambda q, kv: jnp.sum(jnp.sin(sparse_mla_mosaic_tpu(q, kv, indices, valid, scale=0.3, v_dim=8,
                                                                  block_sizes=blocks)))
    reference = lambda q, kv: jnp.sum(jnp.sin(sparse_mla_reference(q, kv, indices, valid, scale=0.3, v_dim=8,
                                                                    query_chunk=4)))
    for got, want in zip(jax.grad(kernel, (0, 1))(q, kv), jax.grad(reference, (0, 1))(q, kv)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="block_k=12"):
        MlaTpuBlockSizes(block_k=12).check()


def test_block_sizes_are_checked_before_tracing():
    with pytest.raises(ValueError, match="block_k=100: must be a positive multiple of 128"):
        DsaTpuBlockSizes(block_k=100).check()
    with pytest.raises(ValueError, match="block_q=12: must be a positive multiple of 8"):
        DsaTpuBlockSizes(block_q=12).check()
    q, k, w, positions = _inputs(1, 8, 128, 1, 8)
    with pytest.raises(ValueError, match="block_size to be a multiple of 128"):  # compiled (interpret=False)
        hisa_topk_mosaic_tpu(q, k, w, None, positions, jnp.asarray([128]), pool_block_sums(k, None, jnp.asarray([128]), 16),
                             topk=4, block_size=16, num_blocks=4, query_chunk=8, interpret=False)
    with pytest.raises(ValueError, match="multiple of search_rows"):
        dsa_topk_mosaic_tpu(q, k, w, None, positions, jnp.asarray([128]), topk=4,
                            block_sizes=DsaTpuBlockSizes(block_q=16, block_k=128, search_rows=24))


def test_generations_and_their_defaults():
    assert tpu_generation("TPU v5 lite") == "v5e"
    assert tpu_generation("TPU v5p") == "v5p"
    assert tpu_generation("TPU v6 lite") == "v6e"
    for gen, blocks in DSA_BLOCK_SIZES.items():
        assert dsa_block_sizes(gen) is blocks.check()
    with pytest.raises(ValueError, match="unknown TPU generation"):
        dsa_block_sizes("v4")


def test_auto_dispatch_off_tpu_keeps_its_choice():
    assert backend_for("auto").name == "xla"  # CPU: the reference first; TPU would pick the TPU kernel
    assert "platform 'cpu'" in backend_for("auto").reason


def test_dsa_tpu_kernels_lower_for_tpu_at_production_shapes():
    """DeepSeek-V3.2's indexer (64 heads x 128, top-2048) lowered for TPU (``jax.export``, no TPU needed): the
    Pallas -> Mosaic step runs in Python, so a kernel Mosaic's front end rejects fails here. (What only
    libtpu's compiler rejects, VMEM overflow or layouts, still needs a TPU.)"""
    import jax

    from sparse_index_jax.kernels.dsa_topk.mosaic_tpu import _dsa_topk_mosaic_tpu

    B, T, S, H, d = 1, 512, 4096, 64, 128
    spec = jax.ShapeDtypeStruct

    def run(q, k, w, positions, lengths):
        return _dsa_topk_mosaic_tpu(q, k, w, None, positions, lengths, topk=2048, block_sizes=dsa_block_sizes("v5p"),
                             chunk_bytes=1 << 30, interpret=False)

    exported = jax.export.export(jax.jit(run), platforms=["tpu"])(
        spec((B, T, H, d), jnp.bfloat16), spec((B, S, d), jnp.bfloat16), spec((B, T, H), jnp.float32),
        spec((B, T), jnp.int32), spec((B,), jnp.int32))
    assert exported.mlir_module().count("tpu_custom_call") == 2  # the scoring and threshold kernels


def test_hisa_and_misa_tpu_kernels_lower_for_tpu():
    """HISA (blocks of 128, 64 kept: the refinement kernel's scalar-prefetched block ids drive its key DMA) and
    MISA-H (8 of 64 heads routed) at V3.2's indexer shapes, lowered for TPU as above."""
    import jax

    from sparse_index_jax.kernels.hisa_topk.mosaic_tpu import _hisa_topk_mosaic_tpu
    from sparse_index_jax.kernels.misa_topk.mosaic_tpu import _misa_topk_mosaic_tpu

    B, T, S, H, d, block = 1, 256, 16384, 64, 128, 128
    spec = jax.ShapeDtypeStruct
    args = (spec((B, T, H, d), jnp.bfloat16), spec((B, S, d), jnp.bfloat16), spec((B, T, H), jnp.float32),
            spec((B, T), jnp.int32), spec((B,), jnp.int32), spec((B, S // block, d), jnp.float32))
    blocks = dsa_block_sizes("v5p")

    def hisa(q, k, w, positions, lengths, sums):
        return _hisa_topk_mosaic_tpu(q, k, w, None, positions, lengths, sums, topk=2048, block_size=block, num_blocks=64,
                              query_chunk=128, block_sizes=blocks, interpret=False, return_keys=False)

    def misa(q, k, w, positions, lengths, sums):
        return _misa_topk_mosaic_tpu(q, k, w, None, positions, lengths, sums, topk=2048, block_size=block, active_heads=8,
                              candidates=8192, query_chunk=64, return_keys=False, block_sizes=blocks,
                              chunk_bytes=1 << 30, interpret=False)

    for fn, kernels in ((hisa, 4), (misa, 2)):  # HISA: scoring + search on blocks, refine + search on tokens
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert text.count("tpu_custom_call") == kernels, (fn.__name__, text.count("tpu_custom_call"))


def test_sparse_mla_tpu_kernel_lowers_for_tpu():
    """DeepSeek-V3.2's sparse MLA (128 heads, 576-wide rows, 512-wide values, top-2048) lowered for TPU."""
    import jax

    from sparse_index_jax.kernels.sparse_mla.mosaic_tpu import _sparse_mla_mosaic_tpu

    B, T, S, H, D = 1, 64, 8192, 128, 576
    spec = jax.ShapeDtypeStruct
    run = lambda q, kv, idx, ok: _sparse_mla_mosaic_tpu(q, kv, idx, ok, 0.1, 512, MlaTpuBlockSizes(), False)
    text = jax.export.export(jax.jit(run), platforms=["tpu"])(
        spec((B, T, H, D), jnp.bfloat16), spec((B, S, D), jnp.bfloat16), spec((B, T, 2048), jnp.int32),
        spec((B, T, 2048), jnp.bool_)).mlir_module()
    assert text.count("tpu_custom_call") == 1


def test_roofline_counts_follow_the_kernels(tmp_path):
    from sparse_index_jax.bench import roofline
    from sparse_index_jax.cli import main

    small, big = roofline.op_costs(4096, "v5p"), roofline.op_costs(8192, "v5p")
    pairs = 4096 * 4097 / 2
    assert small["dsa"]["flops"] == 2 * 64 * 128 * pairs               # causal pairs, all heads
    assert small["dsa"]["bytes"] >= 4 * 4096 * 4096                     # the [T, S] int32 keys are written
    for op in small:
        assert big[op]["flops"] > small[op]["flops"] and big[op]["bytes"] > small[op]["bytes"]
    report = roofline.estimate([4096], ["v5e", "v6e"])
    row = next(r for r in report["rows"] if r["chip"] == "v6e" and r["op"] == "sparse_mla")
    assert row["floor_ms"] == max(row["compute_ms"], row["memory_ms"]) > 0
    assert main(["bench", "roofline", "--lengths", "4K", "--chips", "v5p", "--out", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.json").is_file()
