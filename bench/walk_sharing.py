"""How much work the selectors' listed walk shares between neighbouring queries, on real indexer activations.

HISA's refinement and MISA-H's re-rank run in the streaming DSA kernel as a *listed walk*
(``kernels/dsa_topk/triton.py``): a program of ``bq`` consecutive queries visits every key block of
``block_k`` keys that holds a unit of at least one of its queries (HISA: a kept block; MISA-H: a
candidate) and scores it with all heads for all of them. Its cost is therefore set by the UNION of
the program's queries' blocks: the fewer distinct blocks neighbours need, the less is scored. This
module counts, per program, on the activations of SmolLM2-135M's shipped DSA indexers over a held-out
sequence (CPU, no GPU needed):

* DSA's causal scan: ``ceil(last query's limit / block_k)`` key blocks per program, each scored for its
  ``bq`` queries;
* the merged walk: the union of the key blocks holding the program's queries' units (up to each query);
* ``sharing``: that union over the mean of the per-query counts: 1 when neighbours need the same
  blocks, ``bq`` when they share none;
* MISA-H's gathered walk (what it runs: one query per program, its own candidate rows only).

From them, in key-query pairs scored with every head (a FLOP model, not a timing): HISA's walk and its
block filter (block means before the own block) over DSA's scan; MISA-H's gathered walk, its routed
scan (``active_heads / H`` of DSA's) and its router (block means plus the own block's keys); and the
merged walk MISA-H would need, which is why it gathers. ``bq = 4`` models DeepSeek-V3.2 (64 heads: 256
head queries per program); SmolLM2's indexers have 6 heads.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from sparse_index_jax.bench.reports import environment, save_json


@dataclasses.dataclass(frozen=True)
class WalkSetup:
    seq_len: int = 8192
    topk: int = 256
    block_k: int = 64            # DsaTritonBlockSizes.block_k: the walk's key block
    program_queries: int = 4     # bq: DeepSeek-V3.2's 64 heads -> 4 queries per program
    hisa_block: int = 64
    hisa_blocks: int = 16        # m * B = 4 * topk, HISA's paper ratio
    misa_block: int = 1024
    misa_heads: int = 2          # of SmolLM2's 6 indexer heads
    candidates: int | None = None  # MISA-H; None: 4 * topk
    layer_stride: int = 5

    def __post_init__(self):
        for name in ("seq_len", "topk", "block_k", "program_queries", "hisa_block", "misa_block", "misa_heads",
                     "layer_stride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WalkSetup.{name} must be positive, got {getattr(self, name)}")
        if self.hisa_blocks < 2 or (self.hisa_blocks - 1) * self.hisa_block < self.topk:
            raise ValueError(f"WalkSetup: hisa_blocks={self.hisa_blocks} of {self.hisa_block} keys cannot hold "
                             f"topk={self.topk} (need (hisa_blocks - 1) * hisa_block >= topk)")
        if self.seq_len % self.program_queries:
            raise ValueError(f"WalkSetup.seq_len={self.seq_len} must be a multiple of program_queries="
                             f"{self.program_queries}")

    @property
    def misa_candidates(self) -> int:
        return self.candidates or 4 * self.topk


def key_blocks(positions: np.ndarray, limits: np.ndarray, block_k: int, bq: int) -> tuple[np.ndarray, np.ndarray]:
    """(union [programs], per query [T]) counts of distinct key blocks holding a listed key below the query's
    limit; ``positions`` [T, C] (-1: none), ``limits`` [T], queries in programs of ``bq`` consecutive rows."""
    T = positions.shape[0]
    n_blocks = -(-int(limits.max()) // block_k) + 1
    listed = np.zeros((T, n_blocks), bool)
    rows, cols = np.nonzero((positions >= 0) & (positions < limits[:, None]))
    listed[rows, positions[rows, cols] // block_k] = True
    return listed.reshape(T // bq, bq, n_blocks).any(axis=1).sum(axis=1), listed.sum(axis=1)


def hisa_positions(act, setup: WalkSetup) -> np.ndarray:
    """Each query's candidate positions [T, m * B] (the kept blocks' keys, -1 padding), as the reference keeps."""
    from sparse_index_jax.kernels.block_pooling import block_means, pool_block_sums
    from sparse_index_jax.kernels.hisa_topk.reference import candidate_positions

    T, S = act.q.shape[1], act.k.shape[1]
    lengths = jnp.full((1,), S, jnp.int32)
    means, counts = block_means(pool_block_sums(act.k, act.k_scale, lengths, setup.hisa_block), lengths,
                                setup.hisa_block)
    positions, ok = candidate_positions(act.q, act.w, means, counts, jnp.arange(T, dtype=jnp.int32)[None],
                                        block_size=setup.hisa_block, num_blocks=min(setup.hisa_blocks, means.shape[1]))
    return np.asarray(jnp.where(ok, positions, -1))[0]


def misa_h_positions(act, setup: WalkSetup) -> np.ndarray:
    """MISA-H's first-pass candidates [T, C] (-1 padding): the routed heads' top ``candidates``."""
    from sparse_index_jax.kernels.block_pooling import pool_block_sums
    from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference
    from sparse_index_jax.kernels.misa_topk.reference import routed_heads

    T, S = act.q.shape[1], act.k.shape[1]
    lengths = jnp.full((1,), S, jnp.int32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    q, w = routed_heads(act.q, act.w, act.k, act.k_scale, positions, lengths,
                        pool_block_sums(act.k, act.k_scale, lengths, setup.misa_block), block_size=setup.misa_block,
                        active_heads=setup.misa_heads, query_chunk=256)
    idx, _ = dsa_topk_reference(q, act.k, w, act.k_scale, positions, lengths, topk=setup.misa_candidates,
                                query_chunk=256, key_chunk=1024)
    return np.asarray(idx)[0]


def layer_report(act, setup: WalkSetup) -> dict[str, Any]:
    """Per method: keys scored (with every head) by each pass over DSA's causal scan, summed over the programs
    of one layer, the walk's sharing factor and the predicted speedup. MISA-H: the gathered walk it runs
    (each query scores its own candidates) and the merged walk it would run (shared whole key blocks)."""
    T = act.q.shape[1]
    H = act.q.shape[2]
    bk, bq = setup.block_k, setup.program_queries
    limits = np.arange(1, T + 1)
    dsa = np.ceil(limits.reshape(-1, bq).max(axis=1) / bk).sum() * bk * bq   # key-query pairs, all programs
    # A program scores whole tiles of bk keys (block means, own-block keys) for all its bq queries.
    per_program = lambda x: (np.ceil(x.reshape(-1, bq).max(axis=1) / bk) * bk).sum() * bq
    out: dict[str, Any] = {}
    for method, positions in (("hisa", hisa_positions(act, setup)), ("misa_h", misa_h_positions(act, setup))):
        union, own = key_blocks(positions, limits, bk, bq)
        merged = union.sum() * bk * bq / dsa
        sharing = float(union.sum() / own.reshape(-1, bq).mean(axis=1).sum())
        if method == "hisa":
            passes = {"walk": merged, "block_filter": per_program((limits - 1) // setup.hisa_block) / dsa}
        else:
            gathered = np.sum((positions >= 0) & (positions < limits[:, None])) / dsa
            own_keys = (limits - 1) % setup.misa_block + 1
            passes = {"walk": gathered, "routed_scan": setup.misa_heads / H,
                      "router": per_program(own_keys + (limits - 1) // setup.misa_block) / dsa}
            out["misa_h_merged_walk"] = {"walk_over_dsa": float(merged), "sharing": sharing}
            sharing = None  # the gathered walk shares nothing: each query scores its own rows
        total = sum(passes.values())
        out[method] = {**{f"{name}_over_dsa": float(v) for name, v in passes.items()}, "work_over_dsa": float(total),
                       "sharing": sharing, "predicted_speedup": float(1 / total)}
    return out


def run(setup: WalkSetup = WalkSetup(), indexers: str = "shipped", *, progress: bool = True,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The counts above on every ``layer_stride``-th layer of SmolLM2-135M (+ ``indexers``), one held-out sequence."""
    from sparse_index_jax.bench.model_fidelity import heldout_indexer_activations

    start = time.perf_counter()
    layers = {}
    for i, act in heldout_indexer_activations(setup.seq_len, indexers, layer_stride=setup.layer_stride,
                                              progress=progress):
        layers[str(i)] = layer_report(act, setup)
        if log:
            log(f"layer {i}: " + ", ".join(f"{m} walk/dsa {r['walk_over_dsa']:.3f}" for m, r in layers[str(i)].items()))
    first = next(iter(layers.values()))
    mean = {m: {key: None if first[m][key] is None else float(np.mean([lay[m][key] for lay in layers.values()]))
                for key in first[m]} for m in first}
    return {"benchmark": "walk", "environment": environment(),
            "setup": {**dataclasses.asdict(setup), "candidates": setup.misa_candidates}, "indexers": indexers,
            "layers": layers, "mean_over_layers": mean, "seconds": time.perf_counter() - start}


def format_table(report: dict[str, Any]) -> str:
    """Mean over layers, per method: the walk's keys and the other passes' over DSA's, sharing, predicted speedup."""
    s = report["setup"]
    lines = [f"{'method':>18} {'walk/dsa':>9} {'other passes/dsa':>17} {'work/dsa':>9} {'sharing':>8} "
             f"{'DSA / method':>13}"]
    for method, m in report["mean_over_layers"].items():
        if "work_over_dsa" not in m:  # the merged walk MISA-H does not run: its walk and sharing only
            lines.append(f"{method:>18} {m['walk_over_dsa']:>9.3f} {'':>17} {'':>9} {m['sharing']:>8.2f}")
            continue
        other = m["work_over_dsa"] - m["walk_over_dsa"]
        sharing = "-" if m["sharing"] is None else f"{m['sharing']:.2f}"
        lines.append(f"{method:>18} {m['walk_over_dsa']:>9.3f} {other:>17.3f} {m['work_over_dsa']:>9.3f} "
                     f"{sharing:>8} {m['predicted_speedup']:>12.2f}x")
    lines.append(f"(T = S = {s['seq_len']}, k = {s['topk']}, {s['program_queries']} queries per program, key blocks "
                 f"of {s['block_k']}; HISA {s['hisa_blocks']} blocks of {s['hisa_block']}; MISA-H {s['misa_heads']} "
                 f"heads, blocks of {s['misa_block']}, {s['candidates']} candidates. Key-query pairs scored with "
                 f"every head over DSA's: a FLOP model, not a timing. Sharing: distinct key blocks a program loads "
                 f"over its queries' mean, 1 = neighbours need the same blocks, {s['program_queries']} = none)")
    return "\n".join(lines)


def save(report: dict[str, Any], path: str) -> str:
    return str(save_json(report, path))
