"""Padding and query chunking: how every op bounds its memory and fits its tiles.

Ops process queries in chunks (``map_query_chunks``) so their memory is O(chunk * S) or O(T * k),
never O(T * S); kernels pad axes to multiples of their tiles (``round_up``, ``pad_axis``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= n: the padded extent of a block-tiled axis."""
    return -(-n // multiple) * multiple


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): Triton tensors have power-of-two shapes."""
    return 1 << max(0, int(n) - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, fill=0) -> jax.Array:
    """``x`` padded with ``fill`` at the end of ``axis`` to length ``size`` (>= its length)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill) if size != x.shape[axis] else x


def chunk_axis(x: jax.Array, axis: int, size: int, fill) -> jax.Array:
    """Pads ``axis`` to a multiple of ``size`` with ``fill`` and moves the chunk index to the front."""
    count = -(-x.shape[axis] // size)
    x = pad_axis(x, axis, count * size, fill)
    x = x.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def map_query_chunks(fn, chunk: int, *inputs: tuple[jax.Array, object]):
    """Runs ``fn`` over chunks of ``chunk`` queries and stitches the outputs back to [B, T, ...].

    ``inputs`` are (array [B, T, ...], padding value) pairs; the last chunk is padded with those values
    (use position -1 for query positions: nothing is eligible, so padded rows are pure padding).
    """
    T = inputs[0][0].shape[1]
    chunk = min(chunk, T)
    out = jax.lax.map(lambda args: fn(*args), tuple(chunk_axis(x, 1, chunk, fill) for x, fill in inputs))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:])[:, :T], out)


def to_shard(positions: jax.Array, key_offset, shard_len: int) -> tuple[jax.Array, jax.Array]:
    """Global key positions -> (positions inside a shard holding ``key_offset .. key_offset + shard_len``,
    clipped into it so gathers stay in bounds; whether each position really lies in the shard)."""
    local = positions - key_offset
    return jnp.clip(local, 0, shard_len - 1), (local >= 0) & (local < shard_len)
