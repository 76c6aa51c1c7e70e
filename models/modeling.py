"""DeepSeek-V3.2 / GLM-5 causal LM in Flax NNX, one implementation for both families.

Parameter names follow the HF checkpoints (``model.layers.N.self_attn.q_a_proj`` -> ``layers[N].self_attn.q_a_proj``)
so the converter's name map stays a handful of rules. Attention is ``sparse_index_jax.DSAAttention``;
a "shared" (IndexShare) layer has no indexer and reuses the Selection of the last full layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from sparse_index_jax.attention import DSAAttention, DSACache, DSAOutput
from sparse_index_jax.index_cache import check_pattern
from sparse_index_jax.layers import RMSNorm
from sparse_index_jax.selection import Selection, causal_selection
from sparse_index_jax.sharding import constrain


class Buffer(nnx.Variable):
    """Non-trainable state loaded from the checkpoint (the router's correction bias)."""


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(hidden, inter, **lin)
        self.up_proj = nnx.Linear(hidden, inter, **lin)
        self.down_proj = nnx.Linear(inter, hidden, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def __call__(self, x, *, cache: DSACache | None, selection: Selection | None, capture: bool = False,
                 dense: bool = False) -> tuple[jax.Array, DSAOutput]:
        # dense: the handed selection lists every causal key, which sparse MLA runs like any selection
        attn = self.self_attn(self.input_layernorm(x), cache=cache, selection=selection, capture=capture)
        x = x + attn.out
        return x + self.mlp(self.post_attention_layernorm(x)), attn


class LayersOutput(NamedTuple):
    hidden: jax.Array                          # [B, T, hidden] after the last layer run
    caches: tuple[DSACache, ...] | None        # one per layer run, when caches were given
    attention: tuple[DSAOutput, ...]           # per layer run: selection, and probs/indexer with capture


class CausalLMOutput(NamedTuple):
    logits: jax.Array                          # [B, T, vocab] float32
    caches: tuple[DSACache, ...] | None        # one per layer, when caches were given
    selections: tuple[Selection, ...]          # what each layer attended to


class CausalLM(nnx.Module):
    """What every causal LM here shares: the embedding, the layer loop (IndexCache patterns, the dense
    baseline, capture for distillation) and the head. Subclasses build ``cfg`` (with ``index_pattern``),
    ``embed_tokens``, ``layers``, ``norm`` and ``lm_head`` (None with tied embeddings).

    A layer is called as ``layer(x, cache=, selection=, capture=, dense=)`` and returns ``(x, DSAOutput)``.
    """

    def check_pattern(self, pattern: str | None) -> str:
        """The effective F/S pattern: ``pattern`` validated against the layers, or the config's own."""
        own = self.cfg.index_pattern
        return own if pattern is None else check_pattern(pattern, len(self.layers), available=own)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"{type(self).__name__}: input_ids must be an int array [B, T], got {input_ids.shape} "
                             f"{input_ids.dtype}")
        return self.embed_tokens(input_ids)

    def run_layers(self, x: jax.Array, *, start: int = 0, selection: Selection | None = None,
                   caches: tuple | None = None, index_pattern: str | None = None,
                   dense: bool = False, capture: bool = False) -> LayersOutput:
        """Runs layers ``start..`` on hidden states x. ``selection`` is the one the previous F layer made
        (needed when layer ``start`` is S). ``dense`` makes every layer attend to all causal keys (the
        dense baseline and the warm-up stage of indexer training; no caches)."""
        pattern = self.check_pattern(index_pattern)
        name = type(self).__name__
        if caches is not None and len(caches) != len(self.layers) - start:
            raise ValueError(f"{name}: {len(caches)} caches for {len(self.layers) - start} layers")
        if dense and caches is not None:
            raise ValueError(f"{name}: dense attention runs without caches")
        if pattern[start] == "S" and selection is None and not dense:
            raise ValueError(f"layer {start} is S: pass the selection of the F layer before it")
        B, T, _ = x.shape
        if dense:
            selection = causal_selection(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), T)
        attention, new_caches = [], []
        for i in range(start, len(self.layers)):
            handed = selection if (pattern[i] == "S" or dense) else None
            cache = None if caches is None else caches[i - start]
            x, attn = self.layers[i](x, cache=cache, selection=handed, capture=capture, dense=dense)
            x = constrain(x, ("batch", "seq", "embed"))
            selection = attn.selection
            attention.append(attn)
            new_caches.append(attn.cache)
        return LayersOutput(x, None if caches is None else tuple(new_caches), tuple(attention))

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else self.embed_tokens.attend(x)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, *, caches: tuple | None = None,
                 index_pattern: str | None = None, dense: bool = False) -> CausalLMOutput:
        run = self.run_layers(self.embed(input_ids), caches=caches, index_pattern=index_pattern, dense=dense)
        return CausalLMOutput(self.logits(run.hidden), run.caches, tuple(a.selection for a in run.attention))


class DSAForCausalLM(CausalLM):
    """``model(input_ids)`` -> logits; ``model(input_ids, caches=model.init_caches(...))`` for decoding.

    ``index_pattern`` ("F"/"S" per layer, IndexCache) overrides which layers run their indexer: an S
    layer reuses the selection of the nearest preceding F layer. A layer whose checkpoint has no
    indexer weights can only be S.
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

    def init_caches(self, batch: int, max_len: int) -> tuple[DSACache, ...]:
        return tuple(layer.self_attn.init_cache(batch, max_len) for layer in self.layers)


@nnx.jit
def _forward(model: DSAForCausalLM, input_ids, caches):
    out = model(input_ids, caches=caches)
    return out.logits[:, -1], out.caches


def generate(model: DSAForCausalLM, input_ids: jax.Array, max_new_tokens: int, *,
             stop_at_eos: bool = True) -> jax.Array:
    """Greedy decoding with caches: [B, T] prompt -> [B, T + n] tokens (n <= max_new_tokens).

    Prompts of one batch share their length (no padding mask). Rows that reached an EOS token keep
    emitting it; with ``stop_at_eos`` generation ends once every row has.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be a non-empty [B, T] prompt, got {input_ids.shape}")
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    B, T = input_ids.shape
    caches = model.init_caches(B, T + max_new_tokens)
    eos = jnp.asarray(model.cfg.eos_token_id or (-1,), jnp.int32)
    tokens = [input_ids]
    done = jnp.zeros((B,), bool)
    step_input = input_ids
    for _ in range(max_new_tokens):
        logits, caches = _forward(model, step_input, caches)
        nxt = jnp.argmax(logits, axis=-1).astype(input_ids.dtype)
        nxt = jnp.where(done, tokens[-1][:, -1], nxt)
        done = done | jnp.isin(nxt, eos)
        tokens.append(nxt[:, None])
        step_input = nxt[:, None]
        if stop_at_eos and bool(jnp.all(done)):
            break
    return jnp.concatenate(tokens, axis=1)
