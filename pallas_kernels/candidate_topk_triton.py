"""Top-k over per-query candidate lists on GPU (Pallas, Triton lowering): HISA's token refinement and
MISA-H's re-rank. Reference: ``candidate_topk.refine_topk``.

``gathered_keys``: one program per query. Its H head queries stay in registers; the candidate rows
are gathered ``bc`` at a time (each row is d contiguous values), one tensor-core dot [bc, d] x [d, H]
gives every head's logits, and ReLU, head weights and the head sum follow in float32 as in DSA
scoring. The ranking keys go to a [B, T, C] buffer; ``radix_topk_rows`` then picks the top-k slots.
Candidates arrive in increasing position, so slot order is position order and the radix kernel's
lower-slot-wins tie rule is the contract's lower-position-wins rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_index_jax.kernels.chunking import next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.dsa_topk.triton import order_by_key
from sparse_index_jax.kernels.radix_topk_triton import radix_topk_rows
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY, ordered_keys
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes


def _gathered_kernel(pos_ref, q_ref, w_ref, k_ref, scale_ref, out_ref, *, bc: int, n_tiles: int):
    b, t = pl.program_id(0), pl.program_id(1)
    q = q_ref[b, t, :, :]      # [H, d]
    w = w_ref[b, t, :]         # [H] float32

    def tile(j, carry):
        cols = pl.ds(j * bc, bc)
        pos = pos_ref[b, t, cols]                         # [bc], -1 = not a candidate
        safe = jnp.maximum(pos, 0)
        rows = k_ref[b, safe, :]                          # gathered [bc, d]
        logits = jax.lax.dot_general(rows, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        scores = jnp.sum(jnp.maximum(logits, 0.0) * w[None, :], axis=1) * scale_ref[b, safe]
        out_ref[b, t, cols] = jnp.where(pos >= 0, ordered_keys(scores), INELIGIBLE_KEY)
        return carry

    jax.lax.fori_loop(0, n_tiles, tile, 0)


def gathered_keys(q, w, k, scale, positions, *, bc: int = DsaTritonBlockSizes.block_k,
                  num_warps: int = DsaTritonBlockSizes.num_warps, num_stages: int = DsaTritonBlockSizes.num_stages,
                  interpret: bool | None = None) -> jax.Array:
    """Ranking keys [B, T, C] of the candidates ``positions`` [B, T, C] (-1: none; INELIGIBLE_KEY out).
    Kernel layout as ``dsa_topk.triton.kernel_layout`` gives it; C a multiple of ``bc``."""
    B, T, C = positions.shape
    kernel = functools.partial(_gathered_kernel, bc=bc, n_tiles=C // bc)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, T, C), jnp.int32),
        grid=(B, T),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=triton_interpret(interpret),
        name="gathered_keys",
    )(positions, q, w, k, scale)


def refine_topk_triton(q, w, k, scale, positions, topk: int, *, return_keys: bool, interpret: bool,
                       block_sizes: DsaTritonBlockSizes = DsaTritonBlockSizes()):
    """``candidate_topk.refine_topk`` with kernels: candidates ``positions`` [B, T, C] in increasing order,
    -1 for those not eligible. Returns (positions [B,T,topk], valid[, keys]) in the contract's order."""
    bs = block_sizes
    C = positions.shape[-1]
    tile = min(bs.radix_tile, max(bs.block_k, next_pow2(C)))
    width = round_up(C, tile)
    positions = pad_axis(positions, 2, width, -1)
    keys = gathered_keys(q, w, k, scale, positions, bc=min(bs.block_k, tile), num_warps=bs.num_warps,
                         num_stages=bs.num_stages, interpret=interpret)
    limits = jnp.full(positions.shape[:2], width, jnp.int32)
    slots = radix_topk_rows(keys, limits, topk, tile=tile, bucket=bs.radix_bucket, interpret=interpret)
    slot, valid, *sel = order_by_key(keys, slots, topk, return_keys)
    chosen = jnp.where(valid, jnp.take_along_axis(positions, jnp.maximum(slot, 0), axis=-1), -1)
    return (chosen, valid, *sel)
