"""Selection fidelity on a real model: SmolLM2-135M with DSA retrofitted, on held-out CPython sources.

Per layer, from the dense model's own attention (probabilities averaged over the query heads, queries in
the second half of each sequence):

* ``ceiling``: the attention mass of the best single key set of size k shared by all heads (the top-k of
  the head-averaged attention); no selector shared by the heads can cover more.
* ``dsa_mass``: the mass DSA's top-k (the distilled indexer) covers, and ``dsa_of_ceiling`` = its ratio.
* ``<method>_mass``, ``<method>_iou``, ``<method>_recall`` for HISA, MISA, MISA-H against DSA's selection
  from the same indexer activations. MISA routes a fraction of the indexer's heads (a quarter by default:
  2 of SmolLM2's 6, 4 of 16), its own regime.
* ``sink``: the mass on token 0 (where the attention goes, not a quality measure).

From the same layer pass (no second model run): the IoU of DSA's selections between every pair of layers on
the same queries (what IndexCache relies on), and DSA's share of the ceiling by query position over all
queries t >= k (earlier queries keep every key), which shows where the indexers stop generalising past the
length they were distilled at.

Then the held-out LM loss: dense, DSA, each selector, IndexCache patterns (uniform and greedy-searched) at
1/2 and 1/4 of the layers keeping their indexer, and optionally indexers distilled for an IndexCache pattern.

Every figure is a mean over held-out sequences with its standard error (sample std / sqrt(n)); LM losses
against dense use the paired per-sequence differences, so the text's difficulty, shared by all runs, cancels.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Sequence

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
TARGETS = {"DSA / HISA / MISA-H": 0.01, "IndexCache": 0.02}  # loss vs dense the methods aim to stay within
LAYER_TARGETS = {"dsa_of_ceiling": 0.95, "hisa_iou": 0.99, "misa_recall": 0.92}  # per-layer floors (README's targets)
BEYOND = "beyond the indexers' training length ({} tokens)"


@dataclasses.dataclass(frozen=True)
class ModelFidelitySetup:
    seq_len: int = 4096
    sequences: int = 8           # held-out sequences of seq_len tokens: enough for a standard error
    topk: int = 256
    hisa_block: int = 64
    hisa_blocks: int = 16        # 16 x 64 = 4 * topk candidate tokens (the HISA paper's ratio)
    misa_block: int = 64
    misa_fraction: float = 0.25  # MISA's regime: a quarter of the indexer heads routed (6 -> 2, 16 -> 4)
    misa_heads: int | None = None  # an explicit count instead of the fraction
    position_bins: int = 4       # equal ranges of query positions [topk, seq_len) for the by-position view
    keeps: tuple[float, ...] = (0.5, 0.25)
    search_seq_len: int = 1024   # greedy-search calibration: train-split sequences
    search_batches: int = 4
    search_batch_size: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "sequences", "topk", "hisa_block", "hisa_blocks", "misa_block", "position_bins",
                     "search_seq_len", "search_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelFidelitySetup.{name} must be positive, got {getattr(self, name)}")
        if self.misa_heads is not None and self.misa_heads <= 0:
            raise ValueError(f"ModelFidelitySetup.misa_heads must be positive or None, got {self.misa_heads}")
        if not 0 < self.misa_fraction <= 1:
            raise ValueError(f"ModelFidelitySetup.misa_fraction must lie in (0, 1], got {self.misa_fraction}")
        if any(not 0 < k < 1 for k in self.keeps):
            raise ValueError(f"ModelFidelitySetup.keeps must lie in (0, 1), got {self.keeps}")

    def misa_active_heads(self, n_heads: int) -> int:
        """MISA's routed heads for an indexer of ``n_heads``: ``misa_heads`` if given, else
        max(1, round(n_heads * misa_fraction))."""
        return self.misa_heads if self.misa_heads is not None else max(1, round(n_heads * self.misa_fraction))

    def for_heads(self, n_heads: int) -> "ModelFidelitySetup":
        """This setup with ``misa_heads`` resolved for an indexer of ``n_heads`` heads (what a report records)."""
        heads = self.misa_active_heads(n_heads)
        if heads > n_heads:
            raise ValueError(f"ModelFidelitySetup: MISA routes {heads} heads, the indexer has {n_heads}")
        return dataclasses.replace(self, misa_heads=heads)

    def selector(self, method: str, n_heads: int | None = None) -> Selector:
        """The selector of one method at this setup (MISA-H keeps its default candidates, 4 * topk). MISA's
        active heads come from ``n_heads`` and the fraction unless ``misa_heads`` is set (``for_heads``)."""
        if method in ("misa", "misa_h") and self.misa_heads is None and n_heads is None:
            raise ValueError(f"ModelFidelitySetup.selector({method!r}): MISA routes a fraction of the indexer's "
                             f"heads; give n_heads (or resolve the setup with for_heads)")
        heads = self.misa_active_heads(n_heads) if n_heads is not None else self.misa_heads
        options = {"dsa": {}, "hisa": {"block_size": self.hisa_block, "num_blocks": self.hisa_blocks},
                   "misa": {"block_size": self.misa_block, "active_heads": heads},
                   "misa_h": {"block_size": self.misa_block, "active_heads": heads}}[method]
        selector = Selector.create(method, self.topk, **options)
        return selector.check_heads(n_heads) if n_heads is not None else selector

    def position_edges(self, seq_len: int) -> list[int]:
        """The ``position_bins + 1`` edges of equal query-position ranges over [topk, seq_len): queries before
        topk keep every eligible key, so DSA equals the ceiling there by construction."""
        if seq_len - self.topk < self.position_bins:
            raise ValueError(f"ModelFidelitySetup: {seq_len} tokens leave {seq_len - self.topk} queries past "
                             f"topk={self.topk}, fewer than position_bins={self.position_bins}")
        return [int(e) for e in np.round(np.linspace(self.topk, seq_len, self.position_bins + 1))]


def standard_error(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1) / sqrt(n) of ``values`` [n]; None for n = 1 (no spread to see)."""
    v = np.asarray(values, np.float64)
    return float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else None


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


# ---- the layer pass: per-layer metrics, cross-layer overlap, by-position shares ----------------------------

_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _row_popcount(words: np.ndarray) -> np.ndarray:
    """[R] set bits per row of ``words`` [R, W] uint64 (np.bitwise_count from numpy 2.0, a byte table before)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).sum(-1, dtype=np.int64)
    return _BYTE_BITS[words.view(np.uint8)].sum(-1, dtype=np.int64)


def packed_membership(indices: np.ndarray, valid: np.ndarray, num_keys: int) -> np.ndarray:
    """[R, ceil(num_keys / 64)] uint64: bit s of row r set when row r selects key s (``indices``, ``valid``
    [R, k]; padding slots set nothing)."""
    width = -(-num_keys // 64) * 64
    mask = np.zeros((indices.shape[0], width + 1), bool)  # the last column catches the padding
    np.put_along_axis(mask, np.where(valid, indices, width).astype(np.intp), True, axis=1)
    return np.packbits(mask[:, :width], axis=1).view(np.uint64)


class SelectionOverlap:
    """IoU of every pair of one sequence's layer selections over the same query rows, as the layers come.

    Comparing index lists pairwise costs rows x k x k per pair (6e10 for the 435 pairs of 30 layers at 2,048
    rows, top-256). Instead each layer's selection becomes a bit-packed membership mask once, and a pair's
    intersections are row-wise popcounts of the AND of two masks: rows x keys / 64 words (0.3 ms per pair at
    4K). Memory: the layers' packed masks of the current sequence, rows x keys / 8 bytes each (1 MB per layer at
    4K with the second-half rows, 31 MB for 30 layers; 4 MB and 126 MB at 8K), where bool masks would take 8x
    (250 MB at 4K, 1 GB at 8K); one bool mask of one layer exists while it is packed.
    """

    def __init__(self, num_keys: int):
        self.num_keys = num_keys
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: packed mask [R, W], counts [R]

    def add(self, indices: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Adds the next layer's selection (``indices``, ``valid`` [R, k]); returns its mean IoU over the rows
        with each earlier layer [layers so far], rows where both sets are empty counting 1 (as ``metrics.iou``)."""
        valid = np.asarray(valid, bool)
        packed = packed_membership(np.asarray(indices), valid, self.num_keys)
        counts = valid.sum(-1)
        out = np.empty(len(self.kept))
        for j, (other, other_counts) in enumerate(self.kept):
            inter = _row_popcount(packed & other)
            union = counts + other_counts - inter
            out[j] = np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
        self.kept.append((packed, counts))
        return out


def position_shares(mass: np.ndarray, ceiling: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """[bins] covered mass / ceiling mass over the query rows t in [edges[b], edges[b + 1]) (``mass``,
    ``ceiling`` [T]): a ratio of the bin's means, as ``dsa_of_ceiling`` is of the layer's."""
    return np.array([mass[a:b].sum() / ceiling[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])


def _layer_pass(probs, act, positions, rows, edges, setup: ModelFidelitySetup):
    """One layer, one sequence (B = 1): (the metrics above averaged over ``rows`` [1, T]; DSA's share of the
    ceiling per position bin [bins]; DSA's Selection [1, T, k])."""
    mean = lambda x: row_mean(x, rows)  # noqa: E731
    ceiling = shared_topk_mass(probs, setup.topk)
    out = {"ceiling": mean(ceiling), "sink": mean(probs[..., 0])}
    ref = dsa_mass = None
    for method in ("dsa", *SELECTORS):
        sel = setup.selector(method).select(act.q, act.k, act.w, q_positions=positions, k_scale=act.k_scale)
        mass = metrics.attention_mass_recall(sel, probs)
        out[f"{method}_mass"] = mean(mass)
        if method == "dsa":
            ref, dsa_mass = sel, mass
        else:
            out[f"{method}_iou"] = mean(metrics.iou(sel, ref))
            out[f"{method}_recall"] = mean(metrics.recall(sel, ref))
    out["dsa_of_ceiling"] = out["dsa_mass"] / out["ceiling"]
    shares = position_shares(np.asarray(dsa_mass[0], np.float64), np.asarray(ceiling[0], np.float64), edges)
    return out, shares, ref


@dataclasses.dataclass
class SelectionStats:
    """What the layer pass measured, per sequence (N sequences, L layers, ``bins`` position bins)."""

    per_sequence: list[list[dict[str, float]]]  # [N][L] {metric: value}
    cross_layer_iou: np.ndarray                 # [N, L, L] DSA selections' IoU, second-half queries
    by_position: np.ndarray                     # [N, L, bins] DSA mass / ceiling per query-position bin
    edges: list[int]                            # [bins + 1]


def selection_metrics(model, sequences: np.ndarray, setup: ModelFidelitySetup,
                      progress: Callable[[str], None] | None = None) -> SelectionStats:
    """The layer pass over the sequences [N, T]: the metrics of the module docstring, per sequence and layer.
    ``setup`` must have its MISA heads resolved (``for_heads``)."""
    N, T = sequences.shape
    L = len(model.layers)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    rows = positions >= T // 2
    edges = setup.position_edges(T)
    per_sequence = [[] for _ in range(N)]
    cross = np.tile(np.eye(L), (N, 1, 1))
    by_position = np.zeros((N, L, len(edges) - 1))
    for n, seq in enumerate(sequences):
        overlap = SelectionOverlap(T)
        for i, attn in enumerate(dense_layer_outputs(model, seq[None])):
            if progress:
                progress(f"sequence {n + 1}/{N}, layer {i}")
            values, by_position[n, i], sel = _layer_pass(attn.probs, attn.indexer, positions, rows, edges, setup)
            per_sequence[n].append(values)
            cross[n, i, :i] = cross[n, :i, i] = overlap.add(np.asarray(sel.indices[0, T // 2:]),
                                                            np.asarray(sel.valid[0, T // 2:]))
    return SelectionStats(per_sequence, cross, by_position, edges)


# ---- held-out LM losses -------------------------------------------------------------------------------------

def lm_losses(model, batches, runs: dict[str, dict]) -> dict[str, list[float]]:
    """Held-out LM loss of each run, one value per batch (one sequence each): ``{"name": {"selector": Selector |
    None, "pattern": str | None, "dense": bool, "indexers": file | None}}`` (None: the model's own); the model
    is not changed (other indexers are swapped in for their run and back)."""
    from sparse_index_jax.models.retrofit import indexers_swapped

    def losses(run):
        return [float(lm_loss_of(model, jnp.asarray(i), jnp.asarray(t), run.get("pattern"), run.get("selector"),
                                 run.get("dense", False))) for i, t in batches]

    out = {}
    for name, run in runs.items():
        if run.get("indexers"):
            with indexers_swapped(model, run["indexers"]):
                out[name] = losses(run)
        else:
            out[name] = losses(run)
    return out


def loss_row(losses: Sequence[float], dense: Sequence[float]) -> dict[str, Any]:
    """One run's losses [N] against dense's [N] on the same sequences: the mean, its standard error, and the
    relative change with the standard error of the paired differences (SE(loss_i - dense_i) / mean(dense))."""
    losses, dense = np.asarray(losses, np.float64), np.asarray(dense, np.float64)
    diff_se = standard_error(losses - dense)
    return {"loss": float(losses.mean()), "se": standard_error(losses), "vs_dense": float(losses.mean() / dense.mean()
            - 1.0), "vs_dense_se": None if diff_se is None else diff_se / float(dense.mean()),
            "per_sequence": losses.tolist()}


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


def trained_row_name(pattern: str, searched: Sequence[str] = ()) -> str:
    """``"indexcache trained 1/4 (uniform)"``: the share of layers keeping their indexer, and whether the pattern
    is the uniform one of that share, one of the ``searched`` patterns, or another (custom)."""
    n, kept = len(pattern), pattern.count("F")
    every = max(1, round(n / kept))
    share = f"1/{every}" if int(np.ceil(n / every)) == kept else f"{kept}/{n}"
    kind = ("uniform" if pattern == IndexCacheConfig.uniform(n, every).pattern else
            "searched" if pattern in searched else "custom")
    return f"indexcache trained {share} ({kind})"


def trained_indexcache_run(model, path: str | pathlib.Path, searched: Sequence[str] = ()) -> tuple[str, dict]:
    """(row name, run) of indexers distilled for an IndexCache pattern (``path``, as ``sparse-index distill
    --every 4`` writes it; the pattern is its info["distill"]["pattern"]): the run scores them at that pattern
    (``{"pattern", "indexers", "train_seq_len"}``; ``lm_losses`` and ``niah.score`` swap the weights in and back)."""
    from sparse_index_jax.models.retrofit import read_indexer_file

    info = read_indexer_file(path).info
    pattern = (info.get("distill") or {}).get("pattern")
    if not pattern:
        raise ValueError(f"{path}: the indexers were not distilled for an IndexCache pattern (no info['distill']"
                         f"['pattern']; sparse-index distill --every N writes one)")
    pattern = model.check_pattern(pattern)
    return (trained_row_name(pattern, searched),
            {"pattern": pattern, "indexers": str(path), "train_seq_len": info.get("seq_len")})


# ---- the report -----------------------------------------------------------------------------------------------

def _summary(stats: SelectionStats) -> dict[str, Any]:
    """The report's selection part from the per-sequence stats: per-layer means over sequences, means over layers
    with their standard error over sequences, the cross-layer IoU and the by-position view."""
    keys = list(stats.per_sequence[0][0])
    grid = {k: np.array([[layer[k] for layer in seq] for seq in stats.per_sequence]) for k in keys}  # [N, L]
    N, L = grid[keys[0]].shape
    cross = stats.cross_layer_iou
    adjacent = np.array([np.mean(np.diagonal(c, offset=1)) for c in cross]) if L > 1 else None  # [N]
    mean = {k: float(v.mean()) for k, v in grid.items()}
    se = {k: standard_error(v.mean(axis=1)) for k, v in grid.items()}
    if adjacent is not None:
        mean["adjacent_layer_iou"], se["adjacent_layer_iou"] = float(adjacent.mean()), standard_error(adjacent)
    shares = stats.by_position  # [N, L, bins]
    return {
        "sequences": N,
        "per_layer": [{k: float(grid[k][:, i].mean()) for k in keys} for i in range(L)],
        "mean": mean,
        "se": se,
        "per_sequence": {k: v.tolist() for k, v in grid.items()},
        "cross_layer_iou": cross.mean(axis=0).tolist(),
        "by_position": {"edges": stats.edges, "dsa_of_ceiling": shares.mean(axis=0).tolist(),
                        "mean": shares.mean(axis=(0, 1)).tolist(),
                        "se": [standard_error(shares[:, :, b].mean(axis=1)) for b in range(shares.shape[2])]},
    }


def run(model, heldout: np.ndarray, calibration, setup: ModelFidelitySetup, *, progress: bool = True,
        log: Callable[[str], None] | None = None, model_info: dict | None = None,
        searched: dict[float, dict] | None = None, trained: str | pathlib.Path | None = None) -> dict[str, Any]:
    """The whole report. ``heldout`` [N, seq_len + 1] token rows; ``calibration`` [(inputs, targets)] batches
    for the IndexCache search, or ``searched`` ({keep: {"pattern": ...}}, e.g. an earlier report's) to reuse
    its patterns; ``trained``: an indexers file distilled for an IndexCache pattern, scored last as one more
    row (the model's indexers are restored). ``model_info["train_seq_len"]``: the indexers' distillation
    length, marked in the by-position view. ``log`` takes one line of progress (e.g. ``print``). Sets the
    model's default selector to DSA top-``setup.topk`` (what the search and the patterns run with)."""
    if model.cfg.indexer is None:
        raise ValueError("model_fidelity.run: the model has no indexers")
    log = log or (lambda _: None)
    # the trained IndexCache run is read now: a missing file or pattern fails before the long part, not after
    trained_run = trained_indexcache_run(model, trained)[1] if trained is not None else None
    n_heads = model.cfg.indexer.n_heads
    setup = setup.for_heads(n_heads)
    model.set_selector(**setup.selector("dsa").as_dict())
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(heldout) * len(model.layers), desc="selection metrics", unit="layer")
    stats = selection_metrics(model, heldout[:, :-1], setup, progress=(lambda _: bar.update(1)) if bar else None)
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
    if trained_run is not None:  # named once the searched patterns are known
        runs[trained_row_name(trained_run["pattern"], [s["pattern"] for s in searched.values()])] = trained_run
    batches = [(row[None, :-1], row[None, 1:]) for row in heldout]
    start = time.perf_counter()
    losses = lm_losses(model, batches, runs)
    fields = {name: {k: r[k] for k in ("pattern", "indexers", "train_seq_len") if k in r} for name, r in runs.items()}
    log(f"LM losses: {time.perf_counter() - start:.0f} s")
    info = {"train_seq_len": None, **(model_info or {})}
    return {
        "benchmark": "selection fidelity on a real model (held-out text)",
        "model": info,
        "setup": {**dataclasses.asdict(setup), "indexer_heads": n_heads},
        "environment": environment(),
        **_summary(stats),
        "lm_loss": {name: {**loss_row(v, losses["dense"]), **fields[name]} for name, v in losses.items()},
        "searched": {str(k): v for k, v in searched.items()},
    }


def beyond_training(report: dict[str, Any]) -> int | None:
    """The indexers' distillation length when the report's sequences are longer, else None."""
    train = report["model"].get("train_seq_len")
    return train if train and report["setup"]["seq_len"] > train else None


def _pm(value: float, se: float | None, spec: str = ".3f") -> str:
    """``"0.920 ± 0.004"``; the value alone when there is no standard error (one sequence)."""
    return f"{value:{spec}}" + ("" if se is None else f" ± {se:{spec.lstrip('+')}}")


def format_table(report: dict[str, Any]) -> str:
    """Markdown tables of the report: means ± standard errors, by-position shares, LM losses."""
    m, se = report["mean"], report.get("se", {})
    n, seq_len = report.get("sequences", report["setup"]["sequences"]), report["setup"]["seq_len"]
    heads = report["setup"].get("indexer_heads")
    misa = f"{report['setup']['misa_heads']} of {heads} heads routed" if heads else ""
    lines = [f"n = {n} held-out sequence{'s' * (n != 1)} of {seq_len} tokens; " + (
        "± is the standard error over the sequences" if n > 1 else "one sequence: no standard error (needs n >= 2)"),
        "", "| selection (mean over layers) | value |", "|---|---|",
        f"| ceiling: best shared top-{report['setup']['topk']} mass | {_pm(m['ceiling'], se.get('ceiling'))} |",
        f"| DSA (distilled indexer) mass | {_pm(m['dsa_mass'], se.get('dsa_mass'))} "
        f"({_pm(m['dsa_of_ceiling'], se.get('dsa_of_ceiling'), '.1%')} of the ceiling) |"]
    for method in SELECTORS:
        label = f"{method} ({misa})" if method.startswith("misa") and misa else method
        lines.append(f"| {label}: mass / IoU / recall vs DSA | " + " / ".join(
            _pm(m[f"{method}_{k}"], se.get(f"{method}_{k}")) for k in ("mass", "iou", "recall")) + " |")
    if "adjacent_layer_iou" in m:
        lines.append(f"| DSA top-k IoU of adjacent layers (i, i + 1) | "
                     f"{_pm(m['adjacent_layer_iou'], se.get('adjacent_layer_iou'))} |")
    lines.append(f"| sink: mass on token 0 (not a quality measure) | {_pm(m['sink'], se.get('sink'))} |")
    train = beyond_training(report)
    if "by_position" in report:
        pos = report["by_position"]
        lines += ["", "| query positions | DSA share of the ceiling (mean over layers) |", "|---|---|"]
        for (a, b), v, s in zip(zip(pos["edges"][:-1], pos["edges"][1:]), pos["mean"], pos["se"]):
            mark = "" if not train or b <= train else " (beyond training)" if a >= train else " (partly beyond)"
            lines.append(f"| {a}-{b}{mark} | {_pm(v, s, '.1%')} |")
        if train:
            lines.append(f"\nqueries at positions >= {train} are {BEYOND.format(train)}")
    lines += ["", "| run | held-out LM loss | vs dense |", "|---|---|---|"]
    for name, row in report["lm_loss"].items():
        pattern = f" `{row['pattern']}`" if "pattern" in row else ""
        lines.append(f"| {name}{pattern} | {_pm(row['loss'], row.get('se'), '.4f')} | "
                     f"{_pm(row['vs_dense'], row.get('vs_dense_se'), '+.2%')} |")
    return "\n".join(lines)


# ---- the plot -------------------------------------------------------------------------------------------------

def _heatmap(fig, ax, grid: np.ndarray, *, cmap: str = "viridis", annotate: bool = True, vmax: float = 1.0,
             label: str | None = None):
    """An annotated [rows, cols] heatmap on [0, vmax] with its colour bar; labels dark or light by the cell's shade."""
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    if annotate:
        for (r, c), v in np.ndenumerate(grid):
            label_text = "1" if round(v, 2) >= 1 else f"{v:.2f}".lstrip("0")  # ".97"; 0.996 shows as "1", not ".00"
            red, green, blue, _ = im.cmap(im.norm(v))
            ax.text(c, r, label_text, ha="center", va="center", fontsize=6,
                    color="black" if 0.3 * red + 0.59 * green + 0.11 * blue > 0.5 else "white")
    bar = fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    if label:
        bar.set_label(label, fontsize=7)
    return im


def _plot_layers(fig, ax, sx, report):
    """The quality metrics per layer, their targets (rows with one: the floor in the label, cells below it framed
    in red), and the sink apart, in its own strip with its own colour map and scale: it says where attention goes,
    not how good a selection is."""
    from matplotlib.patches import Rectangle  # noqa: PLC0415  (matplotlib is optional: imported once it is there)

    quality = ["ceiling", "dsa_mass", "dsa_of_ceiling"] + [f"{m}_{k}" for m in SELECTORS
                                                           for k in ("mass", "iou", "recall")]
    layers = report["per_layer"]
    _heatmap(fig, ax, np.array([[layer[r] for layer in layers] for r in quality]), label="1 = best")
    for r, name in enumerate(quality):
        target = LAYER_TARGETS.get(name)
        for c, layer in enumerate(layers if target is not None else []):
            if layer[name] < target:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.3))
    ax.set_yticks(range(len(quality)), [f"{r}  (target >= {LAYER_TARGETS[r]:.2f})" if r in LAYER_TARGETS else r
                                        for r in quality])
    for tick, name in zip(ax.get_yticklabels(), quality):
        if name in LAYER_TARGETS:
            tick.set_color("darkred")
    ax.set_xticks(range(len(layers)), [])
    s, train = report["setup"], beyond_training(report)
    head = (f"{report['model'].get('name', 'model')}: k={s['topk']}, {s['seq_len']} tokens, n={report['sequences']} "
            f"held-out sequences (means; ± standard error)" + (f"\n{BEYOND.format(train)}" if train else ""))
    ax.set_title(f"{head}\nselection fidelity per layer (queries in the second half; MISA routes {s['misa_heads']} "
                 f"of {s.get('indexer_heads', '?')} heads); red frame: below the row's target", fontsize=10)
    sink = np.array([[layer["sink"] for layer in layers]])
    top = max(0.1, float(np.ceil(sink.max() * 10) / 10))  # its own scale: 0 to the largest sink, in tenths
    _heatmap(fig, sx, sink, cmap="Oranges", vmax=top, label="sink")
    sx.set_yticks([0], ["sink: mass on token 0"])
    sx.set_xticks(range(len(layers)))
    sx.set_xlabel("layer (sink strip: where attention goes, not a quality measure; own colour scale)")


def _plot_cross_layer(fig, ax, report):
    iou = np.array(report["cross_layer_iou"])
    _heatmap(fig, ax, iou, annotate=len(iou) <= 12)
    ax.set_xticks(range(len(iou)))
    ax.set_yticks(range(len(iou)))
    ax.tick_params(labelsize=6)
    ax.set(xlabel="layer", ylabel="layer")
    adjacent = report["mean"].get("adjacent_layer_iou")
    ax.set_title(f"DSA top-{report['setup']['topk']} IoU between layers"
                 + (f" (adjacent: {adjacent:.2f})" if adjacent is not None else ""))


def _plot_by_position(fig, ax, report):
    """Layers x query-position bins; positions past the indexers' training length hatched right of a line."""
    pos = report["by_position"]
    edges = pos["edges"]
    _heatmap(fig, ax, np.array(pos["dsa_of_ceiling"]))
    ax.set_xticks(range(len(edges) - 1), [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])], fontsize=7)
    ax.set_yticks(range(len(pos["dsa_of_ceiling"])))
    ax.tick_params(axis="y", labelsize=6)
    ax.set(xlabel="query positions", ylabel="layer")
    ax.set_title("DSA share of the ceiling by query position")
    train = beyond_training(report)
    if train:
        b = max(0, np.searchsorted(edges, train, side="right") - 1)  # the bin that holds position `train`
        x = b - 0.5 + (train - edges[b]) / (edges[b + 1] - edges[b]) if b < len(edges) - 1 else len(edges) - 1.5
        ax.axvline(x, color="red", linestyle="--")
        ax.axvspan(x, len(edges) - 1.5, fill=False, hatch="//", edgecolor="red", linewidth=0)
        ax.set_title(f"DSA share of the ceiling by query position\nhatched: {BEYOND.format(train)}")


def _plot_losses(ax, report):
    """Loss vs dense with standard-error bars and the targets as dashed lines."""
    names = list(report["lm_loss"])
    rows = [report["lm_loss"][n] for n in names]
    values = [r["vs_dense"] * 100 for r in rows]
    errors = [(r.get("vs_dense_se") or 0.0) * 100 for r in rows]
    limits = [TARGETS["IndexCache" if n.startswith("indexcache") else "DSA / HISA / MISA-H"] * 100 for n in names]
    colors = ["gray" if n == "dense" else "tab:orange" if v > t else "tab:blue"  # orange: over its target
              for n, v, t in zip(names, values, limits)]
    ax.barh(names, values, xerr=errors, capsize=3, color=colors)
    for y, (v, e) in enumerate(zip(values, errors)):
        ax.text(max(v + e, 0), y, f" {v:+.2f}%", va="center", fontsize=7)
    for (label, target), color in zip(TARGETS.items(), ("tab:green", "tab:red")):
        ax.axvline(target * 100, color=color, linestyle="--", label=f"+{target:.0%}: {label} target")
    ax.invert_yaxis()
    ax.set_xlabel("held-out LM loss vs dense (%), bars: standard error of the paired differences; orange: over the "
                  "method's target")
    ax.legend(loc="best", fontsize=7)
    ax.grid(axis="x", alpha=0.3)


def plot(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path | None:
    """One PNG: the per-layer metrics (sink apart), the cross-layer IoU, DSA's share of the ceiling by query
    position, and the LM losses vs dense with error bars and targets."""
    plt = pyplot()
    if plt is None:
        return None
    fig = plt.figure(figsize=(14, 18), dpi=110)
    grid = fig.add_gridspec(3, 2, height_ratios=[4.4, 5, 3.5])
    layer_grid = grid[0, :].subgridspec(2, 1, height_ratios=[len(SELECTORS) * 3 + 3, 1.2], hspace=0.04)
    _plot_layers(fig, fig.add_subplot(layer_grid[0]), fig.add_subplot(layer_grid[1]), report)
    _plot_cross_layer(fig, fig.add_subplot(grid[1, 0]), report)
    _plot_by_position(fig, fig.add_subplot(grid[1, 1]), report)
    _plot_losses(fig.add_subplot(grid[2, :]), report)
    return save_figure(fig, path)


def save(report: dict[str, Any], path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    out = save_json(report, path)
    return out, plot(report, out.with_suffix(".png"))


def smollm2_indexer_heads(indexers: str) -> int:
    """The indexer heads of SmolLM2 + ``indexers`` ("shipped", "fresh" or a file), read without loading the model."""
    from sparse_index_jax.models.retrofit import SMOLLM2_INDEXER, read_indexer_file, resolve_indexers

    path = resolve_indexers(indexers)
    return read_indexer_file(path).weights["n_heads"] if path else SMOLLM2_INDEXER["n_heads"]


def read_searched_patterns(path: str | pathlib.Path) -> dict[float, dict]:
    """keep -> searched IndexCache entry (``pattern``, losses) of an earlier ``bench fidelity --model`` report."""
    import json

    try:
        return {float(k): v for k, v in json.loads(pathlib.Path(path).read_text())["searched"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: not a fidelity report with searched IndexCache patterns (JSON with 'searched'): "
                         f"{type(err).__name__}: {err}") from None


def smollm2_report(indexers: str, setup: ModelFidelitySetup, *, search_from: str | None = None,
                   indexcache_indexers: str | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None, model: str = "smollm2") -> dict[str, Any]:
    """``run`` on SmolLM2-135M with DSA retrofitted (``indexers``: "shipped", "fresh" or a file): held-out
    CPython sources as the sequences, train-split batches for the IndexCache search, or the searched
    patterns of an earlier report (``search_from``: its JSON path; the search dominates on a CPU);
    ``indexcache_indexers``: indexers distilled for an IndexCache pattern, scored at it as one more row.
    ``model``: any Llama-family source ``models.load`` takes (an HF folder with its tokenizer.json, a GGUF file)."""
    from sparse_index_jax import models
    from sparse_index_jax.models.retrofit import read_indexer_file, resolve_indexers
    from sparse_index_jax.training.data import PackedDataset, python_stdlib_files, read_tokens

    source = model
    if models.family(source) != "llama":
        raise ValueError(f"{source}: the fidelity report runs a Llama-family model with DSA retrofitted")
    model, tokenizer = models.load(source, indexers=indexers, progress=progress)
    if tokenizer is None:
        raise ValueError(f"{source}: the held-out sources are tokenised; the folder has no tokenizer.json")
    model.cfg.check_length(setup.seq_len)
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
        searched = read_searched_patterns(search_from)
    else:
        train = PackedDataset(read_tokens(python_stdlib_files("train"), tokenizer=tokenizer, eos_id=eos),
                              setup.search_seq_len, seed=setup.seed, heldout_fraction=0)
        calibration = [train.train_batch(i, setup.search_batch_size) for i in range(setup.search_batches)]
    ix = model.cfg.indexer
    indexers_info = read_indexer_file(path).info if path else {}
    name = "SmolLM2-135M-Instruct (Q4_1 GGUF)" if source == "smollm2" else f"{source} ({model.cfg.model_type})"
    info = {"name": f"{name} + DSA retrofit",
            "indexer": {"n_heads": ix.n_heads, "head_dim": ix.head_dim, "rope_dim": ix.rope_dim},
            "indexers": str(path or indexers), "indexers_info": indexers_info,
            "train_seq_len": indexers_info.get("seq_len"),  # the distillation length (sparse-index distill)
            "heldout_files": len(heldout_files), "searched_from": search_from}
    return run(model, rows, calibration, setup, progress=progress, log=log, model_info=info, searched=searched,
               trained=indexcache_indexers)
