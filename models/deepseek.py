"""DeepSeek-V3.2 / GLM-5 causal LM in Flax NNX, one implementation for both families.

Parameter names follow the HF checkpoints (``model.layers.N.self_attn.q_a_proj`` -> ``layers[N].self_attn.q_a_proj``)
so the converter's name map stays a handful of rules. Attention is ``sparse_index_jax.DSAAttention``;
a "shared" (IndexShare) layer has no indexer and reuses the Selection of the last full layer. The layer
loop and decoding are ``causal_lm.py``'s, shared with the Llama family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.dsa_attention import DSAAttention, DSACache, DSAOutput
from sparse_index_jax.layers.norms import RMSNorm
from sparse_index_jax.models.causal_lm import MLP, CausalLM
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.selection.contract import Selection
from sparse_index_jax.selection.methods import Selector


class Buffer(nnx.Variable):
    """Non-trainable state loaded from the checkpoint (the router's correction bias)."""


class Router(nnx.Module):
    """DeepSeek-V3 routing: sigmoid scores, bias-corrected choice, group-limited top-k, scaled weights."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (cfg.n_routed_experts, cfg.hidden_size), jnp.float32))
        self.e_score_correction_bias = Buffer(jnp.zeros((cfg.n_routed_experts,), jnp.float32))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, D] -> (expert ids [N, k] int32, weights [N, k] float32)."""
        cfg = self.cfg
        scores = jax.nn.sigmoid(x.astype(jnp.float32) @ self.weight[...].astype(jnp.float32).T)
        choice = scores + self.e_score_correction_bias[...]
        per_group = choice.reshape(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        group_scores = jnp.sum(jax.lax.top_k(per_group, 2)[0], axis=-1)             # [N, n_group]
        _, groups = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros_like(group_scores, bool).at[jnp.arange(x.shape[0])[:, None], groups].set(True)
        expert_mask = jnp.repeat(group_mask, cfg.n_routed_experts // cfg.n_group, axis=-1)
        _, experts = jax.lax.top_k(jnp.where(expert_mask, choice, -jnp.inf), cfg.num_experts_per_tok)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return experts.astype(jnp.int32), weights * cfg.routed_scaling_factor


class Experts(nnx.Module):
    """Routed experts as stacked weights; tokens are sorted by expert and run through ``lax.ragged_dot``,
    so the work is O(tokens * experts_per_token), never O(tokens * n_experts)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        E, D, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2)
        self.dtype = dtype
        self.gate_proj = nnx.Param(init(rngs.params(), (E, D, inter), param_dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (E, D, inter), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (E, inter, D), param_dtype))

    def __call__(self, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        """x [N, D], experts/weights [N, k] -> [N, D]."""
        N, k = experts.shape
        E = self.gate_proj.shape[0]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        xs = x[token].astype(self.dtype)
        gate = jax.lax.ragged_dot(xs, self.gate_proj[...].astype(self.dtype), group_sizes)
        up = jax.lax.ragged_dot(xs, self.up_proj[...].astype(self.dtype), group_sizes)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.down_proj[...].astype(self.dtype), group_sizes)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros((N, x.shape[-1]), out.dtype).at[token].add(out)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs) if cfg.n_shared_experts else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = self.gate(flat)
        out = self.experts(flat, experts, weights).reshape(x.shape).astype(x.dtype)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=eps, param_dtype=param_dtype)
        self.self_attn = DSAAttention(cfg.layer_config(layer), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=eps, param_dtype=param_dtype)
        if cfg.mlp_layer_types[layer] == "dense":
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, cache: DSACache | None, selection: Selection | None, selector: Selector | None = None,
                 capture: bool = False, dense: bool = False) -> tuple[jax.Array, DSAOutput]:
        attn = self.self_attn(self.input_layernorm(x), cache=cache, selection=selection, selector=selector,
                              capture=capture, dense=dense)
        x = x + attn.out
        return x + self.mlp(self.post_attention_layernorm(x)), attn


class DSAForCausalLM(CausalLM):
    """``model(input_ids)`` -> logits; ``model(input_ids, caches=model.init_caches(...))`` for decoding.

    ``index_pattern`` ("F"/"S" per layer, IndexCache) overrides which layers run their indexer: an S
    layer reuses the selection of the nearest preceding F layer. A layer whose checkpoint has no
    indexer weights can only be S. ``selector`` (a ``Selector``) overrides how the F layers select.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = param_dtype or dtype
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs))

    def init_caches(self, batch: int, max_len: int, selector: Selector | None = None) -> tuple[DSACache, ...]:
        """Empty caches for calls with ``selector`` (default: the layers' own)."""
        return tuple(layer.self_attn.init_cache(batch, max_len, selector) for layer in self.layers)


