"""MISA and MISA-H on GPU: the ``triton`` implementation (same contract and result as the reference).

1. Router, in a kernel (``head_energies_triton``): one program per ``bq`` queries scores the float32
   block means before the queries' own blocks (one dot per tile of means, every head at once) and the
   own block's keys up to each query (one dot per key block: the dot form of the causal partial mean),
   and writes the energies [T, H]; picking the ``active_heads`` largest of H per query is XLA's.
2. The routed heads' flat scan: the fused streaming DSA kernel (``dsa_topk.triton``) on the
   ``active_heads`` routed query heads, so only routed work and k winners are paid; with few heads a
   program takes more queries (N = 256 head queries).
3. MISA-H: the routed scan keeps ``candidates`` keys in position order, and the same streaming kernel
   re-ranks them with ALL heads by its gathered walk (``units`` of one key): one query per program, its
   candidate rows gathered 64 at a time straight into its buffer (candidates touch most key blocks, so
   loading whole blocks would score nearly DSA's work: ``bench/walk_sharing.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_index_jax.kernels.block_pooling import block_means, last_eligible
from sparse_index_jax.kernels.chunking import next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.dsa_topk.triton import NO_UNIT, dsa_topk_triton, kernel_layout, program_queries
from sparse_index_jax.kernels.misa_topk.reference import gather_heads, heads_by_energy
from sparse_index_jax.kernels.ranking import relu
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def misa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk: int, block_size: int,
                     active_heads: int, candidates: int | None = None, query_chunk: int, key_chunk: int,
                     return_keys: bool = False, block_sizes: DsaTritonBlockSizes | None = None,
                     chunk_bytes: int = 1 << 30, interpret: bool | None = None):
    """(indices, valid[, keys]) as ``misa_topk_reference``; ``query_chunk``/``key_chunk`` are the
    reference's knobs, ``block_sizes`` the kernels' tiles (None: ``DsaTritonBlockSizes()``)."""
    del query_chunk, key_chunk
    return _misa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk,
                             block_size=block_size, active_heads=active_heads, candidates=candidates,
                             return_keys=return_keys, block_sizes=block_sizes or DsaTritonBlockSizes(),
                             chunk_bytes=chunk_bytes, interpret=triton_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "block_size", "active_heads", "candidates", "return_keys",
                                             "block_sizes", "chunk_bytes", "interpret"))
def _misa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, block_sums, *, topk, block_size, active_heads,
                      candidates, return_keys, block_sizes, chunk_bytes, interpret):
    energy = head_energies_triton(q, w, k, k_scale, q_positions, kv_lengths, block_sums, block_size=block_size,
                                  block_sizes=block_sizes, interpret=interpret)
    q_routed, w_routed = gather_heads(q, w, heads_by_energy(energy, active_heads))
    select = functools.partial(dsa_topk_triton, k=k, k_scale=k_scale, q_positions=q_positions,
                               kv_lengths=kv_lengths, query_chunk=0, key_chunk=0, block_sizes=block_sizes,
                               chunk_bytes=chunk_bytes, interpret=interpret)
    if candidates is None:
        return select(q_routed, w=w_routed, topk=topk, return_keys=return_keys)
    cand, ok = select(q_routed, w=w_routed, topk=candidates, position_order=True)  # the walk needs position order
    return select(q, w=w, topk=topk, return_keys=return_keys, units=jnp.where(ok, cand, NO_UNIT), unit=1)


def _router_kernel(last_ref, q_ref, w_ref, means_ref, k_ref, scale_ref, out_ref, *, bq: int, heads: int, bm: int,
                   bk: int, block_size: int):
    b, i = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bq, bq)
    q = q_ref[b, rows, :, :].reshape(bq * heads, q_ref.shape[-1])   # [bq*H, d]
    last = last_ref[b, rows]                                          # [bq]
    own = jnp.where(last >= 0, last // block_size, -1)
    start = own * block_size                                          # the own block's first key

    def logits_of(keys, dtype, n):  # ReLU-free per-head logits [n, bq, H] of n keys (keys the dot's M)
        dot = jax.lax.dot_general(keys, q.astype(dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return dot.reshape(n, bq, heads)

    def means_tile(j, acc):  # blocks fully before each query's own block, by their means
        ids = j * bm + jax.lax.iota(jnp.int32, bm)
        logits = relu(logits_of(means_ref[b, pl.ds(j * bm, bm), :], jnp.float32, bm))
        return acc + jnp.sum(jnp.where((ids[:, None] < own[None, :])[:, :, None], logits, 0.0), axis=0)

    def own_tile(j, acc):  # the own block's keys up to the query: sum of scale * (q . k)
        keys = pl.ds(j * bk, bk)
        positions = j * bk + jax.lax.iota(jnp.int32, bk)
        k_blk = k_ref[b, keys, :]
        logits = logits_of(k_blk, k_blk.dtype, bk) * scale_ref[b, keys][:, None, None]
        mine = (positions[:, None] >= start[None, :]) & (positions[:, None] <= last[None, :])
        return acc + jnp.sum(jnp.where(mine[:, :, None], logits, 0.0), axis=0)

    zeros = jnp.zeros((bq, heads), jnp.float32)
    energy = jax.lax.fori_loop(0, (jnp.max(own) + bm - 1) // bm, means_tile, zeros)
    first = jnp.min(jnp.where(last >= 0, start, jnp.iinfo(jnp.int32).max)) // bk  # past every key if none
    partial = jax.lax.fori_loop(first, (jnp.max(last) + bk) // bk, own_tile, zeros)
    count = jnp.maximum(last - start + 1, 1).astype(jnp.float32)
    own_logit = jnp.where((last >= 0)[:, None], relu(partial / count[:, None]), 0.0)
    out_ref[b, rows, :] = (energy + own_logit) * jnp.abs(w_ref[b, rows, :])


def head_energies_triton(q, w, k, k_scale, q_positions, kv_lengths, block_sums, *, block_size: int,
                         block_sizes: DsaTritonBlockSizes = DsaTritonBlockSizes(),
                         interpret: bool | None = None) -> jax.Array:
    """The router's energies [B, T, H] float32, as ``reference.head_energies``: a Pallas kernel (Triton
    lowering) per ``bq`` queries; work per query ``H * d * (own block + blocks before it)``, memory O(T * H)."""
    B, T, H, d = q.shape
    S = k.shape[1]
    bs = block_sizes
    means, _ = block_means(block_sums, kv_lengths, block_size)
    M = means.shape[1]
    bk = min(bs.block_k, max(16, next_pow2(S)))
    q, w, k, scale, _ = kernel_layout(q, w, k, k_scale, tile=bk)
    Hp, dp = q.shape[2:]
    bm = min(bs.block_k, max(16, next_pow2(M)))
    means = pad_axis(pad_axis(means, 1, round_up(M, bm)), 2, dp)
    bq = program_queries(Hp, T, bs.head_queries)
    Tp = round_up(T, bq)
    last = pad_axis(last_eligible(q_positions, kv_lengths), 1, Tp, -1)
    q, w = pad_axis(q, 1, Tp), pad_axis(w, 1, Tp)
    kernel = functools.partial(_router_kernel, bq=bq, heads=Hp, bm=bm, bk=bk, block_size=block_size)
    energy = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Tp, Hp), jnp.float32),
        grid=(B, Tp // bq),
        compiler_params=triton_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=triton_interpret(interpret),
        name="misa_router",
    )(last, q, w, means, k, scale)
    return energy[:, :T, :H]
