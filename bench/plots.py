"""PNG plots of the harness and of the search / distill commands (matplotlib, headless, optional).

Every drawing function returns the PNG's path, or None when matplotlib is not installed (``pip install
matplotlib``, or the ``bench`` extra); the caller says so. Nothing here prints.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | pathlib.Path, *,
                rect: tuple[float, float, float, float] | None = None) -> pathlib.Path:
    """Lays out (within ``rect`` of the figure, when a figure legend takes the rest), writes (creating the folder)
    and closes a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def length_axis(ax, lengths: Sequence[int], label: str = "T = S (tokens)") -> None:
    """A log x axis ticked at exactly the benchmark's lengths ("4K", "128K"), no minor labels."""
    import matplotlib.ticker

    from sparse_index_jax.bench.reports import length_label

    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_xticks(lengths, [length_label(T) for T in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def plain_log_y(ax) -> None:
    """Log y axis labelled 0.01, 0.1, 1, 10 (not 10^-2); less than a decade gets its minor ticks labelled too."""
    import matplotlib.ticker

    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    low, high = ax.get_ylim()
    if high < 10 * low:
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))


def no_data(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color="grey", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# ---- the search and distill commands' plots (drawn by the CLI: training/ does not import bench/) ----------------

SEARCH_MIN_SPAN = 1.0  # percent: the least y range of the search plot, so 1e-6 noise stays a flat line at 0


def search_plot(report: Mapping, path: str | pathlib.Path) -> pathlib.Path | None:
    """IndexCache's greedy search (``SearchState.report()``): the calibration LM loss of the start pattern and after
    each flip, as a change (%) from dense attention's loss on the same batches (from the start pattern's in reports
    without one), against the F layers kept; each point labelled with the layer it flipped."""
    plt = pyplot()
    if plt is None:
        return None
    import matplotlib.ticker

    curve, start = report["curve"], report["base_loss"]
    dense = report.get("dense_loss")  # reports written before the search measured it: read against the start
    base, against = (dense, "dense attention") if dense else (start, "the start pattern")
    n = len(report["pattern"])
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=120)
    if start is None or not report["history"]:  # nothing flipped: the start pattern already keeps few enough F
        no_data(ax, f"no flips: {report['pattern']} already keeps {report['kept_layers']} of {n} layers F")
        return save_figure(fig, path)
    kept = list(curve["f_layers"])
    change = [100 * (loss / base - 1) for loss in curve["loss"]]
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.plot(kept, change, marker="o", markersize=4, color="tab:blue")
    ax.annotate("start", (kept[0], change[0]), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    for i, (step, x, y) in enumerate(zip(report["history"], kept[1:], change[1:])):
        ax.annotate(f"L{step['flip']}", (x, y), textcoords="offset points", xytext=(0, 7 if i % 2 else -12),
                    ha="center", fontsize=7, color="tab:blue")
    low, high = min(0.0, *change), max(0.0, *change)
    if high - low < SEARCH_MIN_SPAN:  # noise must not fill the axis: at least SEARCH_MIN_SPAN points, 0 inside
        mid = (high + low) / 2
        low, high = min(low, mid - SEARCH_MIN_SPAN / 2), max(high, mid + SEARCH_MIN_SPAN / 2)
    pad = 0.12 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(decimals=None))
    ax.set_xlim(kept[0] + 0.5, kept[-1] - 0.5)  # the search runs left to right: F layers kept fall
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel=f"F layers kept (of {n}); each point: the layer that flipped F -> S",
           ylabel=f"calibration LM loss vs {against} ({base:.4f})",
           title=f"IndexCache greedy search: {report['pattern']}")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing running mean (the first points over what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def distill_plot(rows: Sequence[Mapping], path: str | pathlib.Path, *, switch_step: int | None = None,
                 before: Mapping | None = None, after: Mapping | None = None,
                 title: str = "indexer distillation") -> pathlib.Path | None:
    """Two panels against step: the indexer KL (log) and the LM loss, from ``metrics.jsonl`` rows (each step's
    training batch: thin; a running mean: solid; the dense warm-up and the sparse stage in their own colours),
    the stage switch as a vertical line, and the held-out evaluations (``distill.evaluate``: ``before`` at step 0,
    ``after`` at the last step) as markers."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (kl_ax, lm_ax) = plt.subplots(1, 2, figsize=(13, 4.6), dpi=120)
    window = max(1, len(rows) // 50)
    stages = {"dense": ("tab:blue", "dense warm-up (all keys)"), "sparse": ("tab:orange", "sparse stage (top-k)")}
    for ax, key in ((kl_ax, "indexer_kl"), (lm_ax, "lm_loss")):
        for stage, (color, label) in stages.items():
            pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage]
            if not pts:
                continue
            steps, values = zip(*pts)
            ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.35)
            ax.plot(steps, _smooth(values, window), color=color, linewidth=1.5,
                    label=f"{label}, training batch" + (f" (mean of {window})" if window > 1 else ""))
    last = rows[-1]["step"] if rows else 0
    held_out = (("indexer_kl_dense", kl_ax, "o", "all keys"), ("indexer_kl_sparse", kl_ax, "s", "top-k slots"),
                ("lm_loss_dense", lm_ax, "o", "dense attention"), ("lm_loss_sparse", lm_ax, "s", "sparse attention"))
    for key, ax, marker, label in held_out:
        pts = [(x, ev[key]) for x, ev in ((0, before), (last, after)) if ev and key in ev]
        if pts:
            ax.plot(*zip(*pts), linestyle="none", marker=marker, markersize=7, markerfacecolor="white",
                    markeredgewidth=1.5, color="black" if marker == "o" else "tab:red",
                    label=f"held-out eval, {label}", zorder=5)
            for x, y in pts:  # circles labelled below, squares above: the two may sit on one point
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(7, -9 if marker == "o" else 4),
                            fontsize=7)
    kl_ax.set_yscale("log")
    plain_log_y(kl_ax)
    kl_ax.set(xlabel="step", ylabel="indexer KL", title="indexer KL (training: over the stage's keys)")
    lm_ax.set(xlabel="step", ylabel="LM loss", title="LM loss (training batch: the stage's attention)")
    for ax in (kl_ax, lm_ax):
        if switch_step is not None:
            ax.axvline(switch_step, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"step {switch_step}: dense -> sparse", (switch_step, 1), xycoords=("data", "axes fraction"),
                        xytext=(4, -12), textcoords="offset points", fontsize=7, color="dimgrey")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
