"""``sparse-index bench fidelity``: selection fidelity vs DSA, synthetic or on SmolLM2 (``--model smollm2``)."""

from __future__ import annotations

import argparse
import pathlib

from sparse_index_jax.bench import Benchmark, fidelity, model_fidelity
from sparse_index_jax.cli.arguments import positive, report_out_help, report_path

DESCRIPTION = (
    "Without --model: scores HISA, MISA and MISA-H against DSA's exact top-k on synthetic activations with topic "
    "segments (so block means carry signal), head-specific query mixes (so routing matters) and planted needles; "
    "reports mean IoU and recall per method, overall and per regime, the needle recall, and seconds. With --model "
    "smollm2: the real model with DSA retrofitted, on held-out CPython sources; per layer the attention mass DSA's "
    "top-k covers against the best any shared key set can (the ceiling), HISA / MISA / MISA-H mass, IoU and recall "
    "vs DSA (MISA routing a quarter of the indexer heads), the IoU of DSA's selections between every pair of layers, "
    "DSA's share of the ceiling by query position (positions past the indexers' training length marked), then the "
    "held-out LM loss dense vs DSA vs each selector vs IndexCache patterns (uniform and greedy-searched) at 1/2 and "
    "1/4 of the layers, and optionally indexers distilled for an IndexCache pattern (--indexcache-indexers). Every "
    "figure is a mean over the held-out sequences with its standard error. JSON + PNG heatmaps.")


SMOLLM2_REPORT = "fidelity_smollm2.json"  # the report's name with --model smollm2


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION)
    p.add_argument("--model", default=None, help="measure on a real model (see above): 'smollm2', an HF Llama / "
                                                 "Qwen2 / Mistral folder (with tokenizer.json) or a .gguf file")
    p.add_argument("--indexers", default="shipped", help="with --model: 'shipped', 'fresh' or a weights file")
    p.add_argument("--seq-len", **positive(default=4096, help="keys per sequence (default 4096)"))
    p.add_argument("--topk", **positive(default=256, help="keys kept per query (default 256)"))
    p.add_argument("--sequences", **positive(default=8, help="with --model: held-out sequences, the n of the "
                                                              "standard errors (default 8)"))
    p.add_argument("--misa-fraction", type=fraction, default=0.25,
                   help="with --model: share of the indexer heads MISA / MISA-H route (default 0.25: 2 of 6)")
    p.add_argument("--misa-heads", **positive(default=None, help="with --model: route this many heads instead of "
                                                                 "--misa-fraction"))
    p.add_argument("--position-bins", **positive(default=4, help="with --model: query-position bins over [topk, "
                                                                 "seq-len) for DSA's share of the ceiling (default 4)"))
    p.add_argument("--search-batches", **positive(default=4, help="with --model: IndexCache search calibration "
                                                                  "batches of 2 x --search-seq-len (default 4)"))
    p.add_argument("--search-seq-len", **positive(default=1024, help="with --model: tokens per calibration sequence "
                                                                     "(default 1024)"))
    p.add_argument("--search-from", help="with --model: reuse the searched IndexCache patterns of an earlier report "
                                         "(JSON) instead of searching again")
    p.add_argument("--indexcache-indexers", metavar="FILE",
                   help="with --model: indexers distilled for an IndexCache pattern (sparse-index distill --every 4); "
                        "adds their held-out LM loss at that pattern as one more row")
    p.add_argument("--queries", **positive(default=512, help="synthetic: query rows scored (default 512)"))
    p.add_argument("--heads", **positive(default=16, help="synthetic: indexer heads (default 16)"))
    p.add_argument("--head-dim", **positive(default=64, help="synthetic: indexer head dim (default 64)"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help=report_out_help(
        "bench fidelity", f"{spec.report}; with --model smollm2 {SMOLLM2_REPORT} (another model: "
        f"fidelity_<its name>.json) and its PNG", plot=False))
    p.set_defaults(func=run, report=spec.report)


def fraction(text: str) -> float:
    """An argument type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        return run_smollm2(args)
    setup = fidelity.FidelitySetup(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, topk=args.topk,
                                   queries=args.queries, seed=args.seed)
    methods = setup.methods()
    print(f"selection fidelity vs DSA: {setup.queries} queries over {setup.seq_len} keys, {setup.heads} heads x "
          f"{setup.head_dim}; " + "; ".join(f"{s.method} {s.as_dict()}" for s in methods.values()))
    report = fidelity.run(setup, progress=lambda m: print(f"  running {m} ...", flush=True))
    print()
    print(fidelity.format_table(report))
    out = fidelity.save(report, report_path(args.out, "bench fidelity", args.report))
    print(f"\nwrote {out}")
    return 0


def run_smollm2(args: argparse.Namespace) -> int:
    setup = model_fidelity.ModelFidelitySetup(
        seq_len=args.seq_len, sequences=args.sequences, topk=args.topk, misa_fraction=args.misa_fraction,
        misa_heads=args.misa_heads, position_bins=args.position_bins, search_seq_len=args.search_seq_len,
        search_batches=args.search_batches, seed=args.seed)
    heads = model_fidelity.smollm2_indexer_heads(args.indexers)
    name = "SmolLM2-135M" if args.model == "smollm2" else args.model
    print(f"selection fidelity of {name} + DSA ({args.indexers} indexers, {heads} heads): {setup.sequences} "
          f"held-out sequences of {setup.seq_len} tokens (CPython sources); "
          + "; ".join(f"{m} {setup.selector(m, heads).as_dict()}" for m in ("dsa", *model_fidelity.SELECTORS))
          + f"; IndexCache keeps {list(setup.keeps)}"
          + (f" and trained {args.indexcache_indexers}" if args.indexcache_indexers else ""), flush=True)
    report = model_fidelity.smollm2_report(args.indexers, setup, search_from=args.search_from,
                                           indexcache_indexers=args.indexcache_indexers, progress=not args.quiet,
                                           log=print, model=args.model)
    print()
    print(model_fidelity.format_table(report))
    report_name = SMOLLM2_REPORT if args.model == "smollm2" else f"fidelity_{pathlib.Path(args.model).stem}.json"
    json_path, png_path = model_fidelity.save(report, report_path(args.out, "bench fidelity", report_name))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else " (matplotlib is not installed: no plot)"))
    return 0
