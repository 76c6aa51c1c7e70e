"""Sparse MLA Triton tile sweep: every ``candidate_block_sizes()`` entry (and the backward's query chunk),
forward and forward + backward.

One process, DeepSeek's shape (Hq = 128, Dk = 576, v_dim = 512, k = 2048, bf16, indices random in [0, t]),
at one length (default 32K): per candidate the median ms of the forward and of ``jax.grad`` of the output
sum, their TFLOP/s and fraction of the bf16 matmul peak measured in the same run, and any failure
(a configuration that does not fit shared memory fails to compile on the GPU: recorded, the rest go on).
What the defaults of ``MlaTritonBlockSizes`` are chosen from; GPU only (on CPU the kernels interpret).

    python -m sparse_index_jax.bench.attention_sweep --length 32768 --out bench/results/mla_sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from sparse_index_jax.bench.reports import environment, failed_cell, save_json
from sparse_index_jax.bench.speed import BACKWARD_FACTOR, SpeedInputs, SpeedSetup, matmul_peak, mla_flops
from sparse_index_jax.bench.timing import time_call
from sparse_index_jax.cli.arguments import report_out_help, report_path
from sparse_index_jax.kernels.sparse_mla.triton import candidate_block_sizes, sparse_mla_triton


def run(length: int, repeats: int = 3, matmul_size: int = 8192, setup: SpeedSetup | None = None) -> dict:
    """The sweep's report; ``setup`` sets the shape (default ``SpeedSetup()``'s: DeepSeek's)."""
    setup = dataclasses.replace(setup or SpeedSetup(), lengths=(length,))
    q, kv, idx, valid = SpeedInputs(setup, length).mla()  # bench speed's sparse_mla inputs
    peak = matmul_peak(matmul_size, repeats, dtype=jnp.bfloat16)
    flops = mla_flops(length, setup)
    rows = []
    # Every candidate with the backward in chunks of 64 queries (the entry's default), then the default tiles
    # with chunks of 256 (fewer sorts and launches per call, 4x the chunk buffers), then two probes of overlap:
    # 64-row tiles double-buffered, over ``smem_estimate``'s forward formula (245,760 bytes) but perhaps not
    # over the limit (on sm_90 Triton may keep p, the value product's A operand, in registers; a compile
    # failure answers it), and 32 heads x 32 rows x 4 warps (~80 KB of shared memory, 128 accumulator
    # registers per thread): small enough for two programs per SM, whose gathers and products can interleave.
    default = candidate_block_sizes()[0]
    configs = [(bs, 64) for bs in candidate_block_sizes()]
    configs += [(default, 256), (dataclasses.replace(default, num_stages=2), 64),
                (dataclasses.replace(default, block_h=32, block_k=32, num_warps=4), 64)]
    for bs, chunk in configs:
        attend = lambda q, kv, idx, valid, bs=bs, chunk=chunk: sparse_mla_triton(
            q, kv, idx, valid, scale=setup.mla_dk ** -0.5, v_dim=setup.mla_v_dim, block_sizes=bs, query_chunk=chunk)
        grad = jax.grad(lambda *a, f=attend: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1))
        row = {"block_sizes": dataclasses.asdict(bs), "query_chunk": chunk}
        for name, fn, work in (("forward", attend, flops), ("forward_backward", grad, flops * (1 + BACKWARD_FACTOR))):
            try:
                t = time_call(fn, (q, kv, idx, valid), repeats)[0].as_dict()
                tflops = work / t["median_ms"] / 1e9
                row[name] = {**t, "tflops": tflops, "fraction_of_peak": tflops / peak["tflops"]}
            except Exception as err:  # noqa: BLE001  (recorded; the other candidates still run)
                row[name] = failed_cell(err)
        rows.append(row)
        print(row, flush=True)
    return {"benchmark": "sparse MLA Triton tile sweep", "environment": environment(), "length": length,
            "shape": {"heads": setup.mla_heads, "dk": setup.mla_dk, "v_dim": setup.mla_v_dim, "topk": setup.topk,
                      "dtype": "bfloat16"}, "matmul_peak": peak, "candidates": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=32768, help="T = S (default 32768)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help=report_out_help("bench attention-sweep", "mla_sweep.json", plot=False))
    args = p.parse_args()
    out = report_path(args.out, "bench attention-sweep", "mla_sweep.json")
    print(f"wrote {save_json(run(args.length, args.repeats), out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
