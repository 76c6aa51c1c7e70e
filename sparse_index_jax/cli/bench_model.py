"""``sparse-index bench model``: prefill and decode of a DeepSeek-V3.2-shaped stack per selection configuration."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, model_speed
from sparse_index_jax.bench.reports import device_slug
from sparse_index_jax.cli.arguments import lengths, names, positive, report_out_help, report_path

DESCRIPTION = """\
Times, in one process on the default device, a stack of DeepSeek-V3.2 layers (the library's
DSAForCausalLM with random weights) under each selection configuration (--configs):
  dsa, hisa, misa, misa_h   every layer runs its own indexer with that selector
  index_cache_1/2, _1/4     DSA with an IndexCache pattern: every 2nd / 4th layer F (layer 0
                            always), the others S (no indexer: they reuse the F layer's top-k);
                            4 layers: FSFS, FSSS. --layers must make the ratio exact.
dsa is the baseline of the ratios (without it in --configs there are none).

Per context length T (--lengths, batch 1):
  prefill   the stack over T tokens, writing the caches (embedding and LM head not timed)
  decode    one new token for each of --decode-batch sequences holding the T-token context
            (the prefill's cache, copied per sequence; donated, updated in place)
  shares    of the stack's time: selection (layer 0's indexer + top-k, timed alone on its real
            inputs, x the F layers), attention (the sparse MLA call alone on DSA's selection,
            x the layers), rest (the remainder: projections, norms, FFN, cache writes)
  ratios    prefill and decode speedup of each configuration over dsa
Each call is jitted and compiled first (compile time recorded apart), warmed up once, then run
--repeats times with block_until_ready (median, min ms). Out of memory or an error skips that
measurement with a one-line reason (and what needs it); the rest goes on.

Presets: v32 (default): DeepSeek-V3.2's dimensions (hidden 7168, MLA 128 heads, q_lora 1536,
kv_lora 512, rope 64, nope 128, v 128; indexer 64 x 128, top-2048), bf16, 4 layers, T = 16K,
32K, 64K, 128K, decode batch 4, 2 repeats. Reduced: the layer count; the FFN is V3.2's dense
SwiGLU of width 18432 (= the MoE's 8 routed + 1 shared experts x 2048: the same FLOPs per
token) unless --ffn moe (the model's MoE with --routed-experts, default 32 of V3.2's 256: 256
would not fit an H200 beside the 128K activations). tiny: toy dimensions, float32, for CPU
checks of the plumbing (its times mean nothing).

Output: a table (per section: configurations x lengths), a JSON report model_<device-kind>.json
(environment, setup with shapes and dtypes, the backend of each op, per configuration / mode /
length the timing, the components, the shares and the ratios) and a PNG next to it (time vs
length, selection share vs length), in --out: by default a fresh folder
./sparse-index-runs/bench-model-YYYYMMDD-HHMMSS/ under the current directory (a path ending in
.json names the report itself).
Time on an H200 is mostly compiling: 23 programs per length (each configuration's prefill and
decode stack, each method's two selection components, the attention, layer 0's inputs), about
1.5 min per length; the runs add about a minute at 128K. Lengths run in the order given, so with
--max-seconds put the one that matters most first:
  sparse-index bench model --lengths 128K,64K,32K,16K --repeats 1 --max-seconds 540
  sparse-index bench model --lengths 128K --repeats 1                 # about 3 minutes
CPU smoke run: sparse-index bench model --preset tiny"""


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(model_speed.PRESETS), default="v32",
                   help="model dimensions and defaults: v32 (DeepSeek-V3.2, GPU) or tiny (CPU checks); default v32")
    p.add_argument("--lengths", type=lengths, default=None,
                   help="comma-separated context lengths T, K = 1024, each >= topk (default: the preset's; v32 "
                        "16K,32K,64K,128K, tiny 128,256)")
    p.add_argument("--layers", **positive(default=None, help="decoder layers (default 4); a multiple of 4 for "
                                                             "index_cache_1/4, of 2 for index_cache_1/2"))
    p.add_argument("--configs", type=names(model_speed.CONFIGS, "configs"), default=None,
                   help=f"comma-separated subset of {','.join(model_speed.CONFIGS)} (default: all)")
    p.add_argument("--decode-batch", **positive(default=None, help="decode sequences (default: v32 4, tiny 2)"))
    p.add_argument("--repeats", **positive(default=None, help="timed calls after the warm-up (default: v32 2, "
                                                              "tiny 1)"))
    p.add_argument("--ffn", choices=model_speed.FFNS, default="dense",
                   help="dense: V3.2's dense SwiGLU (the MoE's active width) in every layer (default); moe: the "
                        "model's MoE")
    p.add_argument("--routed-experts", **positive(default=None, help="routed experts with --ffn moe (default: v32 "
                                                                     "32, tiny 8)"))
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: measurements not started when it is spent are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=report_out_help("bench model", "model_<device-kind>.json"))
    p.add_argument("--quiet", action="store_true", help="no line per measurement")
    p.set_defaults(func=run, report=spec.report)


def run(args: argparse.Namespace) -> int:
    setup = model_speed.ModelSpeedSetup(
        preset=args.preset, lengths=tuple(args.lengths) if args.lengths else None, layers=args.layers,
        configs=tuple(args.configs or model_speed.CONFIGS), decode_batch=args.decode_batch, repeats=args.repeats,
        ffn=args.ffn, routed_experts=args.routed_experts, max_seconds=args.max_seconds, seed=args.seed)
    resolved = setup.resolved()
    out = report_path(args.out, "bench model", args.report.format(device=device_slug()))
    print(f"bench model on {device_slug()}: preset {resolved.preset}, {resolved.layers} layers, T in "
          f"{list(resolved.lengths)}, configurations {list(resolved.configs)}, FFN {resolved.ffn}, decode batch "
          f"{resolved.decode_batch}, {resolved.repeats} repeats", flush=True)
    report = model_speed.run(setup, log=None if args.quiet else lambda line: print(line, flush=True))
    print()
    print(model_speed.format_table(report))
    json_path, png_path = model_speed.save(report, out)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else " (matplotlib is not installed: no plot)"))
    return 0
