"""DSA lightning-indexer scoring + exact top-k: the entry point, its options and its implementations.

Implementations (names: ``dispatch.py``): ``xla`` (``reference.py``), ``triton`` (``triton.py``:
scoring fused with a streaming exact top-k, or scoring then a radix top-k), ``mosaic_tpu``
(``mosaic_tpu.py``: a scoring kernel, a threshold-search kernel and XLA compaction). All three return
the same indices in the same order.
"""

from __future__ import annotations

import dataclasses

import jax

from sparse_index_jax.kernels.dispatch import Backend, Op
from sparse_index_jax.kernels.dsa_topk.mosaic_tpu import dsa_topk_mosaic_tpu
from sparse_index_jax.kernels.dsa_topk.reference import dsa_topk_reference, eligibility, index_scores
from sparse_index_jax.kernels.dsa_topk.triton import dsa_topk_triton
from sparse_index_jax.kernels.inputs import check_indexer_inputs, check_positive_int
from sparse_index_jax.kernels.options import Options, checked_options, option
from sparse_index_jax.kernels.tpu_block_sizes import DsaTpuBlockSizes
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes

__all__ = ["DsaOptions", "DsaTritonBlockSizes", "DsaTpuBlockSizes", "OP", "backend_for", "dsa_topk",
           "dsa_topk_reference", "eligibility", "index_scores"]


@dataclasses.dataclass(frozen=True)
class DsaOptions(Options):
    """DSA scores every eligible key; its options only bound the memory of the xla implementation."""

    query_chunk: int = option(256, "queries scored together (memory; the result does not change)")
    key_chunk: int = option(1024, "keys scored per block (memory; the result does not change)")


OP = Op("dsa_topk", {"xla": dsa_topk_reference, "triton": dsa_topk_triton, "mosaic_tpu": dsa_topk_mosaic_tpu},
        block_sizes={"triton": DsaTritonBlockSizes, "mosaic_tpu": DsaTpuBlockSizes})


def backend_for(implementation: str = "auto") -> Backend:
    """The implementation a call with ``implementation`` would use here, with the reason."""
    return OP.backend_for(implementation)


def dsa_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, k_scale: jax.Array | None = None,
             q_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
             implementation: str = "auto", block_sizes: DsaTritonBlockSizes | DsaTpuBlockSizes | None = None,
             **options) -> tuple[jax.Array, jax.Array]:
    """Top-``topk`` keys per query by DSA score: (indices [B,T,topk] int32, -1 padded; valid [B,T,topk]).

    The contract (shapes, eligibility, tie rule) is ``sparse_index_jax.selection``'s; ``options`` are
    ``DsaOptions`` fields; ``block_sizes`` the Pallas implementation's tiles (``DsaTritonBlockSizes`` for
    triton, ``DsaTpuBlockSizes`` for mosaic_tpu; None: its defaults).
    """
    topk = check_positive_int(OP.name, "topk", topk)
    opts = checked_options(DsaOptions, OP.name, topk, **options)
    q_positions, kv_lengths = check_indexer_inputs(OP.name, q, k, w, k_scale, q_positions, kv_lengths)
    return OP.run(OP.backend_for(implementation), q, k, w, k_scale, q_positions, kv_lengths, topk=topk,
                  block_sizes=block_sizes, **opts.as_dict())
