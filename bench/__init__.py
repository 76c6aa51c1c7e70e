"""The benchmark harness, ``sparse_index_jax.bench`` (folder bench/): outside the core library, above it.

Each benchmark is a module with ``run(...) -> report`` (a JSON-able dict with its environment),
``format_table(report)`` and ``save(report, path)``; ``BENCHMARKS`` lists them and the command line
(``sparse-index bench NAME``) runs them. They share one timer (``timing.time_call``), one way to write
reports (``reports``) and the plots (``plots``). ``demo`` holds the measurements ``sparse-index demo``
prints; ``model_speed`` times a whole model stack (``sparse-index bench model``). Results of GPU / TPU runs
are kept in ``bench/results/``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str          # the command: sparse-index bench NAME
    summary: str
    default_out: str   # where the report goes unless --out says otherwise ({device}: the device kind)


BENCHMARKS = {b.name: b for b in (
    Benchmark("speed", "time DSA / HISA / MISA / MISA-H selection and sparse MLA against the plain XLA "
              "baseline and a matmul peak", "bench/results/speed_{device}.json"),
    Benchmark("fidelity", "selection fidelity of HISA / MISA / MISA-H vs DSA on structured synthetic "
              "activations, or on SmolLM2 with --model smollm2", "bench/results/fidelity_synthetic.json"),
    Benchmark("roofline", "roofline estimate of the Pallas TPU kernels on v5e / v5p / v6e (no TPU "
              "needed)", "bench/results/roofline_tpu.json"),
    Benchmark("selector-sweep", "HISA / MISA / MISA-H agreement with DSA as their budgets grow "
              "(SmolLM2-135M, about 10 minutes on 2 CPU cores)", "bench/results/smollm2_selector_sweep.json"),
    Benchmark("survivors", "how many keys the streaming DSA kernel's threshold lets into its buffer, on "
              "SmolLM2's real indexer scores (a CPU model)", "bench/results/streaming_survivors_smollm2.json"),
    Benchmark("model", "prefill and decode time of a DeepSeek-V3.2-shaped stack under DSA / HISA / MISA / MISA-H "
              "and IndexCache 1/2, 1/4, with the selection / attention / rest shares",
              "bench/results/model_{device}.json"),
    Benchmark("niah", "passkey / needle-in-a-haystack retrieval per prompt length and depth, dense vs every "
              "selector and IndexCache (SmolLM2-135M + DSA)", "bench/results/niah_smollm2.json"),
    Benchmark("walk", "how much the HISA / MISA-H walks of the streaming kernel share between neighbouring "
              "queries, on SmolLM2's real indexer activations (a CPU FLOP model)",
              "bench/results/walk_sharing_smollm2.json"),
)}
