"""DSAAttention against an independent float64 numpy oracle: dense, NON-absorbed MLA.

The oracle expands per-head k_nope and v from the latent with kv_b_proj, scores q = [nope | rope]
against k = [k_nope | shared k_rope], applies the causal mask (and optionally a selection mask),
softmax, and o_proj. The layer runs the absorbed MQA form over gathered rows; both must agree.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_index_jax.kernels import sparse_mla as sparse_mla_mod
from numpy_rope import np_yarn
from sparse_index_jax import DSAAttention, DSACache, DSAConfig, IndexerConfig, MLAConfig, RopeConfig, Selection

THETA = 10000.0
HIDDEN, HEADS, Q_LORA, KV_LORA, NOPE, ROPE, V = 32, 2, 16, 16, 8, 4, 6
IX_H, IX_D = 2, 8


# --------------------------------------------------------------------------------------------------
# float64 numpy oracle
# --------------------------------------------------------------------------------------------------

def np_rope(x, pos, layout, inv_freqs, mult=1.0):
    """Rotates the whole last axis of x; 'interleaved' pairs (2i, 2i+1), 'half' pairs (i, i+n/2)."""
    x = np.asarray(x, np.float64)
    y = x.copy()
    n = x.shape[-1]
    pos = np.asarray(pos, np.float64)
    for i in range(n // 2):
        a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + n // 2)
        c, s = mult * np.cos(pos * inv_freqs[i]), mult * np.sin(pos * inv_freqs[i])
        y[..., a] = x[..., a] * c - x[..., b] * s
        y[..., b] = x[..., b] * c + x[..., a] * s
    return y


def np_rms(x, weight, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def np_params(layer: DSAAttention) -> dict[str, np.ndarray]:
    names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    names += ["q_a_proj", "q_b_proj"] if layer.cfg.mla.q_lora_rank else ["q_proj"]
    p = {n: f64(getattr(layer, n).kernel[...]) for n in names}
    p["kv_a_layernorm"] = f64(layer.kv_a_layernorm.weight[...])
    if layer.cfg.mla.q_lora_rank:
        p["q_a_layernorm"] = f64(layer.q_a_layernorm.weight[...])
    return p


def rope_numbers(m: MLAConfig):
    r = m.rope
    if r.rope_type == "yarn":
        return np_yarn(m.qk_rope_head_dim, r.theta, r.factor, r.original_max_position_embeddings, r.beta_fast,
                       r.beta_slow, r.mscale, r.mscale_all_dim)
    return r.theta ** (-np.arange(0, m.qk_rope_head_dim, 2) / m.qk_rope_head_dim), 1.0, 1.0


def np_mla(layer: DSAAttention, x, positions=None, extra_mask=None):
    """Dense causal MLA, non-absorbed, float64. extra_mask [B,T,T] bool further restricts the keys."""
    m = layer.cfg.mla
    p = np_params(layer)
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, dn, dr, dv, c = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    pos = np.broadcast_to(np.arange(T), (B, T)) if positions is None else np.asarray(positions)
    inv, mult, smscale = rope_numbers(m)
    qr = np_rms(x @ p["q_a_proj"], p["q_a_layernorm"]) if m.q_lora_rank else x
    q = (qr @ p["q_b_proj"] if m.q_lora_rank else x @ p["q_proj"]).reshape(B, T, H, dn + dr)
    q = np.concatenate([q[..., :dn], np_rope(q[..., dn:], pos[:, :, None], "interleaved", inv, mult)], -1)
    kv = x @ p["kv_a_proj_with_mqa"]
    latent = np_rms(kv[..., :c], p["kv_a_layernorm"])
    k_rope = np_rope(kv[..., c:], pos, "interleaved", inv, mult)                 # [B,S,dr], shared by heads
    kvb = (latent @ p["kv_b_proj"]).reshape(B, T, H, dn + dv)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    k = np.concatenate([k_nope, np.broadcast_to(k_rope[:, :, None, :], (B, T, H, dr))], -1)
    scale = (dn + dr) ** -0.5 * smscale ** 2
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    if extra_mask is not None:
        mask = mask & np.asarray(extra_mask, bool)
    logits = np.where(mask[:, None], logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(mask[:, None], np.exp(logits - row_max), 0.0)
    denom = e.sum(-1, keepdims=True)
    probs = e / np.where(denom > 0, denom, 1.0)
    o = np.einsum("bhts,bshv->bthv", probs, v).reshape(B, T, H * dv)
    return o @ p["o_proj"], qr


def np_index_scores(layer: DSAAttention, x, qr, positions=None):
    """Independent indexer scores [B,T,S] (half or interleaved pairing on the first rope dims)."""
    ix = layer.indexer
    cfg = ix.cfg
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    pos = np.broadcast_to(np.arange(T), (B, T)) if positions is None else np.asarray(positions)
    inv, mult, _ = rope_numbers(layer.cfg.mla)
    r, H, d = cfg.rope_dim, cfg.n_heads, cfg.head_dim
    q = (qr @ f64(ix.wq_b.kernel[...])).reshape(B, T, H, d)
    q = np.concatenate([np_rope(q[..., :r], pos[:, :, None], cfg.rope_layout, inv, mult), q[..., r:]], -1)
    k = x @ f64(ix.wk.kernel[...])
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
    k = k * f64(ix.k_norm.scale[...]) + f64(ix.k_norm.bias[...])
    k = np.concatenate([np_rope(k[..., :r], pos, cfg.rope_layout, inv, mult), k[..., r:]], -1)
    w = x @ f64(ix.weights_proj.kernel[...]) * H ** -0.5 * d ** -0.5
    return np.einsum("bth,bths->bts", w, np.maximum(np.einsum("bthd,bsd->bths", q, k), 0))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def make_cfg(topk=64, with_indexer=True, rope=None, q_lora=Q_LORA, fp8=False, layout="half",
             **selector) -> DSAConfig:
    mla = MLAConfig(hidden_size=HIDDEN, num_heads=HEADS, q_lora_rank=q_lora, kv_lora_rank=KV_LORA,
                    qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                    rope=rope or RopeConfig(theta=THETA), query_chunk=16)
    ix = None
    if with_indexer:
        ix = IndexerConfig(hidden_size=HIDDEN, q_input_dim=q_lora or HIDDEN, n_heads=IX_H, head_dim=IX_D, topk=topk,
                           rope_dim=ROPE, rope_layout=layout, fp8=fp8, query_chunk=16, key_chunk=16, **selector)
    return DSAConfig(mla=mla, indexer=ix)


def make_layer(cfg: DSAConfig, seed=0) -> DSAAttention:
    layer = DSAAttention(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(100 + seed)
    # Non-trivial norm parameters so a skipped or misplaced norm shows.
    layer.kv_a_layernorm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, KV_LORA), jnp.float32)
    if cfg.mla.q_lora_rank:
        layer.q_a_layernorm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, cfg.mla.q_lora_rank), jnp.float32)
    if layer.indexer is not None:
        layer.indexer.k_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, IX_D), jnp.float32)
        layer.indexer.k_norm.bias[...] = jnp.asarray(rng.normal(0, 0.3, IX_D), jnp.float32)
    return layer


def make_x(B, T, seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, HIDDEN)).astype(np.float32)


@nnx.jit
def _jit_call(layer, x, positions, cache, selection):
    return layer(x, positions=positions, cache=cache, selection=selection)


def call(layer, x, *, positions=None, cache=None, selection=None):
    """The layer under nnx.jit: one compilation per shape instead of one per eager op (keeps tests fast)."""
    return _jit_call(layer, jnp.asarray(x), positions, cache, selection)


def assert_close(actual, expected, tol=1e-4):
    np.testing.assert_allclose(f64(actual), expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max()))


def valid_sets(sel: Selection):
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    return idx, valid


# --------------------------------------------------------------------------------------------------
# (1) dense regime equals dense causal MLA
# --------------------------------------------------------------------------------------------------

def test_topk_ge_T_equals_dense_causal_mla():
    B, T = 2, 12
    layer = make_layer(make_cfg(topk=T + 3))
    x = make_x(B, T)
    res = call(layer, x)
    assert res.out.shape == (B, T, HIDDEN) and res.out.dtype == jnp.float32 and res.cache is None
    expected, _ = np_mla(layer, x)
    assert_close(res.out, expected)
    # Every causal key is selected.
    mask = np.asarray(res.selection.to_mask(T))
    np.testing.assert_array_equal(mask, np.tril(np.ones((T, T), bool))[None].repeat(B, 0))


def test_yarn_layer_matches_oracle():
    """A YaRN rope (ramped frequencies, cos/sin factor != 1, softmax mscale) in MLA and indexer."""
    rope = RopeConfig(theta=THETA, rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5)
    B, T = 1, 10
    layer = make_layer(make_cfg(topk=T, rope=rope))
    x = make_x(B, T, seed=3)
    res = call(layer, x)
    expected, _ = np_mla(layer, x)
    assert_close(res.out, expected)
    _, mult, smscale = rope_numbers(layer.cfg.mla)
    assert abs(mult - 1) > 0.02 and abs(smscale - 1) > 0.02


# --------------------------------------------------------------------------------------------------
# (2) sparse regime equals the dense oracle masked by the selection
# --------------------------------------------------------------------------------------------------

def test_topk_lt_T_equals_masked_oracle():
    B, T, K = 2, 40, 8
    layer = make_layer(make_cfg(topk=K))
    x = make_x(B, T, seed=1)
    res = call(layer, x)
    sel = res.selection
    idx, valid = valid_sets(sel)
    assert idx.shape == (B, T, K) and idx.dtype == np.int32 and valid.dtype == bool
    np.testing.assert_array_equal(valid.sum(-1), np.minimum(K, np.arange(T) + 1)[None].repeat(B, 0))
    np.testing.assert_array_equal(idx >= 0, valid)
    mask = np.asarray(sel.to_mask(T))
    np.testing.assert_array_equal(mask.sum(-1), valid.sum(-1))  # no duplicates
    assert not np.any(mask & ~np.tril(np.ones((T, T), bool))), "selection must be causal"

    expected, qr = np_mla(layer, x, extra_mask=mask)
    assert_close(res.out, expected)
    dense, _ = np_mla(layer, x)
    assert np.abs(dense - expected).max() > 1e-3, "the sparse mask must matter in this test"

    # The selected keys are the top-k of an independent indexer score (up to float32 near-ties).
    scores = np_index_scores(layer, x, qr)
    tol = 1e-4 * np.abs(scores).max()
    for b in range(B):
        for t in range(K, T):
            sel_s = scores[b, t][mask[b, t]]
            rest = scores[b, t, : t + 1][~mask[b, t, : t + 1]]
            assert sel_s.min() >= rest.max() - tol, (b, t)


# --------------------------------------------------------------------------------------------------
# (3) decode through the cache equals prefill; (4) chunked prefill equals one-shot prefill
# --------------------------------------------------------------------------------------------------

def check_selection_equal(sel_a: Selection, sel_b: Selection):
    ia, va = valid_sets(sel_a)
    ib, vb = valid_sets(sel_b)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(np.where(va, ia, -1), np.where(vb, ib, -1))


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_token_by_token_equals_prefill(fp8):
    B, T, K = 2, 12, 4
    layer = make_layer(make_cfg(topk=K, fp8=fp8))
    x = jnp.asarray(make_x(B, T, seed=2))
    pre = call(layer, x)
    cache = layer.init_cache(B, 16)
    assert cache.latent.shape == (B, 16, KV_LORA + ROPE)
    assert cache.index_keys.dtype == (jnp.float8_e4m3fn if fp8 else jnp.float32)
    assert (cache.index_key_scale is not None) == fp8
    outs, sels = [], []
    for t in range(T):
        res = call(layer, x[:, t:t + 1], cache=cache)
        cache = res.cache
        assert res.selection.indices.shape == (B, 1, K)
        outs.append(res.out)
        sels.append(res.selection)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T, T])
    np.testing.assert_allclose(f64(jnp.concatenate(outs, 1)), f64(pre.out), rtol=1e-5, atol=1e-5)
    dec_sel = Selection(jnp.concatenate([s.indices for s in sels], 1), jnp.concatenate([s.valid for s in sels], 1))
    check_selection_equal(dec_sel, pre.selection)
    if not fp8:
        expected, _ = np_mla(layer, np.asarray(x), extra_mask=np.asarray(pre.selection.to_mask(T)))
        assert_close(pre.out, expected)


@pytest.mark.parametrize("selector", [
    {"method": "hisa", "block_size": 3, "num_blocks": 3},
    {"method": "misa", "block_size": 4, "active_heads": 1},
    {"method": "misa_h", "block_size": 4, "active_heads": 1, "candidates": 6},
])
def test_hierarchical_selectors_decode_equals_prefill(selector):
    """The cache's pooled block sums, grown chunk by chunk and token by token, select what prefill selects."""
    B, T, K = 2, 20, 4
    layer = make_layer(make_cfg(topk=K, **selector))
    x = jnp.asarray(make_x(B, T, seed=3))
    pre = call(layer, x)
    cache = layer.init_cache(B, 23)
    assert cache.block_sums.shape == (B, -(-23 // selector["block_size"]), IX_D)
    res = call(layer, x[:, :7], cache=cache)
    outs, sels = [res.out], [res.selection]
    cache = res.cache
    for t in range(7, T):
        res = call(layer, x[:, t:t + 1], cache=cache)
        cache = res.cache
        outs.append(res.out)
        sels.append(res.selection)
    np.testing.assert_allclose(f64(jnp.concatenate(outs, 1)), f64(pre.out), rtol=1e-5, atol=1e-5)
    dec_sel = Selection(jnp.concatenate([s.indices for s in sels], 1), jnp.concatenate([s.valid for s in sels], 1))
    check_selection_equal(dec_sel, pre.selection)
    expected, _ = np_mla(layer, np.asarray(x), extra_mask=np.asarray(pre.selection.to_mask(T)))
    assert_close(pre.out, expected)


def test_chunked_prefill_equals_one_shot():
    B, T, K = 2, 12, 4
    layer = make_layer(make_cfg(topk=K))
    x = jnp.asarray(make_x(B, T, seed=4))
    one = call(layer, x)
    cache = layer.init_cache(B, 16)
    r1 = call(layer, x[:, :5], cache=cache)
    r2 = call(layer, x[:, 5:], cache=r1.cache)
    np.testing.assert_array_equal(np.asarray(r2.cache.lengths), [T, T])
    out = jnp.concatenate([r1.out, r2.out], 1)
    np.testing.assert_allclose(f64(out), f64(one.out), rtol=1e-5, atol=1e-5)
    sel = Selection(jnp.concatenate([r1.selection.indices, r2.selection.indices], 1),
                    jnp.concatenate([r1.selection.valid, r2.selection.valid], 1))
    check_selection_equal(sel, one.selection)
    # The one-shot cache prefill equals the chunked one, and so does the next decode step.
    full = call(layer, x, cache=layer.init_cache(B, 16))
    np.testing.assert_allclose(f64(full.out), f64(one.out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(r2.cache.latent), f64(full.cache.latent), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f64(r2.cache.index_keys), f64(full.cache.index_keys), rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(full.cache.latent)[:, T:]), "rows past the length stay untouched"
    x_next = jnp.asarray(make_x(B, 1, seed=5))
    d1, d2 = call(layer, x_next, cache=r2.cache), call(layer, x_next, cache=full.cache)
    np.testing.assert_allclose(f64(d1.out), f64(d2.out), rtol=1e-5, atol=1e-5)


def test_prefill_chunk_equals_all_at_once_with_probs_and_gradients():
    """MLAConfig.prefill_chunk = 5 over T = 12 (a ragged last chunk): the same output, selection, probabilities
    (capture) and parameter gradients as the whole prefill at once; with a cache too."""
    B, T, K = 2, 12, 4
    cfg = make_cfg(topk=K)
    whole, chunked = make_layer(cfg), make_layer(dataclasses.replace(
        cfg, mla=dataclasses.replace(cfg.mla, prefill_chunk=5)))
    x = jnp.asarray(make_x(B, T, seed=6))

    def run(layer):
        res = nnx.jit(lambda m, x: m(x, capture=True))(layer, x)

        def loss(m):
            return jnp.sum(m(x).out ** 2)
        grads = nnx.jit(nnx.grad(loss))(layer)
        return res, grads

    (a, ga), (b, gb) = run(whole), run(chunked)
    np.testing.assert_allclose(f64(b.out), f64(a.out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(b.probs), f64(a.probs), rtol=1e-5, atol=1e-6)
    check_selection_equal(b.selection, a.selection)
    for (path, x_a), (_, x_b) in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves_with_path(gb)):
        np.testing.assert_allclose(f64(x_b), f64(x_a), rtol=1e-4, atol=1e-5, err_msg=str(path))
    cached = call(chunked, x, cache=chunked.init_cache(B, 16))
    np.testing.assert_allclose(f64(cached.out), f64(a.out), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefill_chunk"):
        dataclasses.replace(cfg.mla, prefill_chunk=0)


# --------------------------------------------------------------------------------------------------
# (5) ragged batch
# --------------------------------------------------------------------------------------------------

def stack_caches(caches: list[DSACache]) -> DSACache:
    """Batch-1 caches -> one cache whose rows keep their own lengths (every array field stacked on axis 0)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *caches)


def test_ragged_batch_decode_equals_rows_alone():
    """Two rows with prompts of 5 and 12 tokens, decoded together, give each row's solo output."""
    K, L, steps = 4, 16, 3
    layer = make_layer(make_cfg(topk=K))
    prompts = [make_x(1, 5, seed=10), make_x(1, 12, seed=11)]
    solo_caches = [call(layer, p, cache=layer.init_cache(1, L)).cache for p in prompts]
    cache = stack_caches(solo_caches)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 12])
    new = make_x(2, steps, seed=12)
    batch_outs, solo_outs = [], [[], []]
    for s in range(steps):
        res = call(layer, new[:, s:s + 1], cache=cache)
        cache = res.cache
        batch_outs.append(res)
        for b in range(2):
            r = call(layer, new[b:b + 1, s:s + 1], cache=solo_caches[b])
            solo_caches[b] = r.cache
            solo_outs[b].append(r)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5 + steps, 12 + steps])
    for s in range(steps):
        for b in range(2):
            np.testing.assert_allclose(f64(batch_outs[s].out[b]), f64(solo_outs[b][s].out[0]), rtol=1e-5, atol=1e-5)
            check_selection_equal(Selection(batch_outs[s].selection.indices[b:b + 1],
                                            batch_outs[s].selection.valid[b:b + 1]), solo_outs[b][s].selection)
    # Each row's decoded tokens equal the dense oracle of prompt + new tokens, masked by their selection
    # (the selections are causal, have min(topk, position + 1) entries, and new tokens sit at position = length).
    for b, p in enumerate(prompts):
        seq = np.concatenate([p, new[b:b + 1]], 1)
        n = seq.shape[1]
        mask = np.tril(np.ones((1, n, n), bool))
        for s in range(steps):
            t = p.shape[1] + s
            row = np.asarray(batch_outs[s].selection.to_mask(L))[b, 0]
            assert row.sum() == min(K, t + 1) and not row[t + 1:].any()
            mask[0, t] = row[:n]
        expected, _ = np_mla(layer, seq, extra_mask=mask)
        got = jnp.stack([batch_outs[s].out[b, 0] for s in range(steps)])
        assert_close(got, expected[0, -steps:])


def test_batch_rows_are_independent():
    """A batch of 2 through a cache gives the same per-row output as each row alone."""
    K, T = 4, 12
    layer = make_layer(make_cfg(topk=K))
    x = make_x(2, T, seed=13)
    both = call(layer, x, cache=layer.init_cache(2, 16))
    for b in range(2):
        solo = call(layer, x[b:b + 1], cache=layer.init_cache(1, 16))
        np.testing.assert_allclose(f64(both.out[b]), f64(solo.out[0]), rtol=1e-5, atol=1e-5)
        check_selection_equal(Selection(both.selection.indices[b:b + 1], both.selection.valid[b:b + 1]),
                              solo.selection)


def test_explicit_positions_keep_prefill_causal():
    """Causality follows the token's slot, positions only set RoPE.

    Regression: select_topk used to get q_positions=positions, so positions = arange(T) + 3 without a
    cache let token t attend to the future tokens t+1..t+3.
    """
    B, T = 2, 12
    layer = make_layer(make_cfg(topk=4))
    x = make_x(B, T, seed=14)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + 3, (B, T))
    res = call(layer, x, positions=pos)
    assert not np.any(np.asarray(res.selection.to_mask(T)) & ~np.tril(np.ones((T, T), bool)))
    x2 = x.copy()
    x2[:, -1] += 5.0  # change only the last token
    res2 = call(layer, x2, positions=pos)
    np.testing.assert_array_equal(np.asarray(res.out)[:, :-1], np.asarray(res2.out)[:, :-1])
    # RoPE is relative: a constant shift of every position leaves the output unchanged.
    base = call(layer, x)
    np.testing.assert_allclose(f64(res.out), f64(base.out), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# (6) shared (indexer-less) layers; (7) cache overflow
# --------------------------------------------------------------------------------------------------

def test_layer_without_indexer_needs_and_uses_a_selection():
    B, T, K = 2, 12, 4
    full = make_layer(make_cfg(topk=K), seed=0)
    shared = make_layer(make_cfg(with_indexer=False), seed=1)
    assert shared.indexer is None
    x = make_x(B, T, seed=6)
    with pytest.raises(ValueError, match="selection"):
        shared(jnp.asarray(x))
    with pytest.raises(ValueError, match="selection"):
        shared(jnp.asarray(x[:, :1]), cache=shared.init_cache(B, 16))
    sel = call(full, x).selection
    res = call(shared, x, selection=sel)
    check_selection_equal(res.selection, sel)
    expected, _ = np_mla(shared, x, extra_mask=np.asarray(sel.to_mask(T)))
    assert_close(res.out, expected)
    # With a cache too: decoding a shared layer with the full layer's decode selections.
    fc, sc = full.init_cache(B, 16), shared.init_cache(B, 16)
    assert sc.index_keys is None and sc.index_key_scale is None
    outs = []
    for t in range(T):
        rf = call(full, x[:, t:t + 1], cache=fc)
        rs = call(shared, x[:, t:t + 1], cache=sc, selection=rf.selection)
        fc, sc = rf.cache, rs.cache
        outs.append(rs.out)
    np.testing.assert_allclose(f64(jnp.concatenate(outs, 1)), f64(res.out), rtol=1e-5, atol=1e-5)


def test_cache_overflow_raises():
    """Eagerly, a write past max_len is refused with a message naming max_len (before any attention runs)."""
    layer = make_layer(make_cfg(topk=4))
    x = jnp.asarray(make_x(1, 6))
    with pytest.raises(ValueError, match="max_len"):
        layer(x, cache=layer.init_cache(1, 4))
    # The cache's own check, also for a partly filled cache and ragged rows (the longest row decides).
    cache = layer.init_cache(2, 4)
    cache = dataclasses.replace(cache, lengths=jnp.array([0, 3], jnp.int32))
    rows = jnp.zeros((2, 2, KV_LORA + ROPE), jnp.float32)
    keys = jnp.zeros((2, 2, IX_D), jnp.float32)
    with pytest.raises(ValueError, match="max_len"):
        cache.append(rows, keys)
    ok = cache.append(rows[:, :1], keys[:, :1])  # exactly fills row 1
    np.testing.assert_array_equal(np.asarray(ok.lengths), [1, 4])


def test_cache_overflow_under_jit_overwrites_nothing_and_is_flagged():
    """Under jit the lengths are traced, so append cannot raise: it drops the extra rows (dynamic slices
    would clamp and overwrite the last valid row) and reports the row as overflowed."""
    layer = make_layer(make_cfg(topk=4))
    x = jnp.asarray(make_x(1, 5))
    step = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    full = step(layer, x[:, :4], layer.init_cache(1, 4)).cache
    assert not bool(full.overflowed[0])
    over = step(layer, x[:, 4:], full).cache
    assert bool(over.overflowed[0])
    np.testing.assert_array_equal(np.asarray(over.latent), np.asarray(full.latent))
    np.testing.assert_array_equal(np.asarray(over.index_keys), np.asarray(full.index_keys))
    with pytest.raises(ValueError, match="exceed the cache's max_len=4"):
        step(layer, jnp.asarray(make_x(1, 6)), layer.init_cache(1, 4))


# --------------------------------------------------------------------------------------------------
# (8) sparse_mla op: gradients and empty rows
# --------------------------------------------------------------------------------------------------

@jax.jit
def dense_masked_attention(q, kv, mask, scale, v_dim=8):
    """q [B,T,H,D], kv [B,S,D], mask [B,T,S]: plain masked softmax; rows with no key give 0."""
    logits = jnp.einsum("bthd,bsd->bths", q, kv, precision="highest") * scale
    logits = jnp.where(mask[:, :, None, :], logits, -1e30)
    p = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, -1)[:, :, None, None]
    return jnp.einsum("bths,bsv->bthv", p, kv[..., :v_dim], precision="highest")


def test_sparse_mla_grad_matches_dense():
    B, T, S, H, D, K, v_dim = 2, 5, 9, 3, 12, 4, 8
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    idx = np.full((B, T, K), -1, np.int32)
    valid = np.zeros((B, T, K), bool)
    counts = np.array([[4, 2, 0, 3, 1], [4, 4, 1, 0, 2]])
    for b in range(B):
        for t in range(T):
            picks = rng.permutation(S)[: counts[b, t]]
            idx[b, t, : len(picks)] = picks
            valid[b, t, : len(picks)] = True
    # A padding slot pointing at a real row must be ignored as well.
    idx[0, 1, 3] = 5
    sel = Selection(jnp.asarray(idx), jnp.asarray(valid))
    mask = sel.to_mask(S)
    scale = D ** -0.5
    w_out = jnp.asarray(rng.normal(size=(B, T, H, v_dim)), jnp.float32)

    def loss_sparse(q, kv):
        out = sparse_mla_mod.sparse_mla(q, kv, sel.indices, sel.valid, scale=scale, v_dim=v_dim, query_chunk=2)
        return jnp.sum(out * w_out)

    def loss_dense(q, kv):
        return jnp.sum(dense_masked_attention(q, kv, mask, scale) * w_out)

    out = sparse_mla_mod.sparse_mla(q, kv, sel.indices, sel.valid, scale=scale, v_dim=v_dim, query_chunk=2)
    assert out.shape == (B, T, H, v_dim) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_masked_attention(q, kv, mask, scale)),
                               rtol=1e-5, atol=1e-5)
    empty = counts == 0
    assert np.all(np.asarray(out)[empty] == 0.0), "rows with no valid slot output exactly 0"

    gs = jax.jit(jax.grad(loss_sparse, argnums=(0, 1)))(q, kv)
    gd = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(q, kv)
    for a, b in zip(gs, gd):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(gs[0])[empty] == 0.0), "no gradient flows into an empty row's query"


# --------------------------------------------------------------------------------------------------
# (9) YaRN softmax scale
# --------------------------------------------------------------------------------------------------

def test_yarn_softmax_scale():
    m = MLAConfig(hidden_size=64, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  rope=RopeConfig(rope_type="yarn", factor=40, mscale=1.0, mscale_all_dim=1.0,
                                  original_max_position_embeddings=4096))
    expected = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert m.softmax_scale == pytest.approx(expected, rel=1e-12)
    assert m.softmax_scale == pytest.approx(0.1352, abs=5e-5)
    # The released models keep cos/sin unscaled (mscale == mscale_all_dim).
    assert m.rope.attention_factor == pytest.approx(1.0)
    # Plain rope: no mscale.
    assert MLAConfig(hidden_size=64, qk_nope_head_dim=128, qk_rope_head_dim=64).softmax_scale == pytest.approx(
        192 ** -0.5)
