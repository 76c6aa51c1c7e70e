"""Block sizes of the Triton selection kernels (DSA scoring, radix top-k, candidate scoring), and the check
every Triton block-size dataclass runs on construction: tiles are powers of two of at least 16."""

from __future__ import annotations

import dataclasses

SELECTIONS = ("streaming", "two_pass")


@dataclasses.dataclass(frozen=True)
class DsaTritonBlockSizes:
    """Tiles of the Triton selection kernels (DSA scoring, streaming and radix top-k, candidate scoring),
    shared by the dsa, hisa and misa ops. Scoring and radix defaults: the fastest configurations of the
    H100 sweeps in docs/kernels.md (N 256, bk 64, 4 warps, 3 stages; radix tiles of 256 keys, an
    8,192-key bucket). The streaming fields are not tuned on a GPU yet (docs/kernels.md says so).

    ``block_k`` keys (or candidates) per scoring step, the matmul's M; ``head_queries`` head queries per
    scoring program, the matmul's N (``head_queries // H`` queries); ``radix_tile`` keys per radix-select
    step (also the streaming buffer's compaction step); ``radix_bucket`` keys a row's radix select copies
    aside once its prefix narrows them down; ``rank_tile`` survivors per step of the streaming kernel's
    final ranking ([rank_tile, rank_tile] comparisons); ``min_programs`` programs a streaming launch
    should have: fewer query blocks than that (decode) split each row's keys into segments selected in
    parallel and merged after. ``selection``: ``"streaming"`` (one fused kernel, no [T, S] buffer) or
    ``"two_pass"`` (scoring kernel, [chunk, S] keys in memory, radix top-k: the measured H100 baseline).
    """

    block_k: int = 64
    head_queries: int = 256
    num_warps: int = 4
    num_stages: int = 3
    radix_tile: int = 256
    radix_bucket: int = 8192
    rank_tile: int = 64
    min_programs: int = 264
    selection: str = "streaming"

    def __post_init__(self):
        check_tiles(self, ("block_k", "head_queries", "radix_tile", "rank_tile"))
        if self.selection not in SELECTIONS:
            raise ValueError(f"DsaTritonBlockSizes.selection={self.selection!r}: must be one of {SELECTIONS}")


def check_tiles(block_sizes, tiles: tuple[str, ...]) -> None:
    """Every int field of a Triton block-size dataclass is a positive int; those named in ``tiles`` are
    tile extents, so powers of two of at least 16 (tensor-core products need every dimension >= 16)."""
    name = type(block_sizes).__name__
    for f in dataclasses.fields(block_sizes):
        value = getattr(block_sizes, f.name)
        if isinstance(f.default, str):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{f.name}={value!r}: must be a positive int")
        if f.name in tiles and (value & (value - 1) or value < 16):
            raise ValueError(f"{name}.{f.name}={value}: must be a power of 2 >= 16 (a Triton tile)")
