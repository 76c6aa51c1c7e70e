"""Configuration dataclasses, buildable from HF ``config.json`` dictionaries.

Every config validates itself on construction and names the offending field, so a bad value fails
where it is written rather than deep inside a traced function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

RopeLayout = Literal["half", "interleaved"]
SelectorMethod = Literal["dsa", "hisa", "misa", "misa_h"]

# The indexer's RoPE pairing of each supported HF model type.
INDEXER_ROPE_LAYOUT = {"deepseek_v32": "half", "glm_moe_dsa": "interleaved"}

# Block size each hierarchical selector uses unless told otherwise (HISA paper; MISA public code).
DEFAULT_BLOCK_SIZE = {"hisa": 128, "misa": 1024, "misa_h": 1024}


def _require(cond: bool, cls: type, field: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{cls.__name__}.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies, plain or YaRN (as DeepSeek-V3/V3.2 and GLM-5 use them).

    ``attention_factor`` multiplies cos/sin (HF's ``attention_scaling``); DeepSeek's YaRN sets it to
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` which is 1.0 for the released models.
    ``softmax_mscale`` is the extra factor the MLA softmax scale is multiplied by *twice*
    (``mscale(factor, mscale_all_dim)``, 1 + 0.1 ln 40 for DeepSeek-V3.2).
    """

    theta: float = 10000.0
    rope_type: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def __post_init__(self):
        _require(self.theta > 0, RopeConfig, "theta", f"must be > 0, got {self.theta}")
        _require(self.rope_type in ("default", "yarn"), RopeConfig, "rope_type",
                 f"must be 'default' or 'yarn', got {self.rope_type!r}")
        _require(self.factor > 0, RopeConfig, "factor", f"must be > 0, got {self.factor}")

    @staticmethod
    def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def attention_factor(self) -> float:
        if self.rope_type != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return self.yarn_mscale(self.factor, self.mscale) / self.yarn_mscale(self.factor, self.mscale_all_dim)
        return self.yarn_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        if self.rope_type != "yarn" or not self.mscale_all_dim:
            return 1.0
        return self.yarn_mscale(self.factor, self.mscale_all_dim)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "RopeConfig":
        """Reads both key styles: new ``rope_parameters`` and old ``rope_theta`` + ``rope_scaling``."""
        params = dict(cfg.get("rope_parameters") or {})
        if not params:
            params = dict(cfg.get("rope_scaling") or {})
            if "rope_theta" in cfg:
                params.setdefault("rope_theta", cfg["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"RopeConfig.rope_type: only 'default' and 'yarn' are supported, config has {rope_type!r}")
        kw: dict[str, Any] = {"theta": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                              "rope_type": rope_type}
        if rope_type == "yarn":
            kw.update(
                factor=float(params["factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
                mscale=float(params.get("mscale") or 0.0),
                mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                truncate=bool(params.get("truncate", True)),
            )
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class IndexerConfig:
    """The lightning indexer of one DSA layer.

    ``q_input_dim`` is the width the query projection ``wq_b`` reads: the MLA query latent
    (``q_lora_rank``) in DeepSeek-V3.2 / GLM-5, or the hidden size for models without one.

    ``method`` picks the selector; its options: ``block_size`` (hisa/misa/misa_h; None = 128 for
    hisa, 1024 for misa), ``num_blocks`` (hisa), ``active_heads`` (misa/misa_h), ``candidates``
    (misa_h; None = 4 * topk). ``query_chunk`` None = the selector's own default.
    """

    hidden_size: int
    q_input_dim: int
    n_heads: int = 64
    head_dim: int = 128
    topk: int = 2048
    rope_dim: int = 64
    rope_layout: RopeLayout = "half"
    norm_eps: float = 1e-6
    use_hadamard: bool = False
    fp8: bool = False
    fp8_scale_fmt: Literal["plain", "ue8m0"] = "plain"
    method: SelectorMethod = "dsa"
    block_size: int | None = None
    num_blocks: int = 64
    active_heads: int = 8
    candidates: int | None = None
    query_chunk: int | None = None
    key_chunk: int = 1024

    def __post_init__(self):
        cls = IndexerConfig
        for name in ("hidden_size", "q_input_dim", "n_heads", "head_dim", "topk", "num_blocks", "active_heads",
                     "key_chunk", "block_size", "candidates", "query_chunk"):
            value = getattr(self, name)
            if value is None and name in ("block_size", "candidates", "query_chunk"):
                continue
            _require(isinstance(value, int) and value > 0, cls, name, f"must be a positive int, got {value!r}")
        _require(0 <= self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0, cls, "rope_dim",
                 f"must be even and in [0, head_dim={self.head_dim}], got {self.rope_dim}")
        _require(self.rope_layout in ("half", "interleaved"), cls, "rope_layout",
                 f"must be 'half' (DeepSeek-V3.2) or 'interleaved' (GLM-5), got {self.rope_layout!r}")
        _require(self.norm_eps > 0, cls, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _require(self.fp8_scale_fmt in ("plain", "ue8m0"), cls, "fp8_scale_fmt",
                 f"must be 'plain' or 'ue8m0', got {self.fp8_scale_fmt!r}")
        _require(self.method in ("dsa", "hisa", "misa", "misa_h"), cls, "method",
                 f"unknown selector {self.method!r}; available: 'dsa', 'hisa', 'misa', 'misa_h'")
        if self.method == "hisa":
            _require(self.num_blocks >= 2, cls, "num_blocks",
                     f"must be >= 2 (the first and the query's own block are always kept), got {self.num_blocks}")
            _require((self.num_blocks - 1) * self.selector_block_size >= self.topk, cls, "num_blocks",
                     f"(num_blocks - 1) * block_size = {(self.num_blocks - 1) * self.selector_block_size} < "
                     f"topk={self.topk}: the full blocks besides the query's own must be able to fill topk")
        if self.method in ("misa", "misa_h"):
            _require(self.active_heads <= self.n_heads, cls, "active_heads",
                     f"{self.active_heads} exceeds n_heads={self.n_heads}")
        if self.method == "misa_h" and self.candidates is not None:
            _require(self.candidates >= self.topk, cls, "candidates",
                     f"must be >= topk={self.topk}, got {self.candidates}")
        if self.use_hadamard:
            _require(self.head_dim & (self.head_dim - 1) == 0, cls, "head_dim",
                     f"the Hadamard rotation needs a power of two, got {self.head_dim}")

    @property
    def selector_block_size(self) -> int | None:
        """Pooling block of the hierarchical selectors (None for dsa)."""
        if self.method == "dsa":
            return None
        return self.block_size or DEFAULT_BLOCK_SIZE[self.method]

    def selector_options(self) -> dict[str, Any]:
        """The ``select_topk`` options of this config's method."""
        opts: dict[str, Any] = {}
        if self.method == "dsa":
            opts["key_chunk"] = self.key_chunk
        elif self.method == "hisa":
            opts.update(block_size=self.selector_block_size, num_blocks=self.num_blocks)
        else:
            opts.update(block_size=self.selector_block_size, active_heads=self.active_heads,
                        key_chunk=self.key_chunk)
            if self.method == "misa_h" and self.candidates:
                opts["candidates"] = self.candidates  # None: select_topk's default, 4 * topk
        if self.query_chunk is not None:
            opts["query_chunk"] = self.query_chunk
        return opts

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> "IndexerConfig":
        """Indexer of a ``deepseek_v32`` or ``glm_moe_dsa`` config: the RoPE layout follows the model type."""
        model_type = cfg.get("model_type", "deepseek_v32")
        if model_type not in INDEXER_ROPE_LAYOUT and "rope_layout" not in overrides:
            raise ValueError(f"IndexerConfig.rope_layout: unknown model_type {model_type!r}; pass rope_layout= "
                             f"('half' for DeepSeek-V3.2-style, 'interleaved' for GLM-5-style indexers)")
        q_lora = cfg.get("q_lora_rank")
        kw: dict[str, Any] = dict(
            hidden_size=int(cfg["hidden_size"]),
            q_input_dim=int(q_lora) if q_lora else int(cfg["hidden_size"]),
            n_heads=int(cfg.get("index_n_heads", 64)),
            head_dim=int(cfg.get("index_head_dim", 128)),
            topk=int(cfg.get("index_topk", 2048)),
            rope_dim=int(cfg.get("qk_rope_head_dim", 64)),
            rope_layout=INDEXER_ROPE_LAYOUT.get(model_type, "half"),
        )
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3 style) dimensions.

    The MLA rotary layout is interleaved for both DeepSeek-V3.2 and GLM-5 (HF's
    ``apply_rotary_pos_emb_interleave``), whatever the indexer uses. ``latent_norm_eps`` is the eps of
    ``q_a_layernorm`` and ``kv_a_layernorm``: 1e-6 in the official code and in HF for both families,
    whatever the model's ``rms_norm_eps`` (GLM-5: 1e-5) says.
    """

    hidden_size: int
    num_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    query_chunk: int = 64

    def __post_init__(self):
        cls = MLAConfig
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "query_chunk"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, cls, name, f"must be a positive int, got {value!r}")
        _require(self.qk_rope_head_dim % 2 == 0, cls, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, cls, "q_lora_rank",
                 f"must be None or > 0, got {self.q_lora_rank}")
        _require(self.latent_norm_eps > 0, cls, "latent_norm_eps", f"must be > 0, got {self.latent_norm_eps}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 * mscale^2`` (YaRN), as in the official code and HF transformers."""
        return self.qk_head_dim ** -0.5 * self.rope.softmax_mscale ** 2

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> "MLAConfig":
        kw: dict[str, Any] = dict(
            hidden_size=int(cfg["hidden_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            q_lora_rank=int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None,
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            rope=RopeConfig.from_hf_config(cfg),
        )
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class DSAConfig:
    """One DSA attention layer: MLA plus its lightning indexer (``indexer=None``: a dense MLA layer)."""

    mla: MLAConfig
    indexer: IndexerConfig | None

    def __post_init__(self):
        if self.indexer is not None:
            _require(self.indexer.hidden_size == self.mla.hidden_size, DSAConfig, "indexer.hidden_size",
                     f"{self.indexer.hidden_size} != mla.hidden_size {self.mla.hidden_size}")
            expected = self.mla.q_lora_rank or self.mla.hidden_size
            _require(self.indexer.q_input_dim == expected, DSAConfig, "indexer.q_input_dim",
                     f"{self.indexer.q_input_dim} != the MLA query latent width {expected}")
            _require(self.indexer.rope_dim == self.mla.qk_rope_head_dim, DSAConfig, "indexer.rope_dim",
                     f"{self.indexer.rope_dim} != mla.qk_rope_head_dim {self.mla.qk_rope_head_dim} "
                     f"(the indexer shares the MLA rotary frequencies)")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "DSAConfig":
        return cls(mla=MLAConfig.from_hf_config(cfg), indexer=IndexerConfig.from_hf_config(cfg))
