"""Configuration dataclasses, buildable from HF ``config.json`` dictionaries.

Every config validates itself on construction and names the offending field, so a bad value fails
where it is written rather than deep inside a traced function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Mapping

from sparse_index_jax.kernels.options import OptionError
from sparse_index_jax.selection.methods import Selector, lookup_method

RopeLayout = Literal["half", "interleaved"]

# The indexer's RoPE pairing of each supported HF model type.
INDEXER_ROPE_LAYOUT = {"deepseek_v32": "half", "glm_moe_dsa": "interleaved"}


def _require(cond: bool, cls: type, field: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{cls.__name__}.{field}: {message}")


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies as HF transformers computes them (``modeling_rope_utils``): ``default``,
    ``linear`` (every frequency / ``factor``), ``dynamic`` (NTK: the base grows with the sequence once it passes
    ``max_position_embeddings``), ``llama3`` (Llama 3.1: low frequencies / ``factor``, a smooth ramp between
    ``low_freq_factor`` and ``high_freq_factor``) and ``yarn`` (as DeepSeek-V3/V3.2, GLM-5 and others use it).

    ``attention_factor`` multiplies cos/sin (HF's ``attention_scaling``); YaRN sets it from the config's
    ``attention_factor`` key when given (``attention_scaling`` here), else DeepSeek's
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1.0 for the released models) or
    ``mscale(factor)``. ``softmax_mscale`` is the extra factor the MLA softmax scale is multiplied by *twice*
    (``mscale(factor, mscale_all_dim)``, 1 + 0.1 ln 40 for DeepSeek-V3.2).
    """

    theta: float = 10000.0
    rope_type: Literal["default", "linear", "dynamic", "llama3", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096   # yarn, llama3: the pretraining context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    attention_scaling: float | None = None         # yarn: the config's explicit ``attention_factor``
    low_freq_factor: float = 1.0                   # llama3
    high_freq_factor: float = 4.0                  # llama3
    max_position_embeddings: int = 4096            # dynamic: the length past which the base grows

    def __post_init__(self):
        _require(self.theta > 0, RopeConfig, "theta", f"must be > 0, got {self.theta}")
        _require(self.rope_type in ROPE_TYPES, RopeConfig, "rope_type",
                 f"must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        _require(self.factor > 0, RopeConfig, "factor", f"must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            _require(self.high_freq_factor > self.low_freq_factor > 0, RopeConfig, "high_freq_factor",
                     f"llama3 needs high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor} and "
                     f"{self.low_freq_factor}")
        for name in ("original_max_position_embeddings", "max_position_embeddings"):
            _require(getattr(self, name) > 0, RopeConfig, name, f"must be > 0, got {getattr(self, name)}")

    @staticmethod
    def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def attention_factor(self) -> float:
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_scaling is not None:
            return self.attention_scaling
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
        """Reads both key styles: new ``rope_parameters`` and old ``rope_theta`` + ``rope_scaling`` (``type`` or
        ``rope_type``); ``original_max_position_embeddings`` defaults to ``max_position_embeddings`` as in HF."""
        params = dict(cfg.get("rope_parameters") or {})
        if not params:
            params = dict(cfg.get("rope_scaling") or {})
            if "rope_theta" in cfg:
                params.setdefault("rope_theta", cfg["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeConfig.rope_type: supported are {', '.join(ROPE_TYPES)}; config has {rope_type!r}")
        partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0)
        if partial != 1.0:
            raise ValueError(f"RopeConfig: partial_rotary_factor={partial} is not supported (every dim rotates)")
        max_pos = int(cfg.get("max_position_embeddings") or 4096)
        original = int(params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                       or max_pos)
        kw: dict[str, Any] = {"theta": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                              "rope_type": rope_type}
        if rope_type in ("linear", "dynamic", "llama3"):
            kw["factor"] = float(params["factor"])
        if rope_type == "dynamic":
            kw["max_position_embeddings"] = max_pos
        if rope_type == "llama3":
            kw.update(original_max_position_embeddings=original,
                      low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]))
        if rope_type == "yarn":
            explicit = params.get("attention_factor")
            kw.update(
                factor=float(params.get("factor") or max_pos / original),
                original_max_position_embeddings=original,
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
                mscale=float(params.get("mscale") or 0.0),
                mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                truncate=bool(params.get("truncate", True)),
                attention_scaling=None if explicit is None else float(explicit),
            )
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class IndexerWeights:
    """What a lightning indexer's weights are and mean: every field a loaded indexer cannot change.

    ``q_input_dim`` is the width the query projection ``wq_b`` reads: the MLA query latent
    (``q_lora_rank``) in DeepSeek-V3.2 / GLM-5, or the hidden size for models without one. RoPE rotates
    the first ``rope_dim`` dims, paired ``half`` (V3.2) or ``interleaved`` (GLM-5); ``use_hadamard`` and
    ``fp8`` select the official inference-precision path. The selector (method, topk, options) is not
    here: it may change at any time (``IndexerConfig.selector``).
    """

    hidden_size: int
    q_input_dim: int
    n_heads: int = 64
    head_dim: int = 128
    rope_dim: int = 64
    rope_layout: RopeLayout = "half"
    norm_eps: float = 1e-6
    use_hadamard: bool = False
    fp8: bool = False
    fp8_scale_fmt: Literal["plain", "ue8m0"] = "plain"

    def __post_init__(self):
        cls = type(self)
        for name in ("hidden_size", "q_input_dim", "n_heads", "head_dim"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, cls, name, f"must be a positive int, got {value!r}")
        _require(0 <= self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0, cls, "rope_dim",
                 f"must be even and in [0, head_dim={self.head_dim}], got {self.rope_dim}")
        _require(self.rope_layout in ("half", "interleaved"), cls, "rope_layout",
                 f"must be 'half' (DeepSeek-V3.2) or 'interleaved' (GLM-5), got {self.rope_layout!r}")
        _require(self.norm_eps > 0, cls, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _require(self.fp8_scale_fmt in ("plain", "ue8m0"), cls, "fp8_scale_fmt",
                 f"must be 'plain' or 'ue8m0', got {self.fp8_scale_fmt!r}")
        if self.use_hadamard:
            _require(self.head_dim & (self.head_dim - 1) == 0, cls, "head_dim",
                     f"the Hadamard rotation needs a power of two, got {self.head_dim}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields that fix the weights' shapes and meaning (the indexers file checks exactly these)."""
        return tuple(f.name for f in dataclasses.fields(IndexerWeights))

    def weights(self) -> "IndexerWeights":
        """These fields alone (an ``IndexerConfig`` minus its selector)."""
        return IndexerWeights(**{name: getattr(self, name) for name in IndexerWeights.field_names()})


@dataclasses.dataclass(frozen=True)
class IndexerConfig(IndexerWeights):
    """One layer's lightning indexer: its weights (the ``IndexerWeights`` fields) and its default selector,
    written flat as HF's config.json writes ``index_n_heads`` next to ``index_topk``.

    ``selector`` is the typed ``Selector`` these fields make: ``method`` and ``topk``, and the method's
    options (``sparse_index_jax.selection.METHODS``); an option left None takes the method's default, and
    options the method does not take are ignored, so one config can switch methods
    (``with_selector``). Bad values raise naming the field, e.g. ``IndexerConfig.num_blocks: ...``.
    """

    topk: int = 2048
    method: str = "dsa"
    block_size: int | None = None
    num_blocks: int | None = None
    active_heads: int | None = None
    candidates: int | None = None
    query_chunk: int | None = None
    key_chunk: int | None = None

    def __post_init__(self):
        super().__post_init__()
        try:
            self.selector  # noqa: B018  (validates the selection fields now, naming the bad one)
        except OptionError as err:
            raise ValueError(f"IndexerConfig.{err.field}: {err}") from None

    @classmethod
    def option_fields(cls) -> tuple[str, ...]:
        """The selection fields besides ``topk`` and ``method``: every method's option names, each once."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in IndexerWeights.field_names()
                     and f.name not in ("topk", "method"))

    @functools.cached_property
    def selector(self) -> Selector:
        """The typed selector of these fields (validated against ``n_heads``)."""
        spec = lookup_method(self.method)
        given = {name: getattr(self, name) for name in spec.options.names() if getattr(self, name) is not None}
        return Selector(self.method, self.topk, spec.options(**given)).check_heads(self.n_heads)

    def with_selector(self, selector: Selector) -> "IndexerConfig":
        """This config with ``selector``'s method, topk and options (every other option field cleared)."""
        options = selector.options.as_dict()
        return dataclasses.replace(self, topk=selector.topk, method=selector.method,
                                   **{name: options.get(name) for name in self.option_fields()})

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

    ``query_chunk``: queries per step of the sparse MLA op (its xla implementation and the Triton
    backward). ``prefill_chunk``: when set, the layer runs its query side (query projections, the absorbed
    query, sparse MLA, the output projection) ``prefill_chunk`` queries at a time, so a long prefill
    holds the [T, heads, 576] absorbed query and its outputs for one chunk only (DeepSeek's shape at 256K
    tokens: 72 GiB all at once); the keys, the cache rows and the selection are still built for all T.
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
    prefill_chunk: int | None = None

    def __post_init__(self):
        cls = MLAConfig
        _require(self.prefill_chunk is None or (isinstance(self.prefill_chunk, int) and self.prefill_chunk > 0), cls,
                 "prefill_chunk", f"must be None or a positive int, got {self.prefill_chunk!r}")
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

    def with_selector(self, selector: Selector) -> "DSAConfig":
        """This config with the indexer's selector replaced (a layer without an indexer keeps none)."""
        return self if self.indexer is None else dataclasses.replace(self, indexer=self.indexer.with_selector(selector))
