"""The search and distill commands' plots (``bench/plots.py``), drawn from small synthetic reports: what a reader
needs is on them (percent axis without offset, flipped layers labelled; stage switch, held-out evaluations)."""

from __future__ import annotations

import pytest

from sparse_index_jax.bench import plots
from sparse_index_jax.training.index_cache_search import SearchState

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection (closed at the end)."""
    kept, real = [], plots.save_figure

    def keep(fig, path, **kw):
        kept.append(fig)
        fig.canvas.draw()  # tick labels and offset texts exist once drawn
        return real(fig, path, **kw)
    monkeypatch.setattr(plots, "save_figure", keep)
    yield kept
    import matplotlib.pyplot as plt
    for fig in kept:
        plt.close(fig)


def _search_report(changes: list[float], base: float = 1.5) -> dict:
    state = SearchState("FFFFFF", 0.25, "data", base_loss=base)
    pattern = state.pattern
    for layer, change in zip((3, 5, 1, 4), changes):
        pattern = pattern[:layer] + "S" + pattern[layer + 1:]
        state.history.append({"flip": layer, "pattern": pattern, "loss": base * (1 + change)})
    state.pattern = pattern
    return state.report()


def test_search_plot_shows_the_loss_change_in_percent_with_each_flipped_layer(tmp_path, figures):
    # 1e-6 noise: the axis stays in plain percent around 0 (no offset, no scientific notation)
    path = plots.search_plot(_search_report([1e-6, -2e-6, 3e-6, 1e-6]), tmp_path / "noise.png")
    assert path.is_file() and path.stat().st_size > 0
    ax, = figures[0].axes
    assert ax.yaxis.get_offset_text().get_text() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(t.endswith("%") and "e" not in t for t in labels), labels
    low, high = ax.get_ylim()
    assert high - low >= plots.SEARCH_MIN_SPAN and low < 0 < high  # noise is a flat line, not a curve
    assert [t.get_text() for t in ax.texts] == ["start", "L3", "L5", "L1", "L4"]
    ys = ax.lines[-1].get_ydata()
    assert ys[0] == 0 and abs(ys[-1] - 1e-4) < 1e-9  # percent of the start's loss

    plots.search_plot(_search_report([0.002, 0.01, 0.03, 0.05]), tmp_path / "real.png")
    ax, = figures[1].axes
    assert ax.get_ylim()[1] >= 5.0 and ax.yaxis.get_offset_text().get_text() == ""
    assert all(t.get_text().endswith("%") for t in ax.get_yticklabels() if t.get_text())


def test_search_plot_reads_losses_against_dense_when_the_report_has_it(tmp_path, figures):
    report = {**_search_report([0.01, 0.02, 0.03, 0.04], base=1.5), "dense_loss": 1.2}
    plots.search_plot(report, tmp_path / "dense.png")
    ax, = figures[0].axes
    ys = ax.lines[-1].get_ydata()
    assert abs(ys[0] - 25.0) < 1e-9 and abs(ys[-1] - 100 * (1.5 * 1.04 / 1.2 - 1)) < 1e-9
    assert "vs dense attention" in ax.get_ylabel()


def test_search_plot_without_flips_says_so(tmp_path, figures):
    report = SearchState("FSFS", 0.5, "data").report()  # already at the target: no flip, no loss
    assert plots.search_plot(report, tmp_path / "none.png").is_file()
    assert "no flips" in figures[0].axes[0].texts[0].get_text()


def test_distill_plot_marks_the_stage_switch_and_the_held_out_evaluations(tmp_path, figures):
    rows = [{"step": s, "stage": "dense" if s <= 6 else "sparse", "indexer_kl": 10.0 / s, "lm_loss": 2.0 - 0.01 * s}
            for s in range(1, 11)]
    before = {"lm_loss_dense": 1.9, "lm_loss_sparse": 2.3, "indexer_kl_dense": 9.0, "indexer_kl_sparse": 1.5}
    after = {"lm_loss_dense": 1.9, "lm_loss_sparse": 1.95, "indexer_kl_dense": 2.0, "indexer_kl_sparse": 0.3}
    path = plots.distill_plot(rows, tmp_path / "distill.png", switch_step=6, before=before, after=after,
                              title="indexer distillation, pattern FSFS")
    assert path.is_file() and path.stat().st_size > 0
    kl_ax, lm_ax = figures[0].axes
    for ax in (kl_ax, lm_ax):
        verticals = [line for line in ax.lines if list(line.get_xdata()) == [6, 6]]
        assert len(verticals) == 1, "the stage switch: one vertical line at step 6"
        assert any("dense -> sparse" in t.get_text() for t in ax.texts)
        held_out = [line for line in ax.lines if line.get_linestyle() == "None"]
        assert len(held_out) == 2 and all(list(line.get_xdata()) == [0, 10] for line in held_out)
    assert kl_ax.get_yscale() == "log"
    assert sorted(line.get_ydata()[0] for line in kl_ax.lines if line.get_linestyle() == "None") == [1.5, 9.0]
    # one stage only (no switch), no evaluations: still drawn
    figures.clear()
    plots.distill_plot(rows[:6], tmp_path / "warmup.png")
    assert not any(list(line.get_xdata()) == [6, 6] for ax in figures[0].axes for line in ax.lines)
