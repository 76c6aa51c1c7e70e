"""Sparse MLA on TPU: attention over the selected latent rows, fetched by DMA (prefill and decode alike).

One grid step per query (batch x query): the selection's row ids are scalar-prefetched into SMEM, the
cache stays in HBM (``memory_space=ANY``), and each chunk of ``block_k`` selected rows is gathered by
``block_k`` row DMAs into a VMEM buffer, started together and awaited together. The step then runs
[Hq, Dk] x [Dk, block_k] on the MXU, an online softmax over the chunks (running max, sum, and the
[Hq, v_dim] accumulator in float32), and writes [Hq, v_dim]. Work O(T * k); the cache is never read
beyond the selected rows.

Queries are processed ``query_chunk`` at a time, so the prefetched ids ([B, chunk, k] int32) fit in SMEM.
Differentiable: the backward pass is the reference's (``custom_vjp``), recomputed chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import map_query_chunks, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import mosaic_tpu_interpret
from sparse_index_jax.kernels.sparse_mla.reference import sparse_mla_reference
from sparse_index_jax.kernels.tpu_block_sizes import SUBLANES


@dataclasses.dataclass(frozen=True)
class MlaTpuBlockSizes:
    """``block_k`` selected rows gathered per DMA round (a multiple of 8 sublanes); ``query_chunk`` queries
    per kernel call (their row ids are prefetched to SMEM: ``4 * B * query_chunk * k`` bytes)."""

    block_k: int = 64
    query_chunk: int = 16

    def check(self) -> "MlaTpuBlockSizes":
        if self.block_k <= 0 or self.block_k % SUBLANES:
            raise ValueError(f"MlaTpuBlockSizes.block_k={self.block_k}: must be a positive multiple of {SUBLANES}")
        if self.query_chunk <= 0:
            raise ValueError(f"MlaTpuBlockSizes.query_chunk={self.query_chunk}: must be positive")
        return self


def _kernel(idx_ref, q_ref, valid_ref, kv_hbm, out_ref, rows, sems, *, block_k: int, chunks: int, scale: float,
            v_dim: int):
    from jax.experimental import pallas as pl  # noqa: PLC0415
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    b, t = pl.program_id(0), pl.program_id(1)
    q = q_ref[0, 0]                                                       # [Hq, Dk]
    heads = q.shape[0]

    def one_chunk(c, carry):
        m, l, acc = carry
        copies = []
        for j in range(block_k):  # gather: one row DMA per selected slot, all in flight at once
            row = jnp.maximum(idx_ref[b, t, c * block_k + j], 0)
            copy = pltpu.make_async_copy(kv_hbm.at[b, pl.ds(row, 1)], rows.at[pl.ds(j, 1)], sems.at[j])
            copy.start()
            copies.append(copy)
        for copy in copies:
            copy.wait()
        r = rows[...].astype(q.dtype)                                     # [bk, Dk]
        logits = jax.lax.dot_general(q, r, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        ok = valid_ref[0, 0, pl.ds(c, 1), :] > 0                          # [1, bk]
        logits = jnp.where(ok, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
        base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(ok, jnp.exp(logits - base), 0.0)
        alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - base), 0.0)
        acc = alpha * acc + jnp.dot(p.astype(r.dtype), r[:, :v_dim], preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), acc

    init = (jnp.full((heads, 1), -jnp.inf, jnp.float32), jnp.zeros((heads, 1), jnp.float32),
            jnp.zeros((heads, v_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, chunks, one_chunk, init)
    out_ref[0, 0] = (acc / jnp.where(l > 0, l, 1.0)).astype(out_ref.dtype)  # no valid slot: zeros


def _forward_chunk(q, kv, indices, valid, *, scale, v_dim, block_k, interpret):
    """q [B,c,Hq,Dk], indices/valid [B,c,k] -> [B,c,Hq,v_dim]."""
    from jax.experimental import pallas as pl  # noqa: PLC0415
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    B, c, H, D = q.shape
    k = indices.shape[-1]
    kp = round_up(k, block_k)
    indices = pad_axis(indices, 2, kp, -1)
    valid = pad_axis(valid, 2, kp).astype(jnp.int32).reshape(B, c, kp // block_k, block_k)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B, c),
        in_specs=[pl.BlockSpec((1, 1, H, D), lambda b, t, idx: (b, t, 0, 0)),
                  pl.BlockSpec((1, 1, kp // block_k, block_k), lambda b, t, idx: (b, t, 0, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((1, 1, H, v_dim), lambda b, t, idx: (b, t, 0, 0)),
        scratch_shapes=[pltpu.VMEM((block_k, D), kv.dtype), pltpu.SemaphoreType.DMA((block_k,))])
    return pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, chunks=kp // block_k, scale=scale, v_dim=v_dim),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((B, c, H, v_dim), q.dtype), interpret=interpret,
    )(indices, q, valid, kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _sparse_mla_mosaic_tpu(q, kv, indices, valid, scale, v_dim, block_sizes, interpret):
    def chunk(q_c, idx_c, valid_c):
        return _forward_chunk(q_c, kv, idx_c, valid_c, scale=scale, v_dim=v_dim, block_k=block_sizes.block_k,
                              interpret=interpret)

    return map_query_chunks(chunk, block_sizes.query_chunk, (q, 0), (indices, -1), (valid, False))


def _fwd(q, kv, indices, valid, scale, v_dim, block_sizes, interpret):
    return _sparse_mla_mosaic_tpu(q, kv, indices, valid, scale, v_dim, block_sizes, interpret), (q, kv, indices, valid)


def _bwd(scale, v_dim, block_sizes, interpret, residuals, g):
    q, kv, indices, valid = residuals
    reference = lambda q, kv: sparse_mla_reference(q, kv, indices, valid, scale=scale, v_dim=v_dim,
                                                   query_chunk=block_sizes.query_chunk)
    dq, dkv = jax.vjp(reference, q, kv)[1](g)
    return dq, dkv, None, None


_sparse_mla_mosaic_tpu.defvjp(_fwd, _bwd)


def sparse_mla_mosaic_tpu(q, kv, indices, valid, *, scale: float, v_dim: int, query_chunk: int = 16,
                          return_probs: bool = False, block_sizes: MlaTpuBlockSizes | None = None, interpret=None):
    """out [B,T,Hq,v_dim] in q's dtype, as ``sparse_mla_reference``; ``query_chunk`` queries per kernel call.
    ``return_probs`` (the distillation target) is the reference's: the entry point routes it there."""
    if return_probs:
        raise ValueError("sparse_mla_mosaic_tpu does not return probabilities; use the xla implementation")
    block_sizes = (block_sizes or MlaTpuBlockSizes(query_chunk=query_chunk)).check()
    return _sparse_mla_mosaic_tpu(q, kv, indices, valid, float(scale), v_dim, block_sizes,
                                  mosaic_tpu_interpret(interpret))
