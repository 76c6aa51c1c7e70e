"""Context-parallel DSA selection: keys sharded along the sequence, an exact global top-k merge.

Each device of the ``context`` mesh axis holds S / n consecutive keys, scores them against every query
and keeps its local top-k together with the ranking keys (the float32 score mapped to an ordered int32,
see ``pallas_kernels.common``). An all-to-all then sends every device the n local lists of ITS OWN T / n
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
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.blocks import pool_block_sums
from pallas_kernels.common import check_indexer_inputs, check_positive_int, map_query_chunks, to_shard, top_k_by_key
from pallas_kernels.dsa_topk.reference import dsa_topk_reference
from pallas_kernels.hisa_topk import hisa_options
from pallas_kernels.hisa_topk.reference import hisa_topk_reference
from pallas_kernels.misa_topk import default_candidates, misa_options
from pallas_kernels.misa_topk.reference import misa_topk_reference
from pallas_kernels.sparse_mla.reference import attend, gather_rows
from sparse_index_jax.selection import Selection

METHODS = ("dsa", "hisa", "misa", "misa_h")


def select_topk_context_parallel(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, mesh: Mesh,
                                 method: str = "dsa", axis: str = "context", q_positions: jax.Array | None = None,
                                 kv_lengths: jax.Array | None = None, k_scale: jax.Array | None = None,
                                 **options) -> Selection:
    """``select_topk`` with k [B,S,d] (and k_scale) sharded over ``axis``; same result, index for index.

    S and T must divide evenly over the axis (for hisa / misa / misa_h, each shard must also hold whole
    blocks). Queries, head weights, positions and lengths are replicated over ``axis``; the returned
    Selection is sharded along T. ``options`` are the method's (see ``select_topk``); dsa's
    ``key_chunk`` should divide S / n so each device scores exactly the key blocks a single device would.

    hisa / misa / misa_h: each shard pools its keys into block sums and an all-gather hands every shard
    all of them (M * d floats per row: tiny), so block choice and routing are the same everywhere; MISA's
    own-block partial mean is completed by a psum; MISA-H all-gathers its first-pass candidates.
    """
    op = "select_topk_context_parallel"
    if method not in METHODS:
        raise ValueError(f"{op}: unknown method {method!r}; available: {METHODS}")
    q_positions, kv_lengths = check_indexer_inputs(op, q, k, w, k_scale, q_positions, kv_lengths)
    if axis not in mesh.shape:
        raise ValueError(f"{op}: mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    n = mesh.shape[axis]
    S = k.shape[1]
    if S % n or q.shape[1] % n:
        raise ValueError(f"{op}: S={S} keys and T={q.shape[1]} queries must split evenly over the {n} devices of "
                         f"axis {axis!r}; pad them (padded queries at position -1 select nothing)")
    local_len = S // n
    if method == "dsa":
        unknown = set(options) - {"query_chunk", "key_chunk"}
        if unknown:
            raise TypeError(f"{op}: method 'dsa' takes no option(s) {sorted(unknown)}")
        opts = dict(topk=check_positive_int(op, "topk", topk),
                    query_chunk=check_positive_int(op, "query_chunk", options.get("query_chunk", 256)),
                    key_chunk=min(check_positive_int(op, "key_chunk", options.get("key_chunk", 1024)), local_len))
    elif method == "hisa":
        opts = hisa_options(topk, **options)
    else:
        if method == "misa_h":
            options.setdefault("candidates", default_candidates(topk))
        elif "candidates" in options:
            raise TypeError(f"{op}: method 'misa' takes no option 'candidates' (that is misa_h)")
        opts = misa_options(topk, q.shape[2], **options)
    if method != "dsa" and local_len % opts["block_size"]:
        raise ValueError(f"{op}: each shard's {local_len} keys must hold whole blocks of {opts['block_size']}")
    if k_scale is None:
        k_scale = jnp.ones(k.shape[:2], jnp.float32)

    def shard(q, k, w, k_scale, q_positions, kv_lengths):
        offset = jax.lax.axis_index(axis) * local_len
        if method == "dsa":
            idx, valid, keys = dsa_topk_reference(q, k, w, k_scale, q_positions - offset,
                                                  jnp.clip(kv_lengths - offset, 0, local_len), return_keys=True,
                                                  **opts)
            idx = jnp.where(valid, idx + offset, -1)
        else:
            local_sums = pool_block_sums(k, k_scale, jnp.clip(kv_lengths - offset, 0, local_len), opts["block_size"])
            sums = jax.lax.all_gather(local_sums, axis, axis=1, tiled=True)  # [B, S / block, d], block order
            if method == "hisa":
                idx, valid, keys = hisa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, sums,
                                                       key_offset=offset, return_keys=True, **opts)
            else:
                idx, valid, keys = misa_topk_reference(q, k, w, k_scale, q_positions, kv_lengths, sums,
                                                       key_offset=offset, axis_name=axis, return_keys=True, **opts)
        # device j receives rows j*T/n .. of every shard's list: [B, T / n, n * topk], in shard order
        keys = jax.lax.all_to_all(keys, axis, split_axis=1, concat_axis=2, tiled=True)
        idx = jax.lax.all_to_all(idx, axis, split_axis=1, concat_axis=2, tiled=True)
        slot, ok = top_k_by_key(keys, opts["topk"])
        return jnp.where(ok, jnp.take_along_axis(idx, jnp.maximum(slot, 0), axis=-1), -1), ok

    run = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(None, axis, None), P(), P(None, axis), P(), P()),
                        out_specs=(P(None, axis), P(None, axis)), check_vma=False)
    indices, valid = run(q, k, w, k_scale, q_positions, kv_lengths)
    return Selection(indices, valid)


def sparse_mla_context_parallel(q: jax.Array, kv: jax.Array, selection: Selection, *, scale: float, v_dim: int,
                                mesh: Mesh, axis: str = "context", query_chunk: int = 64, return_probs: bool = False):
    """``pallas_kernels.sparse_mla`` with the cache rows kv [B,S,Dk] sharded over ``axis``.

    Each device attends its queries' selected rows that it holds, and the shards' partial softmaxes are
    combined exactly: the row maximum by ``pmax``, then the exponential sums and the weighted values by
    ``psum`` (flash-decoding style). Equal to the single-device result up to float summation order.
    Queries and the selection are replicated over ``axis``; so is the output [B,T,Hq,v_dim].
    Communication per layer and device: two all-reduces of [B,T,Hq] floats and one of [B,T,Hq,v_dim].
    ``return_probs`` also returns the head-averaged slot probabilities [B,T,k] (each shard's slots summed
    by one more all-reduce), the indexer's distillation target.
    """
    op = "sparse_mla_context_parallel"
    n = mesh.shape[axis]
    S = kv.shape[1]
    if S % n:
        raise ValueError(f"{op}: S={S} cache rows do not split evenly over the {n} devices of axis {axis!r}")
    local_len = S // n
    query_chunk = check_positive_int(op, "query_chunk", query_chunk)

    def shard(q, kv, indices, valid):
        offset = jax.lax.axis_index(axis) * local_len

        def one_chunk(q_c, idx_c, ok_c):
            local, in_shard = to_shard(idx_c, offset, local_len)
            rows = gather_rows(kv, local).astype(q.dtype)
            out = attend(q_c, rows, ok_c & in_shard, scale=scale, v_dim=v_dim, axis_name=axis,
                         return_probs=return_probs)
            # a slot's probability is nonzero only on the shard holding its row: the sum is the whole
            return (out[0], jax.lax.psum(out[1], axis)) if return_probs else out

        out = map_query_chunks(one_chunk, query_chunk, (q, 0), (indices, -1), (valid, False))
        return (out[0].astype(q.dtype), out[1]) if return_probs else out.astype(q.dtype)

    run = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(None, axis, None), P(), P()),
                        out_specs=(P(), P()) if return_probs else P(), check_vma=False)
    return run(q, kv, selection.indices, selection.valid)
