"""DSA scoring + exact top-k on GPU: Pallas kernels (Triton lowering), the ``triton`` implementation.

Two kernels per chunk of queries:

1. ``score_keys``: one program per block of ``bq`` queries. One tensor-core dot per block of ``bk``
   keys (M) against the ``bq * H`` head queries (N = 256 for H = 64, bq = 4) gives every head's
   logits; ReLU, the head weights and the sum over heads follow in float32 registers and the ranking
   key (``ranking.ordered_keys``: the int32 order of the scores) is written out. Key blocks
   past the causal limit of the block's last query are never visited: the causal half of the work is
   skipped, and [T, S, H] never exists.
2. ``radix_topk_rows`` (``radix_topk_triton.py``): exact top-k of each row's eligible prefix.

The winners (position order) are then ordered by key with a sort of k per row. Keys of a chunk live
in device memory between the two kernels: ``chunk * S * 4`` bytes, sized to ``chunk_bytes``.

The top-k needs gathers, scatters and prefix sums over per-thread data, which the Triton lowering
expresses directly; why Triton and not Mosaic GPU, and the measured speed of both kernels, are in
docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_index_jax.kernels.chunking import map_query_chunks, next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.inputs import matmul_dtype
from sparse_index_jax.kernels.radix_topk_triton import radix_topk_rows
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, ordered_keys, top_k_by_key
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def _score_kernel(limit_ref, q_ref, w_ref, k_ref, scale_ref, out_ref, *, bq: int, heads: int, bk: int):
    b, i = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bq, bq)
    q = q_ref[b, rows, :, :]                                   # [bq, H, d]
    q = q.reshape(bq * heads, q.shape[-1])
    w = w_ref[b, rows, :].reshape(1, bq, heads)                # float32
    n_blocks = (jnp.max(limit_ref[b, rows]) + bk - 1) // bk    # causal skip: only blocks someone sees

    def block(j, carry):
        keys = pl.ds(j * bk, bk)
        # Keys are the matmul's M and head queries its N: the sum over heads then runs along each
        # accumulator row (a few lanes apart), not across the register layout.
        k_blk = k_ref[b, keys, :]
        logits = jax.lax.dot_general(k_blk, q.astype(k_blk.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)   # [bk, bq*H], tensor cores
        logits = jnp.maximum(logits, 0.0).reshape(bk, bq, heads)
        scores = jnp.sum(logits * w, axis=2) * scale_ref[b, keys][:, None]  # [bk, bq]
        out_ref[b, rows, keys] = ordered_keys(scores).T
        return carry

    jax.lax.fori_loop(0, n_blocks, block, 0)


def score_keys(q: jax.Array, w: jax.Array, k: jax.Array, k_scale: jax.Array, limits: jax.Array, *,
               width: int, bk: int = DsaTritonBlockSizes.block_k, bq: int | None = None,
               num_warps: int = DsaTritonBlockSizes.num_warps, num_stages: int = DsaTritonBlockSizes.num_stages,
               interpret: bool | None = None) -> jax.Array:
    """int32 ranking keys [B, T, width] of every query against keys ``0 .. limits[b, t]`` (later columns
    are not written). q [B,T,H,d], w [B,T,H] f32, k [B,width,d], k_scale [B,width] f32, limits [B,T].
    q is cast to k's dtype in the kernel; float32 products use TF32 on GPU (HISA's block means).

    Shapes must already be kernel-friendly: H, d, bk powers of two, T a multiple of ``bq`` (default
    ``query_block(H)``), ``width`` a multiple of ``bk``.
    """
    B, T, H, d = q.shape
    bq = bq or query_block(H)
    if T % bq:
        raise ValueError(f"score_keys: T={T} must be a multiple of the query block {bq}")
    kernel = functools.partial(_score_kernel, bq=bq, heads=H, bk=bk)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, T, width), jnp.int32),
        grid=(B, T // bq),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=triton_interpret(interpret),
        name="dsa_score_keys",
    )(limits, q, w, k, k_scale)


def query_block(heads: int, head_queries: int = DsaTritonBlockSizes.head_queries) -> int:
    """Queries per scoring program: enough for ``head_queries`` head queries (the matmul's N)."""
    return max(1, head_queries // heads)


def kernel_layout(q, w, k, k_scale, *, tile: int, min_heads: int = 1):
    """Pads heads and head dim to powers of two (zero weights / zeros: scores unchanged; at least
    ``min_heads`` heads), keys to a multiple of ``tile``, and casts the matmul operands to one dtype
    (fp8 -> bf16 is exact)."""
    B, T, H, d = q.shape
    S = k.shape[1]
    dt = matmul_dtype(q, k)
    Hp, dp = max(min_heads, next_pow2(H)), max(16, next_pow2(d))
    width = round_up(S, tile)
    q = pad_axis(pad_axis(q.astype(dt), 2, Hp), 3, dp)
    w = pad_axis(w.astype(jnp.float32), 2, Hp)
    k = pad_axis(pad_axis(k.astype(dt), 1, width), 2, dp)
    scale = jnp.ones((B, S), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32)
    return q, w, k, pad_axis(scale, 1, width, 1.0), width


def order_by_key(keys: jax.Array, positions: jax.Array, topk: int, return_keys: bool):
    """Winners in position order (-1 padded) -> the contract's order: best key first, ties lower first."""
    sel = jnp.where(positions >= 0, jnp.take_along_axis(keys, jnp.maximum(positions, 0), axis=-1),
                    INELIGIBLE_KEY)
    slot, valid, sel_keys = top_k_by_key(sel, topk, return_keys=True)
    idx = jnp.where(valid, jnp.take_along_axis(positions, jnp.maximum(slot, 0), axis=-1), -1)
    return (idx, valid, sel_keys) if return_keys else (idx, valid)


def dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, *, topk: int, query_chunk: int, key_chunk: int,
                    return_keys: bool = False, block_sizes: DsaTritonBlockSizes | None = None,
                    chunk_bytes: int = 1 << 30, interpret: bool | None = None):
    """Same contract and result as ``dsa_topk_reference``. ``query_chunk``/``key_chunk`` shape the
    reference's memory; here queries go in chunks whose [chunk, S] int32 keys fit ``chunk_bytes``.
    ``block_sizes``: the kernels' tiles (None: ``DsaTritonBlockSizes()``). ``interpret``: None = as the
    platform says (``dispatch.triton_interpret``)."""
    del query_chunk, key_chunk
    return _dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, topk=topk, return_keys=return_keys,
                            block_sizes=block_sizes or DsaTritonBlockSizes(), chunk_bytes=chunk_bytes,
                            interpret=triton_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "return_keys", "block_sizes", "chunk_bytes", "interpret"))
def _dsa_topk_triton(q, k, w, k_scale, q_positions, kv_lengths, *, topk, return_keys, block_sizes, chunk_bytes,
                     interpret):
    B, T, H, d = q.shape
    S = k.shape[1]
    bs = block_sizes
    tile = min(bs.radix_tile, next_pow2(S))
    q, w, k, scale, width = kernel_layout(q, w, k, k_scale, tile=tile)
    bq = query_block(q.shape[2], bs.head_queries)
    limits = jnp.clip(jnp.minimum(q_positions + 1, kv_lengths[:, None]), 0, S).astype(jnp.int32)
    Tp = round_up(T, bq)  # padded query rows have limit 0: nothing eligible, pure padding
    q, w, limits = pad_axis(q, 1, Tp), pad_axis(w, 1, Tp), pad_axis(limits, 1, Tp)
    chunk = max(bq, min(Tp, chunk_bytes // (4 * B * width)) // bq * bq)

    def one_chunk(q_c, w_c, lim_c):
        keys = score_keys(q_c, w_c, k, scale, lim_c, width=width, bk=min(bs.block_k, tile), bq=bq,
                          num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=interpret)
        positions = radix_topk_rows(keys, lim_c, topk, tile=tile, bucket=bs.radix_bucket, interpret=interpret)
        return order_by_key(keys, positions, topk, return_keys)

    out = map_query_chunks(one_chunk, chunk, (q, 0), (w, 0), (limits, 0))
    return jax.tree.map(lambda x: x[:, :T], out)
