"""Selection fidelity of HISA, MISA and MISA-H against DSA on synthetic but structured activations.

The keys come in topic segments (contiguous runs drawn around one of a few cluster centres, as text
drifts from subject to subject), so block means carry real signal. Each query mixes its own topic
with an earlier one, with a different mix per head, so heads disagree and routing matters. Needles
are planted for a sample of queries: one earlier key aligned with that query's heads, which a good
selector must not lose. Random activations would say nothing: every key would look alike.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from sparse_index_jax.bench.reports import environment, save_json
from sparse_index_jax.bench.timing import time_call
from sparse_index_jax.selection import Selection, Selector, metrics


@dataclasses.dataclass(frozen=True)
class FidelitySetup:
    seq_len: int = 4096
    heads: int = 16
    head_dim: int = 64
    topk: int = 256
    queries: int = 512
    needles: int = 64
    topics: int = 24
    segment: int = 192
    seed: int = 0
    hisa_block: int = 64
    misa_block: int = 256
    misa_heads: int = 4

    def __post_init__(self):
        if not 0 < self.queries < self.seq_len:
            raise ValueError(f"FidelitySetup.queries must be in [1, seq_len - 1] = [1, {self.seq_len - 1}], "
                             f"got {self.queries}")
        if self.misa_heads > self.heads:
            raise ValueError(f"FidelitySetup.misa_heads={self.misa_heads} exceeds heads={self.heads}")

    @property
    def hisa_blocks(self) -> int:
        """HISA's paper ratio: m * B = 4 * topk candidates (64 x 128 for k = 2048)."""
        return max(4 * self.topk // self.hisa_block, -(-self.topk // self.hisa_block) + 1, 2)

    def methods(self) -> dict[str, Selector]:
        """Each method's selector at this setup (MISA-H keeps its default candidates, 4 * topk)."""
        return {
            "dsa": Selector("dsa", self.topk),
            "hisa": Selector.create("hisa", self.topk, block_size=self.hisa_block, num_blocks=self.hisa_blocks),
            "misa": Selector.create("misa", self.topk, block_size=self.misa_block, active_heads=self.misa_heads),
            "misa_h": Selector.create("misa_h", self.topk, block_size=self.misa_block, active_heads=self.misa_heads),
        }


def synthetic_activations(setup: FidelitySetup):
    """(q [1,Q,H,d], k [1,S,d], w [1,Q,H], query positions [Q], needle rows [N], needle positions [N])."""
    rng = np.random.default_rng(setup.seed)
    S, H, d, Q = setup.seq_len, setup.heads, setup.head_dim, setup.queries
    centres = rng.standard_normal((setup.topics, d))
    topic = rng.integers(0, setup.topics, -(-S // setup.segment)).repeat(setup.segment)[:S]
    k = centres[topic] + 0.7 * rng.standard_normal((S, d))

    positions = np.sort(rng.choice(np.arange(1, S), Q, replace=False)).astype(np.int32)
    earlier = topic[(rng.random(Q) * positions).astype(int)]
    mix = rng.uniform(0, 1, (H, 1))
    head_proj = np.eye(d) + 0.3 * rng.standard_normal((H, d, d)) / np.sqrt(d)
    base = mix[None] * centres[topic[positions]][:, None] + (1 - mix[None]) * centres[earlier][:, None]
    q = np.einsum("qhd,hed->qhe", base, head_proj) + 0.5 * rng.standard_normal((Q, H, d))
    w = np.abs(rng.standard_normal((Q, H))) * (rng.random((Q, H)) < 0.85) - 0.2 * (rng.random((Q, H)) < 0.15)

    # Needles: an earlier key pointing along the query's mean head direction, far from the query.
    far = np.flatnonzero(positions > setup.topk)
    rows = rng.choice(far, min(setup.needles, len(far)), replace=False)
    needle_pos = (rng.random(len(rows)) * (positions[rows] - setup.topk // 2)).astype(np.int32)
    for r, p in zip(rows, needle_pos):
        direction = q[r].mean(0)
        k[p] = 2.0 * direction / np.linalg.norm(direction) * np.sqrt(d)
    scale = (H ** -0.5) * (d ** -0.5)
    as32 = lambda x: jnp.asarray(x[None], jnp.float32)
    return as32(q), as32(k), as32(w * scale), positions, rows, needle_pos


def run(setup: FidelitySetup, progress=None) -> dict[str, Any]:
    """Selects with every method on the same activations; ``progress(method)`` is called before each."""
    q, k, w, positions, needle_rows, needle_pos = synthetic_activations(setup)
    selections: dict[str, Selection] = {}
    seconds: dict[str, float] = {}
    methods = setup.methods()
    for method, selector in methods.items():
        if progress:
            progress(method)
        timing, selections[method] = time_call(lambda q, k, w, s=selector: s.select(q, k, w, q_positions=positions),
                                               (q, k, w), repeats=1)
        seconds[method] = timing.median_ms / 1e3

    ref = selections["dsa"]
    regimes = {
        "all": np.ones(len(positions), bool),
        "t < topk (dense)": positions < setup.topk,
        f"t >= {setup.hisa_blocks * setup.hisa_block} (HISA prunes)": positions >= setup.hisa_blocks * setup.hisa_block,
    }
    results: dict[str, Any] = {}
    for method, sel in selections.items():
        idx = np.asarray(sel.indices[0])
        needle_hits = np.mean([p in idx[r] for r, p in zip(needle_rows, needle_pos)]) if len(needle_rows) else np.nan
        row = {"seconds": seconds[method], "needle_recall": float(needle_hits),
               "selector": methods[method].as_dict()}
        for name, mask in regimes.items():
            agreement = metrics.Agreement.of(sel, ref, jnp.asarray(mask)[None])
            row[name] = {"iou": agreement.iou, "recall": agreement.recall, "rows": agreement.rows}
        results[method] = row
    return {
        "benchmark": "selection fidelity vs DSA, synthetic structured activations",
        "setup": {**dataclasses.asdict(setup), "hisa_blocks": setup.hisa_blocks},
        "environment": environment(),
        "regimes": list(regimes),
        "methods": results,
    }


def format_table(report: dict[str, Any]) -> str:
    regimes = report["regimes"]
    header = ["method", *[f"IoU / recall [{r}]" for r in regimes], "needles",
              f"seconds ({report['environment']['platform']})"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for method, row in report["methods"].items():
        cells = [method] + [f"{row[r]['iou']:.3f} / {row[r]['recall']:.3f} ({row[r]['rows']})" for r in regimes]
        cells += [f"{row['needle_recall']:.2f}", f"{row['seconds']:.3f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def save(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    return save_json(report, path)
