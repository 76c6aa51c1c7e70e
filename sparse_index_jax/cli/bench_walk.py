"""``sparse-index bench walk``: how much the selectors' walks share between neighbouring queries, on real scores."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, walk_sharing
from sparse_index_jax.cli.arguments import report_out_help, report_path

DESCRIPTION = (
    "Counts, on the activations of SmolLM2-135M's DSA indexers over one held-out sequence, what the streaming "
    "kernel's walks score per program of 4 consecutive queries (DeepSeek-V3.2's program): HISA's merged walk over "
    "the key blocks its queries kept (their union: 'sharing' 1 = neighbours need the same blocks, 4 = none), MISA-H's "
    "gathered walk over each query's candidates, and the merged walk MISA-H would need instead; with each method's "
    "other passes (HISA's block filter; MISA's router and routed scan), in key-query pairs scored with every head over "
    "DSA's causal scan, and the speedup that predicts (a FLOP model, not a timing). CPU only; about 10 minutes on 2 "
    "cores at the default 8K tokens.")


def add_parser(sub, spec: Benchmark) -> None:
    s = walk_sharing.WalkSetup
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION)
    p.add_argument("--seq-len", type=int, default=s.seq_len, help=f"tokens (default {s.seq_len})")
    p.add_argument("--topk", type=int, default=s.topk, help=f"k (default {s.topk})")
    p.add_argument("--program-queries", type=int, default=s.program_queries,
                   help=f"queries per program, bq (default {s.program_queries}: 64 heads, 256 head queries)")
    p.add_argument("--hisa-block", type=int, default=s.hisa_block, help=f"HISA block size (default {s.hisa_block})")
    p.add_argument("--hisa-blocks", type=int, default=s.hisa_blocks,
                   help=f"HISA blocks kept (default {s.hisa_blocks}: 4 * topk candidates)")
    p.add_argument("--misa-block", type=int, default=s.misa_block, help=f"MISA router block (default {s.misa_block})")
    p.add_argument("--misa-heads", type=int, default=s.misa_heads,
                   help=f"MISA heads routed of SmolLM2's 6 (default {s.misa_heads})")
    p.add_argument("--candidates", type=int, default=None, help="MISA-H candidates (default 4 * topk)")
    p.add_argument("--layer-stride", type=int, default=s.layer_stride,
                   help=f"every Nth layer (default {s.layer_stride})")
    p.add_argument("--indexers", default="shipped", help="'shipped' (default), 'fresh' or an indexers file")
    p.add_argument("--quiet", action="store_true", help="no loading bar")
    p.add_argument("--out", default=None, help=report_out_help("bench walk", spec.report, plot=False))
    p.set_defaults(func=run, report=spec.report)


def run(args: argparse.Namespace) -> int:
    out = report_path(args.out, "bench walk", args.report)
    setup = walk_sharing.WalkSetup(seq_len=args.seq_len, topk=args.topk, program_queries=args.program_queries,
                                   hisa_block=args.hisa_block, hisa_blocks=args.hisa_blocks,
                                   misa_block=args.misa_block, misa_heads=args.misa_heads,
                                   candidates=args.candidates, layer_stride=args.layer_stride)
    report = walk_sharing.run(setup, args.indexers, progress=not args.quiet, log=print)
    print(walk_sharing.format_table(report))
    print(f"\nwrote {walk_sharing.save(report, out)}")
    return 0
