"""The pieces of an exact radix select that run inside Triton kernels, shared by the radix top-k kernel
(``radix_topk_triton.py``) and the streaming DSA kernel's buffer (``streaming_topk_triton.py``): one
round's digit counts and the narrowing of the prefix (8 rounds of 4 bits find the k-th largest int32
key), and the layout of a per-row output with a spare column for idle lanes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.chunking import next_pow2, round_up
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY

_DIGIT_BITS = 4
BINS = 1 << _DIGIT_BITS
ROUNDS = 32 // _DIGIT_BITS


def digit_hits(key, ok, prefix, r: int):
    """Round ``r`` of a radix select over a tile of int32 ``key`` (``ok``: taking part): ([BINS, tile]
    int32 one-hot of each key's r-th 4-bit digit, most significant first; zero where the key's higher
    digits differ from ``prefix``'s, match). Digits are of the biased bits (key ^ INT32_MIN: unsigned
    order = key order); shifts are arithmetic, digits masked, prefixes compared after the same shift."""
    shift = 32 - _DIGIT_BITS * (r + 1)
    u = key ^ INELIGIBLE_KEY
    match = ok if r == 0 else ok & ((u >> (shift + _DIGIT_BITS)) == (prefix >> (shift + _DIGIT_BITS)))
    digit = jnp.where(match, (u >> shift) & (BINS - 1), BINS)
    return (digit[None, :] == jax.lax.iota(jnp.int32, BINS)[:, None]).astype(jnp.int32), match


def narrow_prefix(counts, wanted, prefix, r: int):
    """After round ``r``'s per-digit ``counts`` [BINS] of the keys matching ``prefix``: (the prefix
    extended by the digit of the ``wanted``-th largest of them, how many keys of that digit are still
    wanted, how many keys have it). After the last round the prefix is that key."""
    bins = jax.lax.iota(jnp.int32, BINS)
    at_or_above = jnp.sum(counts) - jnp.cumsum(counts) + counts  # keys with digit >= v
    digit = jnp.max(jnp.where(at_or_above >= wanted, bins, 0))
    above = jnp.sum(jnp.where(bins > digit, counts, 0))
    matching = jnp.sum(jnp.where(bins == digit, counts, 0))
    return prefix | (digit << (32 - _DIGIT_BITS * (r + 1))), wanted - above, matching


def output_columns(topk: int) -> tuple[int, int]:
    """(tile, length) of a selection kernel's per-row output: >= topk + 1 columns, the last one a spare
    that idle lanes write to (sliced off), written in tiles of at most 1024."""
    out_tile = min(1024, next_pow2(topk + 1))
    return out_tile, round_up(topk + 1, out_tile)


def padding_slots(n, out_tile: int, out_len: int) -> list[jax.Array]:
    """Inside a kernel: the output columns from ``n`` on, one [out_tile] array per output tile, with the
    columns below ``n`` (the winners', written apart) aimed at the spare last column instead."""
    lane = jax.lax.iota(jnp.int32, out_tile)
    return [jnp.where(j * out_tile + lane >= n, j * out_tile + lane, out_len - 1) for j in range(out_len // out_tile)]


