"""What every causal LM here shares: the SwiGLU MLP and the layer loop (generation: ``generation.py``).

``CausalLM`` holds the embedding, the decoder layers and the head, and runs the layers under an
IndexCache pattern (F layers select, S layers reuse the last F layer's Selection), densely (the
baseline and the distillation warm-up), or with ``capture`` (the distillation targets). DeepSeek-V3.2 /
GLM-5 (``deepseek.py``) and the Llama family (``llama.py``) are subclasses that build the layers.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.kernels.inputs import concrete
from sparse_index_jax.layers.config import IndexerWeights
from sparse_index_jax.layers.dsa_attention import DSACache, DSAOutput
from sparse_index_jax.layers.index_cache import check_pattern
from sparse_index_jax.layers.sharding import constrain
from sparse_index_jax.selection.contract import Selection
from sparse_index_jax.selection.methods import Selector


def _raise_bad_ids(who: str, vocab: int, count, low, high) -> None:
    """Host side of the traced id check (``jax.debug.callback``): raises when some ids were out of range."""
    if int(count):
        raise ValueError(f"{who}: {int(count)} token id(s) outside the vocabulary [0, {vocab}) (smallest {int(low)}, "
                         f"largest {int(high)}); token ids must lie in [0, vocab_size)")


def _raise_overflow(who: str, max_len: int, rows, longest) -> None:
    """Host side of the traced cache check: raises when a call overflowed its caches."""
    if int(rows):
        raise ValueError(f"{who}: {int(rows)} row(s) of the decode caches overflowed max_len={max_len} (a row reached "
                         f"{int(longest)} tokens; their logits are NaN). Create the caches with max_len >= prompt + "
                         f"new tokens (init_caches(batch, max_len))")


def fail_if(flag: jax.Array, callback: Callable, *args) -> None:
    """Under tracing: ``callback(*args)`` (which raises) runs on the host only when ``flag`` is True.

    ``jax.debug.callback`` survives jit, grad, remat, vmap, scan / while loops and shard_map; an exception it
    raises surfaces from the jitted call as a ``JaxRuntimeError`` whose message ends with the ValueError's text
    (JAX also logs "jax.debug.callback failed"). Guarded by ``lax.cond``: a call with good inputs runs no host
    callback at all (under vmap the cond becomes a select and the callback checks ``args`` itself)."""
    jax.lax.cond(flag, lambda: jax.debug.callback(callback, *args), lambda: None)


def check_token_ids(who: str, input_ids: jax.Array, vocab: int, *, runtime_checks: bool = True) -> jax.Array | None:
    """Known ids (eager) outside [0, vocab) raise; then None (all good). Traced ids: [B, T] bool, the ids in
    [0, vocab), and (with ``runtime_checks``) the same error arranged at run time (``fail_if``). A global array
    of several processes is checked on each process's own shards (together: every id)."""
    known = concrete(input_ids)
    if known is None and isinstance(input_ids, jax.Array) and not isinstance(input_ids, jax.core.Tracer):
        known = np.concatenate([np.asarray(shard.data).reshape(-1) for shard in input_ids.addressable_shards])
    if known is not None:
        bad = (known < 0) | (known >= vocab)
        if bad.any():
            shown = sorted(set(known[bad].tolist()))
            raise ValueError(f"{who}: token ids {shown[:5]}{' ...' if len(shown) > 5 else ''} are outside the "
                             f"vocabulary [0, {vocab}) ({int(bad.sum())} of {known.size} ids); token ids must lie "
                             f"in [0, vocab_size)")
        return None
    ok = (input_ids >= 0) & (input_ids < vocab)
    if runtime_checks:
        fail_if(~jnp.all(ok), functools.partial(_raise_bad_ids, who, vocab), jnp.sum(~ok), jnp.min(input_ids),
                jnp.max(input_ids))
    return ok


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

    def embed(self, input_ids: jax.Array, *, runtime_checks: bool = True) -> jax.Array:
        """input_ids [B, T] int -> hidden states [B, T, hidden]; every model's entry point, so the ids are
        checked here. Concrete ids (eager calls) outside [0, vocab_size) raise a ValueError naming them and the
        vocabulary size. Traced ids (under jit, grad, remat, loops) cannot raise at trace time: the check runs
        on the device and, only when an id is out of range, a host callback raises the same ValueError from the
        compiled call (surfacing as a ``JaxRuntimeError`` that ends with its text; ``fail_if``); the rows of
        bad ids also embed as NaN, so their logits are NaN (never a wrapped row for -1).

        Cost: the device side is a compare and a reduction over the ids (nothing measurable); but a compiled
        program that holds a host callback dispatches slower, about 0.2-0.3 ms per call on CPU (measured on a jitted
        embedding: 15-30 us -> 170-370 us per call), which counts for one-token decode steps called from Python.
        ``runtime_checks=False`` drops the callback (bad ids still embed as NaN): for loops that check their ids
        already, as ``models.generate`` does on the host."""
        name = type(self).__name__
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"{name}: input_ids must be an int array [B, T], got {input_ids.shape} "
                             f"{input_ids.dtype}")
        ok = check_token_ids(name, input_ids, self.cfg.vocab_size, runtime_checks=runtime_checks)
        if ok is None:  # checked on the host
            return self.embed_tokens(input_ids)
        return jnp.where(ok[..., None], self.embed_tokens(jnp.where(ok, input_ids, 0)), jnp.nan)

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
                 selector: Selector | None = None, dense: bool = False,
                 runtime_checks: bool = True) -> CausalLMOutput:
        """input_ids [B, T] -> logits, caches and each layer's Selection. ``index_pattern`` ("F"/"S" per
        layer) and ``selector`` apply to this call only; ``dense`` is the model without selection.

        Decoding with ``caches`` (``init_caches(batch, max_len)``): T new tokens per row must fit the caches'
        max_len. Eagerly an overflow raises before anything runs. Under jit the overflowing rows' tokens are
        dropped (never written over earlier ones), their logits are NaN (every position of the row, in this call
        and every later one), each cache's ``overflowed`` is True for them, and the compiled call raises a
        ValueError through a host callback (``fail_if``; only when a row overflows). ``models.generate`` sizes
        its caches so this never happens. Out-of-range token ids: see ``embed``. ``runtime_checks=False`` drops
        both host callbacks (the NaN logits stay), for callers that guarantee ids and room themselves (``generate``;
        see ``embed`` for the cost)."""
        x = self.embed(input_ids, runtime_checks=runtime_checks)
        run = self.run_layers(x, caches=caches, index_pattern=index_pattern, selector=selector, dense=dense)
        logits = self.logits(run.hidden)
        if run.caches and isinstance(run.caches[0].lengths, jax.core.Tracer):  # eagerly, the layers raised
            lengths, max_len = run.caches[0].lengths, run.caches[0].max_len
            overflowed = lengths > max_len
            if runtime_checks:
                fail_if(jnp.any(overflowed), functools.partial(_raise_overflow, type(self).__name__, max_len),
                        jnp.sum(overflowed), jnp.max(lengths))
            logits = jnp.where(overflowed[:, None, None], jnp.nan, logits)
        return CausalLMOutput(logits, run.caches, tuple(a.selection for a in run.attention))
