"""IndexCache patterns, the greedy search, and the two-stage indexer distillation on a tiny model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import save_tiny  # skips without torch / transformers

from sparse_index_jax import models
from sparse_index_jax.cli import main
from sparse_index_jax.layers.index_cache import IndexCacheConfig
from sparse_index_jax.training.data import PackedDataset
from sparse_index_jax.training.distill import INDEXER_PARAMS, DistillConfig, distill, distill_losses, evaluate
from sparse_index_jax.training.index_cache_search import greedy_search
from sparse_index_jax.training.losses import indexer_kl, lm_loss

VOCAB, SEQ = 96, 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """4 layers, weights large enough for peaked attention (so the indexer has something to learn)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=4, initializer_range=0.3)


@pytest.fixture(scope="module")
def data():
    return PackedDataset(np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.int32), SEQ, seed=0)


def load(checkpoint, **kw):
    return models.from_pretrained(checkpoint, dtype=jnp.float32, progress=False, **kw)


def test_pattern_config():
    assert IndexCacheConfig.uniform(8, 4).pattern == "FSSSFSSS"
    assert IndexCacheConfig.uniform(8, 3, offset=2).pattern == "FSFSSFSS"
    cfg = IndexCacheConfig("FSSFS")
    assert cfg.keep_ratio == 0.4 and cfg.groups() == [(0, [0, 1, 2]), (3, [3, 4])]
    assert IndexCacheConfig.from_hf_config({
        "model_type": "glm_moe_dsa", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "moe_intermediate_size": 4, "num_hidden_layers": 4, "num_attention_heads": 2, "n_routed_experts": 4,
        "kv_lora_rank": 4, "q_lora_rank": 4, "qk_rope_head_dim": 2, "v_head_dim": 2, "qk_nope_head_dim": 2,
        "num_experts_per_tok": 2, "index_topk_pattern": "FFSS"}).pattern == "FFSS"
    for bad, message in (("SFF", "layer 0 must be F"), ("FXF", "letters 'F'"), ("", "letters 'F'")):
        with pytest.raises(ValueError, match=message):
            IndexCacheConfig(bad)


def test_shared_layers_reuse_the_last_full_selection(checkpoint):
    model = load(checkpoint)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, SEQ)))
    out = model(ids, index_pattern="FSFS")
    for shared, full in ((1, 0), (3, 2)):
        np.testing.assert_array_equal(np.asarray(out.selections[shared].indices), np.asarray(out.selections[full].indices))
    assert not np.array_equal(np.asarray(out.selections[2].indices), np.asarray(out.selections[0].indices))
    baked = load(checkpoint, index_pattern="FSFS")  # S layers carry no indexer weights
    assert baked.layers[1].self_attn.indexer is None and baked.layers[2].self_attn.indexer is not None
    np.testing.assert_allclose(np.asarray(baked(ids).logits), np.asarray(out.logits), atol=1e-6)
    with pytest.raises(ValueError, match=r"layers \[1\] have no indexer weights"):
        baked(ids, index_pattern="FFFS")
    with pytest.raises(ValueError, match="layer 0 must be F"):
        model(ids, index_pattern="SFFF")
    with pytest.raises(ValueError, match=r"ModelConfig\.selector: unknown option"):
        load(checkpoint, selector={"method": "hisa", "blocks": 3})


@pytest.mark.parametrize("selector", [None, {"method": "hisa", "block_size": 2, "num_blocks": 3},
                                      {"method": "misa_h", "block_size": 4, "active_heads": 4, "candidates": 8}])
def test_pattern_decode_equals_prefill(checkpoint, selector):
    """With S layers (and any selector for the F layers), decoding through caches reproduces prefill."""
    model = load(checkpoint, index_pattern="FSSF", selector=selector)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 14)))
    full = np.asarray(model(ids).logits)
    caches = model.init_caches(2, 14)
    out = model(ids[:, :6], caches=caches)
    logits = [np.asarray(out.logits)]
    caches = out.caches
    for t in range(6, 14):
        out = model(ids[:, t:t + 1], caches=caches)
        caches = out.caches
        logits.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, atol=2e-5)


def self_consistent_batches(model, n=2, batch=2):
    """Calibration targets = the all-F model's own greedy predictions: every selection change then
    tends to raise the loss, and a layer whose selection cannot matter raises it by exactly 0."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        ids = jnp.asarray(rng.integers(0, VOCAB, (batch, SEQ)))
        out.append((np.asarray(ids), np.asarray(jnp.argmax(model(ids).logits, -1))))
    return out


def test_search_recovers_a_planted_redundant_layer(checkpoint, tmp_path):
    model = load(checkpoint)
    layer = model.layers[2].self_attn
    layer.o_proj.kernel[...] = jnp.zeros_like(layer.o_proj.kernel[...])  # layer 2's attention adds nothing
    batches = self_consistent_batches(model)
    state = greedy_search(model, batches, keep=0.75, progress=False, log=lambda s: None)
    assert state.pattern == "FFSF" and state.history[0]["flip"] == 2
    assert state.history[0]["loss"] == pytest.approx(state.base_loss, abs=1e-6)
    others = [v for j, v in state.history[0]["candidates"].items() if j != "2"]
    assert min(others) > state.base_loss + 1e-4
    dense = np.mean([float(lm_loss(model(jnp.asarray(i), dense=True).logits, jnp.asarray(t))) for i, t in batches])
    assert state.report()["dense_loss"] == pytest.approx(dense, rel=1e-5)  # what search.png reads losses against


def test_search_resumes_from_its_state_file(checkpoint, tmp_path):
    model = load(checkpoint)
    batches = self_consistent_batches(model, n=1)
    path = tmp_path / "state.json"
    full = greedy_search(model, batches, keep=0.5, state_path=path, fingerprint="x", progress=False, log=lambda s: None)
    assert len(full.history) == 2 and full.pattern.count("F") == 2
    saved = json.loads(path.read_text())
    saved["pattern"], saved["history"] = saved["history"][0]["pattern"], saved["history"][:1]
    path.write_text(json.dumps(saved))  # as if interrupted after the first flip
    messages = []
    resumed = greedy_search(model, batches, keep=0.5, state_path=path, fingerprint="x", progress=False,
                            log=messages.append)
    assert "resuming" in messages[0] and resumed.pattern == full.pattern
    assert resumed.history[1]["loss"] == pytest.approx(full.history[1]["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="belongs to another search"):
        greedy_search(model, batches, keep=0.25, state_path=path, fingerprint="x", progress=False)


def test_indexer_kl_matches_numpy():
    rng = np.random.default_rng(4)
    B, T, k = 2, 5, 6
    valid = rng.random((B, T, k)) < 0.7
    valid[0, 0] = False  # a row with no key counts 0
    scores = rng.standard_normal((B, T, k)).astype(np.float32)
    targets = []
    for _ in range(2):
        p = np.where(valid, rng.random((B, T, k)), 0.0)
        targets.append((p / np.maximum(p.sum(-1, keepdims=True), 1e-30)).astype(np.float32))
    expected = []
    for p in targets:
        rows = []
        for b, t in np.ndindex(B, T):
            v = valid[b, t]
            if not v.any():
                continue
            s = scores[b, t][v].astype(np.float64)
            log_q = s - np.log(np.exp(s - s.max()).sum()) - s.max()
            pv = p[b, t][v].astype(np.float64)
            rows.append(np.sum(np.where(pv > 0, pv * (np.log(np.where(pv > 0, pv, 1)) - log_q), 0)))
        expected.append(np.mean(rows))
    got = indexer_kl([jnp.asarray(p) for p in targets], jnp.asarray(scores), jnp.asarray(valid))
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-5)


def test_dense_stage_gradients_reach_only_the_indexers(checkpoint):
    model = load(checkpoint)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (2, SEQ + 1)))
    grads = nnx.grad(lambda m: distill_losses(m, ids[:, :-1], ids[:, 1:], "FSFF", "dense")[0])(model)
    flat = nnx.to_flat_state(grads)
    indexer = [np.abs(np.asarray(v.get_value())).max() for p, v in flat if "indexer" in map(str, p)]
    rest = [np.abs(np.asarray(v.get_value())).max() for p, v in flat if "indexer" not in map(str, p)]
    assert rest and max(rest) == 0.0, "the dense stage must not move anything but the indexers"
    assert indexer and max(indexer) > 0
    opt = nnx.Optimizer(model, DistillConfig().tx("dense"), wrt=INDEXER_PARAMS)
    moments = [p for p, _ in nnx.to_flat_state(nnx.state(opt, nnx.OptState)) if "mu" in map(str, p)]
    n_indexer = len(nnx.to_flat_state(nnx.state(model, INDEXER_PARAMS)))
    assert len(moments) == n_indexer and all("indexer" in map(str, p) for p in moments), \
        "frozen weights carry no optimizer state"


def test_distillation_lowers_the_indexer_loss(checkpoint, data, tmp_path):
    model = load(checkpoint)
    before = evaluate(model, data, "FSFF", 2, 2)
    history = distill(model, data, DistillConfig(pattern="FSFF", warmup_steps=20, sparse_steps=2, batch_size=2,
                                                 warmup_lr=3e-3, sparse_lr=1e-4, save_every=100),
                      tmp_path / "run", progress=False)
    after = evaluate(model, data, "FSFF", 2, 2)
    assert after["indexer_kl_dense"] < 0.8 * before["indexer_kl_dense"]
    assert after["lm_loss_dense"] == before["lm_loss_dense"]  # by default only the indexers train
    assert [r["stage"] for r in history] == ["dense"] * 20 + ["sparse"] * 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 22 and json.loads(lines[-1])["step"] == 22


def test_train_base_also_trains_the_model_in_the_sparse_stage(checkpoint, data, tmp_path):
    """``train_base=True`` (DeepSeek's sparse-stage recipe): the model learns from the LM loss too; without it
    every non-indexer weight stays bit for bit what was loaded."""
    base = lambda m: [(p, np.asarray(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))  # noqa: E731
                      if "indexer" not in map(str, p)]
    for train_base in (False, True):
        model = load(checkpoint)
        before = base(model)
        distill(model, data, DistillConfig(pattern="FSFF", warmup_steps=1, sparse_steps=2, batch_size=2,
                                           sparse_lr=1e-3, train_base=train_base, save_every=100),
                tmp_path / str(train_base), progress=False)
        moved = [str(p) for (p, a), (_, b) in zip(before, base(model)) if not np.array_equal(a, b)]
        assert bool(moved) == train_base, moved


def test_interrupted_and_resumed_equals_uninterrupted(checkpoint, data, tmp_path):
    cfg = DistillConfig(pattern="FSFF", warmup_steps=3, sparse_steps=3, batch_size=2, warmup_lr=3e-3,
                        sparse_lr=1e-3, save_every=100)
    straight = load(checkpoint)
    distill(straight, data, cfg, tmp_path / "a", progress=False)
    lines = []
    # two interruptions (after 2 steps; a time limit passed by the first step), each followed by a fresh process
    # loading the checkpoint
    for stop, time_limit in ((2, None), (None, 1e-9), (None, None)):
        resumed = load(checkpoint)
        history = distill(resumed, data, cfg, tmp_path / "b", progress=False, stop_after=stop, log=lines.append,
                          time_limit=time_limit)
        if time_limit:
            assert [h["step"] for h in history] == [3] and "time limit" in lines[-1]
    a, b = nnx.to_flat_state(nnx.state(straight)), nnx.to_flat_state(nnx.state(resumed))
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))


def test_search_and_distill_commands(checkpoint, tmp_path, capsys):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(6).integers(0, VOCAB, 3000).astype(np.uint16))
    common = ["--model", str(checkpoint), "--data", str(tokens), "--seq-len", str(SEQ), "--dtype", "float32",
              "--quiet"]
    assert main(["search", *common, "--keep", "0.5", "--calib-batches", "1", "--out", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "search.json").read_text())
    assert report["pattern"].count("F") == 2 and (tmp_path / "s" / "search.png").stat().st_size > 0
    assert main(["distill", *common, "--every", "2", "--warmup-steps", "2", "--sparse-steps", "1",
                 "--eval-batches", "1", "--out", str(tmp_path / "d")]) == 0
    result = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert result["pattern"] == "FSFS" and (tmp_path / "d" / "distill.png").is_file()
    assert any((tmp_path / "d" / "checkpoints").iterdir())
    assert "held-out indexer KL" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["distill", *common, "--pattern", "FSFF", "--every", "2", "--out", str(tmp_path / "e")])
