"""Sparse MLA with the cache rows sharded along the sequence (context parallelism), exact.

Each device of the ``context`` mesh axis holds S / n consecutive cache rows; a query's selected rows are
attended where they live and the shards' partial softmaxes are combined exactly (flash-decoding style).
``DSAAttention`` uses it for prefill inside ``sharding.activation_sharding(mesh)`` with a context axis.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparse_index_jax.kernels.chunking import map_query_chunks, to_shard
from sparse_index_jax.kernels.inputs import check_positive_int
from sparse_index_jax.kernels.sparse_mla.reference import attend, gather_rows
from sparse_index_jax.selection.contract import Selection


def sparse_mla_context_parallel(q: jax.Array, kv: jax.Array, selection: Selection, *, scale: float, v_dim: int,
                                mesh: Mesh, axis: str = "context", query_chunk: int = 64, return_probs: bool = False):
    """``sparse_index_jax.kernels.sparse_mla`` with the cache rows kv [B,S,Dk] sharded over ``axis``.

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
