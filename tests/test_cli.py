"""The ``sparse-index`` command line."""

from __future__ import annotations

import pytest

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
