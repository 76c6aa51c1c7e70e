"""How HISA, MISA and MISA-H approach DSA on SmolLM2-135M as their budgets grow (candidate blocks, routed heads).

One held-out sequence of 4,096 tokens (CPython sources), every third layer, queries in the second half, top-256,
with the distilled indexers shipped in ``models/weights``. Per configuration and layer: (IoU, recall) against
DSA's selection from the same activations, and the attention mass it covers. About 10 minutes on 2 CPU cores.

    python bench/smollm2_selector_sweep.py          # writes bench/results/smollm2_selector_sweep.json
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp

from models.retrofit import smollm2
from sparse_index_jax import metrics
from sparse_index_jax.data import python_stdlib_files, read_tokens
from sparse_index_jax.model_fidelity import dense_layer_outputs, row_mean
from sparse_index_jax.selection import select_topk

SEQ_LEN, TOPK = 4096, 256
CONFIGS = {  # method -> [(block_size, num_blocks | active_heads[, candidates])]
    "hisa": [(64, 16), (64, 32), (32, 32), (32, 64), (16, 64), (16, 128), (128, 16)],
    "misa": [(64, 2), (64, 3), (16, 2), (32, 2), (256, 2), (64, 4)],
    "misa_h": [(64, 2, 1024), (64, 2, 2048), (16, 2, 1024), (64, 3, 1024)],
}


def options(method: str, config: tuple) -> dict:
    if method == "hisa":
        return {"block_size": config[0], "num_blocks": config[1]}
    extra = {"candidates": config[2]} if method == "misa_h" else {}
    return {"block_size": config[0], "active_heads": config[1], **extra}


def main(out: str = "bench/results/smollm2_selector_sweep.json") -> None:
    model, tokenizer = smollm2(progress=False)
    tokens = read_tokens(python_stdlib_files("heldout"), tokenizer=tokenizer, eos_id=model.cfg.eos_token_id[0])
    positions = jnp.arange(SEQ_LEN, dtype=jnp.int32)[None]
    rows = positions >= SEQ_LEN // 2
    mean = lambda v: row_mean(v, rows)
    layers, start = {}, time.perf_counter()
    for i, attn in enumerate(dense_layer_outputs(model, tokens[None, :SEQ_LEN])):
        if i % 3:
            continue
        act, probs = attn.indexer, attn.probs
        ref = select_topk(act.q, act.k, act.w, topk=TOPK, q_positions=positions)
        row = {"dsa_mass": mean(metrics.attention_mass_recall(ref, probs))}
        for method, configs in CONFIGS.items():
            for config in configs:
                sel = select_topk(act.q, act.k, act.w, topk=TOPK, method=method, q_positions=positions,
                                  **options(method, config))
                row[f"{method}{config}"] = (mean(metrics.iou(sel, ref)), mean(metrics.recall(sel, ref)),
                                            mean(metrics.attention_mass_recall(sel, probs)))
        layers[i] = row
        print(f"layer {i} done, {time.perf_counter() - start:.0f} s", flush=True)
    report = {"environment": {"jax": jax.__version__, "backend": jax.default_backend()}, "seq_len": SEQ_LEN,
              "topk": TOPK, "configs": "hisa(block, blocks), misa(block, heads), misa_h(block, heads, candidates): "
                                       "(iou, recall, mass) vs DSA", "layers": layers}
    pathlib.Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
