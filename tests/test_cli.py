"""The ``sparse-index`` command line."""

from __future__ import annotations

import pathlib
import types

import pytest

from sparse_index_jax.bench import BENCHMARKS
from sparse_index_jax.cli import main


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: sparse-index" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--fp8", "--family", "glm5"]])
def test_demo_runs_and_decode_matches_prefill(capsys, extra):
    assert main(["demo", "--random-layer", "--seq-len", "96", "--topk", "16", "--batch", "1", "--decode-steps", "4",
                 "--repeats", "1", *extra]) == 0
    out = capsys.readouterr().out
    assert "prefill:" in out and "selection: indices (1, 96, 16)" in out and "decode: 4 steps" in out
    diff = float(out.split("max |decode - prefill| = ")[1].split()[0])
    assert diff < 1e-4


def test_demo_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as done:
        main(["demo", "--topk", "0"])
    assert done.value.code == 2
    assert "--topk must be positive" in capsys.readouterr().err


def test_selector_flags_come_from_the_registry(capsys):
    with pytest.raises(SystemExit) as done:
        main(["demo", "--random-layer", "--method", "hisa", "--topk", "16", "--block-size", "8", "--num-blocks", "2"])
    assert done.value.code == 2
    assert "--num-blocks: (num_blocks - 1) * block_size = 8 < topk=16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--block-size", "--num-blocks", "--active-heads", "--candidates", "hisa 128"):
        assert flag in text, flag


def test_demo_runs_another_method(capsys):
    assert main(["demo", "--random-layer", "--seq-len", "48", "--topk", "8", "--batch", "1", "--decode-steps", "2",
                 "--repeats", "1", "--method", "hisa", "--block-size", "4", "--num-blocks", "4"]) == 0
    out = capsys.readouterr().out
    assert "'method': 'hisa'" in out and "decode: 2 steps" in out
    diff = float(out.split("max |decode - prefill| = ")[1].split()[0])
    assert diff < 1e-4


def test_version_is_the_package_version(capsys):
    import sparse_index_jax

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"sparse-index {sparse_index_jax.__version__}\n"


# ---- --out: a fresh folder per run under the current directory, named by command and time -----------------

def test_default_out_is_a_fresh_folder_under_the_current_directory(tmp_path, monkeypatch):
    import datetime

    from sparse_index_jax.cli.arguments import default_out

    monkeypatch.chdir(tmp_path)
    now = datetime.datetime(2026, 11, 30, 8, 15, 0)
    first, second = default_out("bench speed", now), default_out("bench speed", now)
    assert first.name == "bench-speed-20261130-081500" and second.name == "bench-speed-20261130-081500-2"
    assert first.parent == second.parent == pathlib.Path("sparse-index-runs")  # relative: under the current directory
    assert (tmp_path / first).is_dir() and (tmp_path / second).is_dir()
    distill = default_out("distill")  # the time now
    assert distill.name.startswith("distill-20") and (tmp_path / distill).is_dir()


def test_report_path_takes_a_json_path_or_a_folder(tmp_path, monkeypatch):
    from sparse_index_jax.cli.arguments import report_path

    monkeypatch.chdir(tmp_path)
    assert report_path("x/r.json", "bench walk", "walk.json") == pathlib.Path("x/r.json")
    assert report_path("x/runs", "bench walk", "walk.json") == pathlib.Path("x/runs/walk.json")
    fresh = report_path(None, "bench walk", "walk.json")
    assert fresh.name == "walk.json" and fresh.parent.is_dir() and fresh.parent.name.startswith("bench-walk-")
    assert fresh.parent.parent.resolve() == tmp_path / "sparse-index-runs"


def test_bench_writes_to_a_fresh_folder_or_the_out_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["bench", "roofline", "--lengths", "4K", "--chips", "v5p"]) == 0
    reports = sorted((tmp_path / "sparse-index-runs").glob("bench-roofline-*/roofline_tpu.json"))
    assert len(reports) == 2, reports
    assert main(["bench", "roofline", "--lengths", "4K", "--chips", "v5p", "--out", "mine"]) == 0
    assert main(["bench", "roofline", "--lengths", "4K", "--chips", "v5p", "--out", "r/named.json"]) == 0
    assert (tmp_path / "mine" / "roofline_tpu.json").is_file() and (tmp_path / "r" / "named.json").is_file()


@pytest.mark.parametrize("command", [["distill"], ["search"], *(["bench", name] for name in BENCHMARKS)])
def test_every_command_that_writes_documents_its_out(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the folder name
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert f"./sparse-index-runs/{'-'.join(command)}-YYYYMMDD-HHMMSS/" in text, text
    if command[0] in ("distill", "search"):
        assert "resume" in text and "same --out" in text


def _stop_after_loading(monkeypatch, topk):
    """search.run with a stand-in for the model and data: stops (an input error) where the search would begin."""
    from sparse_index_jax.cli import search

    class Data:
        def heldout_batches(self, *args):
            raise ValueError("stand-in data: stop here")

    model = types.SimpleNamespace(selector=types.SimpleNamespace(topk=topk))
    monkeypatch.setattr(search, "load_model_and_data", lambda args, mesh=None: (model, Data()))


@pytest.mark.parametrize("seq_len, topk, warned", [(128, 256, True), (256, 256, True), (512, 256, False)])
def test_search_warns_in_the_dense_regime(seq_len, topk, warned, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _stop_after_loading(monkeypatch, topk)
    with pytest.raises(SystemExit) as done:
        main(["search", "--model", "smollm2", "--seq-len", str(seq_len), "--quiet"])
    assert done.value.code == 2
    printed = capsys.readouterr()
    assert "stop here" in printed.err
    assert ("dense regime" in printed.err) == warned, printed.err
    if warned:
        assert f"--seq-len {seq_len} <= the selector's topk {topk}" in printed.err and "lower --topk" in printed.err
    (folder,) = (tmp_path / "sparse-index-runs").iterdir()
    assert folder.name.startswith("search-")
    relative = pathlib.Path("sparse-index-runs") / folder.name
    assert f"search: writing to {relative}; resume with --out {relative}" in printed.out


def test_search_resumes_only_an_out_given_and_distributed_runs_need_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _stop_after_loading(monkeypatch, 64)
    with pytest.raises(SystemExit):
        main(["search", "--model", "smollm2", "--seq-len", "512", "--out", "earlier"])
    assert "search: writing to earlier; resume with --out earlier" in capsys.readouterr().out
    assert (tmp_path / "earlier").is_dir() and not (tmp_path / "sparse-index-runs").exists()
    with pytest.raises(SystemExit) as done:
        main(["search", "--model", "smollm2", "--distributed"])
    assert done.value.code == 2 and "--distributed needs --out" in capsys.readouterr().err


def test_a_resumable_out_that_is_a_file_is_refused(tmp_path):
    import argparse

    from sparse_index_jax.cli.arguments import resumable_out

    file = tmp_path / "out.txt"
    file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file; give a folder"):
        resumable_out(argparse.Namespace(out=str(file)), "distill")
