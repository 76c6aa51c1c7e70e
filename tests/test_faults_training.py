"""Faults of the training commands (issue 21): each gives a clear error naming the file and the fix, or a correct
result. Distillation resumed on other data, a diverging run, a damaged newest checkpoint, a corrupt
``metrics.jsonl`` or ``search_state.json``, a search with nothing to flip.

The distillation runs use a tiny Llama-family model built from a config and one ``DistillConfig``, so
``train_step`` compiles twice for the whole file (fresh and restored arrays); the command-line cases stand the
same model in for the loaded one (no checkpoint on disk, no torch)."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_index_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sparse_index_jax.training.data import PackedDataset
from sparse_index_jax.training.distill import (
    DistillConfig,
    DivergenceError,
    _record_line,
    check_resumable,
    distill,
    read_metrics,
)

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, eos_token_id=(5,), tie_word_embeddings=False)
SEQ = 16
CFG = DistillConfig(warmup_steps=3, sparse_steps=0, batch_size=2, warmup_lr=3e-3, save_every=100, remat=False,
                    kl_query_chunk=8, kl_key_chunk=8)


def tiny_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(**TINY).with_indexer(n_heads=3, head_dim=8, rope_dim=4, topk=6)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))


def dataset(seed: int = 0, seq_len: int = SEQ) -> PackedDataset:
    return PackedDataset(np.random.default_rng(seed).integers(0, 97, 4000).astype(np.int32), seq_len, seed=0)


def params(model) -> list[np.ndarray]:
    return [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def assert_same(a, b):
    for x, y in zip(params(a), params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def checkpoint_steps(out: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def poisoned(data: PackedDataset, step: int) -> LlamaForCausalLM:
    """The tiny model with the embedding of one token NaN: a token of training batch ``step`` (0-based) that no
    earlier batch holds, so the first ``step`` steps are finite and step ``step + 1`` is not."""
    seen = {int(t) for s in range(step) for t in data.train_batch(s, CFG.batch_size)[0].ravel()}
    token = next(int(t) for t in np.unique(data.train_batch(step, CFG.batch_size)[0]) if t not in seen)
    model = tiny_model()
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...].at[token].set(jnp.nan)
    return model


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run interrupted after 1 and after 2 steps: checkpoints 1 and 2; and the state after 3 steps straight."""
    out = tmp_path_factory.mktemp("runs") / "two"
    for _ in range(2):
        distill(tiny_model(), dataset(), CFG, out, progress=False, stop_after=1)
    straight = tiny_model()
    distill(straight, dataset(), CFG, out.parent / "straight", progress=False)
    return out, straight


# ---- metrics.jsonl: strict JSON, non-finite values as strings ---------------------------------------------------

finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["loss", "indexer_kl", "lm_loss", "grad_norm", "seconds"]),
                                finite_or_not), min_size=1, max_size=5))
def test_metrics_lines_are_strict_json_and_read_back(tmp_path_factory, rows):
    rows = [{"step": i + 1, "stage": "dense", **r} for i, r in enumerate(rows)]
    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    path.write_text("".join(_record_line(r) for r in rows))
    for line in path.read_text().splitlines():  # no bare NaN / Infinity tokens
        json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token} in {line}"))
    back = read_metrics(path)
    assert len(back) == len(rows)
    for got, want in zip(back, rows):
        assert got.keys() == want.keys()
        for key, value in want.items():
            same = (isinstance(value, float) and math.isnan(value) and math.isnan(got[key])) or got[key] == value
            assert same, (key, value, got[key])


@pytest.mark.parametrize("bad", ['{"step": 2, "loss": NaN', "garbage", '[1, 2]', '{"loss": 1.0}'])
def test_a_corrupt_metrics_line_is_named(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_record_line({"step": 1, "loss": 1.0}) + bad + "\n" + _record_line({"step": 3, "loss": 1.0}))
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a metrics record .*delete that line"):
        read_metrics(path)
    path.write_text(_record_line({"step": 1, "loss": 1.0}) + bad)  # the last line, unfinished (a killed write)
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    assert [r["step"] for r in read_metrics(path, partial_last_line=True)] == [1]


# ---- divergence --------------------------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(tmp_path):
    data = dataset()
    model = poisoned(data, step=2)  # steps 1 and 2 are finite, step 3 is not
    lines = []
    with pytest.raises(DivergenceError, match=r"diverged at step 3 \(dense stage\): loss nan .*not applied") as err:
        distill(model, data, CFG, tmp_path / "run", progress=False, log=lines.append)
    assert err.value.step == 3 and err.value.checkpoint == 2 and math.isnan(err.value.metrics["loss"])
    assert "step 2" in str(err.value) and "lower learning rate" in str(err.value)
    assert checkpoint_steps(tmp_path / "run") == [2]  # the state before the bad step, never the bad one
    reference = poisoned(data, step=2)
    distill(reference, data, CFG, tmp_path / "ref", progress=False, stop_after=2)
    assert_same(model, reference)  # the bad step changed nothing
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isnan(rows[-1]["loss"])
    assert '"loss": "nan"' in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]

    # run again on the same folder: resumes from the good state, meets the same step, stops the same way
    with pytest.raises(DivergenceError, match="at step 3"):
        distill(poisoned(data, step=2), data, CFG, tmp_path / "run", progress=False, log=lines.append)
    assert "resumed from step 2" in lines[-1]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_diverging_at_its_first_step_saves_nothing(tmp_path):
    data = dataset()
    model = poisoned(data, step=0)
    with pytest.raises(DivergenceError, match="at step 1 .*no checkpoint was saved") as err:
        distill(model, data, CFG, tmp_path, progress=False)
    assert err.value.checkpoint is None and checkpoint_steps(tmp_path) == []
    assert_same(model, poisoned(data, step=0))


# ---- resuming on other data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("other", [dict(seed=1), dict(seq_len=SEQ + 8)], ids=["other-data", "other-seq-len"])
def test_resuming_on_other_data_is_refused(two_steps, tmp_path, other):
    out = tmp_path / "run"
    shutil.copytree(two_steps[0], out)
    run_json = (out / "run.json").read_text()
    saved, new = dataset().fingerprint(), dataset(**other).fingerprint()
    with pytest.raises(ValueError, match=rf"fingerprint {saved}.* gives {new}.*another --out \(or delete {out}\)"):
        distill(tiny_model(), dataset(**other), CFG, out, progress=False)
    assert (out / "run.json").read_text() == run_json and checkpoint_steps(out) == [1, 2]
    check_resumable(out, dataset())  # the same data goes on
    check_resumable(tmp_path / "fresh", dataset(**other))  # a new folder starts


def test_a_corrupt_run_json_is_named(two_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_steps[0], out)
    (out / "run.json").write_text('{"config": ')
    with pytest.raises(ValueError, match=rf"{out / 'run.json'} is not valid JSON"):
        check_resumable(out, dataset())


# ---- a damaged newest checkpoint --------------------------------------------------------------------------------

def _truncate_arrays(step_folder: pathlib.Path):
    for f in step_folder.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _garble_metadata(step_folder: pathlib.Path):
    (step_folder / "default" / "_METADATA").write_text("{ not json")


def _drop_manifest(step_folder: pathlib.Path):
    for f in step_folder.rglob("manifest.ocdbt"):
        f.unlink()


@pytest.mark.parametrize("damage", [_truncate_arrays, _garble_metadata, _drop_manifest])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(two_steps, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(two_steps[0], out)
    damage(out / "checkpoints" / "2")
    lines, model = [], tiny_model()
    distill(model, dataset(), CFG, out, progress=False, log=lines.append)  # steps 2 and 3 again, from step 1
    warning = next(line for line in lines if line.startswith("warning"))
    assert "checkpoint step 2" in warning and "damaged" in warning and "resumed from step 1" in warning
    assert (out / "damaged-checkpoints" / "2").is_dir()  # set aside, not deleted
    assert checkpoint_steps(out) == [1, 3]
    assert_same(model, two_steps[1])  # bit for bit the uninterrupted run
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_no_intact_checkpoint_names_the_folders_to_delete(two_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_steps[0], out)
    for step in ("1", "2"):
        _truncate_arrays(out / "checkpoints" / step)
    with pytest.raises(ValueError, match=rf"no checkpoint in .* restores .*delete {out / 'checkpoints' / '2'}, "
                                         rf"{out / 'checkpoints' / '1'}"):
        distill(tiny_model(), dataset(), CFG, out, progress=False)
    assert checkpoint_steps(out) == [1, 2]  # nothing moved when nothing restores (it may be another model's)


# ---- the IndexCache search's state file and a search with nothing to flip -------------------------------------

@pytest.fixture(scope="module")
def search_model():
    return tiny_model()


def _batches():
    rng = np.random.default_rng(3)
    return [(rng.integers(0, 97, (2, SEQ)), rng.integers(0, 97, (2, SEQ)))]


@pytest.mark.parametrize("keep", [1.0, 0.75])
def test_a_search_with_nothing_to_flip_reports_the_pattern_as_it_is(search_model, tmp_path, keep):
    from sparse_index_jax.training.index_cache_search import greedy_search

    lines = []
    state = greedy_search(search_model, _batches(), keep, state_path=tmp_path / "s.json", progress=False,
                          log=lines.append)
    report = state.report()
    assert state.pattern == "FF" and state.history == [] and "nothing to flip" in lines[0]
    assert report["base_loss"] == report["final_loss"] and math.isfinite(report["base_loss"])
    assert math.isfinite(report["dense_loss"])
    again = greedy_search(search_model, _batches(), keep, state_path=tmp_path / "s.json", progress=False)
    assert again.base_loss == state.base_loss


@pytest.mark.parametrize("content, message", [
    ("{ truncated", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not valid JSON"),
    ("[1, 2]", "is not the state of an IndexCache search"),
    ('{"pattern": "FF", "keep": 0.5}', "is not the state of an IndexCache search"),
    ('{"pattern": "FX", "keep": 0.5, "fingerprint": ""}', "invalid search state"),
    ('{"pattern": "SF", "keep": 0.5, "fingerprint": ""}', "invalid search state"),
    ('{"pattern": "FS", "keep": 0.5, "fingerprint": "", "history": [{"pattern": "FF", "loss": 1.0}], '
     '"base_loss": 1.0}', "invalid search state"),
    ('{"pattern": "FS", "keep": 0.5, "fingerprint": "", "history": [{"pattern": "FS", "loss": "x"}], '
     '"base_loss": 1.0}', "invalid search state"),
    ('{"pattern": "FS", "keep": 0.5, "fingerprint": "", "history": [{"pattern": "FS", "loss": 1.0}]}',
     "invalid search state"),
])
def test_a_corrupt_search_state_is_named(search_model, tmp_path, content, message):
    from sparse_index_jax.training.index_cache_search import greedy_search

    path = tmp_path / "search_state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"{path} .*{message}.*delete it to start the search afresh"):
        greedy_search(search_model, _batches(), 0.5, state_path=path, progress=False)


# ---- the commands: one line and exit code 2 (an input error) or 1 (a divergence) --------------------------------

def _exit(argv, capsys) -> tuple[int, str]:
    from sparse_index_jax.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def _stub_loading(monkeypatch, command: str, model):
    """The command's model and data: the tiny model and ``dataset()`` (no checkpoint on disk, no torch)."""
    import importlib

    module = importlib.import_module(f"sparse_index_jax.cli.{command}")
    monkeypatch.setattr(module, "load_model_and_data", lambda args, mesh=None: (model, dataset()))


ARGS = ["--model", "smollm2", "--seq-len", str(SEQ), "--batch-size", "2", "--quiet"]


def test_distill_command_refuses_another_data_in_a_runs_folder(tmp_path, monkeypatch, capsys):
    _stub_loading(monkeypatch, "distill", tiny_model())
    out = tmp_path / "d"
    (out / "checkpoints" / "5").mkdir(parents=True)  # what check_resumable reads: run.json and a step folder
    (out / "run.json").write_text(json.dumps({"data": "0123456789abcdef"}))
    code, err = _exit(["distill", *ARGS, "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "fingerprint 0123456789abcdef" in err and dataset().fingerprint() in err and "another --out" in err


def test_distill_command_exits_1_on_divergence(tmp_path, monkeypatch, capsys):
    """A divergence is a runtime fault, not an input error: exit code 1, one line naming the step and the loss."""
    from sparse_index_jax.training import distill as library

    _stub_loading(monkeypatch, "distill", tiny_model())

    def diverging(model, data, cfg, out, **kw):
        raise DivergenceError("training diverged at step 7 (dense stage): loss nan (...)", 7, {}, 5)

    monkeypatch.setattr(library, "evaluate", lambda *args, **kw: {})
    monkeypatch.setattr(library, "distill", diverging)
    code, err = _exit(["distill", *ARGS, "--out", str(tmp_path / "d")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "training diverged at step 7" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "eval.json").exists()


def test_search_command_with_nothing_to_flip_and_with_a_corrupt_state(search_model, tmp_path, monkeypatch, capsys):
    from sparse_index_jax.cli import main

    _stub_loading(monkeypatch, "search", search_model)
    out, argv = tmp_path / "s", ["search", *ARGS, "--keep", "1.0", "--calib-batches", "1", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "search.json").read_text())
    assert "nothing to flip" in printed and report["pattern"] == "FF" and report["history"] == []
    assert report["base_loss"] == report["final_loss"] is not None and (out / "search.png").stat().st_size > 0

    (out / "search_state.json").write_text('{"pattern": "FF", "keep": 1.0, "fingerprint": ')
    code, err = _exit(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "search_state.json is not valid JSON" in err
