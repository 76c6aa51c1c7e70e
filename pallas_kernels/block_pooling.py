"""Block pooling, shared by the hierarchical selectors (HISA, MISA, MISA-H).

Keys are split into contiguous blocks of ``block_size``; a block's representative is the MEAN of its
valid keys (dequantised on the fp8 path). Pooled state is kept as float32 SUMS, so decode can add one
key at a time; counts follow from the row length and are never stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.ranking import relu


def num_blocks_for(S: int, block_size: int) -> int:
    return -(-S // block_size)


def dequantized(k: jax.Array, k_scale: jax.Array | None) -> jax.Array:
    kf = k.astype(jnp.float32)
    return kf if k_scale is None else kf * k_scale.astype(jnp.float32)[..., None]


def pool_block_sums(k: jax.Array, k_scale: jax.Array | None, kv_lengths: jax.Array, block_size: int) -> jax.Array:
    """[B, ceil(S/block_size), d] float32 sums of the keys at positions < kv_lengths, per block."""
    B, S, d = k.shape
    M = num_blocks_for(S, block_size)
    kf = jnp.where((jnp.arange(S) < kv_lengths[:, None])[..., None], dequantized(k, k_scale), 0.0)
    kf = jnp.pad(kf, ((0, 0), (0, M * block_size - S), (0, 0)))
    return kf.reshape(B, M, block_size, d).sum(axis=2)


def append_block_sums(sums: jax.Array, k_new: jax.Array, k_scale_new: jax.Array | None, start: jax.Array,
                      block_size: int, limit: int | None = None) -> jax.Array:
    """Adds T new keys per row (k_new [B,T,d], written at positions start[b] + arange(T)) to ``sums``.

    Keys at positions >= ``limit`` (a cache's max_len) are not counted. No scatter-add: the new keys are
    laid out block-aligned and summed by a reshape, so the result is deterministic on every backend
    (GPU scatter-adds use atomics, whose float order varies from run to run).
    """
    B, T, d = k_new.shape
    M = sums.shape[1]
    span = T // block_size + 2  # blocks the T new keys can touch, whatever their offset in the first one
    keys = dequantized(k_new, k_scale_new)
    if limit is not None:
        keys = jnp.where((start[:, None] + jnp.arange(T) < limit)[..., None], keys, 0.0)

    def one_row(row_sums, new, at):
        first, offset = at // block_size, at % block_size
        laid = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((span * block_size, d), jnp.float32), new, offset, 0)
        partial = laid.reshape(span, block_size, d).sum(axis=1)
        padded = jnp.concatenate([row_sums, jnp.zeros((span, d), jnp.float32)])  # room past the end: dropped
        current = jax.lax.dynamic_slice_in_dim(padded, first, span, 0)
        return jax.lax.dynamic_update_slice_in_dim(padded, current + partial, first, 0)[:M]

    return jax.vmap(one_row)(sums, keys, start)


def block_counts(kv_lengths: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
    """[B, M] int32 number of valid keys per block."""
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
    return jnp.clip(kv_lengths[:, None] - starts[None, :], 0, block_size)


def block_means(sums: jax.Array, kv_lengths: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """(means [B,M,d] float32, counts [B,M]); an empty block's mean is 0 (and it is never eligible)."""
    counts = block_counts(kv_lengths, sums.shape[1], block_size)
    return sums / jnp.maximum(counts, 1)[..., None].astype(jnp.float32), counts


def last_eligible(q_positions: jax.Array, kv_lengths: jax.Array) -> jax.Array:
    """[B, T] the last key position a query may see: min(position, kv_length - 1); < 0 means none."""
    return jnp.minimum(q_positions, kv_lengths[:, None] - 1)


def head_block_logits(q_c: jax.Array, means: jax.Array) -> jax.Array:
    """ReLU(q . kbar) per head and block: q_c [B,c,H,d], means [B,M,d] -> [B,c,H,M] float32."""
    return relu(jnp.einsum("bchd,bmd->bchm", q_c.astype(jnp.float32), means))


def check_block_sums(op: str, block_sums, k: jax.Array, block_size: int) -> None:
    """``block_sums`` handed in by a caller (e.g. a decode cache) must be [B, ceil(S / block_size), d] float32."""
    B, S, d = k.shape
    expected = (B, num_blocks_for(S, block_size), d)
    if block_sums.shape != expected or block_sums.dtype != jnp.float32:
        raise ValueError(f"{op}: block_sums must be float32 {list(expected)} = [B, ceil(S / block_size={block_size}), "
                         f"d] for k {k.shape}, got {block_sums.shape} {block_sums.dtype}")
