"""Block sizes of the Triton selection kernels (DSA scoring, radix top-k, candidate scoring), checked on
construction: Triton tiles are powers of two of at least 16."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DsaTritonBlockSizes:
    """Tiles of the Triton selection kernels (DSA scoring, radix top-k, candidate scoring), shared by the
    dsa, hisa and misa ops. Defaults: the fastest configurations of the H100 sweeps in docs/kernels.md
    (scoring: N 256, bk 64, 4 warps, 3 stages; radix: tiles of 256 keys, an 8,192-key bucket).

    ``block_k`` keys (or candidates) per scoring step, the matmul's M; ``head_queries`` head queries per
    scoring program, the matmul's N (``head_queries // H`` queries); ``radix_tile`` keys per radix-select
    step; ``radix_bucket`` keys a row's radix select copies aside once its prefix narrows them down.
    """

    block_k: int = 64
    head_queries: int = 256
    num_warps: int = 4
    num_stages: int = 3
    radix_tile: int = 256
    radix_bucket: int = 8192

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DsaTritonBlockSizes.{f.name}={value!r}: must be a positive int")
        for name in ("block_k", "head_queries", "radix_tile"):
            value = getattr(self, name)
            if value & (value - 1) or value < 16:
                raise ValueError(f"DsaTritonBlockSizes.{name}={value}: Triton tiles are powers of two >= 16")
