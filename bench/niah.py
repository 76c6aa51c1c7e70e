"""Retrieval: passkey and needle-in-a-haystack prompts, scored for dense attention and every selector.

This is how the sparse-attention papers judge selection: hide a key deep in long irrelevant text, ask for
it at the end, and see whether the model still finds it when each query attends only to its top-k keys.

Prompts are built offline, token by token, so every prompt of a length has exactly that many tokens:

* ``passkey`` (Mohtashami & Jaggi, 2023; LongLoRA's evaluation): the repeated filler "The grass is green. The
  sky is blue. ..." with "The pass key is 71432. Remember it. 71432 is the pass key." at the chosen depth,
  then "What is the pass key? The pass key is" and the answer.
* ``needle`` (RULER's single needle): generated, varied filler sentences (seeded) and "One of the special
  magic numbers is 71432." as the needle.

Depth is the fraction of the filler placed before the needle (0: right after the instruction, 1: right
before the question); the needle goes at the sentence boundary nearest to it.

Scoring is exact retrieval of every answer token under teacher forcing: the model's argmax at each answer
position must be the answer's token. That equals greedy decoding producing the whole answer (each step
sees the same prefix), with one forward pass per prompt and no decode loop.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.bench.plots import pyplot, save_figure
from sparse_index_jax.bench.reports import environment, save_json
from sparse_index_jax.selection import Selector

TASKS = ("passkey", "needle")

_INSTRUCTION = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n",
    "needle": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n",
}
_NEEDLE = {"passkey": " The pass key is {key}. Remember it. {key} is the pass key.",
           "needle": " One of the special magic numbers is {key}."}
_QUESTION = {"passkey": "\nWhat is the pass key? The pass key is",
             "needle": "\nWhat is the special magic number mentioned in the text? The special magic number is"}
_PASSKEY_FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                   " There and back again.")
# The needle task's filler: sentences drawn from these parts, so no two neighbours repeat and nothing in it
# is a number.
_SUBJECTS = ("The old farmer", "A quiet student", "The river", "Our neighbour", "The small company",
             "A tired traveller", "The city council", "The young painter", "An orange cat", "The museum")
_VERBS = ("walked past", "talked about", "looked at", "thought about", "wrote a letter to", "carefully painted",
          "forgot about", "waited near", "quickly repaired", "laughed at")
_OBJECTS = ("the wooden bridge", "a long winter", "the busy market", "an empty garden", "the northern hills",
            "a broken clock", "the evening train", "a field of wheat", "the stone tower", "a quiet library")
_ENDINGS = ("", " before the rain started", " on a cold morning", " after lunch", " for a while",
            " with some friends", " without a word", " during the festival")


@dataclasses.dataclass(frozen=True)
class NiahSetup:
    lengths: tuple[int, ...] = (1024, 2048, 4096)   # tokens per prompt, answer included
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2                                   # prompts (keys, filler draws) per cell
    task: str = "passkey"
    digits: int = 5
    batch_size: int = 1                               # prompts per forward pass
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"NiahSetup.task must be one of {TASKS}, got {self.task!r}")
        for name in ("trials", "digits", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NiahSetup.{name} must be positive, got {getattr(self, name)}")
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"NiahSetup.lengths must be positive token counts, got {self.lengths}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"NiahSetup.depths must lie in [0, 1], got {self.depths}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: np.ndarray        # [length] int32: instruction, filler, needle, filler, question, answer
    answer: np.ndarray     # [digits-ish] int32: the answer's tokens (the last tokens of ``ids``)
    key: str
    depth: float           # as asked
    needle_at: int         # first token of the needle


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _filler_sentences(task: str, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` filler sentences (passkey: the five sentences in turn, from the first again at each call)."""
    if task == "passkey":
        return [_PASSKEY_FILLER[i % len(_PASSKEY_FILLER)] for i in range(count)]
    return [f" {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}."
            for _ in range(count)]


def build_prompt(tokenizer, task: str, length: int, depth: float, key: str, rng: np.random.Generator) -> Prompt:
    """One prompt of exactly ``length`` tokens with ``key`` hidden at ``depth`` of the filler.

    The pieces are encoded apart and concatenated (each piece begins with a space or a newline, where a
    byte-level BPE splits anyway). The filler is cut to fit, so its last sentence may end early.
    """
    head, needle = _encode(tokenizer, _INSTRUCTION[task]), _encode(tokenizer, _NEEDLE[task].format(key=key))
    question, answer = _encode(tokenizer, _QUESTION[task]), _encode(tokenizer, " " + key)
    room = length - len(head) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"a {task} prompt needs at least {length - room} tokens without filler; length {length} "
                         f"is too short")
    filler, starts = [], []   # token ids, and where each sentence starts
    while len(filler) < room:
        for sentence in _filler_sentences(task, rng, 64):
            starts.append(len(filler))
            filler += _encode(tokenizer, sentence)
    filler = filler[:room]
    starts = np.array([s for s in starts if s <= room] + [room])
    cut = int(starts[np.argmin(np.abs(starts - depth * room))])
    ids = head + filler[:cut] + needle + filler[cut:] + question + answer
    return Prompt(np.asarray(ids, np.int32), np.asarray(answer, np.int32), key, depth, len(head) + cut)


def build_prompts(tokenizer, setup: NiahSetup, length: int) -> list[Prompt]:
    """Every (depth, trial) prompt of one length; keys and filler draws are a function of the seed, the length,
    the depth's index and the trial."""
    prompts = []
    for d, depth in enumerate(setup.depths):
        for trial in range(setup.trials):
            rng = np.random.default_rng((setup.seed, length, d, trial))
            key = "".join(str(x) for x in [rng.integers(1, 10), *rng.integers(0, 10, setup.digits - 1)])
            prompts.append(build_prompt(tokenizer, setup.task, length, depth, key, rng))
    return prompts


@nnx.jit(static_argnames=("answer_len", "pattern", "selector", "dense"))
def answer_hits(model, inputs, answers, answer_len: int, pattern: str | None = None,
                selector: Selector | None = None, dense: bool = False):
    """[B, answer_len] whether the argmax at each answer position is the answer's token. ``inputs`` [B, T]
    are the prompts without their last token; the answer is the last ``answer_len`` tokens of the prompt.
    Only the answer positions go through the head (a [B, T, vocab] logits array at 8K would be gigabytes)."""
    hidden = model.run_layers(model.embed(inputs), index_pattern=pattern, selector=selector, dense=dense).hidden
    logits = model.logits(hidden[:, -answer_len:])
    return jnp.argmax(logits, axis=-1) == answers


def score(model, prompts: Sequence[Prompt], run: dict, batch_size: int) -> list[dict[str, Any]]:
    """Per prompt: ``found`` (every answer token right) and ``tokens`` (the share right), under one run:
    ``{"selector": Selector | None, "pattern": str | None, "dense": bool}`` as ``model_fidelity.lm_losses``,
    and ``"indexers"``: an indexers file to run with instead of the model's own (e.g. IndexCache-trained)."""
    if run.get("indexers"):
        from sparse_index_jax.models.retrofit import indexers_swapped

        with indexers_swapped(model, run["indexers"]):
            return score(model, prompts, {k: v for k, v in run.items() if k != "indexers"}, batch_size)
    out = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i:i + batch_size]
        shapes = {(len(p.ids), len(p.answer)) for p in group}
        if len(shapes) > 1:
            raise ValueError(f"prompts of one batch must share their (prompt, answer) lengths, got {sorted(shapes)}")
        answer_len = len(group[0].answer)
        inputs = jnp.asarray(np.stack([p.ids[:-1] for p in group]))
        answers = jnp.asarray(np.stack([p.answer for p in group]))
        hits = np.asarray(answer_hits(model, inputs, answers, answer_len, run.get("pattern"), run.get("selector"),
                                      run.get("dense", False)))
        out += [{"found": bool(h.all()), "tokens": float(h.mean())} for h in hits]
    return out


def run(model, tokenizer, setup: NiahSetup, runs: dict[str, dict], *, train_seq_len: int | None = None,
        model_info: dict | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
        after_length: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """The report: for every run (``{"name": {"selector": ..., "pattern": ..., "dense": ...}}``), every length
    and depth, the share of prompts whose answer is retrieved exactly; ``train_seq_len`` (the indexers'
    distillation length) marks the lengths beyond it. ``after_length(report)`` gets the report so far after each
    length (e.g. to save it: a long run stopped at 8K keeps its shorter lengths)."""
    log = log or (lambda _: None)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(runs) * len(setup.lengths), desc="needle in a haystack", unit="cell column")
    cells: dict[str, dict[str, Any]] = {name: {"found": [], "tokens": [], "seconds": 0.0} for name in runs}
    report: dict[str, Any] = {}
    for done, length in enumerate(setup.lengths, 1):
        prompts = build_prompts(tokenizer, setup, length)
        for name, spec in runs.items():
            start = time.perf_counter()
            scored = score(model, prompts, spec, setup.batch_size)
            cells[name]["seconds"] += time.perf_counter() - start
            shape = (len(setup.depths), setup.trials)
            cells[name]["found"].append(np.array([s["found"] for s in scored], float).reshape(shape).mean(1).tolist())
            cells[name]["tokens"].append(np.array([s["tokens"] for s in scored]).reshape(shape).mean(1).tolist())
            if bar is not None:
                bar.update(1)
        log(f"length {length}: " + ", ".join(f"{n} {np.mean(c['found'][-1]):.2f}" for n, c in cells.items()))
        report = _report(cells, runs, dataclasses.replace(setup, lengths=setup.lengths[:done]), train_seq_len,
                         model_info)
        if after_length is not None:
            after_length(report)
    if bar is not None:
        bar.close()
    return report


def _report(cells: dict, runs: dict[str, dict], setup: NiahSetup, train_seq_len: int | None,
            model_info: dict | None) -> dict[str, Any]:
    """The report of the lengths measured so far (``setup.lengths``)."""
    dense = np.asarray(cells["dense"]["found"]) if "dense" in cells else None
    methods = {}
    for name, c in cells.items():
        found = np.asarray(c["found"])   # [lengths, depths]
        row = {"found": c["found"], "answer_tokens": c["tokens"], "mean": float(found.mean()),
               "seconds": c["seconds"], **_run_fields(runs[name])}
        if dense is not None:
            # The papers' bar: retrieved wherever dense retrieves (a cell where dense fails says nothing).
            green = dense == 1
            row["where_dense_found"] = float(found[green].mean()) if green.any() else None
            row["cells_lost_vs_dense"] = int(np.sum(green & (found < 1)))
        methods[name] = row
    return {
        "benchmark": f"retrieval ({setup.task}): exact answer under teacher forcing, per length and depth",
        "model": model_info or {},
        "setup": dataclasses.asdict(setup),
        "train_seq_len": train_seq_len,
        "environment": environment(),
        "methods": methods,
    }


def _run_fields(run: dict) -> dict:
    out = {}
    if run.get("selector") is not None:
        out["selector"] = run["selector"].as_dict()
    if run.get("pattern") is not None:
        out["pattern"] = run["pattern"]
    if run.get("indexers"):
        out["indexers"] = str(run["indexers"])
    return out


def format_table(report: dict[str, Any]) -> str:
    """One row per method: retrieval per length (mean over depths), overall, and against dense."""
    lengths, train = report["setup"]["lengths"], report.get("train_seq_len")
    heads = [f"{n:,}" + (" (beyond training)" if train and n > train else "") for n in lengths]
    lines = ["| method | " + " | ".join(heads) + " | all | where dense retrieves | cells lost |",
             "|---|" + "---|" * (len(lengths) + 3)]
    for name, row in report["methods"].items():
        per_length = [f"{np.mean(f):.2f}" for f in row["found"]]
        vs = row.get("where_dense_found")
        lines.append(f"| {name} | " + " | ".join(per_length) + f" | {row['mean']:.2f} | "
                     f"{'-' if vs is None else f'{vs:.2f}'} | {row.get('cells_lost_vs_dense', '-')} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path | None:
    """One depth x length heatmap per method, green = retrieved (the papers' picture); lengths beyond the
    indexers' training length sit right of a dashed line."""
    plt = pyplot()
    if plt is None:
        return None
    setup, methods = report["setup"], report["methods"]
    lengths, depths, train = setup["lengths"], setup["depths"], report.get("train_seq_len")
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    width, height = max(3.0, 1.6 + 0.55 * len(lengths)), max(2.4, 1.3 + 0.3 * len(depths))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), dpi=110, squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    beyond = [i for i, n in enumerate(lengths) if train and n > train]
    for k, (ax, (name, row)) in enumerate(zip(axes.flat, methods.items())):
        grid = np.asarray(row["found"]).T   # [depths, lengths]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.0f}" if v in (0, 1) else f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths],
                      fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        if beyond:
            ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1.2)
        ax.set_title(f"{name}\nretrieved {row['mean']:.0%}", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        if k >= len(methods) - cols:
            ax.set_xlabel("prompt length (tokens)", fontsize=8)
    note = f"\ndashed line: longer than the indexers' training length ({train:,} tokens)" if beyond else ""
    fig.suptitle(f"{report['model'].get('name', 'model')}: {setup['task']} retrieval (green: the exact answer), "
                 f"{setup['trials']} prompt(s) per cell{note}", fontsize=9)
    return save_figure(fig, path)


def save(report: dict[str, Any], path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    out = save_json(report, path)
    return out, plot(report, out.with_suffix(".png"))
