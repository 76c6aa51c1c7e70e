"""One ``from_pretrained`` / ``load`` for every family: Llama, Qwen2 and Mistral HF folders and GGUF files.

Tiny random HF models (seeded torch, every weight redrawn so biases and norms are not trivial) are saved with
``save_pretrained`` (one file, and sharded with an index), loaded by ``models.from_pretrained`` and compared
with transformers in float32. RoPE scaling (llama3, yarn, dynamic past ``max_position_embeddings``), GQA, tied
and untied heads and qwen2's biases are covered; a qwen2 GGUF is written the way llama.cpp writes one.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests build HF checkpoints with torch")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers 5.23")

from sparse_index_jax import models  # noqa: E402
from sparse_index_jax.models.retrofit import save_indexers  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
CASES = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3_tied_bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "mistral_dynamic": ("MistralConfig", "MistralForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=None, max_position_embeddings=16,  # T=19 > 16: the base grows
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
}
SHAPE = {"n_heads": 2, "head_dim": 8, "rope_dim": 4}
IDS = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 19))


def hf_model(case: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in hf.parameters():  # biases start at zero and norms at one: redraw everything
            p.normal_(0.0, 0.2)
    return hf


@nnx.jit(static_argnames=("dense",))
def _logits(model, ids, dense: bool = True):
    return model(ids, dense=dense).logits


def logits(model, ids, dense: bool = True) -> np.ndarray:
    """The model's logits, jitted (eager runs are slower than one compile)."""
    return np.asarray(_logits(model, jnp.asarray(ids), dense=dense))


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each case saved once (qwen2 sharded over several files with model.safetensors.index.json)."""
    out = {}
    for case in CASES:
        hf = hf_model(case)
        folder = tmp_path_factory.mktemp(case)
        hf.save_pretrained(folder, max_shard_size="20KB" if case.startswith("qwen2") else "1GB")
        out[case] = (folder, hf_logits(hf, IDS))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(folders, case):
    folder, want = folders[case]
    model = models.from_pretrained(folder, progress=False)  # saved as float32: loaded as float32
    assert models.family(folder) == "llama" and model.dtype == jnp.float32
    cfg = model.cfg
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings == CASES[case][2]["tie_word_embeddings"]
    if case == "qwen2_yarn":
        assert (folder / "model.safetensors.index.json").is_file()
        assert (cfg.attention_bias, cfg.attention_out_bias) == (True, False)
    if case == "llama3_tied_bias":
        assert (cfg.attention_bias, cfg.attention_out_bias) == (True, True) and cfg.rope.rope_type == "llama3"
    np.testing.assert_allclose(logits(model, IDS), want, atol=1e-4, rtol=1e-4)


def test_indexers_fresh_from_a_file_and_refused_by_field(folders, tmp_path):
    folder, want = folders["llama_gqa_untied"]
    fresh = models.from_pretrained(folder, indexers="fresh", indexer_shape=SHAPE, selector={"topk": 6},
                                   progress=False)
    assert fresh.cfg.indexer.n_heads == 2 and fresh.selector.topk == 6
    np.testing.assert_allclose(logits(fresh, IDS), want, atol=1e-4, rtol=1e-4)  # the base model is untouched
    file = save_indexers(fresh, tmp_path / "indexers.safetensors")

    again = models.from_pretrained(folder, indexers=file, progress=False)
    assert again.selector == fresh.selector
    a = fresh.layers[1].self_attn.indexer.wq_b.kernel.get_value()
    np.testing.assert_allclose(np.asarray(again.layers[1].self_attn.indexer.wq_b.kernel.get_value()), a, atol=1e-3)

    wider = tmp_path / "wider"
    hf_model("llama_gqa_untied", hidden_size=48, num_attention_heads=6, num_key_value_heads=2).save_pretrained(wider)
    with pytest.raises(ValueError, match=r"hidden_size=32 \(model: 48\)"):
        models.from_pretrained(wider, indexers=file, progress=False)
    deeper = tmp_path / "deeper"
    hf_model("llama_gqa_untied", num_hidden_layers=3).save_pretrained(deeper)
    with pytest.raises(ValueError, match=r"num_layers=2 \(model: 3\)"):
        models.from_pretrained(deeper, indexers=file, progress=False)
    with pytest.raises(ValueError, match="fresh indexers only"):
        models.from_pretrained(folder, indexers=file, indexer_shape=SHAPE, progress=False)


def test_unknown_model_type_and_misplaced_arguments(folders, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: deepseek_v32, glm_moe_dsa .* llama, "
                                         "qwen2, mistral"):
        models.from_pretrained(tmp_path)
    folder, _ = folders["llama_gqa_untied"]
    with pytest.raises(ValueError, match="index_pattern and prefill_chunk apply to DSA"):
        models.from_pretrained(folder, index_pattern="FS", progress=False)
    with pytest.raises(ValueError, match="Llama-family checkpoint: from_pretrained reads it directly"):
        models.convert(folder, tmp_path / "out")


def test_sliding_window_is_recorded_and_longer_runs_refused(tmp_path):
    from sparse_index_jax.models.llama import LlamaConfig

    hf_model("mistral_dynamic", sliding_window=8).save_pretrained(tmp_path)
    cfg = models.from_pretrained(tmp_path, progress=False).cfg
    assert cfg.sliding_window == 8
    cfg.check_length(8)
    with pytest.raises(ValueError, match="LlamaConfig.sliding_window: .* last 8 keys"):
        cfg.check_length(9)
    qwen = {**BASE, "model_type": "qwen2", "sliding_window": 4, "use_sliding_window": False}
    assert LlamaConfig.from_hf_config(qwen).sliding_window is None  # qwen2 windows only with use_sliding_window


def test_hf_tensor_mismatch_names_the_tensor(folders, tmp_path):
    import shutil

    folder, _ = folders["llama_gqa_untied"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(models.CheckpointError, match="mlp.*_proj.weight' has shape"):
        models.from_pretrained(broken, progress=False)
    (broken / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    with pytest.raises(models.CheckpointError, match="k_proj.weight' has shape"):
        models.from_pretrained(broken, progress=False)
    tied, _ = folders["llama3_tied_bias"]  # no lm_head.weight: untied, the model misses it
    shutil.rmtree(broken)
    shutil.copytree(tied, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(models.CheckpointError, match="'lm_head.weight' is missing"):
        models.from_pretrained(broken, progress=False)


# ---- GGUF: a qwen2 file (biases, no q/k permutation) --------------------------------------------------------

def _write_qwen2_gguf(path, hf, cfg: dict) -> None:
    gguf = pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [f"<extra{i}>" for i in range(cfg["vocab_size"] - len(tokens))]  # padded to the vocabulary
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_types([1] * len(tokens))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in hf.state_dict().items():
        w = tensor.detach().numpy().astype(np.float32)
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if name in top:
            if name == "lm_head.weight" and hf.config.tie_word_embeddings:
                continue
            writer.add_tensor(top[name], w)
            continue
        parts = name.split(".")
        writer.add_tensor(f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen2_gguf_matches_transformers_and_loads_with_its_tokenizer(tmp_path):
    hf = hf_model("qwen2_yarn", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  vocab_size=300)
    cfg = {**BASE, "vocab_size": 300}
    _write_qwen2_gguf(tmp_path / "tiny-qwen2.gguf", hf, cfg)
    ids = np.random.default_rng(1).integers(0, 300, (2, 13))
    model, tokenizer = models.load(tmp_path / "tiny-qwen2.gguf", indexers="fresh", shape=SHAPE, topk=4,
                                   progress=False)
    assert model.cfg.model_type == "qwen2" and model.cfg.attention_bias and model.selector.topk == 4
    np.testing.assert_allclose(logits(model, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    enc = tokenizer.encode("ab 12")
    assert tokenizer.decode(enc.ids) == "ab 12"


# ---- the command line: --model <folder> --------------------------------------------------------------------

def test_the_commands_load_a_llama_family_folder(folders, tmp_path, capsys):
    """distill / search share ``load_model_and_data``: --model <folder> is a retrofit with --indexers and its shape
    flags (a full ``distill`` run on this folder takes ~30 s of compiling on 2 cores: the loader is what changed)."""
    from sparse_index_jax.cli import build_parser
    from sparse_index_jax.cli.arguments import load_model_and_data

    folder, want = folders["llama_gqa_untied"]
    np.save(tmp_path / "tokens.npy", np.random.default_rng(2).integers(0, BASE["vocab_size"], 600).astype(np.int32))
    common = ["--model", str(folder), "--data", str(tmp_path / "tokens.npy"), "--seq-len", "16", "--quiet"]
    args = build_parser().parse_args(["distill", *common, "--indexers", "fresh", "--indexer-heads", "2",
                                      "--indexer-head-dim", "8", "--indexer-rope-dim", "4", "--topk", "4"])
    model, data = load_model_and_data(args)
    assert "model " + str(folder) + ": llama, 2 layers" in capsys.readouterr().out
    assert model.cfg.indexer.n_heads == 2 and model.selector.topk == 4 and data.seq_len == 16
    np.testing.assert_allclose(logits(model, IDS), want, atol=1e-4, rtol=1e-4)
    args = build_parser().parse_args(["search", *common])  # search's default: SmolLM2's shipped indexers
    with pytest.raises(ValueError, match=r"hidden_size=576 \(model: 32\)"):
        load_model_and_data(args)
