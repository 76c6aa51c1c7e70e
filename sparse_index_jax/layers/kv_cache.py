"""Decode caches: writing new rows at each row's length, and the Llama family's GQA cache.

Both caches here (``GQACache`` below, ``dsa_attention.DSACache`` for MLA) keep every buffer as
[B, max_len, ...] with ``lengths`` [B], the tokens written per row, so rows of one batch can sit at
different lengths. ``append`` writes T new tokens per row at that row's length. Overflow (length + T >
max_len) raises when the lengths are known (eager code); under jit it cannot raise here: the rows past
max_len are dropped, never written over earlier ones, and ``overflowed`` turns True. A model call
(``CausalLM.__call__``, the public decode API) turns that into NaN logits for those rows and an error raised from
the compiled call (a host callback that runs only on overflow).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.block_pooling import append_block_sums, num_blocks_for
from sparse_index_jax.kernels.inputs import concrete


def check_room(who: str, lengths: jax.Array, new: int, max_len: int) -> None:
    """Raises when ``new`` tokens per row do not fit (always for new > max_len; eagerly for known lengths)."""
    if new > max_len:
        raise ValueError(f"{who}: {new} new tokens exceed the cache's max_len={max_len}; create the cache with a "
                         f"larger max_len")
    known = concrete(lengths)
    if known is not None and known.max() + new > max_len:
        raise ValueError(f"{who}: {new} new tokens overflow the cache of max_len={max_len} (row lengths "
                         f"{known.tolist()}); create the cache with a larger max_len")


def check_cache_batch(who: str, cache, batch: int) -> None:
    """Raises when a decode cache holds another number of rows than the batch x it is called with (static: holds
    under jit too)."""
    if cache is None:
        return
    rows = cache.lengths.shape[0]
    if rows != batch:
        raise ValueError(f"{who}: the cache holds {rows} rows but x has a batch of {batch}; create the caches for "
                         f"this batch (init_caches({batch}, max_len))")


def write_rows(buffer: jax.Array | None, new: jax.Array | None, lengths: jax.Array) -> jax.Array | None:
    """``buffer`` [B, max_len, ...] with new [B, T, ...] written at slots lengths[b] + 0..T-1 (dropped past max_len)."""
    if buffer is None:
        return None
    slots = lengths[:, None] + jnp.arange(new.shape[1], dtype=jnp.int32)[None, :]
    return jax.vmap(lambda b, n, at: b.at[at].set(n.astype(b.dtype), mode="drop"))(buffer, new, slots)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GQACache:
    """Decode state of one grouped-query attention layer (the Llama family), rows [B, max_len, ...].

    k, v: the rotated keys and the values [B, max_len, Hkv, d]. index_keys: the retrofitted indexer's
    keys [B, max_len, d_index] float32 (None without an indexer). block_sums: [B, ceil(max_len /
    block_size), d_index] float32 pooled index-key sums for the hierarchical selectors (HISA, MISA),
    updated as keys arrive; None for dsa and dense.
    """

    k: jax.Array
    v: jax.Array
    index_keys: jax.Array | None
    lengths: jax.Array
    block_sums: jax.Array | None = None
    block_size: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, batch: int, max_len: int, *, kv_heads: int, head_dim: int, dtype, index_dim: int | None = None,
               block_size: int = 0) -> "GQACache":
        """An empty cache; ``index_dim`` keeps indexer keys, ``block_size`` (> 0) their pooled block sums."""
        kv = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        keys = None if index_dim is None else jnp.zeros((batch, max_len, index_dim), jnp.float32)
        sums = (jnp.zeros((batch, num_blocks_for(max_len, block_size), index_dim), jnp.float32)
                if keys is not None and block_size else None)
        return cls(kv, kv, keys, jnp.zeros((batch,), jnp.int32), sums, block_size if sums is not None else 0)

    def append(self, k: jax.Array, v: jax.Array, index_keys: jax.Array | None = None) -> "GQACache":
        """Writes T new tokens per row (k, v [B, T, Hkv, d]; index_keys [B, T, d_index]) at each row's length."""
        check_room("GQACache.append", self.lengths, k.shape[1], self.max_len)
        if (index_keys is None) != (self.index_keys is None):
            raise ValueError("GQACache.append: pass index_keys exactly when the cache keeps them (a layer with an "
                             "indexer)")
        sums = self.block_sums
        if sums is not None:
            sums = append_block_sums(sums, index_keys, None, self.lengths, self.block_size, limit=self.max_len)
        return GQACache(write_rows(self.k, k, self.lengths), write_rows(self.v, v, self.lengths),
                        write_rows(self.index_keys, index_keys, self.lengths), self.lengths + k.shape[1], sums,
                        self.block_size)

    @property
    def overflowed(self) -> jax.Array:
        """[B] bool: rows that were handed more tokens than max_len (only possible under jit)."""
        return self.lengths > self.max_len
