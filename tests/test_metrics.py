"""IoU / recall / attention-mass recall against plain Python set arithmetic, and the fidelity benchmark."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_index_jax import Selection
from sparse_index_jax.selection import metrics
from sparse_index_jax.cli import main


def random_selection(rng, B, T, S, k):
    idx = np.full((B, T, k), -1, np.int32)
    for b, t in np.ndindex(B, T):
        n = rng.integers(0, min(k, S) + 1)
        idx[b, t, :n] = rng.choice(S, n, replace=False)
    return Selection(jnp.asarray(idx), jnp.asarray(idx >= 0))


def test_iou_and_recall_match_sets():
    rng = np.random.default_rng(0)
    a, b = random_selection(rng, 2, 30, 12, 6), random_selection(rng, 2, 30, 12, 6)
    iou, rec = np.asarray(metrics.iou(a, b)), np.asarray(metrics.recall(a, b))
    for i, t in np.ndindex(2, 30):
        sa = set(np.asarray(a.indices[i, t]).tolist()) - {-1}
        sb = set(np.asarray(b.indices[i, t]).tolist()) - {-1}
        assert iou[i, t] == pytest.approx(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
        assert rec[i, t] == pytest.approx(len(sa & sb) / len(sb) if sb else 1.0)


def test_agreement_means_over_chosen_rows():
    a = Selection(jnp.array([[[0, 1], [2, -1]]], jnp.int32), jnp.array([[[True, True], [True, False]]]))
    b = Selection(jnp.array([[[0, 3], [2, -1]]], jnp.int32), jnp.array([[[True, True], [True, False]]]))
    everything = metrics.Agreement.of(a, b)
    assert everything.rows == 2 and everything.iou == pytest.approx((1 / 3 + 1) / 2)
    first = metrics.Agreement.of(a, b, jnp.array([[True, False]]))
    assert first.rows == 1 and first.recall == pytest.approx(0.5)
    assert [x.iou for x in metrics.per_layer([a, b], [a, b])] == [1.0, 1.0]


def test_attention_mass_recall():
    probs = jnp.array([[[0.5, 0.3, 0.2, 0.0]]])
    sel = Selection(jnp.array([[[0, 2, -1]]], jnp.int32), jnp.array([[[True, True, False]]]))
    assert float(metrics.attention_mass_recall(sel, probs)[0, 0]) == pytest.approx(0.7)
    per_head = jnp.stack([probs, jnp.array([[[0.0, 0.0, 0.0, 1.0]]])], axis=2)  # [B, T, H, S]
    assert float(metrics.attention_mass_recall(sel, per_head)[0, 0]) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="probs must be"):
        metrics.attention_mass_recall(sel, jnp.zeros((1, 2, 4)))


def test_bench_fidelity_cli(tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    assert main(["bench", "fidelity", "--seq-len", "1024", "--queries", "64", "--heads", "8", "--topk", "64",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == {"dsa", "hisa", "misa", "misa_h"}
    assert methods["dsa"]["all"]["iou"] == 1.0
    for name, row in methods.items():
        assert row["t < topk (dense)"]["iou"] == 1.0, name  # every selector is exact in the dense regime
        assert 0.3 < row["all"]["recall"] <= 1.0
    assert methods["misa_h"]["all"]["recall"] >= methods["misa"]["all"]["recall"]
    assert "IoU / recall" in capsys.readouterr().out
