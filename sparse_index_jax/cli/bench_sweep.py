"""``sparse-index bench selector-sweep``: HISA / MISA / MISA-H agreement with DSA as their budgets grow."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, selector_sweep
from sparse_index_jax.cli.arguments import report_out_help, report_path


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=selector_sweep.__doc__.split("\n\n")[1])
    p.add_argument("--out", default=None, help=report_out_help("bench selector-sweep", spec.report, plot=False))
    p.set_defaults(func=run, report=spec.report)


def run(args: argparse.Namespace) -> int:
    out = report_path(args.out, "bench selector-sweep", args.report)
    report = selector_sweep.run(progress=lambda line: print(line, flush=True))
    print(selector_sweep.format_table(report))
    print(f"\nwrote {selector_sweep.save(report, out)}")
    return 0
