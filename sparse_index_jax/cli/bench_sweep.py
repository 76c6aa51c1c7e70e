"""``sparse-index bench selector-sweep``: HISA / MISA / MISA-H agreement with DSA as their budgets grow."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, selector_sweep


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=selector_sweep.__doc__.split("\n\n")[1])
    p.add_argument("--out", default=spec.default_out, help=f"JSON report path (default {spec.default_out})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = selector_sweep.run(progress=lambda line: print(line, flush=True))
    print(selector_sweep.format_table(report))
    print(f"\nwrote {selector_sweep.save(report, args.out)}")
    return 0
