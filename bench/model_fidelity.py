"""Selection fidelity on a real model: SmolLM2-135M with DSA retrofitted, on held-out CPython sources.

Per layer, from the dense model's own attention (probabilities averaged over the query heads, queries in
the second half of each sequence):

* ``ceiling``: the attention mass of the best single key set of size k shared by all heads (the top-k of
  the head-averaged attention); no selector shared by the heads can cover more.
* ``dsa_mass``: the mass DSA's top-k (the distilled indexer) covers, and ``dsa_of_ceiling`` = its ratio.
* ``<method>_mass``, ``<method>_iou``, ``<method>_recall`` for HISA, MISA, MISA-H against DSA's selection
  from the same indexer activations.
* ``sink``: the mass on token 0.

Then the held-out LM loss: dense, DSA, each selector, and IndexCache patterns (uniform and greedy-searched)
at 1/2 and 1/4 of the layers keeping their indexer.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.bench.plots import pyplot, save_figure
from sparse_index_jax.bench.reports import environment, save_json
from sparse_index_jax.layers.index_cache import IndexCacheConfig
from sparse_index_jax.selection import Selector, metrics
from sparse_index_jax.training.index_cache_search import greedy_search
from sparse_index_jax.training.losses import lm_loss

SELECTORS = ("hisa", "misa", "misa_h")


@dataclasses.dataclass(frozen=True)
class ModelFidelitySetup:
    seq_len: int = 4096
    sequences: int = 2           # held-out sequences of seq_len tokens
    topk: int = 256
    hisa_block: int = 64
    hisa_blocks: int = 16        # 16 x 64 = 4 * topk candidate tokens (the HISA paper's ratio)
    misa_block: int = 64
    misa_heads: int = 2          # a third of the 6 indexer heads
    keeps: tuple[float, ...] = (0.5, 0.25)
    search_seq_len: int = 1024   # greedy-search calibration: train-split sequences
    search_batches: int = 4
    search_batch_size: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "sequences", "topk", "hisa_block", "hisa_blocks", "misa_block", "misa_heads",
                     "search_seq_len", "search_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelFidelitySetup.{name} must be positive, got {getattr(self, name)}")
        if any(not 0 < k < 1 for k in self.keeps):
            raise ValueError(f"ModelFidelitySetup.keeps must lie in (0, 1), got {self.keeps}")

    def selector(self, method: str) -> Selector:
        """The selector of one method at this setup (MISA-H keeps its default candidates, 4 * topk)."""
        options = {"dsa": {}, "hisa": {"block_size": self.hisa_block, "num_blocks": self.hisa_blocks},
                   "misa": {"block_size": self.misa_block, "active_heads": self.misa_heads},
                   "misa_h": {"block_size": self.misa_block, "active_heads": self.misa_heads}}[method]
        return Selector.create(method, self.topk, **options)


@nnx.jit
def _dense_layer(layer, x):
    return layer(x, dense=True, capture=True)


def dense_layer_outputs(model, tokens):
    """Runs the dense model on ``tokens`` [B, T] one layer at a time (one layer's attention probabilities in
    memory at once) and yields each layer's ``DSAOutput``: ``probs`` [B, T, T] averaged over heads, and the
    indexer's activations."""
    x = model.embed(jnp.asarray(tokens))
    for layer in model.layers:
        x, attn = _dense_layer(layer, x)
        yield attn


def heldout_indexer_activations(seq_len: int, indexers: str = "shipped", *, layer_stride: int = 1,
                                progress: bool = True):
    """Yields (layer, the layer's indexer activations) of SmolLM2-135M + ``indexers`` run densely over the first
    ``seq_len`` held-out tokens, for every ``layer_stride``-th layer: the real activations the CPU models of the
    kernels (``survivors``, ``walk_sharing``) replay."""
    from sparse_index_jax.models.retrofit import smollm2
    from sparse_index_jax.training.data import python_stdlib_files, read_tokens

    model, tokenizer = smollm2(indexers, progress=progress)
    eos = model.cfg.eos_token_id[0] if model.cfg.eos_token_id else None
    held = read_tokens(python_stdlib_files("heldout"), tokenizer=tokenizer, eos_id=eos)
    if len(held) < seq_len:
        raise ValueError(f"the held-out files hold {len(held):,} tokens, fewer than seq_len={seq_len}")
    for i, attn in enumerate(dense_layer_outputs(model, np.asarray(held[:seq_len])[None])):
        if i % layer_stride == 0:
            yield i, attn.indexer


def shared_topk_mass(probs: jax.Array, topk: int) -> jax.Array:
    """[B, T] the ceiling: attention mass of the best ``topk`` keys all heads share (probs [B, T, S])."""
    return jnp.sum(jax.lax.top_k(probs, min(topk, probs.shape[-1]))[0], axis=-1)


def row_mean(values: jax.Array, rows: jax.Array) -> float:
    """Mean of ``values`` [B, T] over the query rows where ``rows`` is True."""
    return float(jnp.sum(jnp.where(rows, values, 0.0)) / jnp.sum(rows))


@nnx.jit(static_argnames=("pattern", "selector", "dense"))
def lm_loss_of(model, inputs, targets, pattern: str | None = None, selector: Selector | None = None,
               dense: bool = False):
    """Mean LM loss of one batch: dense attention, or selection (``selector``, default the model's) under an
    IndexCache ``pattern``."""
    return lm_loss(model(inputs, index_pattern=pattern, selector=selector, dense=dense).logits, targets)


def _layer_metrics(probs, act, positions, rows, setup: ModelFidelitySetup) -> dict[str, float]:
    """One layer, one sequence: the masses and agreements above, averaged over ``rows`` [1, T]."""
    mean = lambda x: row_mean(x, rows)
    out = {"ceiling": mean(shared_topk_mass(probs, setup.topk)), "sink": mean(probs[..., 0])}
    ref = None
    for method in ("dsa", *SELECTORS):
        sel = setup.selector(method).select(act.q, act.k, act.w, q_positions=positions, k_scale=act.k_scale)
        out[f"{method}_mass"] = mean(metrics.attention_mass_recall(sel, probs))
        if method == "dsa":
            ref = sel
        else:
            out[f"{method}_iou"] = mean(metrics.iou(sel, ref))
            out[f"{method}_recall"] = mean(metrics.recall(sel, ref))
    out["dsa_of_ceiling"] = out["dsa_mass"] / out["ceiling"]
    return out


def selection_metrics(model, sequences: np.ndarray, setup: ModelFidelitySetup,
                      progress: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Per layer, averaged over the sequences [N, T]: the metrics of the module docstring."""
    T = sequences.shape[1]
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    rows = positions >= T // 2
    per_layer: list[list[dict]] = [[] for _ in model.layers]
    for n, seq in enumerate(sequences):
        for i, attn in enumerate(dense_layer_outputs(model, seq[None])):
            if progress:
                progress(f"sequence {n + 1}/{len(sequences)}, layer {i}")
            per_layer[i].append(_layer_metrics(attn.probs, attn.indexer, positions, rows, setup))
    return [{key: float(np.mean([m[key] for m in layer])) for key in layer[0]} for layer in per_layer]


def lm_losses(model, batches, runs: dict[str, dict]) -> dict[str, float]:
    """Mean held-out LM loss of each run: ``{"name": {"selector": Selector | None, "pattern": str | None,
    "dense": bool}}`` (None: the model's own); the model is not changed."""
    return {name: float(np.mean([float(lm_loss_of(model, jnp.asarray(i), jnp.asarray(t), run.get("pattern"),
                                                  run.get("selector"), run.get("dense", False)))
                                 for i, t in batches]))
            for name, run in runs.items()}


def searched_patterns(model, calibration, keeps, *, progress: bool = True, log=None) -> dict[float, dict]:
    """One greedy IndexCache search down to the smallest keep; the pattern it passed at each keep."""
    n = len(model.layers)
    state = greedy_search(model, calibration, min(keeps), progress=progress, log=log)
    trail = [(model.check_pattern(None), state.base_loss)] + [(h["pattern"], h["loss"]) for h in state.history]
    out = {}
    for keep in keeps:
        target = max(1, int(np.ceil(keep * n)))
        pattern, loss = next((p, l) for p, l in trail if p.count("F") == target)
        out[keep] = {"pattern": pattern, "calibration_loss": loss}
    return out


def run(model, heldout: np.ndarray, calibration, setup: ModelFidelitySetup, *, progress: bool = True,
        log: Callable[[str], None] | None = None, model_info: dict | None = None,
        searched: dict[float, dict] | None = None) -> dict[str, Any]:
    """The whole report. ``heldout`` [N, seq_len + 1] token rows; ``calibration`` [(inputs, targets)] batches
    for the IndexCache search, or ``searched`` ({keep: {"pattern": ...}}, e.g. an earlier report's) to reuse
    its patterns. ``log`` takes one line of progress (e.g. ``print``). Sets the model's default selector to
    DSA top-``setup.topk`` (what the search and the patterns run with)."""
    if model.cfg.indexer is None:
        raise ValueError("model_fidelity.run: the model has no indexers")
    log = log or (lambda _: None)
    model.set_selector(**setup.selector("dsa").as_dict())
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(heldout) * len(model.layers), desc="selection metrics", unit="layer")
    layers = selection_metrics(model, heldout[:, :-1], setup, progress=(lambda _: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    log(f"selection metrics: {time.perf_counter() - start:.0f} s")

    n = len(model.layers)
    if searched is None:
        start = time.perf_counter()
        searched = searched_patterns(model, calibration, setup.keeps, progress=progress, log=log)
        log(f"IndexCache search: {time.perf_counter() - start:.0f} s")
    elif set(searched) != set(setup.keeps):
        raise ValueError(f"searched patterns cover keeps {sorted(searched)}, the setup asks for {sorted(setup.keeps)}")
    runs: dict[str, dict] = {"dense": {"dense": True}, "dsa": {}}
    runs.update({m: {"selector": setup.selector(m)} for m in SELECTORS})
    for keep in setup.keeps:
        every = round(1 / keep)
        runs[f"indexcache uniform 1/{every}"] = {"pattern": IndexCacheConfig.uniform(n, every).pattern}
        runs[f"indexcache searched 1/{every}"] = {"pattern": searched[keep]["pattern"]}
    batches = [(row[None, :-1], row[None, 1:]) for row in heldout]
    start = time.perf_counter()
    losses = lm_losses(model, batches, runs)
    log(f"LM losses: {time.perf_counter() - start:.0f} s")
    dense = losses["dense"]
    keys = [k for k in layers[0]]
    return {
        "benchmark": "selection fidelity on a real model (held-out text)",
        "model": model_info or {},
        "setup": dataclasses.asdict(setup),
        "environment": environment(),
        "per_layer": layers,
        "mean": {k: float(np.mean([layer[k] for layer in layers])) for k in keys},
        "lm_loss": {name: {"loss": v, "vs_dense": v / dense - 1.0,
                           **({"pattern": runs[name]["pattern"]} if "pattern" in runs[name] else {})}
                    for name, v in losses.items()},
        "searched": {str(k): v for k, v in searched.items()},
    }


def format_table(report: dict[str, Any]) -> str:
    m = report["mean"]
    lines = ["| selection (mean over layers) | value |", "|---|---|",
             f"| ceiling: best shared top-{report['setup']['topk']} mass | {m['ceiling']:.3f} |",
             f"| DSA (distilled indexer) mass | {m['dsa_mass']:.3f} ({m['dsa_of_ceiling']:.1%} of the ceiling) |"]
    for method in SELECTORS:
        lines.append(f"| {method}: mass / IoU / recall vs DSA | {m[f'{method}_mass']:.3f} / "
                     f"{m[f'{method}_iou']:.3f} / {m[f'{method}_recall']:.3f} |")
    lines += ["", "| run | held-out LM loss | vs dense |", "|---|---|---|"]
    for name, row in report["lm_loss"].items():
        pattern = f" `{row['pattern']}`" if "pattern" in row else ""
        lines.append(f"| {name}{pattern} | {row['loss']:.4f} | {row['vs_dense']:+.2%} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path | None:
    """Per-layer heatmap of the selection metrics, and the LM losses as bars."""
    plt = pyplot()
    if plt is None:
        return None
    rows = ["ceiling", "dsa_mass", "dsa_of_ceiling", "sink"] + [f"{m}_{k}" for m in SELECTORS
                                                                 for k in ("mass", "iou", "recall")]
    grid = np.array([[layer[r] for layer in report["per_layer"]] for r in rows])
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 8.5), dpi=110, gridspec_kw={"height_ratios": [3, 2]})
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("layer")
    for (r, c), v in np.ndenumerate(grid):
        label = "1" if round(v, 2) >= 1 else f"{v:.2f}".lstrip("0")  # ".97"; 0.996 shows as "1", not ".00"
        ax.text(c, r, label, ha="center", va="center", fontsize=6,
                color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.02)
    ax.set_title(f"{report['model'].get('name', 'model')}: selection fidelity per layer "
                 f"(k={report['setup']['topk']}, {report['setup']['seq_len']} tokens)")
    names = list(report["lm_loss"])
    values = [report["lm_loss"][n]["vs_dense"] * 100 for n in names]
    bx.barh(names, values, color=["gray" if n == "dense" else "tab:blue" for n in names])
    bx.invert_yaxis()
    bx.set_xlabel("held-out LM loss vs dense (%)")
    bx.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def save(report: dict[str, Any], path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    out = save_json(report, path)
    return out, plot(report, out.with_suffix(".png"))


def smollm2_report(indexers: str, setup: ModelFidelitySetup, *, search_from: str | None = None,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``run`` on SmolLM2-135M with DSA retrofitted (``indexers``: "shipped", "fresh" or a file): held-out
    CPython sources as the sequences, train-split batches for the IndexCache search, or the searched
    patterns of an earlier report (``search_from``: its JSON path; the search dominates on a CPU)."""
    from sparse_index_jax.models.retrofit import read_indexer_file, resolve_indexers, smollm2
    from sparse_index_jax.training.data import PackedDataset, python_stdlib_files, read_tokens

    model, tokenizer = smollm2(indexers, progress=progress)
    path = resolve_indexers(indexers)
    eos = model.cfg.eos_token_id[0] if model.cfg.eos_token_id else None
    heldout_files = python_stdlib_files("heldout")
    held = read_tokens(heldout_files, tokenizer=tokenizer, eos_id=eos)
    n = (len(held) - 1) // setup.seq_len
    if n < setup.sequences:
        raise ValueError(f"the held-out files hold {len(held):,} tokens: {n} sequences of {setup.seq_len}, fewer "
                         f"than {setup.sequences}")
    rows = np.stack([held[i * setup.seq_len: (i + 1) * setup.seq_len + 1] for i in range(setup.sequences)])
    searched, calibration = None, []
    if search_from:
        import json

        searched = {float(k): v for k, v in json.loads(pathlib.Path(search_from).read_text())["searched"].items()}
    else:
        train = PackedDataset(read_tokens(python_stdlib_files("train"), tokenizer=tokenizer, eos_id=eos),
                              setup.search_seq_len, seed=setup.seed, heldout_fraction=0)
        calibration = [train.train_batch(i, setup.search_batch_size) for i in range(setup.search_batches)]
    ix = model.cfg.indexer
    info = {"name": "SmolLM2-135M-Instruct (Q4_1 GGUF) + DSA retrofit",
            "indexer": {"n_heads": ix.n_heads, "head_dim": ix.head_dim, "rope_dim": ix.rope_dim},
            "indexers": str(path or indexers), "indexers_info": read_indexer_file(path).info if path else {},
            "heldout_files": len(heldout_files), "searched_from": search_from}
    return run(model, rows, calibration, setup, progress=progress, log=log, model_info=info, searched=searched)
