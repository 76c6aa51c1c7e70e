"""IndexCache: F layers run their indexer, S layers reuse the Selection of the nearest preceding F layer.

``IndexCacheConfig`` describes the pattern (a string of "F"/"S", one letter per layer; layer 0 is
always F). Models take it as ``index_pattern`` at call time or bake it in at load time (S layers then
carry no indexer weights). ``greedy_search`` finds a pattern training-free: start all-F, flip to S the
F layer whose flip raises the calibration LM loss least, repeat until the kept fraction is reached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from sparse_index_jax.distributed import is_main_process, layers_context, put_batch
from sparse_index_jax.train.losses import lm_loss


@dataclasses.dataclass(frozen=True)
class IndexCacheConfig:
    pattern: str

    def __post_init__(self):
        if not self.pattern or set(self.pattern) - {"F", "S"}:
            raise ValueError(f"IndexCacheConfig.pattern: letters 'F' (own indexer) and 'S' (shared) only, "
                             f"got {self.pattern!r}")
        if self.pattern[0] != "F":
            raise ValueError(f"IndexCacheConfig.pattern: layer 0 must be F, got {self.pattern!r}")

    @classmethod
    def uniform(cls, num_layers: int, every: int, offset: int = 0) -> "IndexCacheConfig":
        """F at layer 0 and at every ``every``-th layer from ``offset``; S elsewhere."""
        if num_layers <= 0 or every <= 0 or offset < 0:
            raise ValueError(f"IndexCacheConfig.uniform: need num_layers > 0, every > 0, offset >= 0; got "
                             f"{num_layers}, {every}, {offset}")
        return cls("".join("F" if i == 0 or (i >= offset and (i - offset) % every == 0) else "S"
                           for i in range(num_layers)))

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "IndexCacheConfig":
        """From ``indexer_types`` / ``index_topk_pattern`` / ``index_topk_freq`` (+ offset) keys."""
        from models.config import ModelConfig

        return cls(ModelConfig.from_hf_config(cfg).index_pattern)

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def keep_ratio(self) -> float:
        return self.pattern.count("F") / len(self.pattern)

    def groups(self) -> list[tuple[int, list[int]]]:
        """(F layer, the layers it serves: itself and the S layers up to the next F)."""
        out: list[tuple[int, list[int]]] = []
        for i, letter in enumerate(self.pattern):
            if letter == "F":
                out.append((i, [i]))
            else:
                out[-1][1].append(i)
        return out


def check_pattern(pattern: str, num_layers: int, available: str | None = None) -> str:
    """Validates an F/S pattern for a model of ``num_layers`` layers; ``available`` is the pattern of the
    weights at hand (a layer it marks S has no indexer weights, so it cannot be F)."""
    IndexCacheConfig(pattern)
    if len(pattern) != num_layers:
        raise ValueError(f"index pattern {pattern!r} has {len(pattern)} letters for {num_layers} layers")
    if available is not None:
        missing = [i for i, (p, a) in enumerate(zip(pattern, available)) if p == "F" and a == "S"]
        if missing:
            raise ValueError(f"index pattern {pattern!r}: layers {missing} have no indexer weights in this model "
                             f"(its own pattern is {available!r}), so they can only be S")
    return pattern


# ---- training-free greedy search ------------------------------------------------------------------

@nnx.jit(static_argnames=("reuse",))
def _layer_step(layer, x, selection, reuse: bool):
    x, attn = layer(x, cache=None, selection=selection if reuse else None)
    return x, attn.selection


@nnx.jit
def _lm_loss(model, x, targets):
    return lm_loss(model.logits(x), targets)


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

    def save(self, path: pathlib.Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        tmp.replace(path)  # atomic: an interrupted write never corrupts the resumable state


def greedy_search(model, batches: Sequence[tuple[np.ndarray, np.ndarray]], keep: float, *,
                  state_path: str | pathlib.Path | None = None, fingerprint: str = "", progress: bool = True,
                  log: Callable[[str], None] = print, sharding=None) -> SearchState:
    """Greedy F->S flips by calibration LM loss until ``ceil(keep * num_layers)`` F layers remain.

    Each round runs the current pattern once per batch, layer by layer, and at every F layer j branches
    off the candidate "j becomes S" from j's input, so layers before j are never recomputed for it:
    a round costs about N^2/2 layer passes per batch, and memory holds one activation per batch.
    With ``state_path`` every committed flip is saved and a rerun resumes from it.

    Several devices or hosts: pass the batch ``sharding`` of ``distributed.data_parallel`` (which also
    replicates the model; with a context axis the layers run context-parallel). Every process runs the same search on the same batches (each feeding its own
    devices' rows) and reaches the same pattern; only process 0 logs and writes the state file.
    """
    if not is_main_process():
        progress, log = False, (lambda _: None)
    if not 0 < keep <= 1:
        raise ValueError(f"greedy_search: keep must be in (0, 1], got {keep}")
    n = len(model.layers)
    target = max(1, math.ceil(keep * n))
    path = pathlib.Path(state_path) if state_path else None
    state = SearchState(model.check_pattern(None), keep, fingerprint)
    if path is not None and path.is_file():
        saved = SearchState(**json.loads(path.read_text()))
        if (saved.keep, saved.fingerprint, len(saved.pattern)) != (keep, fingerprint, n):
            raise ValueError(f"{path} belongs to another search (keep {saved.keep}, data {saved.fingerprint}, "
                             f"{len(saved.pattern)} layers); remove it or use another output folder")
        state = saved
        log(f"resuming from {path}: pattern {state.pattern}, {len(state.history)} flips done")
    batches = [(put_batch(i, sharding), put_batch(t, sharding)) for i, t in batches]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = sum(state.pattern[1:].count("F") - k for k in range(max(0, state.pattern.count("F") - target)))
        bar = tqdm(total=total * len(batches), desc="IndexCache search", unit="pass", file=sys.stderr)
    with layers_context(sharding):  # context axis: the layers run context-parallel
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
