"""The sparse MLA Pallas kernels against the plain-JAX reference: forward, gradients, probabilities.

On CPU the kernels run in interpret mode (slow: shapes are tiny, block sizes at their minimum of 16
so that every path runs several loop steps and head blocks); on a GPU the same tests run the compiled
kernels. Shapes are ragged on purpose: T and k not multiples of any block, heads not a multiple of the
head block, row widths whose value and rope pieces are not powers of two (padded) or absent, padding
slots (-1, and valid=False on a real row), duplicate indices, a query with no valid slot.
The reference runs with float32 products at HIGHEST precision: XLA on a GPU takes float32 dots at
DEFAULT precision in TF32 (about 1e-3 relative), while the kernel uses IEEE products for float32.
The last tests lower the production shape for CUDA through the Triton front end, without a GPU, for
the default and the candidate block sizes (shared memory is only checked on a GPU; the estimates are).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuda_lowering import lower_for_cuda
from sparse_index_jax.kernels import sparse_mla as sparse_mla_mod
from sparse_index_jax.kernels.sparse_mla import triton
from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes, sparse_mla_triton
from sparse_index_jax.kernels.sparse_mla.reference import sparse_mla_reference

SMALL = MlaTritonBlockSizes(block_h=16, block_k=16, bwd_block_h=16, bwd_block_k=16, dkv_block_h=16, dkv_block_k=16)
SCALE = 0.3


def _inputs(rng, B, T, S, H, D, K, q_dtype, kv_dtype=None):
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), q_dtype)
    kv = jnp.asarray(rng.normal(size=(B, S, D)), kv_dtype or q_dtype)
    idx = rng.integers(0, S, size=(B, T, K)).astype(np.int32)
    valid = rng.random((B, T, K)) < 0.8
    idx[~valid & (rng.random((B, T, K)) < 0.5)] = -1  # some padding slots are -1, others name a real row
    idx[0, 0, 1:4] = idx[0, 0, 0]  # duplicates: the same row selected several times
    valid[0, 0, :4] = True
    valid[-1, 1] = False  # a query with no valid slot
    return q, kv, jnp.asarray(idx), jnp.asarray(valid)


def _both(q, kv, idx, valid, v_dim, **kw):
    got = sparse_mla_triton(q, kv, idx, valid, scale=SCALE, v_dim=v_dim, query_chunk=2, block_sizes=SMALL, **kw)
    with jax.default_matmul_precision("highest"):  # IEEE float32 on GPU too (module docstring)
        want = sparse_mla_reference(q, kv, idx, valid, scale=SCALE, v_dim=v_dim, query_chunk=2, **kw)
    return got, want


# (Dk, v_dim): value piece padded 48 -> 64 with a 16-wide rest; both pieces exact powers of 2; no rest piece.
@pytest.mark.parametrize("D,v_dim", [(64, 48), (48, 32), (40, 40)])
def test_forward_float32_matches_reference(D, v_dim):
    rng = np.random.default_rng(D)
    q, kv, idx, valid = _inputs(rng, B=2, T=5, S=37, H=20, D=D, K=37, q_dtype=jnp.float32)
    got, want = _both(q, kv, idx, valid, v_dim)
    assert got.shape == (2, 5, 20, v_dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[-1, 1] == 0.0), "a query with no valid slot outputs exactly 0"


def test_forward_bfloat16_with_float32_cache():
    rng = np.random.default_rng(1)
    q, kv, idx, valid = _inputs(rng, B=1, T=3, S=50, H=7, D=48, K=45, q_dtype=jnp.bfloat16, kv_dtype=jnp.float32)
    got, want = _both(q, kv, idx, valid, 32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gradients_match_reference(dtype, tol):
    rng = np.random.default_rng(2)
    B, T, H, D, v_dim = 2, 3, 20, 64, 48
    q, kv, idx, valid = _inputs(rng, B=B, T=T, S=23, H=H, D=D, K=21, q_dtype=dtype)
    w = jnp.asarray(rng.normal(size=(B, T, H, v_dim)), jnp.float32)

    def grads(fn, **kw):
        def loss(q, kv):
            return jnp.sum(fn(q, kv, idx, valid, scale=SCALE, v_dim=v_dim, query_chunk=2, **kw).astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(q, kv)

    got = grads(sparse_mla_triton, block_sizes=SMALL)
    with jax.default_matmul_precision("highest"):
        want = grads(sparse_mla_reference)
    for name, a, b in zip(("dq", "dkv"), got, want):
        assert a.dtype == dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)
    assert np.all(np.asarray(got[0])[-1, 1] == 0.0), "no gradient flows into an empty query"


def test_backward_is_deterministic_and_chunking_changes_nothing():
    """Many queries pick the same rows (S = 9 rows, 12 queries x 24 slots): the row gradients are summed
    in a fixed order, so two runs agree bit for bit, and the chunking (1, 5 with a ragged tail, all 12
    queries) moves no more than float32 reassociation."""
    rng = np.random.default_rng(5)
    q, kv, idx, valid = _inputs(rng, B=1, T=12, S=9, H=20, D=48, K=24, q_dtype=jnp.float32)

    def grads(chunk):
        def loss(q, kv):
            out = sparse_mla_triton(q, kv, idx, valid, scale=SCALE, v_dim=32, query_chunk=chunk, block_sizes=SMALL)
            return jnp.sum(out * jnp.cos(out))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(q, kv)

    first, again = grads(5), grads(5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for chunk in (1, 12):
        for a, b in zip(grads(chunk), first):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_row_segments_group_every_slot_of_a_row_in_order():
    idx = jnp.asarray([[[3, -1, 0], [3, 3, 1]]], jnp.int32)  # B=1, 2 queries x 3 slots, cache of 4 rows
    bounds, keys, order = triton._row_segments(idx, 4)
    assert keys.tolist() == [[0, 1, 3, 3, 3, 4]]  # padding sorts last as row 4 (= rows)
    assert order.tolist() == [[2, 5, 0, 3, 4, 1]]  # equal rows keep query-then-slot order
    assert bounds.tolist() == [[0, 1, 2, 5, 6, 6]]  # 4 distinct keys (3 rows + padding), then empty


def test_return_probs_matches_reference_and_differentiates():
    rng = np.random.default_rng(3)
    q, kv, idx, valid = _inputs(rng, B=2, T=3, S=30, H=20, D=48, K=19, q_dtype=jnp.float32)
    (out, probs), (out_ref, probs_ref) = _both(q, kv, idx, valid, 32, return_probs=True)
    assert probs.shape == (2, 3, 19) and probs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(probs_ref), rtol=1e-5, atol=1e-6)
    sums = np.asarray(probs).sum(-1)
    np.testing.assert_allclose(sums[np.asarray(valid).any(-1)], 1.0, rtol=1e-5)
    assert np.all(np.asarray(probs)[~np.asarray(valid)] == 0.0)

    # The probabilities carry no gradient; the output's gradient is unchanged by asking for them.
    def loss(q, with_probs):
        res = sparse_mla_triton(q, kv, idx, valid, scale=SCALE, v_dim=32, query_chunk=2, block_sizes=SMALL,
                                return_probs=with_probs)
        return jnp.sum((res[0] if with_probs else res) ** 2)

    np.testing.assert_allclose(np.asarray(jax.grad(loss)(q, True)), np.asarray(jax.grad(loss)(q, False)),
                               rtol=1e-6, atol=1e-6)


def test_entry_point_dispatch():
    rng = np.random.default_rng(4)
    q, kv, idx, valid = _inputs(rng, B=1, T=2, S=9, H=3, D=24, K=5, q_dtype=jnp.float32)
    got = sparse_mla_mod.sparse_mla(q, kv, idx, valid, scale=SCALE, v_dim=16, implementation="triton")
    with jax.default_matmul_precision("highest"):
        want = sparse_mla_mod.sparse_mla(q, kv, idx, valid, scale=SCALE, v_dim=16, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert sparse_mla_mod.backend_for("triton").name == "triton"
    expected = "triton" if jax.default_backend() == "gpu" else "xla"
    if jax.default_backend() in ("cpu", "gpu"):
        assert sparse_mla_mod.backend_for().name == expected
    with pytest.raises(ValueError, match="power of 2"):
        MlaTritonBlockSizes(block_k=24)


def test_candidate_block_sizes_fit_shared_memory():
    """The default first, at most 6, distinct, each estimated under the H100 limit (backward: worst case)."""
    cands = triton.candidate_block_sizes()
    assert cands[0] == MlaTritonBlockSizes() and 1 <= len(cands) <= 6 and len(set(cands)) == len(cands)
    for bs in cands:
        fwd, dq, slots = triton.smem_estimate(bs)
        assert max(fwd, dq, slots) <= 0.9 * triton.SMEM_LIMIT, (bs, fwd, dq, slots)
    # Past the limit by the estimate: 64 rows x 2 stages forward, a 64-head / 64-row / 2-stage dq kernel.
    assert triton.smem_estimate(MlaTritonBlockSizes(num_stages=2))[0] > triton.SMEM_LIMIT
    assert triton.smem_estimate(MlaTritonBlockSizes(bwd_block_h=64, bwd_block_k=64, bwd_num_stages=2))[1] > \
        triton.SMEM_LIMIT


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowering check for machines without a GPU")
def test_backward_at_long_context_holds_no_float32_per_query_buffer(monkeypatch):
    """T = 2048 queries (lowering only): dq stays in bf16, the slot gradients in bf16 chunks, nothing in float32
    grows with T past the [S, Dk] accumulator."""
    monkeypatch.setattr(triton, "triton_interpret", lambda: False)
    B, T, H, D, v_dim, K, S = 1, 2048, 128, 576, 512, 2048, 65536
    args = (jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, T, K), jnp.int32), jax.ShapeDtypeStruct((B, T, K), jnp.bool_))

    def backward(q, kv, idx, valid):
        def loss(q, kv):
            return jnp.sum(sparse_mla_triton(q, kv, idx, valid, scale=0.1352, v_dim=v_dim).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(q, kv)

    text = lower_for_cuda(backward, *args)
    sizes = [int(np.prod([int(n) for n in dims.split("x") if n]))
             for dims in re.findall(r"tensor<([0-9x]+)xf32>", text)]
    # Allowed: the dkv accumulator [S, Dk], and float32 views of out and dout [T, H, v_dim] that XLA fuses into
    # delta's reduction. dq in float32 [T, H, Dk] or a float32 slot buffer would be larger than both.
    assert max(sizes) <= max(S * D, T * H * v_dim), max(sizes)
    assert "tensor<1x2048x128x576xbf16>" in text  # dq, in q's dtype


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowering check for machines without a GPU")
@pytest.mark.parametrize("candidate", range(len(triton.candidate_block_sizes())))
def test_production_shape_lowers_for_cuda(monkeypatch, candidate):
    """Hq=128, Dk=576 = 512 + 64, k=2048, bf16: forward, probabilities and backward pass Triton's front end.

    Candidate 0 is ``MlaTritonBlockSizes()``, the defaults, passed implicitly (what callers get)."""
    monkeypatch.setattr(triton, "triton_interpret", lambda: False)  # compile, as on a GPU
    B, T, H, D, v_dim, K, S = 1, 4, 128, 576, 512, 2048, 4096
    args = (jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, T, K), jnp.int32), jax.ShapeDtypeStruct((B, T, K), jnp.bool_))

    kw = {} if candidate == 0 else {"block_sizes": triton.candidate_block_sizes()[candidate]}

    def forward(q, kv, idx, valid):
        return sparse_mla_triton(q, kv, idx, valid, scale=0.1352, v_dim=v_dim, return_probs=True, **kw)

    def backward(q, kv, idx, valid):
        def loss(q, kv):
            return jnp.sum(sparse_mla_triton(q, kv, idx, valid, scale=0.1352, v_dim=v_dim, **kw).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(q, kv)

    text = lower_for_cuda(forward, *args)
    assert text.count("xla.gpu.triton") == 2  # forward and probabilities kernels, both compiled
    text = lower_for_cuda(backward, *args)
    # forward, then the backward's dq, slot-gradient and row-reduce kernels
    assert text.count("xla.gpu.triton") == 4
    for name in ("sparse_mla_fwd", "sparse_mla_bwd_dq", "sparse_mla_bwd_slots", "sparse_mla_bwd_reduce"):
        assert name in text, name


def test_mosaic_gpu_gather_probe_reports_every_case():
    """The probe behind keeping sparse MLA on Triton (bench/mosaic_gpu_gather_probe.py) lowers each case for
    CUDA and reports "ok" or the lowering's error, never raising."""
    from sparse_index_jax.bench.mosaic_gpu_gather_probe import probe

    found = probe()
    assert set(found) == {"tma_row", "register_gather", "wgmma_untiled"}
    assert all(v == "ok" or ":" in v for v in found.values()), found
