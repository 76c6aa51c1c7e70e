"""IndexCache's training-free pattern search: greedy F -> S flips by calibration LM loss.

Start from the model's own pattern (all F unless the checkpoint is IndexShare); each round tries every
remaining F layer as S from that layer's cached input (layers before it are not recomputed; ~N^2/2
layer passes per batch and round) and commits the flip that raises the loss least, until the kept
fraction is reached (a pattern that already keeps few enough F layers is the result as it is, its loss
measured). The state is saved after every flip, so an interrupted search resumes; a state file that is not a
search state of this model is refused with its name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Callable, Sequence

import numpy as np
from flax import nnx

from sparse_index_jax.training.distributed import (
    batch_sharding,
    check_mesh,
    is_main_process,
    layers_context,
    put_batch,
    shard_model,
)
from sparse_index_jax.training.losses import lm_loss


@nnx.jit(static_argnames=("reuse",))
def _layer_step(layer, x, selection, reuse: bool):
    x, attn = layer(x, cache=None, selection=selection if reuse else None)
    return x, attn.selection


@nnx.jit
def _lm_loss(model, x, targets):
    return lm_loss(model.logits(x), targets)


def _dense_loss(model, inputs, targets) -> float:
    """LM loss of the model without selection (every causal key): the reference a pattern's loss is read against."""
    x = model.run_layers(model.embed(inputs), dense=True).hidden
    return float(_lm_loss(model, x, targets))


def _pattern_loss(model, pattern: str, inputs, targets) -> float:
    """LM loss of the model under ``pattern`` (F layers select, S layers reuse)."""
    return _loss_from(model, 0, pattern, model.embed(inputs), None, targets)


def _loss_from(model, j: int, pattern: str, x, selection, targets) -> float:
    """LM loss running layers j.. under ``pattern`` from layer j's input (x, selection handed in)."""
    for i in range(j, len(model.layers)):
        x, selection = _layer_step(model.layers[i], x, selection, reuse=pattern[i] == "S")
    return float(_lm_loss(model, x, targets))


@dataclasses.dataclass
class SearchState:
    pattern: str
    keep: float
    fingerprint: str
    base_loss: float | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    dense_loss: float | None = None  # the same batches without selection (absent in states saved before it)

    def report(self) -> dict:
        """The pattern, the losses, and the curve of F layers kept vs calibration loss, flip by flip."""
        kept = [self.pattern.count("F") + len(self.history)]  # each flip makes one F layer S
        kept += [h["pattern"].count("F") for h in self.history]
        losses = [self.base_loss] + [h["loss"] for h in self.history]
        return {"pattern": self.pattern, "keep": self.keep, "kept_layers": kept[-1], "base_loss": self.base_loss,
                "dense_loss": self.dense_loss, "final_loss": losses[-1], "curve": {"f_layers": kept, "loss": losses},
                "history": self.history}

    @classmethod
    def load(cls, path: pathlib.Path, model) -> "SearchState":
        """The state saved in ``path``, checked against ``model``: a file that is not a state of a search on this
        model raises ValueError naming the file and what to do."""
        fix = "delete it to start the search afresh (or use another --out)"
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): it is the resumable state of an IndexCache search; "
                             f"{fix}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or not {"pattern", "keep", "fingerprint"} <= raw.keys() or raw.keys() - names:
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path} is not the state of an IndexCache search (expected the keys "
                             f"{sorted(names)}, got {keys}); {fix}")
        state = cls(**raw)
        try:
            losses = [state.base_loss, state.dense_loss, *(h["loss"] for h in state.history)]
            if not isinstance(state.pattern, str) or not isinstance(state.keep, (int, float)):
                raise ValueError(f"pattern {state.pattern!r}, keep {state.keep!r}")
            if len(state.pattern) == len(model.layers):  # another length: refused as another search's state
                model.check_pattern(state.pattern)
            if state.history and state.history[-1]["pattern"] != state.pattern:
                raise ValueError(f"the last flip's pattern {state.history[-1]['pattern']!r} is not the state's "
                                 f"pattern {state.pattern!r}")
            if (state.history and state.base_loss is None) or any(
                    x is not None and not isinstance(x, (int, float)) for x in losses):
                raise ValueError(f"losses {losses}")
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path} holds an invalid search state ({err}); {fix}") from None
        return state

    def save(self, path: pathlib.Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        tmp.replace(path)  # atomic: an interrupted write never corrupts the resumable state


def greedy_search(model, batches: Sequence[tuple[np.ndarray, np.ndarray]], keep: float, *,
                  state_path: str | pathlib.Path | None = None, fingerprint: str = "", progress: bool = True,
                  log: Callable[[str], None] | None = None, mesh=None) -> SearchState:
    """Greedy F->S flips by calibration LM loss until ``ceil(keep * num_layers)`` F layers remain.

    Each round runs the current pattern once per batch, layer by layer, and at every F layer j branches
    off the candidate "j becomes S" from j's input, so layers before j are never recomputed for it:
    a round costs about N^2/2 layer passes per batch, and memory holds one activation per batch.
    With ``state_path`` every committed flip is saved and a rerun resumes from it.

    ``mesh`` (``layers.sharding.make_mesh``; None: the default device): the model is sharded
    over it by the logical-axis rules (tensor, expert), the batches over ``data``, and with a context axis
    the layers run context-parallel. Every process of a multi-host run runs the same search on the same
    batches (each feeding its own devices' rows) and reaches the same pattern; only process 0 logs
    (``log``: a callable taking one line, e.g. ``print``) and writes the state file.
    """
    if not is_main_process() or log is None:
        log = lambda _: None  # noqa: E731  (the library prints nothing; applications pass print)
    progress = progress and is_main_process()
    if not 0 < keep <= 1:
        raise ValueError(f"greedy_search: keep must be in (0, 1], got {keep}")
    n = len(model.layers)
    target = max(1, math.ceil(keep * n))
    path = pathlib.Path(state_path) if state_path else None
    state = SearchState(model.check_pattern(None), keep, fingerprint)
    if path is not None and path.is_file():
        saved = SearchState.load(path, model)
        if (saved.keep, saved.fingerprint, len(saved.pattern)) != (keep, fingerprint, n):
            raise ValueError(f"{path} belongs to another search (keep {saved.keep}, data {saved.fingerprint}, "
                             f"{len(saved.pattern)} layers); remove it or use another output folder")
        state = saved
        log(f"resuming from {path}: pattern {state.pattern}, {len(state.history)} flips done")
    mesh = check_mesh(len(batches[0][0]), mesh, "search")
    shard_model(model, mesh)
    sharding = batch_sharding(mesh)
    batches = [(put_batch(i, sharding), put_batch(t, sharding)) for i, t in batches]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = sum(state.pattern[1:].count("F") - k for k in range(max(0, state.pattern.count("F") - target)))
        bar = tqdm(total=total * len(batches), desc="IndexCache search", unit="pass", file=sys.stderr)
    with layers_context(mesh):  # context axis: the layers run context-parallel
        if state.dense_loss is None:
            state.dense_loss = sum(_dense_loss(model, i, t) for i, t in batches) / len(batches)
        if state.base_loss is None and state.pattern.count("F") <= target:  # nothing to flip: the pattern as is
            state.base_loss = sum(_pattern_loss(model, state.pattern, i, t) for i, t in batches) / len(batches)
            log(f"nothing to flip: pattern {state.pattern} already keeps {state.pattern.count('F')} of {n} layers F "
                f"(keep {keep} asks for {target}); its loss {state.base_loss:.4f}")
            if path is not None and is_main_process():
                state.save(path)
        while state.pattern.count("F") > target:
            start = time.perf_counter()
            pattern = state.pattern
            candidates = [j for j in range(1, n) if pattern[j] == "F"]
            losses = {j: 0.0 for j in candidates}
            base = 0.0
            for inputs, targets in batches:
                x, selection = model.embed(inputs), None
                for i in range(n):
                    if i in losses:
                        flipped = pattern[:i] + "S" + pattern[i + 1:]
                        losses[i] += _loss_from(model, i, flipped, x, selection, targets) / len(batches)
                        if bar is not None:
                            bar.update(1)
                    x, selection = _layer_step(model.layers[i], x, selection, reuse=pattern[i] == "S")
                base += float(_lm_loss(model, x, targets)) / len(batches)
            if state.base_loss is None:
                state.base_loss = base
            best = min(candidates, key=lambda j: (losses[j], j))
            state.pattern = pattern[:best] + "S" + pattern[best + 1:]
            state.history.append({"flip": best, "pattern": state.pattern, "loss": losses[best], "before": base,
                                  "candidates": {str(j): v for j, v in losses.items()},
                                  "seconds": time.perf_counter() - start})
            if bar is not None:
                bar.set_postfix(loss=f"{losses[best]:.4f}", kept=state.pattern.count("F"))
            log(f"flip layer {best:>3} -> S: loss {base:.4f} -> {losses[best]:.4f}, pattern {state.pattern}")
            if path is not None and is_main_process():
                state.save(path)
    if bar is not None:
        bar.close()
    return state
