"""MLA with DeepSeek sparse attention: the cache, the layer, and sparse MLA over a Selection.

The attention math always runs in the absorbed (MQA) form over the latent cache:
``q_nope @ W_UK`` gives a ``kv_lora_rank``-wide query that, concatenated with the rope query, scores
the cached rows ``[latent | rope key]``; the values are the latent rows, mapped back by ``W_UV``.
Every query gathers only its k selected rows (O(T*k)); prefill and decode are the same code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.kernels import sparse_mla as _sparse_mla
from sparse_index_jax.kernels.block_pooling import append_block_sums, num_blocks_for
from sparse_index_jax.kernels.chunking import map_query_chunks
from sparse_index_jax.layers.config import DSAConfig
from sparse_index_jax.layers.context_parallel_attention import sparse_mla_context_parallel
from sparse_index_jax.layers.indexer import IndexerActivations, LightningIndexer
from sparse_index_jax.layers.kv_cache import check_cache_batch, check_room, write_rows
from sparse_index_jax.layers.norms import RMSNorm
from sparse_index_jax.layers.rope import apply_rope, rotary_cos_sin
from sparse_index_jax.layers.sharding import active_context_mesh
from sparse_index_jax.selection.context_parallel import select_context_parallel
from sparse_index_jax.selection.contract import Selection, causal_selection
from sparse_index_jax.selection.methods import Selector


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DSACache:
    """Decode state of one layer, all rows [B, max_len, ...], ``lengths`` [B] tokens written per row.

    latent: MLA cache rows ``[kv latent (kv_lora_rank) | rope key (qk_rope_head_dim)]``.
    index_keys: indexer keys [B, max_len, d] (float8_e4m3fn on the fp8 path); None on layers without
      an indexer. index_key_scale: [B, max_len] float32 on the fp8 path, else None.
    block_sums: [B, ceil(max_len / block_size), d] float32 pooled indexer-key sums for the
      hierarchical selectors (HISA, MISA), updated as keys arrive; None for dsa.
    """

    latent: jax.Array
    index_keys: jax.Array | None
    index_key_scale: jax.Array | None
    lengths: jax.Array
    block_sums: jax.Array | None = None
    block_size: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        return self.latent.shape[1]

    @classmethod
    def create(cls, cfg: DSAConfig, batch: int, max_len: int, dtype=jnp.bfloat16,
               selector: Selector | None = None) -> "DSACache":
        """An empty cache; block sums are kept for ``selector`` (default: the config's) when it pools blocks."""
        mla, ix = cfg.mla, cfg.indexer
        latent = jnp.zeros((batch, max_len, mla.kv_lora_rank + mla.qk_rope_head_dim), dtype)
        keys = scale = sums = None
        block_size = 0
        if ix is not None:
            keys = jnp.zeros((batch, max_len, ix.head_dim), jnp.float8_e4m3fn if ix.fp8 else dtype)
            scale = jnp.zeros((batch, max_len), jnp.float32) if ix.fp8 else None
            block_size = (selector or ix.selector).block_size or 0
            if block_size:
                sums = jnp.zeros((batch, num_blocks_for(max_len, block_size), ix.head_dim), jnp.float32)
        return cls(latent, keys, scale, jnp.zeros((batch,), jnp.int32), sums, block_size)

    def append(self, latent: jax.Array, index_keys: jax.Array | None = None,
               index_key_scale: jax.Array | None = None) -> "DSACache":
        """Writes T new tokens per row at that row's current length; returns the updated cache.

        Overflow (a row's length + T > max_len) raises when the lengths are known (eager code). Under
        jit it cannot raise here: the rows past max_len are dropped, never written over earlier ones, and
        ``overflowed`` turns True; a model call (``CausalLM.__call__``) then makes those rows' logits NaN and
        raises through a host callback. Size the cache for prompt + new tokens (``generate`` does).
        """
        check_room("DSACache.append", self.lengths, latent.shape[1], self.max_len)
        sums = self.block_sums
        if sums is not None:
            sums = append_block_sums(sums, index_keys, index_key_scale, self.lengths, self.block_size,
                                     limit=self.max_len)
        write = functools.partial(write_rows, lengths=self.lengths)
        return DSACache(write(self.latent, latent), write(self.index_keys, index_keys),
                        write(self.index_key_scale, index_key_scale), self.lengths + latent.shape[1], sums,
                        self.block_size)

    @property
    def overflowed(self) -> jax.Array:
        """[B] bool: rows that were handed more tokens than max_len (only possible under jit)."""
        return self.lengths > self.max_len


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Teacher:
    """What a layer's attention scores come from, for distillation targets computed in key chunks.

    logits[b, t, g, r, s] = scale * q[b, t, g, r] . k[b, s, g] for the causal keys s <= t. q [B, T, G, R, D]
    (G key groups of R query heads), k [B, S, G, D]. MLA: one group of every head over the absorbed rows
    [latent | rope key] (D = kv_lora_rank + qk_rope_head_dim); GQA: the KV groups. Its head-averaged softmax is
    the dense warm-up's target, which ``training.losses.dense_indexer_kl`` reads a key chunk at a time: the
    [T, S] probabilities are never built.
    """

    q: jax.Array
    k: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))


class DSAOutput(NamedTuple):
    out: jax.Array          # [B, T, hidden]
    selection: Selection    # what the attention used (hand it to IndexCache shared layers)
    cache: DSACache | None  # the updated cache, when one was given
    # With capture=True (indexer distillation): attention probabilities of each selection slot averaged
    # over heads [B, T, k] float32, the indexer's activations (keys: all keys attended) or None, and the
    # teacher (the attention's queries and keys: what the dense warm-up's target is computed from).
    probs: jax.Array | None = None
    indexer: IndexerActivations | None = None
    teacher: Teacher | None = None


class DSAAttention(nnx.Module):
    """MLA + lightning indexer + top-k selection + sparse MLA, with HF DeepSeek-V3.2/GLM-5 parameter names.

    A layer built with ``cfg.indexer=None`` has no indexer (an IndexCache "shared" layer) and must
    be handed the Selection of the layer it reuses.
    """

    def __init__(self, cfg: DSAConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 implementation: str = "auto"):
        self.cfg, self.dtype, self.implementation = cfg, dtype, implementation
        m = cfg.mla
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if m.q_lora_rank:
            self.q_a_proj = nnx.Linear(m.hidden_size, m.q_lora_rank, **lin)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, eps=m.latent_norm_eps, param_dtype=param_dtype)
            self.q_b_proj = nnx.Linear(m.q_lora_rank, m.num_heads * m.qk_head_dim, **lin)
        else:
            self.q_proj = nnx.Linear(m.hidden_size, m.num_heads * m.qk_head_dim, **lin)
        self.kv_a_proj_with_mqa = nnx.Linear(m.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, **lin)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, eps=m.latent_norm_eps, param_dtype=param_dtype)
        self.kv_b_proj = nnx.Linear(m.kv_lora_rank, m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), **lin)
        self.o_proj = nnx.Linear(m.num_heads * m.v_head_dim, m.hidden_size, **lin)
        self.indexer = (LightningIndexer(cfg.indexer, m.rope, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                        if cfg.indexer is not None else None)

    def init_cache(self, batch: int, max_len: int, selector: Selector | None = None) -> DSACache:
        """An empty cache for calls with ``selector`` (default: the config's)."""
        return DSACache.create(self.cfg, batch, max_len, self.dtype, selector)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None, cache: DSACache | None = None,
                 selection: Selection | None = None, selector: Selector | None = None,
                 capture: bool = False, dense: bool = False) -> DSAOutput:
        """x [B, T, hidden] -> DSAOutput.

        Without a cache, the T tokens attend among themselves (prefill). With a cache, they are
        appended at each row's length and attend to everything cached so far (chunked prefill and
        decode). Causality always follows where a token sits among the keys (its slot); ``positions``
        [B, T] only sets the RoPE positions (default: the slots). ``selection`` is required on layers
        without an indexer and overrides the layer's own indexer otherwise. ``selector`` picks the keys
        for this call (default: the config's, ``cfg.indexer.selector``); a cache must have been created
        for a selector with the same pooled block size.

        ``capture`` also returns the head-averaged attention probabilities of each selection slot and the
        indexer's activations, computed even under a handed selection and from DETACHED inputs (the
        indexer learns only from its distillation loss, never from the language-model loss).

        ``dense`` (prefill, no cache): every query attends to every causal key (``dense_mla``: no [T, S]
        selection is built; the returned one, ``causal_selection``, exists only if something reads it).

        Context parallelism: a prefill inside ``sharding.activation_sharding(mesh)`` whose mesh has a
        ``context`` axis of n > 1 devices selects with ``select_context_parallel`` (keys split along the
        sequence, exact global merge) and attends with ``sparse_mla_context_parallel`` (rows attended where
        they live, partial softmaxes combined exactly): the same selection, the same output up to float
        summation order. T must divide over n (and, for hisa / misa, each shard hold whole blocks).
        """
        m = self.cfg.mla
        B, T, hidden = x.shape
        if hidden != m.hidden_size:
            raise ValueError(f"DSAAttention: x must be [B, T, {m.hidden_size}], got {x.shape}")
        if dense and cache is not None:
            raise ValueError("DSAAttention: dense attention runs without a cache (a prefill)")
        check_cache_batch("DSAAttention", cache, B)
        if self.indexer is None and selection is None and not dense:
            raise ValueError("DSAAttention: this layer has no indexer (an IndexCache shared layer); pass the "
                             "selection= of the full layer it reuses")
        if self.indexer is not None:
            selector = selector or self.cfg.indexer.selector
            if cache is not None and (selector.block_size or 0) != cache.block_size:
                raise ValueError(f"DSAAttention: the cache pools key blocks of {cache.block_size or 'none'} but "
                                 f"selector {selector.method!r} needs {selector.block_size or 'none'}; create it with "
                                 f"init_cache(..., selector=) for the selector you call with")
        start = cache.lengths[:, None] if cache is not None else jnp.zeros((B, 1), jnp.int32)
        slots = start + jnp.arange(T, dtype=jnp.int32)[None, :]
        if positions is None:
            positions = slots
        elif positions.shape != (B, T):
            raise ValueError(f"DSAAttention: positions must be [B, T] = {(B, T)}, got {positions.shape}")

        # MLA projections: the cache rows here, the per-head query in ``_attend`` (query-chunked on request).
        qr = self.q_a_layernorm(self.q_a_proj(x)) if m.q_lora_rank else x
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., : m.kv_lora_rank])
        cos, sin = rotary_cos_sin(m.rope, positions, m.qk_rope_head_dim)
        k_rope = apply_rope(kv[..., m.kv_lora_rank:], cos, sin, "interleaved")
        rows = jnp.concatenate([latent, k_rope], axis=-1)

        # The indexer runs when it selects, and also under a handed selection when a cache must keep its keys.
        needs_keys = self.indexer is not None and (capture or cache is not None or (selection is None and not dense))
        act = None
        if needs_keys:  # detached under capture: the indexer learns only from its distillation loss
            detach = jax.lax.stop_gradient if capture else (lambda a: a)
            act = self.indexer(detach(x), detach(qr), positions)
        block_sums = None
        if cache is None:
            all_rows, kv_lengths = rows, None
            keys = act
        else:
            cache = cache.append(rows, act.k if act else None, act.k_scale if act else None)
            all_rows, kv_lengths = cache.latent, cache.lengths
            keys = (IndexerActivations(act.q, cache.index_keys, act.w, cache.index_key_scale)
                    if act is not None else None)
            block_sums = cache.block_sums
        context = active_context_mesh() if cache is None else None
        if dense:
            selection = causal_selection(slots, T)
        elif selection is None:
            if context is not None:
                selection = select_context_parallel(selector, keys.q, keys.k, keys.w, mesh=context, q_positions=slots,
                                                    k_scale=keys.k_scale)
            else:
                selection = selector.select(keys.q, keys.k, keys.w, k_scale=keys.k_scale, q_positions=slots,
                                            kv_lengths=kv_lengths, block_sums=block_sums,
                                            implementation=self.implementation)

        def attend(x, qr, cos, sin, positions, indices, valid):
            return self._attend(x, qr, cos, sin, all_rows, positions, indices, valid, context=context,
                                capture=capture, dense=dense)

        chunk = m.prefill_chunk
        args = ((x, 0), (qr, 0), (cos, 0), (sin, 0), (slots, -1))
        args += () if dense else ((selection.indices, -1), (selection.valid, False))
        if dense:  # no selection to hand over: the slots say which keys are causal
            attend = functools.partial(attend, indices=None, valid=None)
        if chunk is None or chunk >= T:
            out, probs, q_full = attend(*(a for a, _ in args))
        else:  # one chunk of queries at a time; the last one padded with queries that select nothing
            out, probs, q_full = map_query_chunks(attend, chunk, *args)
        if not capture:
            return DSAOutput(out, selection, cache)
        teacher = Teacher(jax.lax.stop_gradient(q_full[:, :, None]), jax.lax.stop_gradient(all_rows[:, :, None]),
                          m.softmax_scale)
        return DSAOutput(out, selection, cache, probs, keys, teacher)

    def _attend(self, x, qr, cos, sin, rows, slots, indices, valid, *, context, capture: bool, dense: bool):
        """The query side for queries x [B, Tq, hidden] over the cache ``rows``: (out [B, Tq, hidden], probs,
        the absorbed query [B, Tq, heads, D] with ``capture`` else None).

        The per-head query is [nope | rope] (interleaved MLA rope); W_UK is absorbed into it, sparse MLA
        attends over the latent rows, W_UV and o_proj map the result back."""
        m = self.cfg.mla
        B, T = x.shape[:2]
        q = (self.q_b_proj(qr) if m.q_lora_rank else self.q_proj(x)).reshape(B, T, m.num_heads, m.qk_head_dim)
        q_nope, q_rope = q[..., : m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None], "interleaved")
        w_kv_b = self.kv_b_proj.kernel[...].reshape(m.kv_lora_rank, m.num_heads, m.qk_nope_head_dim + m.v_head_dim)
        w_uk, w_uv = w_kv_b[..., : m.qk_nope_head_dim], w_kv_b[..., m.qk_nope_head_dim:]
        q_latent = jnp.einsum("bthn,chn->bthc", q_nope, w_uk.astype(q_nope.dtype))
        q_full = jnp.concatenate([q_latent, q_rope], axis=-1)
        if dense:
            attended = _sparse_mla.dense_mla(q_full, rows, slots, scale=m.softmax_scale, v_dim=m.kv_lora_rank,
                                             query_chunk=m.query_chunk, return_probs=capture)
        elif context is not None:
            attended = sparse_mla_context_parallel(q_full, rows, Selection(indices, valid), scale=m.softmax_scale,
                                                   v_dim=m.kv_lora_rank, mesh=context, query_chunk=m.query_chunk,
                                                   return_probs=capture)
        else:
            attended = _sparse_mla.sparse_mla(q_full, rows, indices, valid, scale=m.softmax_scale,
                                              v_dim=m.kv_lora_rank, implementation=self.implementation,
                                              query_chunk=m.query_chunk, return_probs=capture)
        out_latent, probs = attended if capture else (attended, None)
        out = jnp.einsum("bthc,chv->bthv", out_latent, w_uv.astype(out_latent.dtype))
        return self.o_proj(out.reshape(B, T, m.num_heads * m.v_head_dim)), probs, q_full if capture else None
