"""``sparse-index bench roofline``: the floor of each Pallas TPU kernel path, from its tiling (an estimate)."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, roofline
from sparse_index_jax.cli.arguments import lengths, names, report_out_help, report_path

DESCRIPTION = (
    "For DeepSeek-V3.2's shapes (64 indexer heads x 128, top-2048; HISA 64 blocks of 128; MISA 8 heads; sparse MLA "
    "128 heads, 576/512), batch 1, causal prefill T = S: FLOPs and HBM bytes of each Pallas TPU kernel path from its "
    "tiling, and the floor max(FLOPs / bf16 peak, bytes / HBM bandwidth) per chip, with whether compute or memory "
    "bounds it. Peaks: Google Cloud's per-chip figures (v5e 197 TFLOP/s, 819 GB/s; v5p 459, 2765; v6e 918, 1640). "
    "The threshold search's VPU work is listed as operations: its rate is not published.")


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION)
    p.add_argument("--lengths", type=lengths, default=None, help="T = S values, K = 1024 (default 8K,32K,128K)")
    p.add_argument("--chips", type=names(roofline.CHIPS, "TPU chips"), default=["v5p", "v6e"],
                   help="comma-separated of v5e, v5p, v6e (default v5p,v6e)")
    p.add_argument("--out", default=None, help=report_out_help("bench roofline", spec.report, plot=False))
    p.set_defaults(func=run, report=spec.report)


def run(args: argparse.Namespace) -> int:
    out = report_path(args.out, "bench roofline", args.report)
    report = roofline.estimate(args.lengths or [8192, 32768, 131072], args.chips)
    print("roofline of the Pallas TPU kernels (an estimate: max(FLOPs / peak, bytes / HBM), batch 1, causal "
          "prefill, DeepSeek-V3.2 shapes; peaks from Google Cloud's TPU pages)\n")
    print(roofline.format_table(report))
    print(f"\nwrote {roofline.save(report, out)}")
    return 0
