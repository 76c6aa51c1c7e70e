"""The fused streaming DSA kernel (scoring + exact top-k behind a proven threshold) against the reference.

Inputs are small integers in bf16 (or e4m3), so every score is exact in float32 whatever the summation
order: any difference is a kernel bug. Tiny tiles (16 keys per block, a 16-slot compaction step) force
many buffer compactions on short rows; the orders that defeat the threshold (increasing scores, all
scores equal) and the one that suits it best (decreasing) are all here, with NaN, inf, -0.0, T < k,
rows with nothing eligible, and rows split into key segments (decode) merged after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lower_for_cuda

from sparse_index_jax.kernels.dsa_topk import DsaTritonBlockSizes, dsa_topk
from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference
from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton, key_segments

TINY = DsaTritonBlockSizes(block_k=16, radix_tile=16, rank_tile=16, min_programs=1)   # one segment
SPLIT = DsaTritonBlockSizes(block_k=16, radix_tile=16, rank_tile=16, min_programs=10**6)  # many segments


def _case(order: str, rng, B=2, T=6, S=230, H=4, d=16):
    """q, k, w, k_scale whose scores follow ``order`` along the key axis."""
    q = jnp.asarray(rng.integers(-2, 3, (B, T, H, d)), jnp.bfloat16)
    k = np.asarray(rng.integers(-2, 3, (B, S, d)), np.float32)
    w = np.asarray(rng.integers(-2, 3, (B, T, H)) * 0.25, np.float32)
    scale = None
    if order in ("increasing", "decreasing", "constant"):
        q = jnp.ones((B, T, H, d), jnp.bfloat16)
        w = np.full((B, T, H), 0.5, np.float32)
        k = np.zeros((B, S, d), np.float32)
        k[:, :, 0] = {"increasing": np.arange(S) % 256, "decreasing": (S - np.arange(S)) % 256,
                      "constant": np.full(S, 3)}[order]
    if order == "specials":  # inf and NaN scores (key scales), -0.0 from negative weights on zero logits
        scale = np.asarray(rng.integers(1, 3, (B, S)) * 0.5, np.float32)
        scale[:, ::7] = np.inf
        scale[:, 3::11] = np.nan
        scale = jnp.asarray(scale)
    return q, jnp.asarray(k, jnp.bfloat16), jnp.asarray(w), scale


def _check(q, k, w, scale, positions, lengths, topk, block_sizes):
    got = dsa_topk_triton(q, k, w, scale, positions, lengths, topk=topk, query_chunk=0, key_chunk=0,
                          return_keys=True, block_sizes=block_sizes)
    want = dsa_topk_reference(q, k, w, scale, positions, lengths, topk=topk, query_chunk=4, key_chunk=64,
                              return_keys=True)
    for name, a, b in zip(("indices", "valid", "keys"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("block_sizes", [TINY, SPLIT], ids=["one-segment", "segments"])
@pytest.mark.parametrize("order", ["random", "increasing", "decreasing", "constant", "specials"])
def test_streaming_matches_reference(order, block_sizes):
    rng = np.random.default_rng(len(order))
    B, T, S = 2, 6, 230
    q, k, w, scale = _case(order, rng, B=B, T=T, S=S)
    # causal positions near the end of the row, one query that sees nothing, one row cut short
    positions = jnp.asarray([[-1, 40, 120, 200, 228, 229], [5, 17, 100, 150, 229, 229]], jnp.int32)
    lengths = jnp.asarray([S, 170], jnp.int32)
    _check(q, k, w, scale, positions, lengths, 24, block_sizes)


@pytest.mark.parametrize("topk", [1, 300])  # k = 1; k larger than every row (T < k, all kept, padding)
def test_streaming_extreme_k(topk):
    rng = np.random.default_rng(topk)
    q, k, w, scale = _case("random", rng, B=1, T=5, S=100)
    positions = jnp.asarray([[0, 20, 50, 98, 99]], jnp.int32)
    _check(q, k, w, scale, positions, jnp.asarray([100], jnp.int32), topk, TINY)


def test_streaming_fp8_inputs_stay_fp8_and_match():
    """e4m3 q and k (the fp8 indexer's output) with per-key scales: the kernel dots them in fp8."""
    rng = np.random.default_rng(5)
    B, T, S, H, d = 1, 9, 150, 8, 24
    q = jnp.asarray(rng.integers(-3, 4, (B, T, H, d)), jnp.float8_e4m3fn)
    k = jnp.asarray(rng.integers(-3, 4, (B, S, d)), jnp.float8_e4m3fn)
    w = jnp.asarray(rng.integers(-2, 3, (B, T, H)) * 0.25, jnp.float32)
    scale = jnp.asarray(rng.integers(1, 4, (B, S)) * 0.25, jnp.float32)
    positions = jnp.asarray(np.sort(rng.integers(-1, S, (B, T))), jnp.int32)
    _check(q, k, w, scale, positions, jnp.asarray([S], jnp.int32), 16, TINY)
    got = dsa_topk(q, k, w, topk=16, k_scale=scale, q_positions=positions, kv_lengths=jnp.asarray([S]),
                   implementation="triton")
    want = dsa_topk(q, k, w, topk=16, k_scale=scale, q_positions=positions, kv_lengths=jnp.asarray([S]),
                    implementation="xla")
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_decode_rows_split_into_segments():
    """One query per row against a long, ragged key cache: the default block sizes split each row."""
    rng = np.random.default_rng(11)
    B, S, H, d, topk = 3, 700, 16, 32, 20
    q, k, w, _ = _case("random", rng, B=B, T=1, S=S, H=H, d=d)
    lengths = jnp.asarray([700, 333, 1], jnp.int32)
    positions = lengths[:, None] - 1
    bs = DsaTritonBlockSizes(block_k=16, radix_tile=16, rank_tile=16)
    assert key_segments(B, 704 // 16, topk, 16, bs.min_programs) > 1
    _check(q, k, w, None, positions, lengths, topk, bs)


def test_two_pass_selection_still_matches():
    rng = np.random.default_rng(2)
    q, k, w, scale = _case("specials", rng, B=1, T=7, S=90)
    positions = jnp.asarray([[0, 10, 30, 60, 80, 89, 89]], jnp.int32)
    _check(q, k, w, scale, positions, jnp.asarray([90], jnp.int32), 12,
           DsaTritonBlockSizes(selection="two_pass", radix_tile=16))


def test_key_segments():
    assert key_segments(programs=2048, n_blocks=2048, topk=2048, bk=64, min_programs=264) == 1  # prefill
    # decode, batch 64 x 128K: 5 segments of >= 2k keys each give >= 264 programs
    assert key_segments(programs=64, n_blocks=2048, topk=2048, bk=64, min_programs=264) == 5
    assert key_segments(programs=1, n_blocks=4, topk=2048, bk=64, min_programs=264) == 1  # short rows stay whole


def test_selection_must_be_known():
    with pytest.raises(ValueError, match="DsaTritonBlockSizes.selection='fused'"):
        DsaTritonBlockSizes(selection="fused")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowering check for machines without a GPU")
@pytest.mark.parametrize("B,T,S,dtype,kernels", [
    (1, 2048, 8192, jnp.bfloat16, {"dsa_stream_topk"}),                  # prefill: one fused kernel
    (1, 2048, 8192, jnp.float8_e4m3fn, {"dsa_stream_topk"}),             # fp8 into the dot
    (64, 1, 131072, jnp.bfloat16, {"dsa_stream_topk", "radix_topk"}),    # decode: segments, then a merge
])
def test_streaming_lowers_for_cuda_at_production_shape(B, T, S, dtype, kernels):
    shapes = [((B, T, 64, 128), dtype), ((B, S, 128), dtype), ((B, T, 64), jnp.float32), ((B, S), jnp.float32),
              ((B, T), jnp.int32), ((B,), jnp.int32)]
    text = lower_for_cuda(lambda q, k, w, s, p, n: dsa_topk_triton(q, k, w, s, p, n, topk=2048, query_chunk=0,
                                                                   key_chunk=0, interpret=False),
                          *[jnp.zeros(s, dt) for s, dt in shapes])
    assert {name for name in ("dsa_stream_topk", "radix_topk", "dsa_score_keys") if name in text} == kernels
    assert ("f8E4M3FN" in text) == (dtype == jnp.float8_e4m3fn)


@pytest.mark.parametrize("block_sizes", [TINY, SPLIT], ids=["one-segment", "segments"])
def test_position_order_gives_the_same_winners_by_position(block_sizes):
    """MISA-H's candidates: the same set, increasing position, -1 padding last (no ranking pass)."""
    from sparse_index_jax.kernels.misa_topk.reference import candidates_in_position_order

    rng = np.random.default_rng(9)
    q, k, w, scale = _case("specials", rng, B=2, T=4, S=120)
    positions = jnp.asarray([[-1, 30, 90, 119], [3, 60, 119, 119]], jnp.int32)
    lengths = jnp.asarray([120, 80], jnp.int32)
    got, ok = dsa_topk_triton(q, k, w, scale, positions, lengths, topk=40, query_chunk=0, key_chunk=0,
                              block_sizes=block_sizes, position_order=True)
    want, want_ok = candidates_in_position_order(*dsa_topk_reference(q, k, w, scale, positions, lengths, topk=40,
                                                                     query_chunk=4, key_chunk=64))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(ok), np.asarray(want_ok))


def test_survivor_model_replays_the_buffer_policy():
    """bench/survivors.py: increasing scores insert every key; decreasing ones stop at the first compaction;
    the latest-first order (the kernel's second version) is aligned to the kernel's blocks."""
    from sparse_index_jax.bench.survivors import INELIGIBLE, buffer_capacity, replay, stream_orders

    S, topk, bk = 1000, 20, 16
    cap = buffer_capacity(topk, bk, 16)
    assert cap == 64 and buffer_capacity(2048, 64, 256) == 4352  # 2k + bk rounded up to the compaction tile
    rising, falling = np.arange(S)[None], (S - np.arange(S))[None]
    up = replay(rising, topk, bk, cap)
    # 4 blocks fill 64 > 48 slots; then each 2 blocks: compactions before blocks 4, 6, ..., 62 and at the end
    assert up["inserted"][0] == S and up["compactions"][0] == 30 + 1
    down = replay(falling, topk, bk, cap)
    first = -(-(cap - bk + 1) // bk) * bk  # blocks inserted until a buffer holds more than cap - bk
    assert down["inserted"][0] == first and down["compactions"][0] == 1
    short = np.where(np.arange(S) < topk - 3, rising, INELIGIBLE)
    assert replay(short, topk, bk, cap)["compactions"][0] == 0  # a row shorter than k keeps everything
    ties = np.full((1, S), 7)  # all equal: they enter only when ties do (the kernel's rule)
    assert replay(ties, topk, bk, cap)["inserted"][0] == S
    assert replay(ties, topk, bk, cap, ties_enter=False)["inserted"][0] == first

    orders = stream_orders(rising, np.array([37]), bk, np.random.default_rng(0))
    latest, ties_enter = orders["latest_first"]
    assert ties_enter and (latest[0, :11] == INELIGIBLE).all()  # positions 47..37 of the last block: past the row
    assert list(latest[0, 11:48]) == list(range(36, -1, -1)) and (latest[0, 48:] == INELIGIBLE).all()


def test_survivor_model_probe_matches_the_kernel_rule():
    """The probe: the k-th largest of the last ceil(2k / bk) blocks, minus one; only rows of more than
    twice that many blocks are probed."""
    from sparse_index_jax.bench.survivors import INELIGIBLE, probe_threshold

    topk, bk = 8, 4  # a probe of 4 blocks = 16 keys; probed rows have > 8 blocks
    keys = np.arange(100)[None].repeat(2, axis=0)
    thr, probed = probe_threshold(keys, np.array([37, 30]), topk, bk)
    # row 0: 10 blocks; the last 4 hold positions 24..36 (13 keys), their 8th largest is 29
    assert thr[0] == 29 - 1 and probed[0] == 13
    assert thr[1] == INELIGIBLE and probed[1] == 0  # 8 blocks: not probed
