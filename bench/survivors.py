"""How much the streaming DSA kernel's threshold prunes, on real indexer scores: a CPU model, no GPU needed.

The fused kernel (``kernels/dsa_topk/triton.py`` with ``kernels/streaming_topk_triton.py``) first probes a
long row's latest 2k keys for a starting threshold (their k-th largest key), then scores keys in blocks of
``bk`` in position order, and a key enters its query's buffer only if it is above the threshold. A
compaction (radix select over the buffer: 8 counting passes and one emitting pass) raises the threshold
to the k-th largest key seen whenever the next block could overflow the buffer's ``cap = 2k + bk``
slots (rounded up to the compaction tile). This module replays exactly that policy, per query, on the
scores of SmolLM2-135M's DSA indexers (the shipped ones) over held-out CPython sources, and counts per
query: keys scored, keys inserted, compactions, and the buffer entries the compactions and the probe
move. The same scores streamed without the probe show what it is worth: in position order (the first
version of the kernel), latest block first (the second), in a random order, and in increasing order
(the threshold never prunes). What it predicts for a GPU: the selection work of the fused kernel,
against the two-pass path, which writes every scored key and reads it in each radix pass.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from sparse_index_jax.bench.reports import environment, save_json
from sparse_index_jax.kernels import ranking
from sparse_index_jax.kernels.dsa_topk.triton import stream_buffer

# kernel: the probe, then position order; latest_first: no probe, latest block first (ties enter)
ORDERS = ("kernel", "position", "latest_first", "shuffled", "increasing")
_PASSES = 9  # a compaction reads the buffer 8 times (4-bit radix digits) and once more to emit


@dataclasses.dataclass(frozen=True)
class SurvivorSetup:
    seq_len: int = 4096
    topks: tuple[int, ...] = (64, 256, 1024)
    block_k: int = 64        # DsaTritonBlockSizes.block_k
    compaction_tile: int = 256  # DsaTritonBlockSizes.radix_tile
    query_stride: int = 4    # replay every 4th query
    layer_stride: int = 1    # and every layer
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "block_k", "compaction_tile", "query_stride", "layer_stride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SurvivorSetup.{name} must be positive, got {getattr(self, name)}")
        if not self.topks or min(self.topks) <= 0:
            raise ValueError(f"SurvivorSetup.topks must be positive ints, got {self.topks}")


def ordered_keys(scores: np.ndarray) -> np.ndarray:
    """``kernels.ranking.ordered_keys`` (the kernels' own ranking) as int64: room for the ineligible keys below."""
    return np.asarray(ranking.ordered_keys(jnp.asarray(scores, jnp.float32))).astype(np.int64)


def buffer_capacity(topk: int, block_k: int, tile: int) -> int:
    """The kernel's ``cap`` (``dsa_topk.triton.stream_buffer``)."""
    return stream_buffer(topk, block_k, tile)[1]


INELIGIBLE = np.iinfo(np.int64).min


def replay(keys: np.ndarray, topk: int, block_k: int, cap: int, *, ties_enter: bool = True,
           threshold: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The kernel's buffer policy on ranking ``keys`` [R, S] in stream order (``INELIGIBLE`` where a key
    is not eligible), all rows at once: per row, keys scored, inserted, compactions and compaction reads
    (buffer entries read). ``ties_enter``: a key equal to the threshold enters (the kernel: it streams
    positions downwards, where such a key wins the tie); else only keys above it (position order).
    ``threshold`` [R]: a starting threshold (default: none)."""
    R, S = keys.shape
    low = INELIGIBLE
    count, inserted, compactions, reads = (np.zeros(R, np.int64) for _ in range(4))
    thr = np.full(R, low, np.int64) if threshold is None else threshold.astype(np.int64).copy()

    def compact(rows, end):
        for r in rows:  # the k-th largest key seen so far (a rejected key is never above it)
            thr[r] = np.partition(keys[r, :end], -topk)[-topk]
        reads[rows] += _PASSES * count[rows]
        compactions[rows] += 1
        count[rows] = topk

    for j in range(-(-S // block_k)):
        compact(np.flatnonzero(count > cap - block_k), j * block_k)
        blk = keys[:, j * block_k:(j + 1) * block_k]
        take = ((blk >= thr[:, None]) if ties_enter else (blk > thr[:, None])) & (blk > low)
        count += take.sum(axis=1)
        inserted += take.sum(axis=1)
    compact(np.flatnonzero(count > topk), S)
    return {"scored": np.sum(keys > low, axis=1), "inserted": inserted, "compactions": compactions, "reads": reads,
            "probed": np.zeros(R, np.int64)}


def summarise(stats: dict[str, np.ndarray], topk: int) -> dict[str, float]:
    """Totals over the rows; buffer traffic in entries (8 bytes: key and position). A probe's keys are
    scored twice (``probe_share``) and written once and read by 8 radix passes."""
    rows = stats["scored"] > topk  # rows shorter than k keep everything: nothing to select
    scored = float(stats["scored"][rows].sum())
    if not rows.any():
        return {"rows": 0}
    return {"rows": int(rows.sum()), "scored": scored,
            "inserted_share": float(stats["inserted"][rows].sum()) / scored,
            "compactions_per_row": float(stats["compactions"][rows].mean()),
            # streaming: inserts written once, compactions' reads and writes (k each); two-pass: every key written
            # once and read by >= 2 radix passes (counting, emitting), the fewest it can do
            "stream_entries_per_key": float((stats["inserted"] + stats["reads"] + topk * stats["compactions"]
                                             + 9 * stats["probed"])[rows].sum()) / scored,
            "probe_share": float(stats["probed"][rows].sum()) / scored,
            "two_pass_entries_per_key_at_least": 3.0}


def stream_orders(keys: np.ndarray, limits: np.ndarray, block_k: int, rng: np.random.Generator):
    """{order: (keys in that stream order [R, S], ties_enter)} for rows whose first ``limits`` are eligible.
    ``latest_first``: the kernel's blocks of ``block_k`` keys aligned to positions, latest block first (the
    partial causal block, padded with ineligible keys, comes first)."""
    S = keys.shape[1]
    keys = np.where(np.arange(S)[None, :] < limits[:, None], keys, INELIGIBLE)

    def per_row(fn):
        streams = [fn(r, n) for r, n in zip(keys, limits)]
        return np.stack([np.concatenate([x, np.full(S - len(x), INELIGIBLE)]) for x in streams])

    width = lambda n: min(S, -(-n // block_k) * block_k)
    return {"latest_first": (per_row(lambda r, n: r[:width(n)][::-1]), True),
            "position": (keys, False),
            "shuffled": (per_row(lambda r, n: rng.permutation(r[:n])), False),
            "increasing": (per_row(lambda r, n: np.sort(r[:n])), False)}


def probe_threshold(keys: np.ndarray, limits: np.ndarray, topk: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's probe, per row: (a proven starting threshold, the k-th largest of the row's last
    ceil(2k / bk) key blocks minus one (keys equal to it still enter), or ``INELIGIBLE``; the keys the
    probe put in the buffer). Rows of at most twice that many blocks are not probed, as in the kernel."""
    thr, probed = np.full(len(keys), INELIGIBLE, np.int64), np.zeros(len(keys), np.int64)
    span_blocks = -(-2 * topk // block_k)
    for r, (row, n) in enumerate(zip(keys, limits)):
        blocks = -(-n // block_k)
        if blocks <= 2 * span_blocks:
            continue
        probe = row[(blocks - span_blocks) * block_k:n]
        probed[r] = len(probe)
        if len(probe) >= topk:
            thr[r] = np.partition(probe, -topk)[-topk] - 1
    return thr, probed


def layer_report(scores: np.ndarray, setup: SurvivorSetup, rng: np.random.Generator) -> dict[str, Any]:
    """All orders and k for one layer's scores [T, S] (causal: row t sees keys 0..t). ``kernel``: position
    order from the probe's threshold (its keys counted apart)."""
    T = scores.shape[0]
    rows = np.arange(setup.query_stride - 1, T, setup.query_stride)
    orders = stream_orders(ordered_keys(scores[rows]), rows + 1, setup.block_k, rng)
    out: dict[str, Any] = {}
    for order in ORDERS:
        keys, ties = orders["position" if order == "kernel" else order]
        out[order] = {}
        for k in setup.topks:
            thr, probed = probe_threshold(keys, rows + 1, k, setup.block_k) if order == "kernel" else (None, None)
            stats = replay(keys, k, setup.block_k, buffer_capacity(k, setup.block_k, setup.compaction_tile),
                           ties_enter=ties, threshold=thr)
            if order == "kernel":
                stats["probed"] = probed
            out[order][str(k)] = summarise(stats, k)
    return out


def run(setup: SurvivorSetup = SurvivorSetup(), indexers: str = "shipped", *, progress: bool = True,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Replays the policy on every layer of SmolLM2-135M (+ ``indexers``) over one held-out sequence."""
    from sparse_index_jax.bench.model_fidelity import heldout_indexer_activations
    from sparse_index_jax.kernels.dsa_topk import index_scores

    start = time.perf_counter()
    rng = np.random.default_rng(setup.seed)
    layers = []  # every ``layer_stride``-th layer
    for i, act in heldout_indexer_activations(setup.seq_len, indexers, layer_stride=setup.layer_stride,
                                              progress=progress):
        scores = np.asarray(index_scores(act.q, act.k, act.w, act.k_scale)[0], np.float32)
        layers.append(layer_report(scores, setup, rng))
        if log:
            log(f"layer {i}: inserted share (the kernel's order) "
                + ", ".join(f"k={k} {layers[-1]['kernel'][str(k)].get('inserted_share', 0):.3f}" for k in setup.topks))
    mean = {order: {str(k): {m: float(np.mean([lay[order][str(k)][m] for lay in layers]))
                             for m in ("inserted_share", "compactions_per_row", "stream_entries_per_key",
                                       "probe_share")}
                    for k in setup.topks} for order in ORDERS}
    return {"benchmark": "survivors", "environment": environment(), "setup": dataclasses.asdict(setup),
            "indexers": indexers, "layers": layers, "mean_over_layers": mean,
            "seconds": time.perf_counter() - start}


def format_table(report: dict[str, Any]) -> str:
    """Mean over layers, per key order and k: what share of scored keys the buffer takes, compactions per
    row, and buffer entries moved per scored key."""
    setup = report["setup"]
    lines = [f"{'order':>10} {'k':>6} {'inserted / scored':>18} {'compactions/row':>16} {'entries moved/key':>18} "
             f"{'probed / scored':>16}"]
    for order, per_k in report["mean_over_layers"].items():
        for k, m in per_k.items():
            lines.append(f"{order:>10} {k:>6} {m['inserted_share']:>18.3f} {m['compactions_per_row']:>16.2f} "
                         f"{m['stream_entries_per_key']:>18.2f} {m['probe_share']:>16.3f}")
    every = lambda n, what: f"every {what}" if n == 1 else f"every {n}th {what}"
    lines.append(f"(T = S = {setup['seq_len']}, causal, {every(setup['query_stride'], 'query')} of "
                 f"{every(setup['layer_stride'], 'layer')}; two-pass moves >= 3 entries per scored key: one write, "
                 ">= 2 radix reads)")
    return "\n".join(lines)


def save(report: dict[str, Any], path: str) -> str:
    return str(save_json(report, path))
