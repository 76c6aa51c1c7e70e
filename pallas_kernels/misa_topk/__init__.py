"""MISA / MISA-H: a router picks a few indexer heads per query; MISA-H re-ranks with all heads.

Implementations (names: ``dispatch.py``): ``xla`` (``reference.py``), ``triton`` (``triton.py``: routing in
XLA, the DSA kernels on the routed heads, the gathered re-rank kernel for MISA-H), ``mosaic_tpu``
(``mosaic_tpu.py``: the DSA TPU kernels on the routed heads, the MISA-H re-rank in XLA). All return the
reference's indices.
"""

from __future__ import annotations

import dataclasses

import jax

from sparse_index_jax.kernels.block_pooling import check_block_sums, pool_block_sums
from sparse_index_jax.kernels.dispatch import Backend, Op
from sparse_index_jax.kernels.inputs import check_indexer_inputs, check_positive_int
from sparse_index_jax.kernels.misa_topk.mosaic_tpu import misa_topk_mosaic_tpu
from sparse_index_jax.kernels.misa_topk.reference import misa_topk_reference, route_heads
from sparse_index_jax.kernels.misa_topk.triton import misa_topk_triton
from sparse_index_jax.kernels.options import OptionError, Options, checked_options, option
from sparse_index_jax.kernels.tpu_block_sizes import DsaTpuBlockSizes
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes

__all__ = ["MisaOptions", "MisaHOptions", "OP", "backend_for", "misa_topk", "misa_topk_reference", "route_heads"]

CANDIDATES_PER_TOPK = 4  # MISA-H's routed pass keeps 4 * topk keys unless told otherwise (the MISA paper's setting)


@dataclasses.dataclass(frozen=True)
class MisaOptions(Options):
    """MISA (arXiv 2605.07363): ``active_heads`` heads routed per query by their energy on pooled blocks."""

    active_heads: int = option(8, "indexer heads routed per query (8 of 64 for DeepSeek-V3.2)")
    block_size: int = option(1024, "keys per pooled block the router scores (MISA's public code: 1024)")
    query_chunk: int = option(64, "queries processed together (memory; the result does not change)")
    key_chunk: int = option(1024, "keys scored per block (memory; the result does not change)")

    def check_rules(self, topk: int, num_heads: int | None) -> None:
        if num_heads is not None and self.active_heads > num_heads:
            raise OptionError("active_heads", f"active_heads={self.active_heads} exceeds the {num_heads} indexer heads "
                                              f"of q")


@dataclasses.dataclass(frozen=True)
class MisaHOptions(MisaOptions):
    """MISA-H: MISA's routed pass keeps ``candidates`` keys, re-scored with every head (the DSA score)."""

    candidates: int | None = option(None, f"keys the routed pass keeps for the all-head re-rank (default "
                                          f"{CANDIDATES_PER_TOPK} * topk)")

    def check_rules(self, topk: int, num_heads: int | None) -> None:
        super().check_rules(topk, num_heads)
        if self.candidates is not None and self.candidates < topk:
            raise OptionError("candidates", f"candidates={self.candidates} must be >= topk={topk} (MISA-H re-ranks "
                                            f"them to keep topk); the usual choice is {CANDIDATES_PER_TOPK} * topk")

    def candidates_for(self, topk: int) -> int:
        """The candidates kept for ``topk`` slots: the given number, else ``CANDIDATES_PER_TOPK * topk``."""
        return self.candidates or CANDIDATES_PER_TOPK * topk

    def op_kwargs(self, topk: int) -> dict:
        return {**self.as_dict(), "candidates": self.candidates_for(topk)}


OP = Op("misa_topk", {"xla": misa_topk_reference, "triton": misa_topk_triton, "mosaic_tpu": misa_topk_mosaic_tpu},
        block_sizes={"triton": DsaTritonBlockSizes, "mosaic_tpu": DsaTpuBlockSizes})


def backend_for(implementation: str = "auto") -> Backend:
    """The implementation a call with ``implementation`` would use here, with the reason."""
    return OP.backend_for(implementation)


def misa_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, candidates: int | None = None,
              k_scale: jax.Array | None = None, q_positions: jax.Array | None = None,
              kv_lengths: jax.Array | None = None, block_sums: jax.Array | None = None, implementation: str = "auto",
              block_sizes: DsaTritonBlockSizes | DsaTpuBlockSizes | None = None,
              **options) -> tuple[jax.Array, jax.Array]:
    """MISA top-k (``candidates=None``) or MISA-H (``candidates`` keys re-ranked with all heads).

    The contract is ``sparse_index_jax.selection``'s, the algorithm ``reference.py``'s; ``options`` are
    ``MisaOptions`` fields; ``block_sums`` as for ``hisa_topk``; ``block_sizes``: the triton or mosaic_tpu tiles.
    """
    topk = check_positive_int(OP.name, "topk", topk)
    q_positions, kv_lengths = check_indexer_inputs(OP.name, q, k, w, k_scale, q_positions, kv_lengths)
    if candidates is None:
        opts = checked_options(MisaOptions, OP.name, topk, q.shape[2], **options)
    else:
        opts = checked_options(MisaHOptions, OP.name, topk, q.shape[2], candidates=candidates, **options)
    if block_sums is None:
        block_sums = pool_block_sums(k, k_scale, kv_lengths, opts.block_size)
    check_block_sums(OP.name, block_sums, k, opts.block_size)
    return OP.run(OP.backend_for(implementation), q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk,
                  block_sizes=block_sizes, **opts.as_dict())
