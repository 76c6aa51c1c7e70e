"""What every causal LM here shares: the SwiGLU MLP and the layer loop (generation: ``generation.py``).

``CausalLM`` holds the embedding, the decoder layers and the head, and runs the layers under an
IndexCache pattern (F layers select, S layers reuse the last F layer's Selection), densely (the
baseline and the distillation warm-up), or with ``capture`` (the distillation targets). DeepSeek-V3.2 /
GLM-5 (``deepseek.py``) and the Llama family (``llama.py``) are subclasses that build the layers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.config import IndexerWeights
from sparse_index_jax.layers.dsa_attention import DSACache, DSAOutput
from sparse_index_jax.layers.index_cache import check_pattern
from sparse_index_jax.layers.sharding import constrain
from sparse_index_jax.selection.contract import Selection
from sparse_index_jax.selection.methods import Selector


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(hidden, inter, **lin)
        self.up_proj = nnx.Linear(hidden, inter, **lin)
        self.down_proj = nnx.Linear(inter, hidden, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


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

    A layer is called as ``layer(x, cache=, selection=, selector=, capture=, dense=)`` and returns
    ``(x, DSAOutput)``; its attention module has a ``cfg`` with ``with_selector``.
    """

    @property
    def selector(self) -> Selector:
        """The default selector of the F layers (``cfg.indexer.selector``)."""
        if self.cfg.indexer is None:
            raise ValueError(f"{type(self).__name__}: this model has no indexers, so no selector")
        return self.cfg.indexer.selector

    def set_selector(self, **fields) -> None:
        """Replaces the default selector (``Selector`` fields: ``method``, ``topk``, options by name) in the
        model's config and every layer's. The configs are frozen values swapped whole, so ``nnx.jit`` sees a
        new graph and retraces. To try a selector for one call, pass ``selector=`` to the call instead."""
        weights = sorted(set(fields) & set(IndexerWeights.field_names()))
        if weights:
            raise ValueError(f"set_selector: {weights} shape the indexer weights and cannot change")
        selector = self.selector.replace(**fields)
        self.cfg = self.cfg.with_selector(selector)  # validates against the indexer before anything changes
        for layer in self.layers:
            layer.self_attn.cfg = layer.self_attn.cfg.with_selector(selector)

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
                   caches: tuple | None = None, index_pattern: str | None = None, selector: Selector | None = None,
                   dense: bool = False, capture: bool = False, remat: bool = False,
                   observe: Callable[[int, DSAOutput], DSAOutput] | None = None) -> LayersOutput:
        """Runs layers ``start..`` on hidden states x. ``selection`` is the one the previous F layer made
        (needed when layer ``start`` is S); ``selector`` the F layers' (default: their config's). ``dense``
        makes every layer attend to all causal keys (the dense baseline and the warm-up stage of indexer
        training). ``remat``: each layer under ``nnx.remat``, so a backward pass keeps only the
        layers' inputs and recomputes one layer's activations at a time (training at length). ``observe(i, out)``
        sees each layer's output as soon as the layer has run and returns what to keep of it: a loss can use a
        large capture there (the dense warm-up's teacher) and drop it, so no two layers' captures live at once."""
        pattern = self.check_pattern(index_pattern)
        name = type(self).__name__
        if caches is not None and len(caches) != len(self.layers) - start:
            raise ValueError(f"{name}: {len(caches)} caches for {len(self.layers) - start} layers")
        if pattern[start] == "S" and selection is None and not dense:
            raise ValueError(f"layer {start} is S: pass the selection of the F layer before it")
        attention, new_caches = [], []
        for i in range(start, len(self.layers)):
            handed = selection if (pattern[i] == "S" and not dense) else None
            cache = None if caches is None else caches[i - start]
            def call(layer, x, handed, cache):
                return layer(x, cache=cache, selection=handed, selector=selector, capture=capture, dense=dense)

            x, attn = (nnx.remat(call) if remat else call)(self.layers[i], x, handed, cache)
            x = constrain(x, ("batch", "seq", "embed"))
            if observe is not None:
                attn = observe(i, attn)
            selection = attn.selection
            attention.append(attn)
            new_caches.append(attn.cache)
        return LayersOutput(x, None if caches is None else tuple(new_caches), tuple(attention))

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else self.embed_tokens.attend(x)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, *, caches: tuple | None = None, index_pattern: str | None = None,
                 selector: Selector | None = None, dense: bool = False) -> CausalLMOutput:
        """input_ids [B, T] -> logits, caches and each layer's Selection. ``index_pattern`` ("F"/"S" per
        layer) and ``selector`` apply to this call only; ``dense`` is the model without selection."""
        run = self.run_layers(self.embed(input_ids), caches=caches, index_pattern=index_pattern, selector=selector,
                              dense=dense)
        return CausalLMOutput(self.logits(run.hidden), run.caches, tuple(a.selection for a in run.attention))
