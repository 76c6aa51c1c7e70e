"""Roofline estimates of the Pallas TPU kernels, before anyone rents a pod: time >= max(FLOPs / peak, bytes / HBM).

FLOPs and HBM bytes follow each kernel's tiling (``sparse_index_jax.kernels.*.mosaic_tpu``), batch 1, causal
prefill T = S, and count only what the kernels move; VMEM-resident re-reads are free here. The
threshold search (32 compare-and-count passes over VMEM-resident rows) runs on the VPU, whose rate
Google does not publish: it is listed as element operations, not converted to time. Peaks are Google
Cloud's published per-chip figures (bf16 dense matmul, HBM bandwidth):

* TPU v5e: 197 TFLOP/s, 819 GB/s  (cloud.google.com/tpu/docs/v5e)
* TPU v5p: 459 TFLOP/s, 2,765 GB/s (cloud.google.com/tpu/docs/v5p)
* TPU v6e: 918 TFLOP/s, 1,640 GB/s (cloud.google.com/tpu/docs/v6e)

A roofline is a floor, not a forecast: real kernels reach some fraction of it (the GPU kernels here
reach 99% of the matmul peak for DSA scoring and about 30% for sparse MLA, see the README).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from sparse_index_jax.bench.reports import save_json
from sparse_index_jax.kernels.tpu_block_sizes import DSA_BLOCK_SIZES


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    tflops: float        # bf16 dense matmul, per chip
    hbm_gbps: float      # HBM bandwidth, per chip


CHIPS = {"v5e": Chip("TPU v5e", 197.0, 819.0), "v5p": Chip("TPU v5p", 459.0, 2765.0),
         "v6e": Chip("TPU v6e", 918.0, 1640.0)}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """DeepSeek-V3.2's indexer and MLA by default."""

    heads: int = 64            # indexer heads H
    head_dim: int = 128        # indexer d
    topk: int = 2048
    hisa_block: int = 128
    hisa_blocks: int = 64
    misa_heads: int = 8
    misa_block: int = 128
    mla_heads: int = 128
    mla_dk: int = 576
    mla_v: int = 512
    itemsize: int = 2          # bf16 q, k and cache rows


def op_costs(T: int, chip: str, s: Shapes = Shapes()) -> dict[str, dict[str, float]]:
    """FLOPs, HBM bytes and VPU element operations of each TPU kernel path for a causal prefill of T tokens."""
    blocks = DSA_BLOCK_SIZES[chip]
    bq = blocks.block_q  # key blocks stream once per query block, whatever their size
    pairs = T * (T + 1) / 2                      # causal (query, key) pairs
    q_bytes = T * s.heads * s.head_dim * s.itemsize
    # scoring: each query block streams the key blocks up to its causal limit once; keys int32 out, T x S
    streamed = sum(min(T, (i + 1) * bq) for i in range(-(-T // bq)))  # keys read over all query blocks
    score_bytes = q_bytes + streamed * s.head_dim * s.itemsize + 4 * T * T
    search = {"vpu_ops": 2 * 32 * T * T, "bytes": 4 * T * T}         # 32 passes, compare + add, VMEM-resident
    compaction = 4 * 4 * T * T                                        # XLA: compare, prefix sums, scatter reads
    dsa_flops = 2 * s.heads * s.head_dim * pairs
    dsa = {"flops": dsa_flops, "bytes": score_bytes + search["bytes"] + compaction, "vpu_ops": search["vpu_ops"]}

    M = -(-T // s.hisa_block)
    kept = min(s.hisa_blocks, M) * s.hisa_block
    block_pairs = T * (M + 1) / 2
    hisa_flops = 2 * s.heads * s.head_dim * (block_pairs + T * kept)
    hisa_bytes = (q_bytes + 4 * T * M * 3                           # block keys out, searched, compacted
                  + T * kept * s.head_dim * s.itemsize              # refinement: one DMA per kept block per query
                  + 4 * T * kept * 4)                               # candidate keys out, searched, compacted
    hisa = {"flops": hisa_flops, "bytes": hisa_bytes, "vpu_ops": 2 * 32 * T * (M + kept)}

    routing = 2 * s.heads * s.head_dim * T * (-(-T // s.misa_block) + 1) / 2
    misa_scan = 2 * s.misa_heads * s.head_dim * pairs
    misa = {"flops": routing + misa_scan,
            "bytes": T * s.misa_heads * s.head_dim * s.itemsize + streamed * s.head_dim * s.itemsize + 12 * T * T,
            "vpu_ops": search["vpu_ops"]}

    k_eff = sum(min(t + 1, s.topk) for t in range(T))                  # selected rows over all queries
    mla = {"flops": 2 * s.mla_heads * k_eff * (s.mla_dk + s.mla_v),
           "bytes": k_eff * s.mla_dk * s.itemsize + T * s.mla_heads * (s.mla_dk + s.mla_v) * s.itemsize,
           "vpu_ops": 0}
    return {"dsa": dsa, "hisa": hisa, "misa": misa, "sparse_mla": mla}


def estimate(lengths, chips=("v5p", "v6e"), shapes: Shapes = Shapes()) -> dict[str, Any]:
    rows = []
    for chip in chips:
        peak = CHIPS[chip]
        for T in lengths:
            for op, c in op_costs(T, chip, shapes).items():
                compute_ms = c["flops"] / (peak.tflops * 1e12) * 1e3
                memory_ms = c["bytes"] / (peak.hbm_gbps * 1e9) * 1e3
                rows.append({"chip": chip, "T": T, "op": op, "flops": c["flops"], "bytes": c["bytes"],
                             "vpu_ops": c["vpu_ops"], "intensity": c["flops"] / c["bytes"],
                             "compute_ms": compute_ms, "memory_ms": memory_ms,
                             "floor_ms": max(compute_ms, memory_ms),
                             "bound": "compute" if compute_ms >= memory_ms else "memory"})
    return {"benchmark": "roofline of the Pallas TPU kernels (estimate, not a measurement)",
            "chips": {c: dataclasses.asdict(CHIPS[c]) for c in chips}, "shapes": dataclasses.asdict(shapes),
            "block_sizes": {c: dataclasses.asdict(DSA_BLOCK_SIZES[c]) for c in chips}, "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    lines = ["| chip | T = S | op | TFLOP | GB | FLOP/byte | floor ms | bound |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['chip']} | {r['T'] // 1024}K | {r['op']} | {r['flops'] / 1e12:.2f} | "
                     f"{r['bytes'] / 1e9:.2f} | {r['intensity']:.0f} | {r['floor_ms']:.2f} | {r['bound']} |")
    return "\n".join(lines)


def save(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    return save_json(report, path)
