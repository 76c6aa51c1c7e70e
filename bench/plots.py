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


def line_plot(path: str | pathlib.Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
              title: str, xlabel: str, ylabel: str, logy: bool = False) -> pathlib.Path | None:
    """One PNG with a line per series."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | pathlib.Path) -> pathlib.Path:
    """Lays out, writes (creating the folder) and closes a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
