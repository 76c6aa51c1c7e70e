"""Pallas selector kernels against their plain-JAX references: identical indices, validity and keys.

On CPU the kernels run in interpret mode; on a GPU the same tests run the compiled kernels. Inputs
are small integers and head weights multiples of 1/4, so every score is exact in float32 whatever the
summation order: any difference is a kernel bug, not rounding, and the many exact ties check the
tie rule (lower position wins). Shapes are ragged on purpose: T and S not multiples of any block,
T > S and T < k, rows with nothing eligible, head counts and dims that are not powers of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, top_k_by_key
from sparse_index_jax.kernels.dsa_topk import dsa_topk
from sparse_index_jax.kernels.hisa_topk import hisa_topk
from sparse_index_jax.kernels.misa_topk import misa_topk
from sparse_index_jax.kernels.radix_topk_triton import radix_topk_rows
from cuda_lowering import lower_for_cuda


def _activations(rng, B, T, S, H, d, *, fp8_scale=False):
    q = jnp.asarray(rng.integers(-2, 3, (B, T, H, d)), jnp.bfloat16)
    k = jnp.asarray(rng.integers(-2, 3, (B, S, d)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-2, 3, (B, T, H)) * 0.25, jnp.float32)
    k_scale = jnp.asarray(rng.integers(1, 3, (B, S)) * 0.5, jnp.float32) if fp8_scale else None
    return q, k, w, k_scale


def _assert_same(got, want):
    for name, a, b in zip(("indices", "valid", "keys"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("B,T,S,H,d,topk", [
    (2, 5, 100, 4, 16, 8),       # T < S, ragged S
    (1, 37, 300, 3, 20, 40),     # heads and dim not powers of two
    (2, 9, 70, 64, 32, 100),     # k > S: every eligible key, then padding
    (1, 130, 129, 8, 16, 16),    # T > S, several query blocks
])
def test_dsa_pallas_matches_reference(B, T, S, H, d, topk):
    rng = np.random.default_rng(T * 1000 + S)
    q, k, w, k_scale = _activations(rng, B, T, S, H, d, fp8_scale=(H == 3))
    lengths = jnp.asarray(rng.integers(1, S + 1, (B,)), jnp.int32)
    positions = jnp.asarray(np.sort(rng.integers(-1, S + 2, (B, T)), axis=1), jnp.int32)  # incl. none eligible
    kw = dict(topk=topk, k_scale=k_scale, q_positions=positions, kv_lengths=lengths)
    got = dsa_topk(q, k, w, implementation="triton", **kw)
    want = dsa_topk(q, k, w, implementation="xla", **kw)
    _assert_same(got, want)


def test_dsa_pallas_small_query_chunks_and_keys():
    """Several query chunks (a tiny memory budget; one program is enough for a launch here) and the keys
    returned for a context-parallel merge."""
    from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference
    from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton
    from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes

    rng = np.random.default_rng(7)
    B, T, S, H, d = 1, 40, 90, 16, 16
    q, k, w, _ = _activations(rng, B, T, S, H, d)
    positions = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))
    lengths = jnp.full((B,), S, jnp.int32)
    got = dsa_topk_triton(q, k, w, None, positions, lengths, topk=12, query_chunk=0, key_chunk=0,
                          return_keys=True, chunk_bytes=4 * 128 * 16, block_sizes=DsaTritonBlockSizes(min_programs=1))
    want = dsa_topk_reference(q, k, w, None, positions, lengths, topk=12, query_chunk=8, key_chunk=32,
                              return_keys=True)
    _assert_same(got, want)


@pytest.mark.parametrize("bucket", [64, 4096])  # compacted after a few passes / never
def test_radix_topk_ties_limits_and_ineligible(bucket):
    rng = np.random.default_rng(3)
    B, R, n, topk = 2, 6, 256, 20
    keys = rng.integers(-50, 50, (B, R, n)).astype(np.int32)
    keys[0, 0] = 7                                          # one value everywhere: ties decide
    keys[1, 1, ::3] = INELIGIBLE_KEY                        # holes
    keys[1, 2] = rng.integers(-2**31 + 1, 2**31 - 1, n)     # the full key range
    keys[1, 3, :5] = [2**31 - 1, -2**31 + 1, 0, -1, 1]      # extremes
    limits = np.array([[256, 10, 0, 255, 100, 20], [256, 256, 256, 5, 21, 1]], np.int32)
    keys[0, 4] = np.float32(rng.normal(size=n)).view(np.int32)  # float keys: buckets follow exponents
    got = np.asarray(radix_topk_rows(jnp.asarray(keys), jnp.asarray(limits), topk, tile=64, bucket=bucket))
    masked = np.where(np.arange(n) < limits[..., None], keys, INELIGIBLE_KEY)
    want, _ = top_k_by_key(jnp.asarray(masked), topk)
    want = np.sort(np.where(np.asarray(want) < 0, n, np.asarray(want)), axis=-1)  # position order
    np.testing.assert_array_equal(np.where(got < 0, n, got), want)


def test_radix_topk_rejects_bad_tiles():
    with pytest.raises(ValueError, match="multiple of tile"):
        radix_topk_rows(jnp.zeros((1, 1, 100), jnp.int32), jnp.zeros((1, 1), jnp.int32), 4, tile=64)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowering check for machines without a GPU")
def test_dsa_kernels_lower_for_cuda_at_production_shape():
    """H = 64, d = 128, k = 2048 over 8K keys: the Triton front end accepts both kernels."""
    from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton

    shapes = [((1, 256, 64, 128), jnp.bfloat16), ((1, 8192, 128), jnp.bfloat16), ((1, 256, 64), jnp.float32),
              ((1, 256), jnp.int32), ((1,), jnp.int32)]
    args = [jnp.zeros(s, dt) for s, dt in shapes]
    text = lower_for_cuda(lambda q, k, w, p, n: dsa_topk_triton(q, k, w, None, p, n, topk=2048, query_chunk=0,
                                                                 key_chunk=0, interpret=False), *args)
    assert text.count("xla.gpu.triton") >= 2  # both kernels compiled for the GPU, not interpreted


def _hierarchical_case(seed, B, T, S, H, d, *, block_size):
    """Activations, causal positions (some rows with nothing eligible) and ragged lengths."""
    rng = np.random.default_rng(seed)
    q, k, w, k_scale = _activations(rng, B, T, S, H, d, fp8_scale=(H % 2 == 1))
    lengths = jnp.asarray(rng.integers(S // 2, S + 1, (B,)), jnp.int32)
    positions = jnp.asarray(np.sort(rng.integers(-1, S, (B, T)), axis=1), jnp.int32)
    return dict(q=q, k=k, w=w, k_scale=k_scale, q_positions=positions, kv_lengths=lengths)


@pytest.mark.parametrize("B,T,S,H,d,topk,block_size,num_blocks", [
    (2, 7, 100, 4, 16, 12, 8, 3),     # ragged last block, few kept blocks
    (1, 33, 260, 5, 24, 20, 16, 4),   # odd heads/dim, fp8-style key scales
    (1, 5, 40, 8, 16, 64, 8, 16),     # every block kept, k > S
])
def test_hisa_pallas_matches_reference(B, T, S, H, d, topk, block_size, num_blocks):
    args = _hierarchical_case(T + S, B, T, S, H, d, block_size=block_size)
    kw = dict(topk=topk, block_size=block_size, num_blocks=num_blocks, **args)
    _assert_same(hisa_topk(implementation="triton", **kw), hisa_topk(implementation="xla", **kw))


@pytest.mark.parametrize("B,T,S,H,d,topk,block_size,active,candidates", [
    (2, 9, 100, 8, 16, 12, 16, 3, None),     # MISA
    (1, 21, 150, 6, 24, 10, 32, 2, 40),      # MISA-H, odd heads, key scales
    (1, 6, 30, 4, 16, 8, 8, 4, 64),          # every head routed, candidates > S: DSA's result
])
def test_misa_pallas_matches_reference(B, T, S, H, d, topk, block_size, active, candidates):
    args = _hierarchical_case(T * S, B, T, S, H, d, block_size=block_size)
    kw = dict(topk=topk, block_size=block_size, active_heads=active, candidates=candidates, **args)
    _assert_same(misa_topk(implementation="triton", **kw), misa_topk(implementation="xla", **kw))
