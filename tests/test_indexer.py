"""The lightning indexer against an independent float64 numpy implementation of DeepSeek-V3.2's definition.

Nothing here calls the library's rope / norm / scoring helpers to build the expected values: the
rotary pairing, the LayerNorm, the head weights and the ReLU scoring are all re-derived below.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sparse_index_jax.kernels.dsa_topk import index_scores
from numpy_rope import np_yarn
from sparse_index_jax import IndexerConfig, LightningIndexer, RopeConfig

THETA = 10000.0
EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# float64 numpy oracle
# --------------------------------------------------------------------------------------------------

def np_pairs(rope_dim: int, layout: str) -> list[tuple[int, int]]:
    """Index pairs rotated together; pair i uses inverse frequency theta^(-2i/rope_dim)."""
    half = rope_dim // 2
    if layout == "half":
        return [(i, i + half) for i in range(half)]
    if layout == "interleaved":
        return [(2 * i, 2 * i + 1) for i in range(half)]
    raise ValueError(layout)


def np_rope(x: np.ndarray, pos: np.ndarray, rope_dim: int, layout: str, theta: float = THETA,
            inv_freqs=None, mult: float = 1.0) -> np.ndarray:
    """Rotates the FIRST rope_dim dims of x[..., n]; pos broadcasts against x.shape[:-1].

    Default inverse frequencies theta^(-2i/rope_dim); ``mult`` scales cos and sin (YaRN).
    """
    x = np.asarray(x, np.float64)
    y = x.copy()
    pos = np.asarray(pos, np.float64)
    for i, (a, b) in enumerate(np_pairs(rope_dim, layout)):
        inv_freq = theta ** (-2.0 * i / rope_dim) if inv_freqs is None else inv_freqs[i]
        c, s = mult * np.cos(pos * inv_freq), mult * np.sin(pos * inv_freq)
        y[..., a] = x[..., a] * c - x[..., b] * s
        y[..., b] = x[..., b] * c + x[..., a] * s
    return y


def np_layernorm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = EPS) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_params(ix: LightningIndexer) -> dict[str, np.ndarray]:
    f = lambda p: np.asarray(jnp.asarray(p[...], jnp.float32), np.float64)
    return dict(wq=f(ix.wq_b.kernel), wk=f(ix.wk.kernel), ln_s=f(ix.k_norm.scale), ln_b=f(ix.k_norm.bias),
                wp=f(ix.weights_proj.kernel))


def np_indexer(p, cfg: IndexerConfig, x, qr, positions, layout: str | None = None, **rope_kw):
    """(q [B,T,H,d], k [B,T,d], w [B,T,H]) in float64, straight from the definition."""
    layout = layout or cfg.rope_layout
    x, qr = np.asarray(x, np.float64), np.asarray(qr, np.float64)
    B, T, _ = x.shape
    H, d, r = cfg.n_heads, cfg.head_dim, cfg.rope_dim
    q = (qr @ p["wq"]).reshape(B, T, H, d)
    q = np_rope(q, np.asarray(positions)[:, :, None], r, layout, **rope_kw)
    k = np_layernorm(x @ p["wk"], p["ln_s"], p["ln_b"])
    k = np_rope(k, np.asarray(positions), r, layout, **rope_kw)
    w = (x @ p["wp"]) * H ** -0.5 * d ** -0.5
    return q, k, w


def np_scores(q, k, w, k_scale=None):
    """I[b,t,s] = k_scale[b,s] * sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])."""
    q, k, w = (np.asarray(a, np.float64) for a in (q, k, w))
    logits = np.einsum("bthd,bsd->bths", q, k)
    s = np.einsum("bths,bth->bts", np.maximum(logits, 0.0), w)
    if k_scale is not None:
        s = s * np.asarray(k_scale, np.float64)[:, None, :]
    return s


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def make_cfg(**kw) -> IndexerConfig:
    base = dict(hidden_size=24, q_input_dim=20, n_heads=4, head_dim=16, topk=4, rope_dim=8, rope_layout="half")
    base.update(kw)
    return IndexerConfig(**base)


def make_indexer(cfg: IndexerConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32, rope=None):
    rope = rope or RopeConfig(theta=THETA)
    ix = LightningIndexer(cfg, rope, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    # Non-trivial LayerNorm affine parameters (the defaults 1 / 0 would hide a missing scale or bias).
    rng = np.random.default_rng(1234 + seed)
    d = cfg.head_dim
    ix.k_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, d), jnp.float32)
    ix.k_norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, d), jnp.float32)
    return ix


def make_inputs(cfg: IndexerConfig, B=2, T=6, seed=0, x_dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, cfg.hidden_size)).astype(x_dtype)
    qr = rng.normal(size=(B, T, cfg.q_input_dim)).astype(x_dtype)
    # Not arange: a per-row offset and a gap.
    base = np.array([0, 1, 2, 4, 5, 9, 10, 11, 12, 13, 14, 15][:T], np.int32)
    positions = np.stack([base + 3, base + 17])[:B]
    return x, qr, positions


def run(ix, x, qr, positions):
    return ix(jnp.asarray(x), jnp.asarray(qr), jnp.asarray(positions, jnp.int32))


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# --------------------------------------------------------------------------------------------------
# (1) q, k, w and scores match numpy for both layouts
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_forward_matches_numpy(layout):
    cfg = make_cfg(rope_layout=layout)
    ix = make_indexer(cfg)
    x, qr, pos = make_inputs(cfg)
    act = run(ix, x, qr, pos)
    q, k, w = np_indexer(np_params(ix), cfg, x, qr, pos)

    assert act.q.shape == (2, 6, cfg.n_heads, cfg.head_dim) and act.q.dtype == jnp.float32
    assert act.k.shape == (2, 6, cfg.head_dim) and act.k.dtype == jnp.float32
    assert act.w.shape == (2, 6, cfg.n_heads) and act.w.dtype == jnp.float32
    assert act.k_scale is None
    np.testing.assert_allclose(f64(act.q), q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(act.k), k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(act.w), w, rtol=1e-5, atol=1e-6)

    scores = index_scores(act.q, act.k, act.w, act.k_scale)
    assert scores.shape == (2, 6, 6) and scores.dtype == jnp.float32
    expected = np_scores(q, k, w)
    np.testing.assert_allclose(f64(scores), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_yarn_rope_matches_numpy(layout):
    """The indexer uses the MLA rotary frequencies incl. YaRN (ramp and cos/sin attention factor)."""
    yarn = dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                mscale_all_dim=0.5)
    rope = RopeConfig(theta=THETA, rope_type="yarn", **yarn)
    cfg = make_cfg(rope_layout=layout)
    ix = make_indexer(cfg, rope=rope)
    inv, mult, _ = np_yarn(cfg.rope_dim, THETA, 4.0, 64, 32.0, 1.0, 1.0, 0.5)
    # This setting really ramps (pairs are neither all interpolated nor all extrapolated) and scales cos/sin.
    plain = THETA ** (-np.arange(0, cfg.rope_dim, 2) / cfg.rope_dim)
    assert np.any(np.isclose(inv, plain)) and np.any(np.isclose(inv, plain / 4)) and abs(mult - 1) > 0.05
    x, qr, pos = make_inputs(cfg)
    act = run(ix, x, qr, pos)
    q, k, w = np_indexer(np_params(ix), cfg, x, qr, pos, inv_freqs=inv, mult=mult)
    np.testing.assert_allclose(f64(act.q), q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(act.k), k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(act.w), w, rtol=1e-5, atol=1e-6)


def test_layernorm_uses_scale_and_bias():
    """The key goes through LayerNorm with weight AND bias (checked on the un-roped tail dims)."""
    cfg = make_cfg()
    ix = make_indexer(cfg)
    x, qr, pos = make_inputs(cfg)
    k1 = f64(run(ix, x, qr, pos).k)
    ix.k_norm.bias[...] = ix.k_norm.bias[...] + 1.0
    k2 = f64(run(ix, x, qr, pos).k)
    r = cfg.rope_dim
    np.testing.assert_allclose(k2[..., r:] - k1[..., r:], 1.0, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# (2) the rotary pairing is pinned
# --------------------------------------------------------------------------------------------------

def test_half_and_interleaved_differ_and_each_matches_its_pairing():
    ix_half = make_indexer(make_cfg(rope_layout="half"))
    ix_int = make_indexer(make_cfg(rope_layout="interleaved"))
    nnx.update(ix_int, nnx.state(ix_half))  # identical weights
    cfg_h, cfg_i = ix_half.cfg, ix_int.cfg
    x, qr, pos = make_inputs(cfg_h)
    a_half, a_int = run(ix_half, x, qr, pos), run(ix_int, x, qr, pos)
    p = np_params(ix_half)

    assert np.abs(f64(a_half.q) - f64(a_int.q)).max() > 1e-2, "the two layouts must rotate different pairs"
    assert np.abs(f64(a_half.k) - f64(a_int.k)).max() > 1e-2
    r = cfg_h.rope_dim
    # Only the rope part differs; the nope tail is identical.
    np.testing.assert_array_equal(np.asarray(a_half.q)[..., r:], np.asarray(a_int.q)[..., r:])

    q_h, k_h, _ = np_indexer(p, cfg_h, x, qr, pos, layout="half")
    q_i, k_i, _ = np_indexer(p, cfg_i, x, qr, pos, layout="interleaved")
    np.testing.assert_allclose(f64(a_half.q), q_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(a_half.k), k_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(a_int.q), q_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(a_int.k), k_i, rtol=1e-5, atol=1e-5)
    # ... and each is far from the other pairing's oracle.
    assert np.abs(f64(a_half.q) - q_i).max() > 1e-2
    assert np.abs(f64(a_int.q) - q_h).max() > 1e-2


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_pairing_on_basis_vectors(layout):
    """q = e_j before RoPE, at position p: exactly the partner element of e_j's pair becomes +-sin(p*f)."""
    cfg = make_cfg(rope_layout=layout)  # head_dim 16, rope_dim 8
    d, r = cfg.head_dim, cfg.rope_dim
    ix = make_indexer(cfg)
    kernel = np.zeros((cfg.q_input_dim, cfg.n_heads * d), np.float32)
    kernel[np.arange(d), np.arange(d)] = 1.0  # head 0's pre-rope query is qr[:d]
    ix.wq_b.kernel[...] = jnp.asarray(kernel)
    p_val = 3
    expected_partner = {"half": {0: 4, 1: 5, 3: 7, 4: 0, 6: 2}, "interleaved": {0: 1, 1: 0, 2: 3, 5: 4, 6: 7}}[layout]
    js = list(expected_partner) + [r, d - 1]  # plus two un-roped dims
    qr = np.zeros((1, len(js), cfg.q_input_dim), np.float32)
    for n, j in enumerate(js):
        qr[0, n, j] = 1.0
    x = np.ones((1, len(js), cfg.hidden_size), np.float32)
    q = f64(run(ix, x, qr, np.full((1, len(js)), p_val)).q)[0, :, 0]
    for n, j in enumerate(js):
        expected = np.zeros(d)
        if j >= r:
            expected[j] = 1.0  # beyond rope_dim nothing rotates
        else:
            partner = expected_partner[j]
            pair_index = j % (r // 2) if layout == "half" else j // 2
            ang = p_val * THETA ** (-2.0 * pair_index / r)
            expected[j] = np.cos(ang)
            expected[partner] = np.sin(ang) if j < partner else -np.sin(ang)
        np.testing.assert_allclose(q[n], expected, atol=1e-6, err_msg=f"{layout} pairing of e_{j}")


# --------------------------------------------------------------------------------------------------
# (3) relative position property
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_scores_depend_only_on_relative_position(layout):
    cfg = make_cfg(rope_layout=layout)
    ix = make_indexer(cfg)
    x, qr, pos = make_inputs(cfg)
    a0 = run(ix, x, qr, pos)
    a1 = run(ix, x, qr, pos + 57)
    # The rotated vectors themselves change...
    assert np.abs(f64(a0.q) - f64(a1.q)).max() > 1e-2
    # ...but every q_t . k_s (and so every score) is unchanged.
    l0 = np.einsum("bthd,bsd->bths", f64(a0.q), f64(a0.k))
    l1 = np.einsum("bthd,bsd->bths", f64(a1.q), f64(a1.k))
    np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-4 * np.abs(l0).max())
    s0, s1 = f64(index_scores(a0.q, a0.k, a0.w)), f64(index_scores(a1.q, a1.k, a1.w))
    np.testing.assert_allclose(s1, s0, rtol=1e-4, atol=1e-4 * np.abs(s0).max())
    # Sanity: moving only the queries does change them (RoPE really is applied).
    a2 = run(ix, x, qr, pos + np.array([[0, 0, 0, 5, 5, 5]], np.int32))
    l2 = np.einsum("bthd,bsd->bths", f64(a2.q), f64(a2.k))
    assert np.abs(l2 - l0).max() > 1e-3


# --------------------------------------------------------------------------------------------------
# (4) Hadamard rotation
# --------------------------------------------------------------------------------------------------

def np_hadamard(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_hadamard_leaves_scores_unchanged(layout):
    cfg = make_cfg(rope_layout=layout)
    cfg_h = make_cfg(rope_layout=layout, use_hadamard=True)
    ix, ix_h = make_indexer(cfg), make_indexer(cfg_h)
    nnx.update(ix_h, nnx.state(ix))
    x, qr, pos = make_inputs(cfg)
    a, a_h = run(ix, x, qr, pos), run(ix_h, x, qr, pos)
    # The vectors are rotated (orthonormal Walsh-Hadamard after RoPE)...
    had = np_hadamard(cfg.head_dim)
    np.testing.assert_allclose(f64(a_h.q), f64(a.q) @ had, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(a_h.k), f64(a.k) @ had, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(a_h.w), f64(a.w), rtol=1e-6)
    # ...and the scores are the same.
    s, s_h = f64(index_scores(a.q, a.k, a.w)), f64(index_scores(a_h.q, a_h.k, a_h.w))
    np.testing.assert_allclose(s_h, s, rtol=1e-4, atol=1e-5 * np.abs(s).max())


# --------------------------------------------------------------------------------------------------
# (5) fp8 path
# --------------------------------------------------------------------------------------------------

def fp8_to_f64(a) -> np.ndarray:
    a = np.asarray(a)
    assert a.dtype == ml_dtypes.float8_e4m3fn
    return a.astype(np.float64)


@pytest.mark.parametrize("fmt", ["plain", "ue8m0"])
@pytest.mark.parametrize("use_hadamard", [False, True])
def test_fp8_path(fmt, use_hadamard):
    kw = dict(use_hadamard=use_hadamard)
    cfg = make_cfg(**kw)
    cfg8 = make_cfg(fp8=True, fp8_scale_fmt=fmt, **kw)
    ix, ix8 = make_indexer(cfg), make_indexer(cfg8)
    nnx.update(ix8, nnx.state(ix))
    x, qr, pos = make_inputs(cfg, B=2, T=8)
    a = run(ix, x, qr, pos)
    a8 = run(ix8, x, qr, pos)
    B, T, H, d = 2, 8, cfg.n_heads, cfg.head_dim
    assert d <= 128  # one fp8 scale group per vector

    assert a8.q.dtype == jnp.float8_e4m3fn and a8.q.shape == (B, T, H, d)
    assert a8.k.dtype == jnp.float8_e4m3fn and a8.k.shape == (B, T, d)
    assert a8.k_scale is not None and a8.k_scale.dtype == jnp.float32 and a8.k_scale.shape == (B, T)
    assert a8.w.dtype == jnp.float32 and a8.w.shape == (B, T, H)

    # Scales as DeepSeek-V3.2 defines them: amax = max(|x|, 1e-4), s = amax / 448, or 2^ceil(log2(amax/448)), ue8m0.
    q32, k32, w32 = f64(a.q), f64(a.k), f64(a.w)
    def spec_scale(v):
        s = np.maximum(np.abs(v).max(-1), 1e-4) / 448.0
        return 2.0 ** np.ceil(np.log2(s)) if fmt == "ue8m0" else s
    k_scale = f64(a8.k_scale)
    q_scale = f64(a8.w) / w32  # the q scale is folded into the head weight
    np.testing.assert_allclose(k_scale, spec_scale(k32), rtol=1e-5)
    np.testing.assert_allclose(q_scale, spec_scale(q32), rtol=1e-5)
    if fmt == "ue8m0":
        for s in (k_scale, q_scale):
            e = np.log2(s)
            np.testing.assert_allclose(e, np.round(e), atol=1e-5)
        e = np.log2(k_scale)
        assert np.all(e == np.round(e)), "ue8m0 k scales must be exact powers of two"

    # Dequantised values are fp8-close to the float path: e4m3 rounding is within 2^-4 relative, or
    # half a subnormal step (2^-10 in fp8 units) near zero.
    q8, k8 = fp8_to_f64(a8.q), fp8_to_f64(a8.k)
    for v8, scale, v in ((q8, q_scale, q32), (k8, k_scale, k32)):
        err = np.abs(v8 * scale[..., None] - v)
        bound = 2 ** -4 * np.abs(v) + 2 ** -10 * scale[..., None] * (1 + 1e-6)
        assert np.all(err <= bound), f"fp8 rounding error too large: {np.max(err - bound)}"
    assert np.abs(q8).max() <= 448 and np.abs(k8).max() <= 448

    # Scores: the official formula from the returned fp8 values, in float64...
    s8 = f64(index_scores(a8.q, a8.k, a8.w, a8.k_scale))
    expected = np_scores(q8, k8, f64(a8.w), k_scale)
    np.testing.assert_allclose(s8, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # ...and within a few percent of the float path.
    s32 = f64(index_scores(a.q, a.k, a.w))
    # (e4m3 keeps 3 mantissa bits: ~3.6% rms rounding per element; measured ~4-5% on these scores. A
    # wrong scale, e.g. the q scale not folded into w, is off by orders of magnitude.)
    rel = np.linalg.norm(s8 - s32) / np.linalg.norm(s32)
    assert rel < 0.08, f"fp8 scores relative error {rel:.3f}"
    assert np.abs(s8 - s32).max() < 0.15 * np.abs(s32).max()


# --------------------------------------------------------------------------------------------------
# (6) the head weights stay in float32 in a bfloat16 module
# --------------------------------------------------------------------------------------------------

def test_weights_proj_is_float32_in_bf16_module():
    cfg = make_cfg()
    ix = make_indexer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert ix.wq_b.kernel[...].dtype == jnp.bfloat16
    assert ix.wk.kernel[...].dtype == jnp.bfloat16
    assert ix.weights_proj.kernel[...].dtype == jnp.float32
    assert ix.k_norm.scale[...].dtype == jnp.float32 and ix.k_norm.bias[...].dtype == jnp.float32
    x, qr, pos = make_inputs(cfg, x_dtype=ml_dtypes.bfloat16)
    act = run(ix, x, qr, pos)
    assert act.q.dtype == jnp.bfloat16 and act.k.dtype == jnp.bfloat16
    assert act.w.dtype == jnp.float32
    # w is computed in float32 from the (exactly representable) bf16 inputs: no bf16 rounding.
    w = np.asarray(x, np.float64) @ f64(ix.weights_proj.kernel) * cfg.n_heads ** -0.5 * cfg.head_dim ** -0.5
    np.testing.assert_allclose(f64(act.w), w, rtol=1e-5, atol=1e-6)
    # q and k are bf16-close to the float64 oracle.
    q, k, _ = np_indexer(np_params(ix), cfg, np.asarray(x, np.float64), np.asarray(qr, np.float64), pos)
    np.testing.assert_allclose(f64(act.q), q, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(f64(act.k), k, rtol=3e-2, atol=3e-2)
