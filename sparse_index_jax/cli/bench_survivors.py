"""``sparse-index bench survivors``: how much the streaming DSA kernel's threshold prunes on real scores."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, survivors
from sparse_index_jax.cli.arguments import lengths, report_out_help, report_path

DESCRIPTION = (
    "Replays the fused DSA kernel's candidate-buffer policy (a probe of a long row's latest 2k keys sets the "
    "starting threshold, their k-th largest key; then key blocks in position order, a key entering only above the "
    "threshold; a compaction, raising it, whenever the next block could overflow 2k + bk slots) on the scores of "
    "SmolLM2-135M's DSA indexers over one held-out sequence, every layer, causal. Also without the probe, in "
    "position order, latest block first, shuffled and increasing. Prints, per order and k, the share of scored keys "
    "inserted, compactions per row, buffer entries moved per scored key and the probe's share. CPU only; about 10 "
    "minutes on 2 cores at the default 4K tokens.")


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION)
    p.add_argument("--seq-len", type=int, default=survivors.SurvivorSetup.seq_len, help="tokens (default 4096)")
    p.add_argument("--topks", type=lengths, default=None, help="comma-separated k, K = 1024 (default 64,256,1024)")
    p.add_argument("--query-stride", type=int, default=4, help="replay every Nth query (default 4)")
    p.add_argument("--layer-stride", type=int, default=1, help="replay every Nth layer (default 1: all)")
    p.add_argument("--indexers", default="shipped", help="'shipped' (default), 'fresh' or an indexers file")
    p.add_argument("--quiet", action="store_true", help="no loading bar")
    p.add_argument("--out", default=None, help=report_out_help("bench survivors", spec.report, plot=False))
    p.set_defaults(func=run, report=spec.report)


def run(args: argparse.Namespace) -> int:
    out = report_path(args.out, "bench survivors", args.report)
    setup = survivors.SurvivorSetup(seq_len=args.seq_len, topks=tuple(args.topks or survivors.SurvivorSetup.topks),
                                    query_stride=args.query_stride, layer_stride=args.layer_stride)
    report = survivors.run(setup, args.indexers, progress=not args.quiet, log=print)
    print(survivors.format_table(report))
    print(f"\nwrote {survivors.save(report, out)}")
    return 0
