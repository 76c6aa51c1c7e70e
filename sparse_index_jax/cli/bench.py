"""``sparse-index bench``: the harness's benchmarks (``sparse_index_jax.bench.BENCHMARKS``), one sub-command each."""

from __future__ import annotations

from sparse_index_jax.bench import BENCHMARKS
from sparse_index_jax.cli import (
    bench_fidelity,
    bench_model,
    bench_niah,
    bench_roofline,
    bench_speed,
    bench_survivors,
    bench_sweep,
    bench_walk,
)

_COMMANDS = {"speed": bench_speed, "fidelity": bench_fidelity, "roofline": bench_roofline,
             "selector-sweep": bench_sweep, "survivors": bench_survivors, "model": bench_model, "niah": bench_niah,
             "walk": bench_walk}


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS),
                           description="Benchmarks. Each prints a table and writes a JSON report with its environment "
                                       "(and most a PNG) to --out: a .json path or a folder, by default a fresh "
                                       "folder ./sparse-index-runs/bench-NAME-YYYYMMDD-HHMMSS/ under the current "
                                       "directory.")
    commands = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, spec in BENCHMARKS.items():
        _COMMANDS[name].add_parser(commands, spec)
