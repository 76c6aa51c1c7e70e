"""One model configuration for DeepSeek-V3.2 (``deepseek_v32``) and GLM-5 (``glm_moe_dsa``).

The two families share every building block; what differs is configuration: the indexer's RoPE
pairing (half for V3.2, interleaved for GLM-5), head counts and dims, norm eps, and which layers
reuse a previous layer's top-k instead of running their own indexer ("shared" / IndexShare layers).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from sparse_index_jax.kernels.options import OptionError
from sparse_index_jax.layers.config import INDEXER_ROPE_LAYOUT, DSAConfig, IndexerConfig, MLAConfig, RopeConfig
from sparse_index_jax.layers.index_cache import check_pattern, pattern_from_hf_config
from sparse_index_jax.selection.methods import Selector, option_names

# Keys this config reads; any other key of config.json is kept in ``extra`` untouched.
_KNOWN = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
    "num_experts_per_tok", "norm_topk_prob", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "index_topk", "index_head_dim",
    "index_n_heads", "first_k_dense_replace", "mlp_layer_types", "indexer_types", "index_topk_pattern",
    "index_topk_freq", "index_skip_topk_offset", "quantization_config", "bos_token_id", "eos_token_id",
    "attention_bias", "num_nextn_predict_layers",
}


def _fail(field: str, message: str) -> None:
    raise ValueError(f"ModelConfig.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    routed_scaling_factor: float
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    v_head_dim: int
    qk_nope_head_dim: int
    n_group: int
    topk_group: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    index_topk: int
    index_head_dim: int
    index_n_heads: int
    mlp_layer_types: tuple[str, ...]
    indexer_types: tuple[str, ...]
    weight_block_size: tuple[int, int] | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    selector: Selector | None = None  # the F layers' selector; None: DSA top-``index_topk``
    prefill_chunk: int | None = None  # MLAConfig.prefill_chunk of every layer: queries per step of the query side
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.model_type not in INDEXER_ROPE_LAYOUT:
            _fail("model_type", f"{self.model_type!r} is not supported; supported: {sorted(INDEXER_ROPE_LAYOUT)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                     "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok", "index_topk",
                     "index_head_dim", "index_n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(name, f"must be a positive integer, got {value!r}")
        if self.n_shared_experts < 0:
            _fail("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        if self.n_routed_experts % self.n_group:
            _fail("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible into {self.n_group} groups")
        if self.topk_group > self.n_group:
            _fail("topk_group", f"{self.topk_group} exceeds n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            _fail("num_experts_per_tok", f"{self.num_experts_per_tok} exceeds the experts of the topk_group="
                                         f"{self.topk_group} groups a token may use")
        if self.n_routed_experts // self.n_group < 2:
            _fail("n_group", "each expert group needs >= 2 experts (groups are scored by their top-2 experts)")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            _fail("mlp_layer_types", f"must list 'dense'/'sparse' for each of the {self.num_hidden_layers} layers, "
                                     f"got {list(self.mlp_layer_types)}")
        if self.weight_block_size is not None and (len(self.weight_block_size) != 2
                                                   or min(self.weight_block_size) <= 0):
            _fail("weight_block_size", f"must be two positive ints, got {self.weight_block_size}")

    def with_index_cache(self, pattern: str | None = None,
                         selector: Selector | Mapping[str, Any] | None = None) -> "ModelConfig":
        """This config with another IndexCache pattern (S layers get no indexer) and/or selector: a
        ``Selector`` or its fields (``{"method": "hisa", "num_blocks": 64}``; topk defaults to index_topk)."""
        cfg = self
        if pattern is not None:
            try:
                check_pattern(pattern, self.num_hidden_layers, available=self.index_pattern)
            except ValueError as err:
                _fail("indexer_types", str(err))
            cfg = dataclasses.replace(cfg, indexer_types=tuple("full" if p == "F" else "shared" for p in pattern))
        if selector is not None:
            cfg = cfg.with_selector(selector)
        return cfg

    def with_selector(self, selector: Selector | Mapping[str, Any]) -> "ModelConfig":
        """This config with the F layers' selector replaced (validated against the indexer's heads)."""
        try:
            if not isinstance(selector, Selector):
                selector = Selector.from_dict(selector, topk=self.index_topk)
            selector.check_heads(self.index_n_heads)
        except OptionError as err:
            unknown = err.field not in ("method", "topk", *option_names())
            _fail("selector", f"unknown option {err.field!r}: {err}" if unknown else str(err))
        return dataclasses.replace(self, selector=selector)

    @property
    def indexer(self) -> IndexerConfig:
        """The lightning indexer of the F layers (weights and selector)."""
        ix = IndexerConfig(hidden_size=self.hidden_size, q_input_dim=self.q_lora_rank or self.hidden_size,
                           n_heads=self.index_n_heads, head_dim=self.index_head_dim, topk=self.index_topk,
                           rope_dim=self.qk_rope_head_dim, rope_layout=self.indexer_rope_layout)
        return ix.with_selector(self.selector) if self.selector is not None else ix

    @property
    def index_pattern(self) -> str:
        """The IndexCache pattern of the checkpoint: "F" (own indexer) or "S" (shared) per layer."""
        return "".join("F" if t == "full" else "S" for t in self.indexer_types)

    @property
    def indexer_rope_layout(self) -> str:
        return INDEXER_ROPE_LAYOUT[self.model_type]

    def layer_config(self, layer: int) -> DSAConfig:
        """The attention config of one layer (no indexer on shared layers)."""
        mla = MLAConfig(hidden_size=self.hidden_size, num_heads=self.num_attention_heads,
                        q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                        qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                        v_head_dim=self.v_head_dim, rope=self.rope, prefill_chunk=self.prefill_chunk)
        return DSAConfig(mla=mla, indexer=self.indexer if self.indexer_types[layer] == "full" else None)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From a ``config.json`` dictionary (new ``rope_parameters`` or old ``rope_theta``/``rope_scaling``)."""
        def need(key):
            if key not in cfg:
                _fail(key, "missing from config.json")
            return cfg[key]

        if cfg.get("attention_bias"):
            _fail("attention_bias", "attention projections with biases are not supported (no released DeepSeek-V3.2 "
                                    "or GLM-5 checkpoint has them)")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            _fail("hidden_act", f"only 'silu' is supported, got {act!r}")
        n_layers = int(need("num_hidden_layers"))
        if cfg.get("mlp_layer_types") is not None:
            mlp_types = tuple(cfg["mlp_layer_types"])
        else:
            dense = min(int(cfg.get("first_k_dense_replace", 3)), n_layers)
            mlp_types = ("dense",) * dense + ("sparse",) * (n_layers - dense)
        quant = cfg.get("quantization_config") or {}
        block = quant.get("weight_block_size")
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        try:
            rope = RopeConfig.from_hf_config(cfg)
        except (KeyError, ValueError) as err:
            _fail("rope_parameters", str(err))
        try:
            pattern = pattern_from_hf_config(cfg, n_layers)
        except ValueError as err:
            _fail("indexer_types", str(err))
        return cls(
            model_type=str(need("model_type")),
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=int(need("num_attention_heads")),
            n_shared_experts=int(cfg.get("n_shared_experts", 1)),
            n_routed_experts=int(need("n_routed_experts")),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            kv_lora_rank=int(need("kv_lora_rank")),
            q_lora_rank=int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None,
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope=rope,
            index_topk=int(cfg.get("index_topk", 2048)),
            index_head_dim=int(cfg.get("index_head_dim", 128)),
            index_n_heads=int(cfg.get("index_n_heads", 64)),
            mlp_layer_types=mlp_types,
            indexer_types=tuple("full" if letter == "F" else "shared" for letter in pattern),
            weight_block_size=tuple(int(b) for b in block) if block else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            extra={k: v for k, v in cfg.items() if k not in _KNOWN},
        )

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> "ModelConfig":
        file = pathlib.Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: expected an HF checkpoint or a converted model folder")
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        return cls.from_hf_config(cfg)
