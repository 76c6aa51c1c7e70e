"""Exact streaming top-k inside a Triton kernel: a per-query candidate buffer behind a proven threshold.

A kernel that scores keys block by block in increasing position order (``dsa_topk/triton.py``) keeps
for each query a buffer of (ranking key, position) slots in device memory, in position order, and a
threshold ``thr``:

* **probe** (rows of many blocks): the latest ``2k`` keys are scored first and their k-th largest key
  ``tau0`` becomes the starting threshold, every key >= ``tau0`` entering (``thr = tau0 - 1``). The k-th
  largest of a subset is a lower bound on the row's, so a key below it can never be in the top k.
  Causal indexers score recent keys highest, so the threshold starts high.
* **insert**: a scored key enters the buffer iff its ranking key is > ``thr`` (ineligible keys are
  ``INELIGIBLE_KEY``, never above it).
* **compact**: when the next block could overflow the buffer, an exact radix select (8 counting passes
  of 4 bits over the buffer) finds the k-th largest key ``tau`` among the ``n > k`` entries; the
  entries above ``tau`` and the lowest-position entries equal to it, exactly k, move to the other half
  of the buffer (ping-pong: reads and writes never alias), still in position order, and ``thr = tau``.
* **finish**: a last compaction if more than k entries are left, then each survivor's rank in the
  contract's order (higher key first, equal keys: lower position first) is counted against every other
  survivor and the survivor is written to its rank's slot: the result needs no sort afterwards.

Why it is exact: every key below ``tau0`` loses to the k probed keys >= ``tau0``. After a compaction,
the k kept keys (the top k of everything seen: what was rejected is below ``tau0 <= tau``) are >= ``tau``
and sit at lower positions than every key still to come, so a later key <= ``tau`` can never be in the
top k (it loses to all k of them, on value or on the tie rule); ``tau`` never decreases. Nothing else is
dropped. Inputs that never let the threshold prune (increasing or all-equal scores) only cost more
compactions: one per ``cap - k`` inserted keys, ``9 * cap`` buffer reads each.

Buffers are refs shaped [..., 2, cap + spare]: slot ``cap`` is the spare slot that idle lanes write to.
Everything here runs inside a Pallas kernel body (Triton lowering, or interpreted on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton

from sparse_index_jax.kernels.radix_select import BINS, ROUNDS, digit_hits, narrow_prefix
from sparse_index_jax.kernels.ranking import INELIGIBLE_KEY


def barrier(enabled: bool) -> None:
    """Makes one pass's buffer writes visible to every thread of the program (compiled kernels only)."""
    if enabled:
        pl_triton.debug_barrier()


def kth_largest(load, n_tiles, tile: int, wanted):
    """(tau, equal_wanted): the ``wanted``-th largest key (wanted >= 1) among the tiles ``load(j)`` ->
    (key [tile], ok [tile]) for j < ``n_tiles``, and how many keys equal to tau the top ``wanted`` hold:
    the radix kernel's rounds (``digit_hits``, ``narrow_prefix``) over the buffer."""
    prefix = jnp.int32(0)
    for r in range(ROUNDS):
        def count(j, counts, prefix=prefix, r=r):
            return counts + digit_hits(*load(j), prefix, r)[0]  # per lane; summed once per round

        counts = jnp.sum(jax.lax.fori_loop(0, n_tiles, count, jnp.zeros((BINS, tile), jnp.int32)), axis=1)
        prefix, wanted, _ = narrow_prefix(counts, wanted, prefix, r)
    return prefix ^ INELIGIBLE_KEY, wanted


def compact(key_ref, pos_ref, src, n, topk: int, *, tile: int, cap: int, sync: bool):
    """Keeps the top ``topk`` of the ``n`` (> topk) entries of half ``src`` of one query's buffer in
    half ``1 - src``, in position order. ``key_ref``/``pos_ref`` are that query's [2, cap + spare]
    buffer views (callables ``ref(half, slots)`` for loads and ``ref(half, slots, value)`` for stores).
    Returns tau, the new threshold."""
    lane = jax.lax.iota(jnp.int32, tile)
    n_tiles = (n + tile - 1) // tile

    def load(j):
        return key_ref(src, j * tile + lane), j * tile + lane < n

    barrier(sync)  # the inserts (or the last compaction) are visible
    tau, equal_wanted = kth_largest(load, n_tiles, tile, jnp.int32(topk))
    dst = 1 - src

    def emit(j, carry):
        written, equal_seen = carry
        key, ok = load(j)
        equal = ok & (key == tau)
        equal_rank = equal_seen + jnp.cumsum(equal.astype(jnp.int32))
        take = (ok & (key > tau)) | (equal & (equal_rank <= equal_wanted))
        slot = jnp.where(take, written + jnp.cumsum(take.astype(jnp.int32)) - 1, cap)
        key_ref(dst, slot, key)
        pos_ref(dst, slot, pos_ref(src, j * tile + lane))
        return written + jnp.sum(take.astype(jnp.int32)), equal_seen + jnp.sum(equal.astype(jnp.int32))

    jax.lax.fori_loop(0, n_tiles, emit, (jnp.int32(0), jnp.int32(0)))
    return tau


def rank_survivors(key_ref, half, n, *, tile: int, ranked: bool, emit, sync: bool) -> None:
    """Calls ``emit(slots, ok, keys, entries)`` per tile of the ``n`` survivors in ``half``: ``slots`` is
    each survivor's rank in the contract's order (``ranked``) or its buffer slot (position order),
    ``entries`` the buffer slots. The rank is the number of survivors ahead of it: higher keys, and equal
    keys at lower positions (the buffer is in position order, so: at lower slots)."""
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
                                                           & (theirs[None, :] < mine[:, None]))
                return rank + jnp.sum((beats & (theirs < n)[None, :]).astype(jnp.int32), axis=1)

            slots = jax.lax.fori_loop(0, n_tiles, ahead, jnp.zeros((tile,), jnp.int32))
        else:
            slots = mine
        emit(slots, ok, key, mine)
        return carry

    jax.lax.fori_loop(0, n_tiles, one_tile, 0)
