"""``sparse-index bench niah``: passkey / needle retrieval per length and depth, dense vs every selector."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, niah
from sparse_index_jax.cli.arguments import lengths, names, positive, report_out_help, report_path

METHODS = ("dense", "dsa", "hisa", "misa", "misa_h", "indexcache")
GRIDS = {  # fast: about 40 minutes on 2 CPU cores (each run compiles the model per length); full: for a GPU
    "fast": {"lengths": [1024, 2048], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 1},
    "full": {"lengths": [1024, 2048, 4096, 8192], "depths": [i / 10 for i in range(11)], "trials": 3},
}

DESCRIPTION = (
    "Needle in a haystack on SmolLM2-135M with DSA retrofitted: prompts of exactly N tokens (generated offline) "
    "hide a 5-digit key at a depth of the filler and ask for it at the end. A prompt counts as retrieved when "
    "every answer token is the model's argmax (equal to greedy decoding of the answer). Runs dense attention, "
    "DSA, HISA, MISA, MISA-H (the selectors of `bench fidelity`: HISA 4 x topk candidates, MISA a quarter of the "
    "indexer heads) and IndexCache at --keep (uniform; searched with --patterns-from; trained with "
    "--indexcache-indexers). Prints retrieval per length, writes JSON and a depth x length heatmap per method "
    "(lengths beyond the indexers' training length marked). --grid fast (default: 1K and 2K, 5 depths, 1 prompt "
    "per cell; about 40 minutes on 2 CPU cores, mostly compiling: each run compiles the model once per length) or "
    "full (1K-8K, 11 depths, 3 prompts per cell; for a GPU). The report is saved after every length.")


def _depths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1] like 0,0.5,1, got {text!r}")
    return values


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION)
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), an HF Llama / Qwen2 / Mistral folder "
                                                      "(with tokenizer.json) or a .gguf file: DSA retrofitted")
    p.add_argument("--indexers", default="shipped", help="'shipped' (default; SmolLM2's), 'fresh' or an indexers "
                                                         "file (refused if its shape does not fit the model)")
    p.add_argument("--task", choices=niah.TASKS, default="passkey",
                   help="passkey: repeated filler (LongLoRA's test); needle: varied generated sentences (RULER's "
                        "single needle). Default passkey")
    p.add_argument("--grid", choices=tuple(GRIDS), default="fast", help="preset lengths, depths and trials (above)")
    p.add_argument("--lengths", type=lengths, help="prompt lengths, e.g. 1K,2K,4K,8K (overrides --grid)")
    p.add_argument("--depths", type=_depths, help="needle depths in [0, 1], e.g. 0,0.5,1 (overrides --grid)")
    p.add_argument("--trials", **positive(default=None, help="prompts per cell, each with its own key (overrides "
                                                             "--grid)"))
    p.add_argument("--methods", type=names(METHODS, "method"), default=list(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (default all)")
    p.add_argument("--topk", **positive(default=256, help="keys kept per query (default 256)"))
    p.add_argument("--keep", type=float, default=0.25, help="IndexCache: share of layers keeping their indexer "
                                                            "(default 0.25: F every 4th layer)")
    p.add_argument("--patterns-from", help="a `bench fidelity --model smollm2` report: also run its searched "
                                           "IndexCache pattern at --keep")
    p.add_argument("--indexcache-indexers", help="indexers distilled with an IndexCache pattern (`sparse-index "
                                                 "distill --every 4`): also run them at their pattern")
    p.add_argument("--batch-size", **positive(default=1, help="prompts per forward pass (default 1)"))
    p.add_argument("--seed", type=int, default=0, help="keys and filler draws")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help=report_out_help("bench niah", spec.report))
    p.set_defaults(func=run, report=spec.report)


def _indexcache_runs(args: argparse.Namespace, model) -> dict[str, dict]:
    """The IndexCache rows: uniform at --keep, the searched pattern of a report, a trained indexers file."""
    from sparse_index_jax.layers.index_cache import IndexCacheConfig

    every = round(1 / args.keep)
    runs = {f"indexcache uniform 1/{every}": {"pattern": IndexCacheConfig.uniform(len(model.layers), every).pattern}}
    if args.patterns_from:
        from sparse_index_jax.bench.model_fidelity import read_searched_patterns

        searched = read_searched_patterns(args.patterns_from)
        match = [v for k, v in searched.items() if abs(k - args.keep) < 1e-9]
        if not match:
            raise ValueError(f"{args.patterns_from} holds searched patterns for keeps {sorted(searched)}, not "
                             f"{args.keep}")
        runs[f"indexcache searched 1/{every}"] = {"pattern": match[0]["pattern"]}
    if args.indexcache_indexers:
        from sparse_index_jax.bench.model_fidelity import trained_indexcache_run

        searched = [run["pattern"] for name, run in runs.items() if "searched" in name]
        name, run = trained_indexcache_run(model, args.indexcache_indexers, searched)
        runs[name] = run
    return runs


def run(args: argparse.Namespace) -> int:
    from sparse_index_jax import models
    from sparse_index_jax.bench import model_fidelity
    from sparse_index_jax.bench.reports import save_json
    from sparse_index_jax.models.retrofit import read_indexer_file, resolve_indexers

    if not 0 < args.keep < 1:
        raise ValueError(f"--keep must lie in (0, 1), got {args.keep}")
    grid = GRIDS[args.grid]
    out = report_path(args.out, "bench niah", args.report)
    print(f"writing to {out} (after every length)")
    setup = niah.NiahSetup(lengths=tuple(args.lengths or grid["lengths"]), depths=tuple(args.depths or grid["depths"]),
                           trials=args.trials or grid["trials"], task=args.task, batch_size=args.batch_size,
                           seed=args.seed)
    if models.family(args.model) != "llama":
        raise ValueError(f"--model {args.model}: bench niah runs a Llama-family model with DSA retrofitted")
    model, tokenizer = models.load(args.model, indexers=args.indexers, progress=not args.quiet)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: the prompts are tokenised; the folder has no tokenizer.json")
    model.cfg.check_length(max(setup.lengths))
    name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else f"{args.model} ({model.cfg.model_type})"
    path = resolve_indexers(args.indexers)
    info = read_indexer_file(path).info if path else {}
    ix = model.cfg.indexer
    selectors = model_fidelity.ModelFidelitySetup(topk=args.topk)
    model.set_selector(**selectors.selector("dsa").as_dict())
    runs: dict[str, dict] = {}
    for method in args.methods:
        if method == "dense":
            runs["dense"] = {"dense": True}
        elif method == "indexcache":
            runs.update(_indexcache_runs(args, model))
        else:
            runs[method] = {"selector": selectors.selector(method, ix.n_heads)}
    model_info = {"name": f"{name} + DSA retrofit", "indexers": str(path or args.indexers),
                  "indexer": {"n_heads": ix.n_heads, "head_dim": ix.head_dim, "rope_dim": ix.rope_dim}}
    print(f"{setup.task} retrieval, {name} + DSA ({args.indexers} indexers, {ix.n_heads} heads, trained at "
          f"{info.get('seq_len', '?')} tokens): lengths {list(setup.lengths)}, depths {list(setup.depths)}, "
          f"{setup.trials} prompt(s) per cell; runs: {', '.join(runs)}", flush=True)
    report = niah.run(model, tokenizer, setup, runs, train_seq_len=info.get("seq_len"), model_info=model_info,
                      progress=not args.quiet, log=print, after_length=lambda r: save_json(r, out))
    print()
    print(niah.format_table(report))
    json_path, png = niah.save(report, out)
    print(f"\nwrote {json_path}" + (f" and {png}" if png else " (matplotlib is not installed: no plot)"))
    return 0
