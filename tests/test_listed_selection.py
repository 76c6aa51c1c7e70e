"""The selector kernels' own parts against their references: the walks of the streaming DSA kernel over
per-query unit lists (merged over whole key blocks: HISA's refinement over kept blocks; gathered rows:
MISA-H's re-rank of candidates), HISA's in-kernel block filter, and MISA's router kernel.

Inputs are small integers (bf16) and weights multiples of 1/4, so every score is exact in float32 whatever
the summation order: any difference is a kernel bug. Tiny tiles (16-key blocks, 16-slot compaction steps)
force many compactions; unit lists are ragged (empty, one unit, units past the query, all units), keys tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lower_for_cuda

from sparse_index_jax.kernels.block_pooling import pool_block_sums
from sparse_index_jax.kernels.candidate_topk import refine_topk
from sparse_index_jax.kernels.dsa_topk import DsaTritonBlockSizes, dsa_topk
from sparse_index_jax.kernels.dsa_topk.triton import NO_UNIT, dsa_topk_triton
from sparse_index_jax.kernels.hisa_topk import hisa_topk
from sparse_index_jax.kernels.misa_topk import misa_topk
from sparse_index_jax.kernels.misa_topk.reference import head_energies
from sparse_index_jax.kernels.misa_topk.triton import head_energies_triton

TINY = DsaTritonBlockSizes(block_k=16, radix_tile=16, rank_tile=16)


def _inputs(rng, B, T, S, H, d, *, scales=False):
    q = jnp.asarray(rng.integers(-2, 3, (B, T, H, d)), jnp.bfloat16)
    k = jnp.asarray(rng.integers(-2, 3, (B, S, d)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-2, 3, (B, T, H)) * 0.25, jnp.float32)
    k_scale = jnp.asarray(rng.integers(1, 3, (B, S)) * 0.5, jnp.float32) if scales else None
    lengths = jnp.asarray(rng.integers(S // 2, S + 1, (B,)), jnp.int32)
    positions = jnp.asarray(np.sort(rng.integers(-1, S, (B, T)), axis=1), jnp.int32)
    return q, k, w, k_scale, positions, lengths


def _unit_lists(rng, B, T, n_units, L):
    """Sorted unit lists [B, T, L], NO_UNIT padded: empty, single, full and random rows."""
    lists = np.full((B, T, L), NO_UNIT, np.int64)
    for b in range(B):
        for t in range(T):
            n = [0, 1, min(L, n_units), int(rng.integers(0, min(L, n_units) + 1))][(b * T + t) % 4]
            lists[b, t, :n] = np.sort(rng.choice(n_units, n, replace=False))
    return jnp.asarray(lists, jnp.int32)


def _listed_reference(q, k, w, k_scale, positions, lengths, units, unit, topk):
    """Top-k of the flat DSA score over each query's listed units' keys (the contract's order)."""
    S = k.shape[1]
    cand = (units[..., None] * unit + jnp.arange(unit)).reshape(*units.shape[:2], -1)
    limit = jnp.minimum(positions + 1, lengths[:, None])[..., None]
    ok = (units[..., None] < NO_UNIT).repeat(unit, axis=-1).reshape(cand.shape) & (cand < limit) & (cand < S)
    cand = jnp.where(ok, cand, 0)
    return refine_topk(q, w, k, k_scale, cand, ok, topk, return_keys=True)


@pytest.mark.parametrize("B,T,S,H,unit,L,topk", [
    (2, 13, 200, 4, 1, 40, 8),      # single keys (MISA-H's candidates: the gathered walk), k < list
    (1, 9, 150, 3, 16, 5, 30),      # whole 16-key blocks (HISA: the merged walk), odd heads
    (2, 7, 170, 4, 8, 6, 12),       # units smaller than a key block: several per block
    (1, 5, 100, 4, 24, 3, 100),     # units straddling key blocks, k > every list
])
def test_listed_walk_matches_reference(B, T, S, H, unit, L, topk):
    rng = np.random.default_rng(B * 100 + unit)
    q, k, w, k_scale, positions, lengths = _inputs(rng, B, T, S, H, 16, scales=unit == 16)
    units = _unit_lists(rng, B, T, -(-S // unit), L)
    got = dsa_topk_triton(q, k, w, k_scale, positions, lengths, topk=topk, query_chunk=0, key_chunk=0,
                          return_keys=True, block_sizes=TINY, units=units, unit=unit)
    want = _listed_reference(q, k, w, k_scale, positions, lengths, units, unit, topk)
    for name, a, b in zip(("indices", "valid", "keys"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_listed_walk_with_every_unit_is_dsa():
    rng = np.random.default_rng(5)
    B, T, S, H = 2, 11, 190, 4
    q, k, w, _, positions, lengths = _inputs(rng, B, T, S, H, 16)
    every = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, T, S))
    got = dsa_topk_triton(q, k, w, None, positions, lengths, topk=20, query_chunk=0, key_chunk=0,
                          block_sizes=TINY, units=every, unit=1)
    want = dsa_topk(q, k, w, topk=20, q_positions=positions, kv_lengths=lengths, implementation="xla")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_listed_walk_needs_streaming():
    q, k, w = jnp.zeros((1, 2, 4, 16)), jnp.zeros((1, 8, 16)), jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="units need selection='streaming'"):
        dsa_topk_triton(q, k, w, None, jnp.zeros((1, 2), jnp.int32), jnp.full((1,), 8), topk=2, query_chunk=0,
                        key_chunk=0, block_sizes=DsaTritonBlockSizes(selection="two_pass"),
                        units=jnp.zeros((1, 2, 1), jnp.int32), unit=1)


@pytest.mark.parametrize("T,S,H,d,block_size,scales", [
    (37, 300, 8, 16, 16, False),   # many blocks before the own block, queries spanning two own blocks
    (9, 70, 5, 24, 32, True),      # odd heads and dim, key scales, a partial last block
    (4, 40, 64, 16, 8, False),     # 64 heads: one query block per program of 4
])
def test_router_kernel_energies_match_reference(T, S, H, d, block_size, scales):
    rng = np.random.default_rng(T + S)
    q, k, w, k_scale, positions, lengths = _inputs(rng, 2, T, S, H, d, scales=scales)
    sums = pool_block_sums(k, k_scale, lengths, block_size)
    got = head_energies_triton(q, w, k, k_scale, positions, lengths, sums, block_size=block_size)
    want = head_energies(q, w, k, k_scale, positions, lengths, sums, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_router_kernel_ignores_future_keys_of_the_own_block():
    """No query may see a key after it through the router (MISA's public code pools the whole block)."""
    rng = np.random.default_rng(11)
    B, S, H, d, bs = 1, 64, 4, 16, 16
    q, k, w, _, _, lengths = _inputs(rng, B, S, S, H, d)
    lengths = jnp.full((B,), S, jnp.int32)
    positions = jnp.arange(S, dtype=jnp.int32)[None]
    energies = lambda keys: np.asarray(head_energies_triton(q, w, keys, None, positions, lengths,
                                                            pool_block_sums(keys, None, lengths, bs), block_size=bs))
    base = energies(k)
    later = k.at[:, 37:].set(jnp.asarray(rng.integers(-9, 10, (B, S - 37, d)), jnp.bfloat16))
    np.testing.assert_array_equal(energies(later)[:, :37], base[:, :37])
    assert not np.array_equal(energies(later)[:, 37:], base[:, 37:])


def _hierarchical(seed, T, S, H, block_size):
    q, k, w, k_scale, positions, lengths = _inputs(np.random.default_rng(seed), 2, T, S, H, 16)
    return dict(q=q, k=k, w=w, k_scale=k_scale, q_positions=positions, kv_lengths=lengths,
                block_sums=pool_block_sums(k, k_scale, lengths, block_size))


def test_hisa_kernel_with_tiny_tiles_and_no_future_blocks():
    """Tiny tiles: the block filter and the walk compact often; a query's future blocks never count."""
    args = _hierarchical(3, 40, 400, 4, 16)
    kw = dict(topk=10, block_size=16, num_blocks=4, **args)
    got = hisa_topk(implementation="triton", block_sizes=TINY, **kw)
    want = hisa_topk(implementation="xla", **kw)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Causality: changing keys after every query's last eligible key changes nothing.
    last = int(np.max(np.minimum(np.asarray(args["q_positions"]), np.asarray(args["kv_lengths"])[:, None] - 1)))
    k2 = args["k"].at[:, last + 1:].set(7)
    args2 = dict(args, k=k2, block_sums=pool_block_sums(k2, None, args["kv_lengths"], 16))
    again = hisa_topk(implementation="triton", block_sizes=TINY, **dict(kw, **args2))
    for a, b in zip(again, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_misa_with_every_head_and_misa_h_with_every_candidate_are_dsa():
    args = _hierarchical(4, 21, 120, 4, 16)
    del args["block_sums"]
    dsa = dsa_topk(topk=9, implementation="xla", **args)
    for candidates in (None, 120):
        got = misa_topk(topk=9, block_size=16, active_heads=4 if candidates is None else 1, candidates=candidates,
                        implementation="triton", block_sizes=TINY, **args)
        for a, b in zip(got, dsa):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowering check for machines without a GPU")
@pytest.mark.parametrize("method,kernels", [
    ("hisa", {"dsa_stream_topk", "merged_stream_topk"}),           # block filter, merged walk of kept blocks
    ("misa", {"misa_router", "dsa_stream_topk"}),                  # router, routed fused selection
    ("misa_h", {"misa_router", "dsa_stream_topk", "gathered_stream_topk"}),  # + gathered walk of the candidates
])
def test_selector_kernels_lower_for_cuda_at_production_shape(method, kernels):
    """A 16K prefill, H = 64, d = 128, k = 2048 (HISA: 64 blocks of 128; MISA: 8 of 64 heads, blocks of 1024)."""
    from sparse_index_jax.kernels.hisa_topk.triton import hisa_topk_triton
    from sparse_index_jax.kernels.misa_topk.triton import misa_topk_triton

    B, T, S, H, d = 1, 16384, 16384, 64, 128
    block = 128 if method == "hisa" else 1024
    q, k = jnp.zeros((B, T, H, d), jnp.bfloat16), jnp.zeros((B, S, d), jnp.bfloat16)
    w, pos, n = jnp.zeros((B, T, H), jnp.float32), jnp.zeros((B, T), jnp.int32), jnp.full((B,), S, jnp.int32)
    sums = jnp.zeros((B, S // block, d), jnp.float32)
    if method == "hisa":
        fn = lambda *a: hisa_topk_triton(*a, topk=2048, block_size=128, num_blocks=64, query_chunk=0, interpret=False)
    else:
        fn = lambda *a: misa_topk_triton(*a, topk=2048, block_size=1024, active_heads=8, query_chunk=0, key_chunk=0,
                                         candidates=8192 if method == "misa_h" else None, interpret=False)
    text = lower_for_cuda(fn, q, k, w, None, pos, n, sums)
    names = ("dsa_stream_topk", "merged_stream_topk", "gathered_stream_topk", "misa_router", "radix_topk",
             "dsa_score_keys")
    assert {name for name in names if name in text} == kernels
