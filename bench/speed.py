"""Speed of the selection ops and sparse MLA against the plain XLA baseline, measured in one process.

Every entry is one jitted call on fresh random inputs (normal q/k, bf16; fp32 head weights), timed by
the harness's one timer (``timing.time_call``: compilation apart as ``compile_ms``, one warm-up, then
``repeats`` calls; median and min in ms). Inputs the op would get from a cache (HISA/MISA pooled block
sums) are computed before the timed region. Method options default to ``METHODS``' (the registry).

Entries (T = S = the length, batch 1, causal, unless said):

* ``naive_xla``: the plain XLA baseline: einsum q[T,H,d].k[S,d] -> [T,S,H] fp32 -> ReLU ->
  weighted head sum with w[T,H] -> causal mask -> ``lax.top_k``. Skipped when ``T*S*H*4*2`` bytes exceed
  the free device memory; a run-time out-of-memory is recorded as ``oom``.
* ``dsa``, ``hisa``, ``misa``, ``misa_h``: the selection ops (``sparse_index_jax.kernels``), scoring + top-k
  of the whole prefill (on GPU: the fused streaming kernel).
* ``dsa_fp8``: ``dsa`` on the fp8 indexer's inputs (q and k quantised to e4m3 with one scale per vector,
  the q scale folded into w, the k scale per key), as DeepGEMM's ``fp8_mqa_logits`` takes them.
* ``dsa_two_pass``: ``dsa`` with ``DsaTritonBlockSizes(selection="two_pass")`` (scoring kernel, [T, S]
  keys, radix top-k, sort of k: the previous GPU path), whatever ``implementation`` says.
* ``dsa_sort_after``: the streaming kernel without its in-kernel ranking (winners in position order), then
  XLA's sort of k per row: what the kernel's k^2-comparison ranking is to beat.
* ``dsa_scoring``, ``dsa_scoring_fp8``: the Triton DSA scoring kernel alone (causal key blocks, ranking
  keys written to a [T, S] int32 buffer, no top-k), whatever ``implementation`` says (interpreted on CPU).
* ``sparse_mla``, ``sparse_mla_fwd_bwd``: sparse MLA prefill forward, and ``jax.grad`` of its sum wrt
  q and kv; indices random in [0, t] per query (duplicates for t < k), every slot valid.
  ``sparse_mla_xla``, ``sparse_mla_fwd_bwd_xla``: the same with ``implementation="xla"`` (the gather-based
  reference in query chunks): the baseline the kernels are compared with in the same process.
* ``sparse_gqa``, ``sparse_gqa_fwd_bwd``, ``sparse_gqa_xla``: sparse GQA (the Llama retrofit's attention) on a
  Llama-3-8B-shaped layer (``gqa_heads`` 32 query heads over ``gqa_kv_heads`` 8 KV heads of ``gqa_head_dim``
  128), the same indices; ``_xla`` is the reference.
* ``dsa_decode``, ``dsa_decode_fp8``, ``sparse_mla_decode``: one new token for each of ``decode_batch``
  sequences, each with its own length drawn in [S/2, S].
* ``key_cache_read``, ``key_cache_read_fp8``: one read of the decode key cache [decode_batch, S, d] (a sum
  over it), the memory floor decode selection is compared with.
* ``matmul_peak``, ``matmul_peak_fp8``: one large bf16 (e4m3 x e4m3 -> float32) matmul, the rooflines
  every entry's TFLOP/s is divided by (fp8 entries: by the fp8 one).

FLOPs (2 per multiply-add, dot products only; the head-weighted sums, softmax and top-k are not counted):

* DSA, ``dsa_scoring`` (and ``naive_xla``): the causal work ``2*H*d*T*(T+1)/2``; ``flops_square = 2*T*S*H*d`` (the
  "effective TFLOP/s" of the whole square) is reported too.
* HISA: per query t: ``2*H*d*(blocks fully before t's block + candidate tokens <= t in the kept blocks)``.
* MISA: per query t: ``2*H*d*(blocks before t's + own-block keys up to t)`` for the router, ``2*A*d*(t+1)`` for
  the routed scan;
  MISA-H adds ``2*H*d*min(candidates, t+1)`` for the re-ranking.
* sparse MLA forward: ``2*Hq*k*(Dk+v_dim)`` per query; forward+backward: 3.5x that (backward = 2.5x
  forward, the FlashAttention convention). Sparse GQA: ``2*Hq*k*2d`` per query, the same 3.5x.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparse_index_jax.bench.plots import length_axis, no_data, plain_log_y, pyplot, save_figure
from sparse_index_jax.bench.reports import (
    backend_choices,
    environment,
    error_line,
    failed_cell,
    length_label,
    not_timed_lines,
    save_json,
)
from sparse_index_jax.bench.timing import time_call
from sparse_index_jax.kernels import dsa_topk as dsa_topk_op
from sparse_index_jax.kernels import hisa_topk as hisa_topk_op
from sparse_index_jax.kernels import misa_topk as misa_topk_op
from sparse_index_jax.kernels import sparse_gqa as sparse_gqa_op
from sparse_index_jax.kernels import sparse_mla as sparse_mla_op
from sparse_index_jax.kernels.block_pooling import pool_block_sums
from sparse_index_jax.kernels.dsa_topk import dsa_topk
from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton, kernel_layout, score_keys
from sparse_index_jax.kernels.hisa_topk import HisaOptions, hisa_topk
from sparse_index_jax.kernels.misa_topk import MisaHOptions, MisaOptions, misa_topk
from sparse_index_jax.kernels.ranking import top_k_by_key
from sparse_index_jax.kernels.sparse_gqa import sparse_gqa
from sparse_index_jax.kernels.sparse_mla import sparse_mla
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes
from sparse_index_jax.layers.quantization import quantize_fp8

INDEXER_ENTRIES = ("naive_xla", "dsa", "dsa_fp8", "dsa_two_pass", "dsa_sort_after", "dsa_scoring", "dsa_scoring_fp8",
                   "hisa", "misa", "misa_h")
MLA_ENTRIES = ("sparse_mla", "sparse_mla_fwd_bwd", "sparse_mla_xla", "sparse_mla_fwd_bwd_xla", "sparse_gqa",
               "sparse_gqa_fwd_bwd", "sparse_gqa_xla")
DECODE_ENTRIES = ("dsa_decode", "dsa_decode_fp8", "key_cache_read", "key_cache_read_fp8", "sparse_mla_decode")
FP8_ENTRIES = ("dsa_fp8", "dsa_scoring_fp8", "dsa_decode_fp8")  # their fraction of peak: of the fp8 matmul's
ENTRIES = INDEXER_ENTRIES + MLA_ENTRIES + DECODE_ENTRIES
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
BACKWARD_FACTOR = 2.5  # backward FLOPs = 2.5 x forward (FlashAttention convention)

# (ratio name, numerator entry, denominator entry): a speedup is numerator time / denominator time.
SPEEDUPS = (("dsa_vs_naive_xla", "naive_xla", "dsa"), ("dsa_fp8_vs_naive_xla", "naive_xla", "dsa_fp8"),
            ("streaming_vs_two_pass", "dsa_two_pass", "dsa"), ("rank_in_kernel_vs_sort_after", "dsa_sort_after", "dsa"),
            ("hisa_vs_dsa", "dsa", "hisa"),
            ("sparse_mla_vs_xla", "sparse_mla_xla", "sparse_mla"),
            ("sparse_mla_fwd_bwd_vs_xla", "sparse_mla_fwd_bwd_xla", "sparse_mla_fwd_bwd"),
            ("sparse_gqa_vs_xla", "sparse_gqa_xla", "sparse_gqa"),
            ("misa_vs_dsa", "dsa", "misa"), ("misa_h_vs_dsa", "dsa", "misa_h"),
            # not speedups: decode selection time over the time to read the key cache once (target <= 1.5)
            ("cache_reads_per_dsa_decode", "dsa_decode", "key_cache_read"),
            ("cache_reads_per_dsa_decode_fp8", "dsa_decode_fp8", "key_cache_read_fp8"))


@dataclasses.dataclass(frozen=True)
class SpeedSetup:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    entries: tuple[str, ...] = ENTRIES
    topk: int = 2048
    heads: int = 64
    head_dim: int = 128
    hisa_block: int = HisaOptions.block_size
    hisa_blocks: int = HisaOptions.num_blocks
    misa_block: int = MisaOptions.block_size
    misa_heads: int = MisaOptions.active_heads
    misa_candidates: int | None = None  # None: MisaHOptions' default for topk
    mla_heads: int = 128
    mla_dk: int = 576
    mla_v_dim: int = 512
    gqa_heads: int = 32
    gqa_kv_heads: int = 8
    gqa_head_dim: int = 128
    decode_batch: int = 64
    implementation: str = "auto"
    repeats: int | None = None  # None: 5 on an accelerator, 2 on CPU
    matmul_size: int | None = None  # None: 8192 on an accelerator, 512 on CPU
    memory_budget_bytes: int | None = None  # None: the device's free memory
    max_seconds: float | None = None
    seed: int = 0

    def __post_init__(self):
        unknown = [e for e in self.entries if e not in ENTRIES]
        if unknown:
            raise ValueError(f"bench speed: unknown entries {unknown}; choose from {list(ENTRIES)}")
        if not self.lengths or min(self.lengths) <= 0:
            raise ValueError(f"bench speed: lengths must be positive, got {list(self.lengths)}")
        if self.misa_heads > self.heads:
            raise ValueError(f"bench speed: misa_heads={self.misa_heads} exceeds heads={self.heads}")
        if self.mla_v_dim > self.mla_dk:
            raise ValueError(f"bench speed: mla_v_dim={self.mla_v_dim} exceeds mla_dk={self.mla_dk}")
        if self.gqa_heads % self.gqa_kv_heads:
            raise ValueError(f"bench speed: gqa_heads={self.gqa_heads} is not a multiple of "
                             f"gqa_kv_heads={self.gqa_kv_heads}")

    def resolved(self) -> "SpeedSetup":
        """The setup with the platform-dependent defaults filled in."""
        cpu = jax.default_backend() == "cpu"
        return dataclasses.replace(
            self, repeats=self.repeats or (2 if cpu else 5), matmul_size=self.matmul_size or (512 if cpu else 8192),
            misa_candidates=MisaHOptions(candidates=self.misa_candidates).candidates_for(self.topk))


# ----------------------------------------------------------------------------------------------- FLOPs

def dsa_flops(T: int, H: int, d: int) -> int:
    return H * d * T * (T + 1)  # 2 * H * d * sum_{t<T} (t + 1)


def hisa_flops(T: int, H: int, d: int, block: int, num_blocks: int) -> int:
    t = np.arange(T, dtype=np.int64)
    before = t // block                                              # blocks fully before t's own block
    candidates = np.minimum(t + 1, (num_blocks - 1) * block + t % block + 1)
    return int(2 * H * d * np.sum(before + candidates))


def misa_flops(T: int, H: int, d: int, block: int, active: int, candidates: int | None) -> int:
    t = np.arange(T, dtype=np.int64)
    work = 2 * H * d * np.sum(t // block + t % block + 1) + 2 * active * d * np.sum(t + 1)  # router + routed scan
    if candidates is not None:
        work += 2 * H * d * np.sum(np.minimum(candidates, t + 1))
    return int(work)


def mla_flops(queries: int, setup: SpeedSetup) -> int:
    return 2 * queries * setup.mla_heads * setup.topk * (setup.mla_dk + setup.mla_v_dim)


def gqa_flops(queries: int, setup: SpeedSetup) -> int:
    return 2 * queries * setup.gqa_heads * setup.topk * 2 * setup.gqa_head_dim


# ------------------------------------------------------------------------------------------ the baseline

def naive_xla_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int):
    """The plain XLA formulation: q [T,H,d], k [S,d], w [T,H] -> (values, indices) [T, topk].

    Materialises the [T, S, H] float32 logits (and their ReLU): O(T*S*H) memory.
    """
    T, S = q.shape[0], k.shape[0]
    logits = jnp.einsum("thd,sd->tsh", q, k, preferred_element_type=jnp.float32)
    scores = jnp.einsum("tsh,th->ts", jax.nn.relu(logits), w.astype(jnp.float32))
    causal = jnp.arange(S)[None, :] <= (S - T + jnp.arange(T))[:, None]
    return jax.lax.top_k(jnp.where(causal, scores, -jnp.inf), min(topk, S))


def naive_bytes(T: int, S: int, H: int) -> int:
    return T * S * H * 4 * 2


def free_memory_bytes() -> int | None:
    """Free memory of the default device (accelerator allocator stats, else available host RAM)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------ timing

def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def matmul_peak(n: int, repeats: int, seed: int = 0, dtype=jnp.bfloat16) -> dict[str, Any]:
    """One n^3 matmul: bf16, or e4m3 x e4m3 with float32 accumulation (``dtype=jnp.float8_e4m3fn``)."""
    a, b = (jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
            for key in jax.random.split(jax.random.key(seed)))
    fn = lambda a, b: jax.lax.dot_general(a, b.T, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    row = time_call(fn, (a, b), repeats)[0].as_dict()
    flops = 2 * n ** 3
    return {"n": n, "dtype": jnp.dtype(dtype).name, **row, "flops": flops, "tflops": flops / row["median_ms"] / 1e9}


# ------------------------------------------------------------------------------------------------ inputs

class SpeedInputs:
    """Random inputs of one length, made on first use and shared by the entries of that length."""

    def __init__(self, setup: SpeedSetup, length: int):
        self.setup, self.length, self._cache = setup, length, {}
        self._key = jax.random.fold_in(jax.random.key(setup.seed), length)

    def _get(self, name: str, make):
        if name not in self._cache:
            self._cache[name] = make(jax.random.fold_in(self._key, len(self._cache)))
        return self._cache[name]

    def _indexer(self, name: str, batch: int, queries: int):
        """q [batch,queries,H,d] bf16, k [batch,S,d] bf16, w [batch,queries,H] fp32 (scaled by (H*d)^-0.5 like a
        real indexer)."""
        s, S = self.setup, self.length

        def make(key):
            kq, kk, kw = jax.random.split(key, 3)
            q = jax.random.normal(kq, (batch, queries, s.heads, s.head_dim), jnp.bfloat16)
            k = jax.random.normal(kk, (batch, S, s.head_dim), jnp.bfloat16)
            w = jax.random.normal(kw, (batch, queries, s.heads), jnp.float32) * (s.heads * s.head_dim) ** -0.5
            return q, k, w
        return self._get(name, make)

    def _mla(self, name: str, batch: int, queries: int, limit):
        """q [batch,queries,Hq,Dk] bf16, kv [batch,S,Dk] bf16, indices [batch,queries,k] random in [0, limit),
        valid all True."""
        s, S = self.setup, self.length

        def make(key):
            kq, kkv, ki = jax.random.split(key, 3)
            q = jax.random.normal(kq, (batch, queries, s.mla_heads, s.mla_dk), jnp.bfloat16)
            kv = jax.random.normal(kkv, (batch, S, s.mla_dk), jnp.bfloat16)
            idx = jax.random.randint(ki, (batch, queries, s.topk), 0, jnp.iinfo(jnp.int32).max) % limit
            return q, kv, idx, jnp.ones(idx.shape, bool)
        return self._get(name, make)

    def indexer(self):
        """Prefill: q [1,T,H,d], k [1,S,d], w [1,T,H] with T = S."""
        return self._indexer("indexer", 1, self.length)

    def indexer_fp8(self):
        """The prefill inputs as the fp8 indexer hands them over: e4m3 q and k, w * q_scale, k_scale [1, S]."""
        return self._get("indexer_fp8", lambda _: _as_fp8(*self.indexer()))

    def block_sums(self, block: int):
        _, k, _ = self.indexer()
        return self._get(f"sums{block}", lambda _: jax.block_until_ready(
            pool_block_sums(k, None, jnp.full((1,), k.shape[1], jnp.int32), block)))

    def mla(self):
        """Prefill: indices of query t random in [0, t]."""
        limit = jnp.arange(1, self.length + 1, dtype=jnp.int32)[None, :, None]
        return self._mla("mla", 1, self.length, limit)

    def gqa(self):
        """Prefill of a GQA layer: q [1,T,Hq,d], k and v [1,S,Hkv,d] bf16, the prefill MLA entries' indices."""
        s, S = self.setup, self.length
        _, _, idx, valid = self.mla()

        def make(key):
            kq, kk, kv = jax.random.split(key, 3)
            q = jax.random.normal(kq, (1, S, s.gqa_heads, s.gqa_head_dim), jnp.bfloat16)
            k = jax.random.normal(kk, (1, S, s.gqa_kv_heads, s.gqa_head_dim), jnp.bfloat16)
            v = jax.random.normal(kv, (1, S, s.gqa_kv_heads, s.gqa_head_dim), jnp.bfloat16)
            return q, k, v, idx, valid
        return self._get("gqa", make)

    def decode_lengths(self):
        s, S = self.setup, self.length
        return self._get("lengths", lambda key: jax.random.randint(key, (s.decode_batch,), max(S // 2, 1), S + 1))

    def decode_indexer(self):
        """One query per sequence of ``decode_batch``, with their valid lengths."""
        lengths = self.decode_lengths()  # first: the keys' fold-in order stays as it was
        return (*self._indexer("decode_indexer", self.setup.decode_batch, 1), lengths)

    def decode_indexer_fp8(self):
        q, k, w, lengths = self.decode_indexer()
        return (*self._get("decode_indexer_fp8", lambda _: _as_fp8(q, k, w)), lengths)

    def decode_mla(self):
        lengths = self.decode_lengths()
        return self._mla("decode_mla", self.setup.decode_batch, 1, lengths[:, None, None])


def _as_fp8(q, k, w):
    """(q8, k8, w * q_scale, k_scale): one e4m3 scale per vector, as ``layers.quantization.quantize_fp8``."""
    q8, q_scale = quantize_fp8(q)
    k8, k_scale = quantize_fp8(k)
    return jax.block_until_ready((q8, k8, w * q_scale, k_scale))


def _prepare(entry: str, setup: SpeedSetup, inputs: SpeedInputs) -> tuple[Callable, tuple, dict[str, Any]]:
    """(function to jit, its arguments, FLOPs/shape facts) for one entry at one length."""
    s, T = setup, inputs.length
    impl, H, d = s.implementation, s.heads, s.head_dim
    scale = s.mla_dk ** -0.5
    if entry in INDEXER_ENTRIES:
        q, k, w = inputs.indexer()
        facts = {"shapes": {"q": list(q.shape), "k": list(k.shape), "w": list(w.shape)},
                 "flops_square": 2 * T * T * H * d}
        if entry == "naive_xla":
            fn = lambda q, k, w: naive_xla_topk(q[0], k[0], w[0], topk=s.topk)
            return fn, (q, k, w), {**facts, "flops": dsa_flops(T, H, d), "estimated_bytes": naive_bytes(T, T, H)}
        if entry == "dsa":
            fn = lambda q, k, w: dsa_topk(q, k, w, topk=s.topk, implementation=impl)
            return fn, (q, k, w), {**facts, "flops": dsa_flops(T, H, d)}
        if entry == "dsa_fp8":
            fn = lambda q, k, w, scale: dsa_topk(q, k, w, topk=s.topk, k_scale=scale, implementation=impl)
            return fn, inputs.indexer_fp8(), {**facts, "flops": dsa_flops(T, H, d)}
        if entry == "dsa_two_pass":  # the Triton kernels whatever ``implementation`` says (interpreted on CPU)
            fn = lambda q, k, w: dsa_topk(q, k, w, topk=s.topk, implementation="triton",
                                          block_sizes=DsaTritonBlockSizes(selection="two_pass"))
            return fn, (q, k, w), {**facts, "flops": dsa_flops(T, H, d)}
        if entry == "dsa_sort_after":
            fn = lambda q, k, w: _sort_after(q, k, w, s.topk)
            return fn, (q, k, w), {**facts, "flops": dsa_flops(T, H, d)}
        if entry in ("dsa_scoring", "dsa_scoring_fp8"):
            args = (q, k, w) if entry == "dsa_scoring" else inputs.indexer_fp8()
            return _scoring_kernel(s, T), args, {**facts, "flops": dsa_flops(T, H, d)}
        if entry == "hisa":
            sums = inputs.block_sums(s.hisa_block)
            fn = lambda q, k, w, sums: hisa_topk(q, k, w, topk=s.topk, block_size=s.hisa_block,
                                                 num_blocks=s.hisa_blocks, block_sums=sums, implementation=impl)
            return fn, (q, k, w, sums), {**facts, "flops": hisa_flops(T, H, d, s.hisa_block, s.hisa_blocks)}
        sums = inputs.block_sums(s.misa_block)
        candidates = s.misa_candidates if entry == "misa_h" else None
        fn = lambda q, k, w, sums: misa_topk(q, k, w, topk=s.topk, active_heads=s.misa_heads,
                                             block_size=s.misa_block, candidates=candidates, block_sums=sums,
                                             implementation=impl)
        return fn, (q, k, w, sums), {**facts, "flops": misa_flops(T, H, d, s.misa_block, s.misa_heads, candidates)}

    if entry.startswith("sparse_mla"):
        q, kv, idx, valid = inputs.decode_mla() if entry == "sparse_mla_decode" else inputs.mla()
        mla_impl = "xla" if entry.endswith("_xla") else impl
        attend = lambda q, kv, idx, valid: sparse_mla(q, kv, idx, valid, scale=scale, v_dim=s.mla_v_dim,
                                                      implementation=mla_impl)
        facts = {"shapes": {"q": list(q.shape), "kv": list(kv.shape), "indices": list(idx.shape)},
                 "flops": mla_flops(q.shape[0] * q.shape[1], s), "implementation": mla_impl}
        return _with_backward(entry, attend, (q, kv, idx, valid), facts)
    if entry.startswith("sparse_gqa"):
        q, k, v, idx, valid = inputs.gqa()
        gqa_impl = "xla" if entry.endswith("_xla") else impl
        attend = lambda q, k, v, idx, valid: sparse_gqa(q, k, v, idx, valid, scale=s.gqa_head_dim ** -0.5,
                                                        implementation=gqa_impl)[0]
        facts = {"shapes": {"q": list(q.shape), "k": list(k.shape), "v": list(v.shape), "indices": list(idx.shape)},
                 "flops": gqa_flops(q.shape[1], s), "implementation": gqa_impl}
        return _with_backward(entry, attend, (q, k, v, idx, valid), facts)

    if entry in ("dsa_decode", "dsa_decode_fp8"):
        q, k, w, *scale, lengths = inputs.decode_indexer() if entry == "dsa_decode" else inputs.decode_indexer_fp8()
        fn = lambda q, k, w, lengths, *scale: dsa_topk(q, k, w, topk=s.topk, k_scale=(scale or [None])[0],
                                                       kv_lengths=lengths, implementation=impl)
        total = int(np.sum(np.asarray(lengths)))
        return fn, (q, k, w, lengths, *scale), {
            "shapes": {"q": list(q.shape), "k": list(k.shape), "w": list(w.shape)},
            "flops": 2 * H * d * total, "flops_square": 2 * H * d * q.shape[0] * T}
    if entry in ("key_cache_read", "key_cache_read_fp8"):
        k = inputs.decode_indexer()[1] if entry == "key_cache_read" else inputs.decode_indexer_fp8()[1]
        fn = lambda k: jnp.sum(k.astype(jnp.float32), axis=1)  # one pass over the cache, fused by XLA
        return fn, (k,), {"shapes": {"k": list(k.shape)}, "flops": 0, "bytes": k.size * k.dtype.itemsize}
    raise ValueError(f"bench speed: unknown entry {entry!r}")


def _with_backward(entry: str, attend: Callable, args: tuple, facts: dict[str, Any]):
    """(fn, args, facts) of an attention entry: the forward, or for ``*_fwd_bwd*`` the gradient of its sum wrt
    the float inputs (all but the last two: indices and valid), with the FLOPs scaled to forward + backward."""
    if "_fwd_bwd" not in entry:
        return attend, args, facts
    n = len(args) - 2
    fn = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=tuple(range(n)))
    return fn, args, {**facts, "flops": int(facts["flops"] * (1 + BACKWARD_FACTOR))}


def _sort_after(q, k, w, topk: int):
    """Streaming selection in position order, then ordered by key in XLA (a sort of k per row)."""
    T, S = q.shape[1], k.shape[1]
    positions = jnp.arange(T, dtype=jnp.int32)[None] + (S - T)
    idx, _, keys = dsa_topk_triton(q, k, w, None, positions, jnp.full((1,), S, jnp.int32), topk=topk, query_chunk=0,
                                   key_chunk=0, return_keys=True, position_order=True)
    slot, valid = top_k_by_key(keys, topk)
    return jnp.where(valid, jnp.take_along_axis(idx, jnp.maximum(slot, 0), axis=-1), -1), valid


def _scoring_kernel(s: "SpeedSetup", T: int) -> Callable:
    """The DSA scoring kernel alone over a causal prefill of T queries (no top-k); interpreted on CPU."""
    def fn(q, k, w, k_scale=None):
        q, w, k, scale, width = kernel_layout(q, w, k, k_scale, tile=DsaTritonBlockSizes().radix_tile)
        return score_keys(q, w, k, scale, jnp.arange(1, T + 1, dtype=jnp.int32)[None], width=width)
    return fn


# ----------------------------------------------------------------------------------------------- the run

def _backends(setup: SpeedSetup) -> dict[str, dict[str, str | None]]:
    """The implementation each op serves this benchmark's calls with (bf16 q), and why."""
    impl = setup.implementation
    return backend_choices({
        "dsa_topk": lambda: dsa_topk_op.backend_for(impl),
        "hisa_topk": lambda: hisa_topk_op.backend_for(impl, block_size=setup.hisa_block),
        "misa_topk": lambda: misa_topk_op.backend_for(impl),
        "sparse_mla": lambda: sparse_mla_op.backend_for(impl, q_dtype=jnp.bfloat16),
        "sparse_gqa": lambda: sparse_gqa_op.backend_for(impl, q_dtype=jnp.bfloat16)})


def run(setup: SpeedSetup, progress: bool = True) -> dict[str, Any]:
    """Times every entry at every length (each guarded), the matmul peak, and the ratios; returns the report."""
    setup = setup.resolved()
    started = time.perf_counter()
    tasks = [(T, e) for T in setup.lengths for e in setup.entries]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks) + 1, desc="bench speed", unit="entry", dynamic_ncols=True)

    def step(text: str):
        if bar is not None:
            bar.set_postfix_str(text)

    peaks = {}
    for name, dtype in (("bf16", jnp.bfloat16), ("fp8", jnp.float8_e4m3fn)):
        step(f"{name} matmul {setup.matmul_size}^3")
        try:
            peaks[name] = matmul_peak(setup.matmul_size, setup.repeats, setup.seed, dtype)
        except Exception as err:  # noqa: BLE001  (recorded, the rest still runs)
            peaks[name] = {"n": setup.matmul_size, "status": "skipped", "reason": error_line(err)}
    peak = peaks["bf16"]
    if bar is not None:
        bar.update()

    results: dict[str, dict[str, Any]] = {e: {} for e in setup.entries}
    for T in setup.lengths:
        inputs = SpeedInputs(setup, T)
        for entry in setup.entries:
            step(f"{entry} T={T}")
            elapsed = time.perf_counter() - started
            if setup.max_seconds is not None and elapsed > setup.max_seconds:
                cell = {"status": "skipped", "reason": f"time budget --max-seconds {setup.max_seconds:g} "
                                                       f"exceeded ({elapsed:.0f} s)"}
            elif entry == "naive_xla" and (too_big := _naive_too_big(setup, T)):
                cell = {"status": "oom", "reason": too_big}
            else:
                cell = _run_entry(entry, setup, inputs, peaks["fp8" if entry in FP8_ENTRIES else "bf16"])
            results[entry][str(T)] = cell
            if bar is not None:
                bar.update()
        del inputs  # free this length's arrays before the next
    if bar is not None:
        bar.close()

    return {
        "benchmark": "speed: selection ops and sparse MLA vs the plain XLA baseline, one process",
        "environment": environment(),
        "setup": {**dataclasses.asdict(setup),
                  "dtypes": {"q": "bfloat16", "k": "bfloat16", "w": "float32", "mla_q": "bfloat16",
                             "mla_kv": "bfloat16", "gqa_q, k, v": "bfloat16", "block_sums": "float32",
                             "fp8 entries": "q, k float8_e4m3fn (one scale per vector), k_scale and w float32"},
                  "batch": 1, "causal": True},
        "backends": _backends(setup),
        "flop_convention": {
            "all": "2 FLOPs per multiply-add of the dot products; head-weighted sums, softmax, top-k not counted",
            "naive_xla, dsa, dsa_scoring": "causal work 2*H*d*T*(T+1)/2; flops_square = 2*T*S*H*d (the whole square)",
            "hisa": "per query t: 2*H*d*(blocks fully before t's block + candidate tokens <= t in the kept blocks)",
            "misa": "per query t: 2*H*d*(t//block + t%block + 1) router (block means before t's block, own block "
                    "keys up to t) + 2*active_heads*d*(t+1) routed scan",
            "misa_h": "misa + 2*H*d*min(candidates, t+1) re-ranking",
            "sparse_mla": "2*Hq*k*(Dk+v_dim) per query",
            "sparse_mla_fwd_bwd": f"{1 + BACKWARD_FACTOR} x forward (backward = {BACKWARD_FACTOR} x forward)",
            "sparse_gqa": "2*Hq*k*2*d per query; sparse_gqa_fwd_bwd: the same 3.5 x",
            "dsa_decode": "2*H*d*sum(kv_lengths); sparse_mla_decode: 2*Hq*k*(Dk+v_dim) per sequence",
        },
        "matmul_peak": peak,
        "matmul_peak_fp8": peaks["fp8"],
        "results": results,
        "ratios": ratios(results, peak),
        "elapsed_s": time.perf_counter() - started,
    }


def _naive_too_big(setup: SpeedSetup, T: int) -> str | None:
    """Why ``naive_xla`` is not run at length T (its estimate exceeds the free memory or the budget), or None."""
    need = naive_bytes(T, T, setup.heads)
    if setup.memory_budget_bytes is not None:
        budget, what = setup.memory_budget_bytes, "the memory budget"
    else:
        budget, what = free_memory_bytes(), "the free device memory"
    if budget is None or need <= budget:
        return None
    return f"not run: estimated {_gib(need)} ([T,S,H] fp32 x2) exceeds {what}, {_gib(budget)}"


def _run_entry(entry: str, setup: SpeedSetup, inputs: SpeedInputs, peak: dict[str, Any]) -> dict[str, Any]:
    try:
        fn, args, facts = _prepare(entry, setup, inputs)
        row = time_call(fn, args, setup.repeats)[0].as_dict()
    except Exception as err:  # noqa: BLE001  (one line recorded; the other entries still run)
        return failed_cell(err)
    cell = {"status": "ok", **row, **facts, "tflops": facts["flops"] / row["median_ms"] / 1e9}
    if "bytes" in facts:
        cell["gb_per_s"] = facts["bytes"] / row["median_ms"] / 1e6
    if "flops_square" in facts:
        cell["tflops_square"] = facts["flops_square"] / row["median_ms"] / 1e9
    if peak.get("tflops") and facts["flops"]:
        cell["fraction_of_peak"] = cell["tflops"] / peak["tflops"]
    return cell


def ratios(results: dict[str, dict[str, Any]], peak: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Speedups (baseline ms / entry ms, > 1 = faster) and fractions of the matmul peak, per length."""
    out: dict[str, dict[str, float]] = {}
    for name, slow, fast in SPEEDUPS:
        a, b = results.get(slow, {}), results.get(fast, {})
        out[name] = {T: a[T]["median_ms"] / b[T]["median_ms"] for T in a
                     if a[T].get("status") == "ok" and b.get(T, {}).get("status") == "ok"}
    out["fraction_of_matmul_peak"] = {
        entry: {T: c["fraction_of_peak"] for T, c in cells.items() if "fraction_of_peak" in c}
        for entry, cells in results.items()}
    return out


# ------------------------------------------------------------------------------------------------ output

def format_table(report: dict[str, Any]) -> str:
    lengths = report["setup"]["lengths"]
    env = report["environment"]
    head = ["median ms", *[length_label(T) for T in lengths]]

    def peak_text(peak):
        return (f"{peak['tflops']:.3g} TFLOP/s ({peak['dtype']} {peak['n']}^3)" if "tflops" in peak
                else f"not measured: {peak.get('reason')}")

    lines = [f"{env['device_kind']} ({env['platform']}), jax {env['jax']}; matmul peak "
             f"{peak_text(report['matmul_peak'])}; fp8 peak {peak_text(report.get('matmul_peak_fp8', {}))} "
             f"(% of peak of {', '.join(FP8_ENTRIES)}: of the fp8 one)",
             " | ".join(head), " | ".join("---" for _ in head)]

    def cell(c):
        return f"{c['median_ms']:.3f}" if c.get("status") == "ok" else c.get("status", "-")

    for entry, cells in report["results"].items():
        lines.append(" | ".join([entry, *[cell(cells.get(str(T), {})) for T in lengths]]))
    lines.append("")
    for name, values in report["ratios"].items():
        if name == "fraction_of_matmul_peak":
            continue
        lines.append(" | ".join([f"speedup {name}", *[f"{values[str(T)]:.2f}x" if str(T) in values else "-"
                                                      for T in lengths]]))
    for entry, values in report["ratios"]["fraction_of_matmul_peak"].items():
        if values:
            lines.append(" | ".join([f"% of peak {entry}", *[f"{100 * values[str(T)]:.1f}%" if str(T) in values
                                                              else "-" for T in lengths]]))
    lines += not_timed_lines(report["results"].items())
    return "\n".join(lines)


def peak_note(report: dict[str, Any]) -> tuple[bool, str]:
    """(whether fractions of peak are worth showing, what the plot says about them). Only a peak measured on an
    accelerator counts: a CPU's bf16 matmul is no roofline (entries beat it, "% of peak" goes past 100)."""
    env, peak = report["environment"], report["matmul_peak"]
    if env["platform"] == "cpu":
        return False, "no % of peak on CPU: its bf16 matmul is no roofline"
    if "tflops" not in peak:
        return False, f"no % of peak: the matmul peak was not measured ({peak.get('reason', 'no result')})"
    fp8 = report.get("matmul_peak_fp8", {})
    rate = lambda p: f"{p['tflops']:,.0f}" if p["tflops"] >= 10 else f"{p['tflops']:.3g}"  # noqa: E731
    return True, (f"legend: % of the {peak['dtype']} matmul peak measured in this run, {rate(peak)} TFLOP/s"
                  + (f"\n(fp8 entries: of the fp8 one, {rate(fp8)} TFLOP/s)" if "tflops" in fp8 else ""))


def plot(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path | None:
    """Two panels against length (log-log): left, median ms per entry (selection solid, attention dashed, decode
    dotted), with its fraction of the matmul peak in the legend where a peak was measured on an accelerator;
    right, the ratios to the baseline timed in the same run (``SPEEDUPS``)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.6), dpi=120)
    colors = plt.get_cmap("tab10").colors  # one per entry of a group; the group by line style
    styles = ((INDEXER_ENTRIES, "-"), (MLA_ENTRIES, "--"), (DECODE_ENTRIES, ":"))
    show_peak, note = peak_note(report)
    fractions = report["ratios"].get("fraction_of_matmul_peak", {})
    for entry, cells in report["results"].items():
        pts = sorted((int(T), c["median_ms"]) for T, c in cells.items() if c.get("status") == "ok")
        if not pts:
            continue
        group, style = next(((g, s) for g, s in styles if entry in g), ((entry,), "-"))
        label, last = entry, str(pts[-1][0])
        if show_peak and last in fractions.get(entry, {}):
            label += f" ({100 * fractions[entry][last]:.0f}% of peak at {length_label(int(last))})"
        line, = left.plot(*zip(*pts), marker="o", markersize=3, linestyle=style, label=label,
                          color=colors[group.index(entry) % len(colors)])
        stopped = sorted(int(T) for T, c in cells.items() if c.get("status") != "ok" and int(T) > pts[-1][0])
        if stopped:  # where a line stops, and why (the table's "not timed" lines say it in full)
            left.annotate(cells[str(stopped[0])]["status"], pts[-1], textcoords="offset points", xytext=(4, -2),
                          fontsize=6, color=line.get_color())
    env = report["environment"]
    left.set(yscale="log", ylabel="median ms", title=f"{env['device_kind']}, jax {env['jax']}: median ms\n{note}")
    pairs = {name: (slow, fast) for name, slow, fast in SPEEDUPS}
    for name, values in report["ratios"].items():
        pts = sorted((int(T), v) for T, v in values.items()) if name in pairs else []
        if not pts:
            continue
        slow, fast = pairs[name]
        reads = name.startswith("cache_reads")  # not a speedup: decode selection time in key-cache reads
        right.plot(*zip(*pts), marker="o", markersize=3, linestyle=":" if reads else "-",
                   label=f"{slow} / {fast} (target <= 1.5)" if reads else f"{fast} vs {slow}")
    if right.get_legend_handles_labels()[0]:
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set(yscale="log", ylabel="baseline ms / ms (x)",
                  title="ratio to the baseline timed in this run: > 1 = faster than it\n"
                        "(dotted: decode selection over one read of the key cache, not a speedup)")
    else:
        no_data(right, "no ratios: no entry ran with its baseline in this run")
    lengths = sorted(int(T) for T in report["setup"]["lengths"])
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            length_axis(ax, lengths)
            plain_log_y(ax)
            ax.grid(alpha=0.35)
            ax.grid(alpha=0.1, which="minor")
            ax.legend(fontsize=7, ncol=2 if ax is left else 3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return save_figure(fig, path)


def save(report: dict[str, Any], path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Writes the JSON report and the PNG next to it (same name, .png); returns both paths."""
    out = save_json(report, path)
    return out, plot(report, out.with_suffix(".png"))
