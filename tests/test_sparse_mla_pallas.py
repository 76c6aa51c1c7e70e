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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuda_lowering import lower_for_cuda
from sparse_index_jax.kernels import sparse_mla as sparse_mla_mod
from sparse_index_jax.kernels.sparse_mla import triton
from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes, sparse_mla_triton
from sparse_index_jax.kernels.sparse_mla.reference import sparse_mla_reference

SMALL = MlaTritonBlockSizes(block_h=16, block_k=16, bwd_block_h=16, bwd_block_k=16)
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
        fwd, bwd = triton.smem_estimate(bs)
        assert fwd <= 0.9 * triton.SMEM_LIMIT and bwd <= 0.95 * triton.SMEM_LIMIT, (bs, fwd, bwd)
    # The backward that asked for 385,280 bytes on an H100 is over by the estimate too.
    old = MlaTritonBlockSizes(bwd_block_h=64, bwd_block_k=32, bwd_num_stages=2)
    assert triton.smem_estimate(old)[1] > triton.SMEM_LIMIT


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
    assert text.count("xla.gpu.triton") == 2  # forward and backward kernels
