"""Block sizes of the Triton selection kernels (DSA scoring, radix top-k, candidate scoring), and the check
every Triton block-size dataclass runs on construction: tiles are powers of two of at least 16."""

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
        check_tiles(self, ("block_k", "head_queries", "radix_tile"))


def check_tiles(block_sizes, tiles: tuple[str, ...]) -> None:
    """Every field of a Triton block-size dataclass is a positive int; those named in ``tiles`` are tile
    extents, so powers of two of at least 16 (tensor-core products need every dimension >= 16)."""
    name = type(block_sizes).__name__
    for f in dataclasses.fields(block_sizes):
        value = getattr(block_sizes, f.name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{f.name}={value!r}: must be a positive int")
        if f.name in tiles and (value & (value - 1) or value < 16):
            raise ValueError(f"{name}.{f.name}={value}: must be a power of 2 >= 16 (a Triton tile)")
