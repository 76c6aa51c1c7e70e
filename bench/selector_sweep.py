"""How HISA, MISA and MISA-H approach DSA on SmolLM2-135M as their budgets grow (candidate blocks, routed heads).

One held-out sequence of 4,096 tokens (CPython sources), every third layer, queries in the second half, top-256,
with the distilled indexers shipped in ``models/weights``. Per configuration and layer: (IoU, recall) against
DSA's selection from the same activations, and the attention mass it covers. About 10 minutes on 2 CPU cores:

    sparse-index bench selector-sweep        # writes bench/results/smollm2_selector_sweep.json
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax.numpy as jnp

from sparse_index_jax.bench.model_fidelity import dense_layer_outputs, row_mean
from sparse_index_jax.bench.reports import environment, save_json
from sparse_index_jax.models.retrofit import smollm2
from sparse_index_jax.selection import Selector, metrics
from sparse_index_jax.training.data import python_stdlib_files, read_tokens

SEQ_LEN, TOPK, EVERY_NTH_LAYER = 4096, 256, 3
# The sweep: each configuration by the options it sets (MISA-H's candidates default to 4 * topk = 1,024).
SWEEP: dict[str, list[dict[str, int]]] = {
    "hisa": [{"block_size": b, "num_blocks": m} for b, m in
             ((64, 16), (64, 32), (32, 32), (32, 64), (16, 64), (16, 128), (128, 16))],
    "misa": [{"block_size": b, "active_heads": h} for b, h in ((64, 2), (64, 3), (16, 2), (32, 2), (256, 2), (64, 4))],
    "misa_h": [{"block_size": 64, "active_heads": 2}, {"block_size": 64, "active_heads": 2, "candidates": 2048},
               {"block_size": 16, "active_heads": 2}, {"block_size": 64, "active_heads": 3}],
}


def label(method: str, options: dict[str, int]) -> str:
    """``hisa(block_size=64, num_blocks=16)``: a configuration's name in the report."""
    return f"{method}({', '.join(f'{k}={v}' for k, v in options.items())})"


def run(progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The sweep's report; ``progress`` gets a line after each layer."""
    model, tokenizer = smollm2(progress=False)
    tokens = read_tokens(python_stdlib_files("heldout"), tokenizer=tokenizer, eos_id=model.cfg.eos_token_id[0])
    positions = jnp.arange(SEQ_LEN, dtype=jnp.int32)[None]
    rows = positions >= SEQ_LEN // 2
    mean = lambda v: row_mean(v, rows)  # noqa: E731
    layers = {}
    for i, attn in enumerate(dense_layer_outputs(model, tokens[None, :SEQ_LEN])):
        if i % EVERY_NTH_LAYER:
            continue
        act, probs = attn.indexer, attn.probs
        ref = Selector("dsa", TOPK).select(act.q, act.k, act.w, q_positions=positions)
        row = {"dsa_mass": mean(metrics.attention_mass_recall(ref, probs))}
        for method, configs in SWEEP.items():
            for options in configs:
                sel = Selector.create(method, TOPK, **options).select(act.q, act.k, act.w, q_positions=positions)
                row[label(method, options)] = {"iou": mean(metrics.iou(sel, ref)),
                                               "recall": mean(metrics.recall(sel, ref)),
                                               "mass": mean(metrics.attention_mass_recall(sel, probs))}
        layers[i] = row
        if progress:
            progress(f"layer {i} done")
    return {"benchmark": "HISA / MISA / MISA-H agreement with DSA as their budgets grow (SmolLM2-135M)",
            "environment": environment(), "seq_len": SEQ_LEN, "topk": TOPK,
            "configs": "per layer and configuration: iou, recall vs DSA, attention mass covered", "layers": layers}


def format_table(report: dict[str, Any]) -> str:
    """Mean over the layers swept, one row per configuration."""
    layers = list(report["layers"].values())
    names = [k for k in layers[0] if k != "dsa_mass"]
    lines = [f"DSA attention mass: {sum(r['dsa_mass'] for r in layers) / len(layers):.3f}", "",
             "| configuration | IoU | recall | mass |", "|---|---|---|---|"]
    for name in names:
        iou, recall, mass = (sum(r[name][k] for r in layers) / len(layers) for k in ("iou", "recall", "mass"))
        lines.append(f"| {name} | {iou:.3f} | {recall:.3f} | {mass:.3f} |")
    return "\n".join(lines)


def save(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    return save_json(report, path)
