"""Context-parallel DSA selection: keys sharded along the sequence, an exact global top-k merge.

Each device of the ``context`` mesh axis holds S / n consecutive keys, scores them against every query
and keeps its local top-k together with the ranking keys (the float32 score mapped to an ordered int32,
see ``sparse_index_jax.kernels.ranking``). An all-to-all then sends every device the n local lists of ITS OWN T / n
queries (n * k candidates per query, never n * S scores), and one more top-k picks the global winners;
the selection comes out sharded along the queries. Lists arrive in shard (= position) order and each has
equal keys in position order, so "equal score -> lower position" holds across shards: the result equals
single-device ``select_topk`` index for index.

Communication per layer and device: about T * topk * 8 bytes sent and received (int32 key + int32
index per candidate), e.g. 2 GiB at T = 128K, topk = 2048, whatever n is; an all-gather would cost n
times that. Compute per device: T * (S / n) * H * d multiply-adds, 1/n of the single-device scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparse_index_jax.kernels.block_pooling import pool_block_sums
from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference
from sparse_index_jax.kernels.hisa_topk.reference import hisa_topk_reference
from sparse_index_jax.kernels.inputs import check_indexer_inputs
from sparse_index_jax.kernels.misa_topk.reference import misa_topk_reference
from sparse_index_jax.kernels.options import OptionError
from sparse_index_jax.kernels.ranking import top_k_by_key
from sparse_index_jax.selection.contract import Selection
from sparse_index_jax.selection.methods import Selector


def select_topk_context_parallel(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, mesh: Mesh,
                                 method: str = "dsa", axis: str = "context", q_positions: jax.Array | None = None,
                                 kv_lengths: jax.Array | None = None, k_scale: jax.Array | None = None,
                                 **options) -> Selection:
    """``select_topk`` with k [B,S,d] (and k_scale) sharded over ``axis``; same result, index for index.
    ``options`` are the method's (see ``select_topk``); the rest is ``select_context_parallel``'s."""
    try:
        selector = Selector.create(method, topk, **options)
    except OptionError as err:
        raise err.at("select_topk_context_parallel: ") from None
    return select_context_parallel(selector, q, k, w, mesh=mesh, axis=axis, q_positions=q_positions,
                                   kv_lengths=kv_lengths, k_scale=k_scale)


def select_context_parallel(selector: Selector, q: jax.Array, k: jax.Array, w: jax.Array, *, mesh: Mesh,
                            axis: str = "context", q_positions: jax.Array | None = None,
                            kv_lengths: jax.Array | None = None, k_scale: jax.Array | None = None) -> Selection:
    """``selector.select`` with k [B,S,d] (and k_scale) sharded over ``axis``; same result, index for index.

    S and T must divide evenly over the axis (for hisa / misa / misa_h, each shard must also hold whole
    blocks). Queries, head weights, positions and lengths are replicated over ``axis``; the returned
    Selection is sharded along T. dsa's ``key_chunk`` is capped at S / n, so each device scores exactly
    the key blocks a single device would.

    hisa / misa / misa_h: each shard pools its keys into block sums and an all-gather hands every shard
    all of them (M * d floats per row: tiny), so block choice and routing are the same everywhere; MISA's
    own-block partial mean is completed by a psum; MISA-H all-gathers its first-pass candidates.
    """
    op = "select_topk_context_parallel"
    try:
        selector.check_heads(q.shape[2])
    except OptionError as err:
        raise err.at(f"{op}: ") from None
    q_positions, kv_lengths = check_indexer_inputs(op, q, k, w, k_scale, q_positions, kv_lengths)
    if axis not in mesh.shape:
        raise ValueError(f"{op}: mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    n = mesh.shape[axis]
    S = k.shape[1]
    if S % n or q.shape[1] % n:
        raise ValueError(f"{op}: S={S} keys and T={q.shape[1]} queries must split evenly over the {n} devices of "
                         f"axis {axis!r}; pad them (padded queries at position -1 select nothing)")
    local_len = S // n
    method, topk = selector.method, selector.topk
    opts = selector.options.op_kwargs(topk)
    if method == "dsa":  # each device scores exactly the key blocks a single device would
        opts["key_chunk"] = min(opts["key_chunk"], local_len)
    if selector.block_size and local_len % selector.block_size:
        raise ValueError(f"{op}: each shard's {local_len} keys must hold whole blocks of {selector.block_size}")
    if k_scale is None:
        k_scale = jnp.ones(k.shape[:2], jnp.float32)

    def shard(q, k, w, k_scale, q_positions, kv_lengths):
        offset = jax.lax.axis_index(axis) * local_len
        if method == "dsa":
            idx, valid, keys = dsa_topk_reference(q, k, w, k_scale, q_positions - offset,
                                                  jnp.clip(kv_lengths - offset, 0, local_len), topk=topk,
                                                  return_keys=True, **opts)
            idx = jnp.where(valid, idx + offset, -1)
        else:
            local_sums = pool_block_sums(k, k_scale, jnp.clip(kv_lengths - offset, 0, local_len), opts["block_size"])
            sums = jax.lax.all_gather(local_sums, axis, axis=1, tiled=True)  # [B, S / block, d], block order
            if method == "hisa":
                idx, valid, keys = hisa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, sums, topk=topk,
                                                       key_offset=offset, return_keys=True, **opts)
            else:
                idx, valid, keys = misa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, sums, topk=topk,
                                                       key_offset=offset, axis_name=axis, return_keys=True, **opts)
        # device j receives rows j*T/n .. of every shard's list: [B, T / n, n * topk], in shard order
        keys = jax.lax.all_to_all(keys, axis, split_axis=1, concat_axis=2, tiled=True)
        idx = jax.lax.all_to_all(idx, axis, split_axis=1, concat_axis=2, tiled=True)
        slot, ok = top_k_by_key(keys, topk)
        return jnp.where(ok, jnp.take_along_axis(idx, jnp.maximum(slot, 0), axis=-1), -1), ok

    run = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(None, axis, None), P(), P(None, axis), P(), P()),
                        out_specs=(P(None, axis), P(None, axis)), check_vma=False)
    indices, valid = run(q, k, w, k_scale, q_positions, kv_lengths)
    return Selection(indices, valid)
