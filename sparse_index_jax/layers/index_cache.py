"""IndexCache patterns: F layers run their indexer, S layers reuse the Selection of the nearest preceding F.

``IndexCacheConfig`` describes the pattern (a string of "F"/"S", one letter per layer; layer 0 is
always F). Models take it as ``index_pattern`` at call time or bake it in at load time (S layers then
carry no indexer weights); ``pattern_from_hf_config`` reads it from an HF config (GLM-5.2 style
IndexShare keys). The training-free pattern search is ``sparse_index_jax.training.index_cache_search``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_LETTERS = {"full": "F", "shared": "S"}


@dataclasses.dataclass(frozen=True)
class IndexCacheConfig:
    pattern: str

    def __post_init__(self):
        if not self.pattern or set(self.pattern) - {"F", "S"}:
            raise ValueError(f"IndexCacheConfig.pattern: letters 'F' (own indexer) and 'S' (shared) only, "
                             f"got {self.pattern!r}")
        if self.pattern[0] != "F":
            raise ValueError(f"IndexCacheConfig.pattern: layer 0 must be F, got {self.pattern!r}")

    @classmethod
    def uniform(cls, num_layers: int, every: int, offset: int = 0) -> "IndexCacheConfig":
        """F at layer 0 and at every ``every``-th layer from ``offset``; S elsewhere."""
        if num_layers <= 0 or every <= 0 or offset < 0:
            raise ValueError(f"IndexCacheConfig.uniform: need num_layers > 0, every > 0, offset >= 0; got "
                             f"{num_layers}, {every}, {offset}")
        return cls("".join("F" if i == 0 or (i >= offset and (i - offset) % every == 0) else "S"
                           for i in range(num_layers)))

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "IndexCacheConfig":
        """From an HF config's ``indexer_types`` / ``index_topk_pattern`` / ``index_topk_freq`` (+ offset) keys."""
        return cls(pattern_from_hf_config(cfg, int(cfg["num_hidden_layers"])))

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def keep_ratio(self) -> float:
        return self.pattern.count("F") / len(self.pattern)

    def groups(self) -> list[tuple[int, list[int]]]:
        """(F layer, the layers it serves: itself and the S layers up to the next F)."""
        out: list[tuple[int, list[int]]] = []
        for i, letter in enumerate(self.pattern):
            if letter == "F":
                out.append((i, [i]))
            else:
                out[-1][1].append(i)
        return out


def check_pattern(pattern: str, num_layers: int, available: str | None = None) -> str:
    """Validates an F/S pattern for a model of ``num_layers`` layers; ``available`` is the pattern of the
    weights at hand (a layer it marks S has no indexer weights, so it cannot be F)."""
    IndexCacheConfig(pattern)
    if len(pattern) != num_layers:
        raise ValueError(f"index pattern {pattern!r} has {len(pattern)} letters for {num_layers} layers")
    if available is not None:
        missing = [i for i, (p, a) in enumerate(zip(pattern, available)) if p == "F" and a == "S"]
        if missing:
            raise ValueError(f"index pattern {pattern!r}: layers {missing} have no indexer weights in this model "
                             f"(its own pattern is {available!r}), so they can only be S")
    return pattern


def pattern_from_hf_config(cfg: Mapping[str, Any], num_layers: int) -> str:
    """The F/S pattern of an HF config; a ValueError says which key is wrong.

    Sources, first found wins: ``indexer_types`` ("full"/"shared" per layer); ``index_topk_pattern``
    ("FSSF..." or a list of "full"/"shared"); ``index_topk_freq`` + ``index_skip_topk_offset`` (HF's rule);
    otherwise every layer is F.
    """
    def from_types(key: str, types) -> str:
        bad = sorted(set(types) - set(_LETTERS))
        if bad:
            raise ValueError(f"{key} entries must be 'full' or 'shared', got {bad}")
        return "".join(_LETTERS[t] for t in types)

    if cfg.get("indexer_types") is not None:
        pattern = from_types("indexer_types", cfg["indexer_types"])
    elif cfg.get("index_topk_pattern") is not None:
        raw = cfg["index_topk_pattern"]
        pattern = raw if isinstance(raw, str) else from_types("index_topk_pattern", raw)
    elif cfg.get("index_topk_freq") is not None:
        freq = max(int(cfg["index_topk_freq"]), 1)
        offset = cfg.get("index_skip_topk_offset")
        offset = 2 if offset is None else int(offset)  # HF's default
        pattern = "".join("F" if max(i - offset + 1, 0) % freq == 0 else "S" for i in range(num_layers))
    else:
        pattern = "F" * num_layers
    return check_pattern(pattern, num_layers)
