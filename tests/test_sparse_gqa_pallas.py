"""The sparse GQA Triton kernel (the Llama retrofit's attention) against the plain-JAX reference.

On CPU the kernels run in interpret mode at their smallest tiles (16), so every path takes several
loop steps. Shapes are ragged on purpose: 3 query heads per KV group (padded to 16), a head width that
is not a power of two (24, padded to 32), T and k not multiples of any block, -1 padding slots and
valid=False on real rows, the same row picked by several slots and several queries, a query with no
valid slot; gradients wrt q, k and v, and the head-mean probabilities. The last test lowers
SmolLM2-135M's shape for CUDA through the Triton front end, without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuda_lowering import lower_for_cuda
from sparse_index_jax.kernels import sparse_gqa as sparse_gqa_mod
from sparse_index_jax.kernels.sparse_gqa.reference import sparse_gqa_reference
from sparse_index_jax.kernels.sparse_gqa.triton import sparse_gqa_triton
from sparse_index_jax.kernels.sparse_mla import triton as mla_triton
from sparse_index_jax.kernels.sparse_mla.triton import MlaTritonBlockSizes

SMALL = MlaTritonBlockSizes(block_h=16, block_k=16, bwd_block_h=16, bwd_block_k=16, dkv_block_h=16, dkv_block_k=16)
SCALE = 0.35


def _inputs(rng, B, T, S, Hq, Hkv, d, K, dtype):
    q = jnp.asarray(rng.normal(size=(B, T, Hq, d)), dtype)
    k = jnp.asarray(rng.normal(size=(B, S, Hkv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(B, S, Hkv, d)), dtype)
    idx = rng.integers(0, S, size=(B, T, K)).astype(np.int32)
    valid = rng.random((B, T, K)) < 0.8
    idx[~valid & (rng.random((B, T, K)) < 0.5)] = -1
    idx[0, 0, 1:3] = idx[0, 0, 0]
    valid[0, 0, :3] = True
    valid[-1, -1] = False  # a query with no valid slot
    return q, k, v, jnp.asarray(idx), jnp.asarray(valid)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_forward_and_probs_match_reference(dtype, tol):
    rng = np.random.default_rng(0)
    q, k, v, idx, valid = _inputs(rng, B=2, T=5, S=29, Hq=6, Hkv=2, d=24, K=19, dtype=dtype)
    out, probs = sparse_gqa_triton(q, k, v, idx, valid, scale=SCALE, query_chunk=2, return_probs=True,
                                   block_sizes=SMALL)
    with jax.default_matmul_precision("highest"):
        want, want_probs = sparse_gqa_reference(q, k, v, idx, valid, scale=SCALE, query_chunk=2, return_probs=True)
    assert out.shape == q.shape and out.dtype == dtype and probs.shape == (2, 5, 19)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(want_probs), rtol=tol, atol=tol)
    assert np.all(np.asarray(out)[-1, -1] == 0.0), "a query with no valid slot outputs exactly 0"
    assert np.all(np.asarray(probs)[~np.asarray(valid)] == 0.0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gradients_match_reference(dtype, tol):
    rng = np.random.default_rng(1)
    B, T, Hq, Hkv, d = 2, 3, 6, 2, 24
    q, k, v, idx, valid = _inputs(rng, B=B, T=T, S=17, Hq=Hq, Hkv=Hkv, d=d, K=21, dtype=dtype)
    w = jnp.asarray(rng.normal(size=(B, T, Hq, d)), jnp.float32)

    def grads(fn, **kw):
        def loss(q, k, v):
            out, _ = fn(q, k, v, idx, valid, scale=SCALE, query_chunk=2, **kw)
            return jnp.sum(out.astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got = grads(sparse_gqa_triton, block_sizes=SMALL)
    with jax.default_matmul_precision("highest"):
        want = grads(sparse_gqa_reference)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)


def test_entry_point_and_layer_dispatch():
    from sparse_index_jax.layers.gqa_attention import sparse_gqa_attention

    rng = np.random.default_rng(2)
    q, k, v, idx, valid = _inputs(rng, B=1, T=3, S=11, Hq=4, Hkv=4, d=16, K=7, dtype=jnp.float32)
    got, _ = sparse_gqa_attention(q, k, v, idx, valid, scale=SCALE, implementation="triton")
    with jax.default_matmul_precision("highest"):
        want, _ = sparse_gqa_mod.sparse_gqa(q, k, v, idx, valid, scale=SCALE, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if jax.default_backend() in ("cpu", "gpu"):
        assert sparse_gqa_mod.backend_for().name == ("triton" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="Hq divisible by Hkv"):
        sparse_gqa_mod.sparse_gqa(q[:, :, :3], k, v, idx, valid, scale=SCALE)
    with pytest.raises(ValueError, match="bool"):
        sparse_gqa_mod.sparse_gqa(q, k, v, idx, valid.astype(jnp.int32), scale=SCALE)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowering check for machines without a GPU")
def test_smollm2_shape_lowers_for_cuda(monkeypatch):
    """SmolLM2-135M: 9 query heads over 3 KV heads of 64, k = 2048, bf16: forward, probabilities, backward."""
    monkeypatch.setattr(mla_triton, "triton_interpret", lambda: False)
    monkeypatch.setattr("sparse_index_jax.kernels.sparse_gqa.triton.triton_interpret", lambda: False)
    B, T, S, K = 1, 8, 4096, 2048
    args = (jax.ShapeDtypeStruct((B, T, 9, 64), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, 3, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, S, 3, 64), jnp.bfloat16), jax.ShapeDtypeStruct((B, T, K), jnp.int32),
            jax.ShapeDtypeStruct((B, T, K), jnp.bool_))

    def forward(q, k, v, idx, valid):
        return sparse_gqa_triton(q, k, v, idx, valid, scale=0.125, return_probs=True)

    def backward(q, k, v, idx, valid):
        return jax.grad(lambda *a: jnp.sum(sparse_gqa_triton(*a, idx, valid, scale=0.125)[0].astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    assert lower_for_cuda(forward, *args).count("xla.gpu.triton") == 2
    text = lower_for_cuda(backward, *args)
    assert text.count("xla.gpu.triton") == 4 and "sparse_gqa_bwd_reduce" in text
