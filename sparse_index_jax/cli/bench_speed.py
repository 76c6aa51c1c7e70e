"""``sparse-index bench speed``: selection ops and sparse MLA against the plain XLA baseline, one process."""

from __future__ import annotations

import argparse

from sparse_index_jax.bench import Benchmark, speed
from sparse_index_jax.bench.reports import device_slug
from sparse_index_jax.cli.arguments import lengths, names, positive, report_out_help, report_path
from sparse_index_jax.kernels.dispatch import AUTO, IMPLEMENTATIONS

DESCRIPTION = """\
Times, in one process on the default device (GPU/TPU, or CPU for a smoke run with small
--lengths), for every T = S in --lengths (batch 1, causal prefill, fresh random inputs: bf16
q/k, fp32 head weights):
  naive_xla           the plain XLA baseline: einsum -> [T,S,H] fp32 -> ReLU -> head-weighted
                      sum -> causal mask -> lax.top_k. Recorded as "oom" without running when
                      T*S*H*4*2 bytes exceed the free device memory (or --memory-budget-gb), and
                      when it runs out of memory.
  dsa, hisa, misa,    the selection ops, scoring + top-k of the whole prefill. HISA/MISA get
  misa_h              their pooled block sums computed before the timed region.
  dsa_scoring         the Triton DSA scoring kernel alone ([T,S] int32 ranking keys, no top-k).
  sparse_mla          sparse MLA forward over k random causal indices per query;
  sparse_mla_fwd_bwd  jax.grad of its sum wrt q and kv; *_xla: the same with the gather-based
                      reference (the baseline, same process).
  sparse_gqa,         sparse GQA (the Llama retrofit) on a Llama-3-8B-shaped layer (--gqa-heads
  sparse_gqa_fwd_bwd  over --gqa-kv-heads of --gqa-head-dim), same indices; sparse_gqa_xla.
  dsa_decode,         one new token for each of --decode-batch sequences with lengths drawn in
  sparse_mla_decode   [S/2, S].
  matmul_peak         a bf16 NxN matmul (--matmul-size), the peak every TFLOP/s is divided by.
Each call is jitted and compiled first (compile time recorded apart), warmed up once, then run
--repeats times with block_until_ready: median and min ms. Any error or out-of-memory skips that
entry at that length with a one-line reason; the rest go on. --max-seconds skips what is left
once the budget is spent.

FLOPs (2 per multiply-add of the dot products; head sums, softmax, top-k not counted):
  naive_xla, dsa, causal work 2*H*d*T*(T+1)/2; also flops_square = 2*T*S*H*d (the whole
  dsa_scoring     square, the "effective TFLOP/s" of the naive baseline).
  hisa            per query t: 2*H*d*(blocks before t's block + candidate tokens <= t kept).
  misa            per query t: 2*H*d*(t//block + 1) routing + 2*A*d*(t+1) routed scan;
  misa_h          + 2*H*d*min(candidates, t+1) re-ranking.
  sparse_mla      2*Hq*k*(Dk+v_dim) per query; fwd_bwd = 3.5x (backward = 2.5x forward).
  sparse_gqa      2*Hq*k*2d per query; fwd_bwd = 3.5x.
Ratios from the same run: speedup of dsa over naive_xla, of hisa/misa/misa_h over dsa, of the
attention kernels over their *_xla references (baseline ms / entry ms), and every entry's
fraction of the matmul peak.

Output: a table (rows: entries, columns: lengths, cells: median ms; then the ratios), a JSON
report speed_<device-kind>.json (environment, setup, backend chosen per op with its reason,
per entry and length median/min/compile ms, FLOPs, TFLOP/s, shapes, skip reasons; ratios) and
a PNG next to it (time vs length; ratios vs length), in --out: by default a fresh folder
./sparse-index-runs/bench-speed-YYYYMMDD-HHMMSS/ under the current directory (a path ending in
.json names the report itself).
CPU smoke run: sparse-index bench speed --lengths 256,512 --topk 64"""


def add_parser(sub, spec: Benchmark) -> None:
    p = sub.add_parser(spec.name, help=spec.summary, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = speed.SpeedSetup()
    p.add_argument("--lengths", type=lengths, default=None,
                   help="comma-separated T = S values, K = 1024 (default 4K,8K,16K,32K,64K,128K)")
    p.add_argument("--entries", type=names(speed.ENTRIES, "entries"), default=None,
                   help="comma-separated subset of the entries above (default: all)")
    p.add_argument("--implementation", choices=(AUTO, *IMPLEMENTATIONS), default=AUTO,
                   help="implementation of every op (default auto; the choice of each op is recorded with its reason)")
    p.add_argument("--topk", **positive(default=d.topk, help=f"keys selected per query (default {d.topk})"))
    p.add_argument("--heads", **positive(default=d.heads, help=f"indexer heads H (default {d.heads})"))
    p.add_argument("--head-dim", **positive(default=d.head_dim, help=f"indexer head dim d (default {d.head_dim})"))
    p.add_argument("--hisa-block", **positive(default=d.hisa_block, help=f"HISA block size (default {d.hisa_block})"))
    p.add_argument("--hisa-blocks", **positive(default=d.hisa_blocks,
                                               help=f"HISA blocks kept (default {d.hisa_blocks})"))
    p.add_argument("--misa-block", **positive(default=d.misa_block,
                                              help=f"MISA/MISA-H block size (default {d.misa_block})"))
    p.add_argument("--misa-heads", **positive(default=d.misa_heads, help=f"MISA active heads (default {d.misa_heads})"))
    p.add_argument("--misa-candidates", **positive(default=None, help="MISA-H candidates re-ranked (default 4 * topk)"))
    p.add_argument("--mla-heads", **positive(default=d.mla_heads,
                                             help=f"sparse MLA query heads (default {d.mla_heads})"))
    p.add_argument("--mla-dk", **positive(default=d.mla_dk, help=f"sparse MLA row width Dk (default {d.mla_dk})"))
    p.add_argument("--mla-v-dim", **positive(default=d.mla_v_dim,
                                             help=f"sparse MLA value width (default {d.mla_v_dim})"))
    p.add_argument("--gqa-heads", **positive(default=d.gqa_heads,
                                             help=f"sparse GQA query heads (default {d.gqa_heads})"))
    p.add_argument("--gqa-kv-heads", **positive(default=d.gqa_kv_heads,
                                                help=f"sparse GQA KV heads (default {d.gqa_kv_heads})"))
    p.add_argument("--gqa-head-dim", **positive(default=d.gqa_head_dim,
                                                help=f"sparse GQA head dim (default {d.gqa_head_dim})"))
    p.add_argument("--decode-batch", **positive(default=d.decode_batch,
                                                help=f"decode sequences (default {d.decode_batch})"))
    p.add_argument("--repeats", **positive(default=None, help="timed runs (default 5; 2 on CPU)"))
    p.add_argument("--matmul-size", **positive(default=None,
                                               help="N of the bf16 NxN peak matmul (default 8192; 512 on CPU)"))
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="memory naive_xla may use, GiB (default: the device's free memory)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: entries not started when it is spent are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=report_out_help("bench speed", "speed_<device-kind>.json"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, report=spec.report)


def run(args: argparse.Namespace) -> int:
    setup = speed.SpeedSetup(
        lengths=tuple(args.lengths or speed.DEFAULT_LENGTHS), entries=tuple(args.entries or speed.ENTRIES),
        topk=args.topk, heads=args.heads, head_dim=args.head_dim, hisa_block=args.hisa_block,
        hisa_blocks=args.hisa_blocks, misa_block=args.misa_block, misa_heads=args.misa_heads,
        misa_candidates=args.misa_candidates, mla_heads=args.mla_heads, mla_dk=args.mla_dk, mla_v_dim=args.mla_v_dim,
        gqa_heads=args.gqa_heads, gqa_kv_heads=args.gqa_kv_heads, gqa_head_dim=args.gqa_head_dim,
        decode_batch=args.decode_batch, implementation=args.implementation, repeats=args.repeats,
        matmul_size=args.matmul_size,
        memory_budget_bytes=None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30),
        max_seconds=args.max_seconds, seed=args.seed)
    out = report_path(args.out, "bench speed", args.report.format(device=device_slug()))
    print(f"bench speed on {device_slug()}: T = S in {list(setup.lengths)}, top-k {setup.topk}, {setup.heads} indexer "
          f"heads x {setup.head_dim}, implementation {setup.implementation!r}", flush=True)
    report = speed.run(setup, progress=not args.quiet)
    print()
    print(speed.format_table(report))
    json_path, png_path = speed.save(report, out)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else " (matplotlib is not installed: no plot)"))
    return 0
