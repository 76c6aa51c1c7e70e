"""The benchmark harness, ``sparse_index_jax.bench`` (folder bench/): outside the core library, above it.

Each benchmark is a module with ``run(...) -> report`` (a JSON-able dict with its environment),
``format_table(report)`` and ``save(report, path)``; ``BENCHMARKS`` lists them and the command line
(``sparse-index bench NAME``) runs them. They share one timer (``timing.time_call``), one way to write
reports (``reports``) and the plots (``plots``). ``demo`` holds the measurements ``sparse-index demo``
prints; ``model_speed`` times a whole model stack (``sparse-index bench model``). A run writes its report to
--out, by default a fresh folder ``./sparse-index-runs/bench-NAME-YYYYMMDD-HHMMSS/``; the results of the GPU / TPU
runs quoted in the README are kept in the repository's ``bench/results/`` (not installed).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str          # the command: sparse-index bench NAME
    summary: str
    report: str        # the report's file name in the --out folder ({device}: the device kind)


BENCHMARKS = {b.name: b for b in (
    Benchmark("speed", "time DSA / HISA / MISA / MISA-H selection and sparse MLA against the plain XLA "
              "baseline and a matmul peak", "speed_{device}.json"),
    Benchmark("fidelity", "selection fidelity of HISA / MISA / MISA-H vs DSA on structured synthetic "
              "activations, or on SmolLM2 with --model smollm2", "fidelity_synthetic.json"),
    Benchmark("roofline", "roofline estimate of the Pallas TPU kernels on v5e / v5p / v6e (no TPU "
              "needed)", "roofline_tpu.json"),
    Benchmark("selector-sweep", "HISA / MISA / MISA-H agreement with DSA as their budgets grow "
              "(SmolLM2-135M, about 10 minutes on 2 CPU cores)", "smollm2_selector_sweep.json"),
    Benchmark("survivors", "how many keys the streaming DSA kernel's threshold lets into its buffer, on "
              "SmolLM2's real indexer scores (a CPU model)", "streaming_survivors_smollm2.json"),
    Benchmark("model", "prefill and decode time of a DeepSeek-V3.2-shaped stack under DSA / HISA / MISA / MISA-H "
              "and IndexCache 1/2, 1/4, with the selection / attention / rest shares",
              "model_{device}.json"),
    Benchmark("niah", "passkey / needle-in-a-haystack retrieval per prompt length and depth, dense vs every "
              "selector and IndexCache (SmolLM2-135M + DSA)", "niah_smollm2.json"),
    Benchmark("walk", "how much the HISA / MISA-H walks of the streaming kernel share between neighbouring "
              "queries, on SmolLM2's real indexer activations (a CPU FLOP model)",
              "walk_sharing_smollm2.json"),
)}
