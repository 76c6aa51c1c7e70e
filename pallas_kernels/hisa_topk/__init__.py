"""HISA: block-level coarse filter, then token-level top-k over the kept blocks; entry point and options.

Implementations (names: ``dispatch.py``): ``xla`` (``reference.py``), ``triton`` (``triton.py``: the DSA
scoring kernel on block means, then gathered refinement and radix top-k kernels), ``mosaic_tpu``
(``mosaic_tpu.py``: the TPU scoring and threshold-search kernels on block means, then a refinement kernel
whose scalar-prefetched block ids drive the key DMA). All return the reference's indices.
"""

from __future__ import annotations

import dataclasses

import jax

from sparse_index_jax.kernels import dispatch
from sparse_index_jax.kernels.block_pooling import check_block_sums, pool_block_sums
from sparse_index_jax.kernels.dispatch import Backend, Op
from sparse_index_jax.kernels.hisa_topk.mosaic_tpu import hisa_topk_mosaic_tpu
from sparse_index_jax.kernels.hisa_topk.reference import hisa_topk_reference
from sparse_index_jax.kernels.hisa_topk.triton import hisa_topk_triton
from sparse_index_jax.kernels.inputs import check_indexer_inputs, check_positive_int
from sparse_index_jax.kernels.options import OptionError, Options, checked_options, option
from sparse_index_jax.kernels.tpu_block_sizes import LANES, DsaTpuBlockSizes
from sparse_index_jax.kernels.triton_block_sizes import DsaTritonBlockSizes

__all__ = ["HisaOptions", "OP", "backend_for", "hisa_topk", "hisa_topk_reference"]


@dataclasses.dataclass(frozen=True)
class HisaOptions(Options):
    """HISA (arXiv 2603.28458): blocks of ``block_size`` keys scored by their mean, ``num_blocks`` kept."""

    block_size: int = option(128, "keys per block; the block's mean key represents it")
    num_blocks: int = option(64, "blocks kept per query, the first and the query's own included")
    query_chunk: int = option(32, "queries processed together (memory; the result does not change)")

    def check_rules(self, topk: int, num_heads: int | None) -> None:
        if self.num_blocks < 2:
            raise OptionError("num_blocks", f"num_blocks must be >= 2 (the first and the query's own block are "
                                            f"always kept), got {self.num_blocks}")
        if (self.num_blocks - 1) * self.block_size < topk:
            raise OptionError("num_blocks", f"(num_blocks - 1) * block_size = {(self.num_blocks - 1) * self.block_size}"
                                            f" < topk={topk}: the query's own block may hold a single eligible token, "
                                            f"so only the other num_blocks - 1 full blocks guarantee topk candidates; "
                                            f"raise num_blocks or block_size")


OP = Op("hisa_topk", {"xla": hisa_topk_reference, "triton": hisa_topk_triton, "mosaic_tpu": hisa_topk_mosaic_tpu},
        block_sizes={"triton": DsaTritonBlockSizes, "mosaic_tpu": DsaTpuBlockSizes})


def _refusals(block_size: int) -> dict[str, str]:
    if dispatch.platform() == "tpu" and block_size % LANES:  # compiled: a key block's scales fill whole lanes
        return {"mosaic_tpu": f"compiled TPU kernels need block_size to be a multiple of {LANES} (lanes), got "
                              f"{block_size}; HISA's usual 128 works"}
    return {}


def backend_for(implementation: str = "auto", *, block_size: int = HisaOptions.block_size) -> Backend:
    """The implementation a call with ``implementation`` (and ``block_size``) would use here, with the reason."""
    return OP.backend_for(implementation, _refusals(block_size))


def hisa_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, k_scale: jax.Array | None = None,
              q_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
              block_sums: jax.Array | None = None, implementation: str = "auto",
              block_sizes: DsaTritonBlockSizes | DsaTpuBlockSizes | None = None,
              **options) -> tuple[jax.Array, jax.Array]:
    """HISA top-k; the contract is ``sparse_index_jax.selection``'s, the algorithm ``reference.py``'s.

    ``options`` are ``HisaOptions`` fields. ``block_sums`` [B, ceil(S/block_size), d] float32: pooled key
    sums kept by a decode cache; computed from ``k`` when omitted. ``block_sizes``: the triton or mosaic_tpu tiles.
    """
    topk = check_positive_int(OP.name, "topk", topk)
    opts = checked_options(HisaOptions, OP.name, topk, **options)
    q_positions, kv_lengths = check_indexer_inputs(OP.name, q, k, w, k_scale, q_positions, kv_lengths)
    if block_sums is None:
        block_sums = pool_block_sums(k, k_scale, kv_lengths, opts.block_size)
    check_block_sums(OP.name, block_sums, k, opts.block_size)
    backend = OP.backend_for(implementation, _refusals(opts.block_size))
    return OP.run(backend, q, k, w, k_scale, q_positions, kv_lengths, block_sums, topk=topk, block_sizes=block_sizes,
                  **opts.as_dict())
