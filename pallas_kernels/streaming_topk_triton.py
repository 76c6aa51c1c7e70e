"""Exact streaming top-k inside a Triton kernel: a per-query candidate buffer behind a proven threshold.

A kernel that scores keys block by block, latest block first (``dsa_topk/triton.py``), keeps for each
query a buffer of (ranking key, position) slots in device memory, in descending position order, and a
threshold ``thr``:

* **insert**: a scored key enters the buffer iff its ranking key is >= ``thr``. ``thr`` starts at
  ``FIRST_THRESHOLD``, above ``INELIGIBLE_KEY`` and below every eligible key (-inf included).
* **compact**: when the next block could overflow the buffer, an exact radix select (8 counting passes
  of 4 bits over the buffer) finds the k-th largest key ``tau`` among the ``n > k`` entries; the
  entries above ``tau`` and the lowest-position entries equal to it (the last ones in buffer order),
  exactly k, move to the other half of the buffer (ping-pong: reads and writes never alias), still in
  descending position order, and ``thr = tau``.
* **finish**: a last compaction if more than k entries are left, then each survivor's rank in the
  contract's order (higher key first, equal keys: lower position first) is counted against every other
  survivor and the survivor is written to its rank's slot: the result needs no sort afterwards.

Why it is exact: after a compaction, k entries with keys >= ``tau`` sit at higher positions than every
key still to come. A later key below ``tau`` loses to all k on value, so it can be rejected; a later key
equal to ``tau`` would win the tie against the kept ones equal to it, so it enters. ``tau`` never
decreases, so a rejected key stays below the final k-th key. Nothing else is dropped.

Why latest first: causal indexer scores favour recent keys, so the threshold starts high
(``sparse-index bench survivors`` measures it on SmolLM2's scores: docs/kernels.md). Inputs that never
let the threshold prune (scores falling with position, all scores equal) only cost more compactions:
one per ``cap - k`` inserted keys, ``9 * cap`` buffer reads each.

Buffers are refs shaped [..., 2, cap + spare]: slot ``cap`` is the spare slot that idle lanes write to.
Everything here runs inside a Pallas kernel body (Triton lowering, or interpreted on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton

from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY

_DIGIT_BITS = 4
_BINS = 1 << _DIGIT_BITS
_ROUNDS = 32 // _DIGIT_BITS
FIRST_THRESHOLD = INELIGIBLE_KEY + 1  # ``key >= FIRST_THRESHOLD``: eligible (ordered -inf is far above it)


def barrier(enabled: bool) -> None:
    """Makes one pass's buffer writes visible to every thread of the program (compiled kernels only)."""
    if enabled:
        pl_triton.debug_barrier()


def kth_largest(load, n_tiles, tile: int, wanted):
    """(tau, equal_wanted, equal_total): the ``wanted``-th largest key (wanted >= 1) among the tiles
    ``load(j)`` -> (key [tile], ok [tile]) for j < ``n_tiles``, how many keys equal to tau the top
    ``wanted`` hold, and how many keys equal tau.

    Radix select on the biased bits (key ^ INT32_MIN: unsigned order = key order), most significant
    digit first; shifts are arithmetic, digits masked, prefixes compared after the same shift.
    """
    bins = jax.lax.iota(jnp.int32, _BINS)
    prefix = jnp.int32(0)
    for r in range(_ROUNDS):
        shift = 32 - _DIGIT_BITS * (r + 1)

        def count(j, counts, shift=shift, prefix=prefix, r=r):
            key, ok = load(j)
            u = key ^ INELIGIBLE_KEY
            match = ok if r == 0 else ok & ((u >> (shift + _DIGIT_BITS)) == (prefix >> (shift + _DIGIT_BITS)))
            digit = jnp.where(match, (u >> shift) & (_BINS - 1), _BINS)
            return counts + (digit[None, :] == bins[:, None]).astype(jnp.int32)  # per lane; summed once

        counts = jnp.sum(jax.lax.fori_loop(0, n_tiles, count, jnp.zeros((_BINS, tile), jnp.int32)), axis=1)
        at_or_above = jnp.sum(counts) - jnp.cumsum(counts) + counts  # keys with this digit or a higher one
        digit = jnp.max(jnp.where(at_or_above >= wanted, bins, 0))
        wanted = wanted - jnp.sum(jnp.where(bins > digit, counts, 0))
        prefix = prefix | (digit << shift)
        matching = jnp.sum(jnp.where(bins == digit, counts, 0))  # after the last digit: the keys equal to tau
    return prefix ^ INELIGIBLE_KEY, wanted, matching


def compact(key_ref, pos_ref, src, n, topk: int, *, tile: int, cap: int, sync: bool):
    """Keeps the top ``topk`` of the ``n`` (> topk) entries of half ``src`` of one query's buffer in
    half ``1 - src``, in the same (descending position) order. ``key_ref``/``pos_ref`` are that query's [2, cap + spare]
    buffer views (callables ``ref(half, slots)`` for loads and ``ref(half, slots, value)`` for stores).
    Returns tau, the new threshold."""
    lane = jax.lax.iota(jnp.int32, tile)
    n_tiles = (n + tile - 1) // tile

    def load(j):
        return key_ref(src, j * tile + lane), j * tile + lane < n

    barrier(sync)  # the inserts (or the last compaction) are visible
    tau, equal_wanted, equal_total = kth_largest(load, n_tiles, tile, jnp.int32(topk))
    dst = 1 - src
    skip_equal = equal_total - equal_wanted  # equal keys at higher positions (earlier in the buffer) lose

    def emit(j, carry):
        written, equal_seen = carry
        key, ok = load(j)
        equal = ok & (key == tau)
        equal_rank = equal_seen + jnp.cumsum(equal.astype(jnp.int32))
        take = (ok & (key > tau)) | (equal & (equal_rank > skip_equal))
        slot = jnp.where(take, written + jnp.cumsum(take.astype(jnp.int32)) - 1, cap)
        key_ref(dst, slot, key)
        pos_ref(dst, slot, pos_ref(src, j * tile + lane))
        return written + jnp.sum(take.astype(jnp.int32)), equal_seen + jnp.sum(equal.astype(jnp.int32))

    jax.lax.fori_loop(0, n_tiles, emit, (jnp.int32(0), jnp.int32(0)))
    return tau


def rank_survivors(key_ref, half, n, *, tile: int, ranked: bool, emit, sync: bool) -> None:
    """Calls ``emit(slots, ok, keys, entries)`` per tile of the ``n`` survivors in ``half``: ``slots`` is
    each survivor's rank in the contract's order (``ranked``) or its place in increasing position order,
    ``entries`` the buffer slots. The rank is the number of survivors ahead of it: higher keys, and equal
    keys at lower positions (the buffer is in descending position order, so: at higher slots)."""
    lane = jax.lax.iota(jnp.int32, tile)
    n_tiles = (n + tile - 1) // tile
    barrier(sync)  # the last compaction (or the inserts) are visible

    def one_tile(i, carry):
        mine = i * tile + lane
        ok = mine < n
        key = key_ref(half, mine)
        if ranked:
            def ahead(j, rank):
                theirs = j * tile + lane
                other = key_ref(half, theirs)
                beats = (other[None, :] > key[:, None]) | ((other[None, :] == key[:, None])
                                                           & (theirs[None, :] > mine[:, None]))
                return rank + jnp.sum((beats & (theirs < n)[None, :]).astype(jnp.int32), axis=1)

            slots = jax.lax.fori_loop(0, n_tiles, ahead, jnp.zeros((tile,), jnp.int32))
        else:
            slots = n - 1 - mine
        emit(slots, ok, key, mine)
        return carry

    jax.lax.fori_loop(0, n_tiles, one_tile, 0)
