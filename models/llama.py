"""Llama-family causal LM (GQA, RoPE, SwiGLU) in Flax NNX, with DSA retrofitted onto every attention layer.

The retrofit: each attention layer gets a ``LightningIndexer`` whose query reads the layer's (normed)
hidden state, since these models have no query latent. Its top-k Selection, shared by all heads,
drives ``sparse_gqa_attention``. With ``dense=True`` (or no indexer at all) the layer is plain causal
attention, numerically the HF ``LlamaForCausalLM`` (q/k in HF's half-split RoPE layout).

Parameter names follow HF (``model.layers.N.self_attn.q_proj`` -> ``layers[N].self_attn.q_proj``); the
indexers live at ``layers[N].self_attn.indexer``, so the distillation loop's ``"indexer"`` filter finds them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.config import IndexerConfig, RopeConfig
from sparse_index_jax.layers.dsa_attention import DSAOutput, Teacher
from sparse_index_jax.layers.gqa_attention import dense_gqa_attention, sparse_gqa_attention
from sparse_index_jax.layers.indexer import LightningIndexer
from sparse_index_jax.layers.kv_cache import GQACache, check_cache_batch
from sparse_index_jax.layers.norms import RMSNorm
from sparse_index_jax.layers.rope import apply_rope, rotary_cos_sin
from sparse_index_jax.models.causal_lm import MLP, CausalLM
from sparse_index_jax.selection.contract import Selection, causal_selection
from sparse_index_jax.selection.methods import Selector

# HF model types read by ``LlamaConfig.from_hf_config`` (the architecture each names is this one)
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    indexer: IndexerConfig | None = None   # the retrofit; None: a plain dense model
    query_chunk: int = 256                 # attention query rows per chunk (memory O(chunk * S))
    model_type: str = "llama"
    attention_bias: bool = False           # biases on q/k/v (qwen2; llama's ``attention_bias`` key: q/k/v/o)
    attention_out_bias: bool = False       # a bias on o_proj (llama's ``attention_bias`` key)
    rope_scaling: RopeConfig | None = None  # HF's rope_scaling / rope_parameters (None: plain RoPE at rope_theta)
    sliding_window: int | None = None      # some layers attend to the last N keys only: longer runs are refused

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "query_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}: must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.theta != self.rope_theta:
            raise ValueError(f"LlamaConfig.rope_scaling: its theta {self.rope_scaling.theta} differs from "
                             f"rope_theta={self.rope_theta}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window: must be None or a positive int, got {self.sliding_window!r}")
        ix = self.indexer
        if ix is not None and (ix.hidden_size, ix.q_input_dim) != (self.hidden_size, self.hidden_size):
            raise ValueError(f"LlamaConfig.indexer: hidden_size and q_input_dim must both be {self.hidden_size} "
                             f"(the indexer reads the hidden state), got {ix.hidden_size} and {ix.q_input_dim}")

    @property
    def rope(self) -> RopeConfig:
        return self.rope_scaling or RopeConfig(theta=self.rope_theta)

    def check_length(self, length: int) -> None:
        """Refuses sequences the dense causal attention here would compute differently from HF: past a sliding
        window (Mistral, Qwen2 with ``use_sliding_window``) HF masks keys older than the window; we do not."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(f"LlamaConfig.sliding_window: this {self.model_type} model attends to the last "
                             f"{self.sliding_window} keys only (sliding window); sequences of {length} tokens need "
                             f"that mask, which is not implemented: run at most {self.sliding_window} tokens")

    @property
    def index_pattern(self) -> str:
        """Every layer has its own indexer (F) once retrofitted; IndexCache patterns pick which ones run."""
        if self.indexer is None:
            raise ValueError("this Llama model has no indexers: retrofit them first, e.g. "
                             "cfg.with_indexer(n_heads=6, head_dim=32, topk=256), and load or distil their weights")
        return "F" * self.num_hidden_layers

    def with_indexer(self, **indexer: Any) -> "LlamaConfig":
        """The retrofit: this config with a lightning indexer (``IndexerConfig`` fields) on every layer."""
        ix = IndexerConfig(hidden_size=self.hidden_size, q_input_dim=self.hidden_size,
                           **{"norm_eps": 1e-6, "rope_layout": "half", **indexer})
        return dataclasses.replace(self, indexer=ix)

    def with_selector(self, selector: Selector) -> "LlamaConfig":
        """This config with the indexers' selector replaced."""
        return dataclasses.replace(self, indexer=self.indexer.with_selector(selector))

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
        """From an HF ``config.json`` dictionary of the Llama family (``model_type`` in ``HF_MODEL_TYPES``):
        GQA, ``head_dim``, tied or untied heads, RoPE scaling (default, linear, dynamic, llama3, yarn; both key
        styles), qwen2's q/k/v biases, llama's ``attention_bias`` (q/k/v/o), Mistral / Qwen2 sliding windows
        (recorded; ``check_length`` refuses runs longer than the window)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type: {model_type!r} is not a Llama-family type; supported: "
                             f"{', '.join(HF_MODEL_TYPES)}")
        if cfg.get("mlp_bias"):
            raise ValueError("LlamaConfig.mlp_bias: MLP biases are not supported (config has mlp_bias=true)")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"LlamaConfig.hidden_act: only 'silu' (SwiGLU) is supported, config has {act!r}")
        rope = RopeConfig.from_hf_config(cfg)
        eos = cfg.get("eos_token_id")
        heads = int(cfg["num_attention_heads"])
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None  # qwen2 windows only the layers layer_types names, and only with use_sliding_window
        if model_type == "qwen2" and "sliding_attention" not in (cfg.get("layer_types") or ["sliding_attention"]):
            window = None
        bias = bool(cfg.get("attention_bias", False))
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
                   num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads), rope_theta=rope.theta,
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5) or 1e-5),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   max_position_embeddings=int(cfg.get("max_position_embeddings") or 8192),
                   bos_token_id=cfg.get("bos_token_id"),
                   eos_token_id=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                   model_type=model_type, attention_bias=bias or model_type == "qwen2",
                   attention_out_bias=bias and model_type == "llama",
                   rope_scaling=None if rope.rope_type == "default" else rope,
                   sliding_window=None if window is None else int(window))


class LlamaAttention(nnx.Module):
    """GQA attention with HF Llama names, plus the retrofitted indexer (``cfg.indexer``)."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "auto"):
        self.cfg, self.dtype, self.implementation = cfg, dtype, implementation
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nnx.Linear(cfg.hidden_size, hq * d, use_bias=cfg.attention_bias, **lin)
        self.k_proj = nnx.Linear(cfg.hidden_size, hkv * d, use_bias=cfg.attention_bias, **lin)
        self.v_proj = nnx.Linear(cfg.hidden_size, hkv * d, use_bias=cfg.attention_bias, **lin)
        self.o_proj = nnx.Linear(hq * d, cfg.hidden_size, use_bias=cfg.attention_out_bias, **lin)
        # float32 like the DSA models' indexers: the indexer is small and its scores decide ties
        self.indexer = (LightningIndexer(cfg.indexer, cfg.rope, dtype=jnp.float32, param_dtype=jnp.float32,
                                         rngs=rngs) if cfg.indexer is not None else None)

    def init_cache(self, batch: int, max_len: int, selector: Selector | None = None) -> GQACache:
        """An empty cache for calls with ``selector`` (default: the config's; block sums when it pools blocks)."""
        cfg, ix = self.cfg, self.cfg.indexer
        block_size = ((selector or ix.selector).block_size or 0) if ix is not None else 0
        return GQACache.create(batch, max_len, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                               dtype=self.dtype, index_dim=None if ix is None else ix.head_dim, block_size=block_size)

    def __call__(self, x: jax.Array, *, cache: GQACache | None = None, selection: Selection | None = None,
                 selector: Selector | None = None, capture: bool = False, dense: bool = False) -> DSAOutput:
        """x [B, T, hidden] -> DSAOutput. ``dense``: plain causal attention over every key; otherwise the handed
        ``selection`` or the indexer's top-k by ``selector`` (default: the config's).

        Without a cache the T tokens attend among themselves (prefill, positions 0..T-1). With a cache
        (``init_cache``) they are appended at each row's length and attend to everything cached so far
        (decode, chunked prefill); a layer with an indexer caches its keys even under a handed selection
        (an IndexCache S layer), so any later call can select. ``capture`` (prefill only) adds the
        head-averaged probabilities per slot and the indexer's activations from DETACHED inputs (see
        ``DSAAttention``)."""
        cfg = self.cfg
        if capture and cache is not None:
            raise ValueError("LlamaAttention: capture (distillation targets) runs on whole sequences, without a cache")
        if self.indexer is not None and cache is not None and not dense:
            selector = selector or cfg.indexer.selector
            if (selector.block_size or 0) != cache.block_size:
                raise ValueError(f"LlamaAttention: the cache pools key blocks of {cache.block_size or 'none'} but "
                                 f"selector {selector.method!r} needs {selector.block_size or 'none'}; create it with "
                                 f"init_caches(..., selector=) for the selector you call with")
        B, T, _ = x.shape
        check_cache_batch("LlamaAttention", cache, B)
        cfg.check_length(T if cache is None else cache.max_len)  # static: holds under jit, and for decode
        start = cache.lengths[:, None] if cache is not None else jnp.zeros((B, 1), jnp.int32)
        positions = start + jnp.arange(T, dtype=jnp.int32)[None, :]  # the slots: RoPE positions and causality
        q = self.q_proj(x).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        cos, sin = rotary_cos_sin(cfg.rope, positions, cfg.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None], "half")
        k = apply_rope(k, cos[:, :, None], sin[:, :, None], "half")

        act = None
        if self.indexer is not None and (capture or cache is not None or (selection is None and not dense)):
            detach = jax.lax.stop_gradient if capture else (lambda a: a)
            act = self.indexer(detach(x), detach(x), positions)
        kv_lengths = block_sums = None
        if cache is not None:
            cache = cache.append(k, v, None if act is None else act.k)
            k, v, kv_lengths, block_sums = cache.k, cache.v, cache.lengths, cache.block_sums
            act = None if act is None else dataclasses.replace(act, k=cache.index_keys)
        options = dict(scale=cfg.head_dim ** -0.5, query_chunk=cfg.query_chunk, return_probs=capture)
        if dense:
            selection = causal_selection(positions, k.shape[1])
            out, probs = dense_gqa_attention(q, k, v, positions, **options)
        else:
            if selection is None:
                if act is None:
                    raise ValueError("LlamaAttention: this model has no indexers; call it with dense=True or hand "
                                     "it a selection")
                selection = (selector or cfg.indexer.selector).select(
                    act.q, act.k, act.w, q_positions=positions, k_scale=act.k_scale, kv_lengths=kv_lengths,
                    block_sums=block_sums, implementation=self.implementation)
            out, probs = sparse_gqa_attention(q, k, v, selection.indices, selection.valid,
                                              implementation=self.implementation, **options)
        out = self.o_proj(out.reshape(B, T, cfg.num_attention_heads * cfg.head_dim))
        if not capture:
            return DSAOutput(out, selection, cache)
        groups = cfg.num_key_value_heads
        teacher = Teacher(jax.lax.stop_gradient(q.reshape(B, T, groups, -1, cfg.head_dim)),
                          jax.lax.stop_gradient(k), options["scale"])
        return DSAOutput(out, selection, None, probs, act, teacher)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, cache=None, selection: Selection | None = None, selector: Selector | None = None,
                 capture: bool = False, dense: bool = False) -> tuple[jax.Array, DSAOutput]:
        attn = self.self_attn(self.input_layernorm(x), cache=cache, selection=selection, selector=selector,
                              capture=capture, dense=dense)
        x = x + attn.out
        return x + self.mlp(self.post_attention_layernorm(x)), attn


class LlamaForCausalLM(CausalLM):
    """``model(input_ids, dense=True)`` is the original model; ``model(input_ids)`` attends through the
    indexers' top-k (``index_pattern`` as for the DSA models: S layers reuse the last F layer's selection)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs))

    def init_caches(self, batch: int, max_len: int, selector: Selector | None = None) -> tuple[GQACache, ...]:
        """Empty decode caches (``GQACache``, one per layer) for calls with ``selector`` (default: the layers')."""
        return tuple(layer.self_attn.init_cache(batch, max_len, selector) for layer in self.layers)

    def check_pattern(self, pattern: str | None) -> str:
        if self.cfg.indexer is None and pattern is None:
            return "F" * len(self.layers)  # only dense runs are possible; the layers say so if asked otherwise
        return super().check_pattern(pattern)
