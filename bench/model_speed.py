"""Prefill and decode time of a DeepSeek-V3.2-shaped stack under each selection configuration, and where the
layer time goes: selection (indexer + top-k), sparse MLA attention, the rest.

The model is the library's ``DSAForCausalLM`` (``models/deepseek.py``) with random weights, run through its own
layer loop (``run_layers``) and cache API (``init_caches``); nothing is re-implemented here.

**What is real and what is reduced** (preset ``v32``, the default):

* real, from DeepSeek-V3.2's config.json: hidden 7168; MLA with 128 heads, q_lora 1536, kv_lora 512, rope 64,
  nope 128, v 128 (YaRN factor 40); the lightning indexer with 64 heads x 128, top-2048; vocabulary 129280;
  RMSNorm eps; bf16 weights and activations (the indexer's LayerNorm and head weights in fp32, as the model
  has them); the selectors' defaults (``METHODS``: HISA blocks of 128 x 64, MISA 8 of 64 heads over blocks
  of 1024, MISA-H 8192 candidates).
* reduced: ``layers`` (default 4) of the 61; random weights (times do not depend on trained values, except the
  streaming top-k's pruning, which sees random-weight scores); prefill batch 1; decode ``decode_batch``
  sequences (default 4).
* the FFN (``ffn``): ``dense`` (default) is V3.2's dense SwiGLU of width 18432, the FFN of its first three
  layers, in every layer. 18432 = 9 x 2048: the same FLOPs per token as the MoE's 8 routed + 1 shared experts,
  and at decode batch 1 the same weight bytes read. Expert routing, the token permutation and expert
  imbalance are not modelled. ``moe`` runs the model's MoE (the router, ``lax.ragged_dot`` over sorted
  tokens) with ``routed_experts`` experts (``v32``: 32 instead of 256; 8 per token, 1 shared, as V3.2):
  256 experts are 22.5 GB of weights per layer (90 GB for 4 layers), and at 128K tokens the permuted
  activations (8 x 128K rows x 7168) add 15 GB, beside MLA activations of which one layer's absorbed queries
  and outputs ([T, 128, 576] bf16) are 19 GB each: more than a 139 GB H200 holds. How XLA:GPU lowers
  ``ragged_dot`` depends on its version (a rewrite to a dense dot costs E times the FLOPs): the reason
  ``dense`` is the default.
* the embedding and the LM head are not timed: the same in every configuration, and at 128K tokens the full
  logits alone would be [131072, 129280] fp32 = 68 GB.

Preset ``tiny`` is the same structure at toy size (hidden 64, 4 heads, indexer 4 x 16, top-32, float32, compiled
with XLA:CPU's backend optimisation and fusion emitters off, options an XLA without them drops) for CPU checks of
the plumbing: its times mean nothing.

**Configurations** (``CONFIGS``): ``dsa``, ``hisa``, ``misa``, ``misa_h``: every layer F (runs its own
indexer) with that selector; ``index_cache_1/2`` and ``index_cache_1/4``: DSA with an IndexCache pattern in
which every 2nd resp. 4th layer is F (layer 0 always; 4 layers: ``FSFS`` and ``FSSS``). The layer count must
make these ratios exact (divisible by 2 resp. 4). The pattern is baked into the model (the same weights,
S layers built without an indexer), so an S layer neither selects nor keeps indexer keys: it attends with
the selection of the F layer before it. ``dsa`` is the baseline of the ratios: without it in the run (a run
split over processes) there are none.

**What is timed** (each call by ``timing.time_call``: compiled apart, one warm-up, ``repeats`` timed calls,
median and min ms), per length T (batch 1) and configuration:

* ``prefill``: the stack's forward over T tokens from the embeddings to the last hidden states, writing the
  caches decode reads (``init_caches(1, T + 128)``: the cache has 128 free slots for the decode steps).
* ``decode``: one new token for each of ``decode_batch`` sequences holding the T-token context: the cache the
  timed prefill wrote, copied to every sequence. The cache is donated and fed from call to call (it is
  updated in place, as a server does; each call appends one token, T + 1 .. T + 1 + repeats).

**Shares** (per mode, configuration and length): the components are timed alone with the inputs layer 0 gets
in the stack, then set against the stack's time:

* selection: ``indexer + top-k``: the layer-0 ``LightningIndexer`` on the layer's real normed input and query
  latent, the indexer keys (and pooled block sums) appended to a cache like the layer's, then
  ``Selector.select`` over the cache, as ``DSAAttention`` runs them. Timed once per method and length; counted
  once per F layer (S layers run none).
* attention: the sparse MLA call alone (``kernels.sparse_mla`` over the cached latent rows with the
  selection the first configuration's method made there, DSA's when dsa runs; random absorbed queries: its
  cost depends on k, not on the values or on which rows). Timed once per length; counted once per layer.
* rest = stack - F layers x selection - layers x attention: the MLA projections (the W_UK / W_UV absorption
  included), RoPE, norms, cache writes of the latent rows, the FFN, residuals.
  Each share is its time over the stack's. Components timed alone cost a little more than inside the stack
  (dispatch, no fusion with neighbours), so where they add up to more than the stack (tiny sizes on CPU) the
  shares are taken of their sum (rest 0) and ``components_exceed_stack`` says so; ``rest_ms`` keeps the raw
  remainder.

**Ratios** from the same run: prefill and decode speedup of each configuration over ``dsa`` (dsa ms /
configuration ms) at each length.

A failed measurement (out of memory, an error) is recorded as ``oom`` or ``skipped`` with a one-line reason and
the run goes on; what depends on it (the decode of a failed prefill, the attention component without a
selection) is skipped with that reason. ``max_seconds`` skips what is left once the budget is spent.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.bench.plots import length_axis, no_data, plain_log_y, pyplot, save_figure
from sparse_index_jax.bench.reports import (
    backend_choices,
    environment,
    error_line,
    failed_cell,
    length_label,
    not_timed_lines,
    save_json,
)
from sparse_index_jax.bench.timing import time_call
from sparse_index_jax.kernels import dsa_topk as dsa_topk_op
from sparse_index_jax.kernels import hisa_topk as hisa_topk_op
from sparse_index_jax.kernels import misa_topk as misa_topk_op
from sparse_index_jax.kernels import sparse_mla as sparse_mla_op
from sparse_index_jax.layers.dsa_attention import DSACache
from sparse_index_jax.layers.index_cache import IndexCacheConfig
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.models.deepseek import DSAForCausalLM
from sparse_index_jax.selection.contract import Selection
from sparse_index_jax.selection.methods import Selector

BASELINE = "dsa"
INDEX_CACHE = {"index_cache_1/2": 2, "index_cache_1/4": 4}  # configuration -> every n-th layer is F
METHOD_OF = {"dsa": "dsa", "hisa": "hisa", "misa": "misa", "misa_h": "misa_h", **dict.fromkeys(INDEX_CACHE, "dsa")}
CONFIGS = tuple(METHOD_OF)
MODES = ("prefill", "decode")
FFNS = ("dense", "moe")
CACHE_SLACK = 128  # free cache slots after the prefill's T tokens, for the decode steps

# DeepSeek-V3.2's config.json (deepseek-ai/DeepSeek-V3.2), less what this benchmark reduces (layers, experts).
V32_CONFIG: Mapping[str, Any] = {
    "model_type": "deepseek_v32", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64, "tie_word_embeddings": False,
}
# The same structure at toy size, for CPU runs (tests): every dimension small, the ratios kept.
TINY_CONFIG: Mapping[str, Any] = {
    "model_type": "deepseek_v32", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 32,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16, "n_group": 2, "topk_group": 1,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "index_topk": 32, "index_head_dim": 16, "index_n_heads": 4, "tie_word_embeddings": False,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    summary: str
    hf_config: Mapping[str, Any]                   # config.json keys of the model (layers and MLP types set apart)
    lengths: tuple[int, ...]
    layers: int
    decode_batch: int
    repeats: int
    moe_experts: int                               # routed experts with ffn="moe"
    dtype: Any = jnp.bfloat16                      # weights and activations
    compiler_options: Mapping[str, Any] | None = None  # XLA options of every compilation (time_call's)
    options: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)  # per method; else METHODS'


PRESETS: Mapping[str, Preset] = {
    "v32": Preset("DeepSeek-V3.2 dimensions, bf16 (GPU: 8.5 GB of weights; at 128K one layer's absorbed MLA queries "
                  "and outputs, [T, 128, 576] bf16, are 19 GB each)", V32_CONFIG,
                  lengths=(16384, 32768, 65536, 131072), layers=4, decode_batch=4, repeats=2, moe_experts=32),
    "tiny": Preset("toy dimensions (hidden 64, 4 heads, indexer 4 x 16, top-32) for CPU checks; float32 (XLA:CPU "
                   "emulates bf16, which doubles its compile time) and XLA:CPU's backend optimisation and fusion "
                   "emitters off (half the compile time): its times check the plumbing, they measure nothing",
                   TINY_CONFIG,
                   lengths=(128, 256), layers=4, decode_batch=2, repeats=1, moe_experts=8, dtype=jnp.float32,
                   compiler_options={"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
                   options={"hisa": {"block_size": 16, "num_blocks": 4},
                            "misa": {"block_size": 32, "active_heads": 2},
                            "misa_h": {"block_size": 32, "active_heads": 2, "candidates": 64}}),
}


def _fail(message: str) -> None:
    raise ValueError(f"bench model: {message}")


@dataclasses.dataclass(frozen=True)
class ModelSpeedSetup:
    """What to run; a None field takes the preset's value (``resolved``). Errors name the bad value."""

    preset: str = "v32"
    lengths: tuple[int, ...] | None = None
    layers: int | None = None
    configs: tuple[str, ...] = CONFIGS
    decode_batch: int | None = None
    repeats: int | None = None
    ffn: str = "dense"
    routed_experts: int | None = None   # ffn="moe" only; None: the preset's
    max_seconds: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.preset not in PRESETS:
            _fail(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown or not self.configs:
            _fail(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
        if self.ffn not in FFNS:
            _fail(f"ffn must be one of {', '.join(FFNS)}, got {self.ffn!r}")
        if self.routed_experts is not None and self.ffn != "moe":
            _fail("routed_experts applies to ffn='moe' (the dense FFN has no experts)")
        for name in ("layers", "decode_batch", "repeats", "routed_experts"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                _fail(f"{name} must be a positive int, got {value!r}")
        preset = PRESETS[self.preset]
        topk = preset.hf_config["index_topk"]
        lengths = self.lengths if self.lengths is not None else preset.lengths
        if not lengths or any(not isinstance(T, int) or T < topk for T in lengths):
            _fail(f"lengths must be >= topk={topk} (shorter rows select every key: nothing to compare), got "
                  f"{list(lengths)}")
        layers = self.layers or preset.layers
        for config in self.configs:
            every = INDEX_CACHE.get(config)
            if every and layers % every:
                _fail(f"{config} needs a layer count divisible by {every} (exactly 1/{every} of the layers F), got "
                      f"{layers} layers")
        repeats = self.repeats or preset.repeats
        if repeats + 1 > CACHE_SLACK:
            _fail(f"repeats must be <= {CACHE_SLACK - 1}: each decode call appends a token to a cache with "
                  f"{CACHE_SLACK} free slots, got {repeats}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            _fail(f"max_seconds must be > 0, got {self.max_seconds}")

    def resolved(self) -> "ModelSpeedSetup":
        """The preset's values filled in; the configurations deduplicated, ``dsa`` (the baseline) first."""
        p = PRESETS[self.preset]
        configs = tuple(sorted(dict.fromkeys(self.configs), key=lambda c: c != BASELINE))
        return dataclasses.replace(
            self, lengths=tuple(self.lengths or p.lengths), layers=self.layers or p.layers, configs=configs,
            decode_batch=self.decode_batch or p.decode_batch, repeats=self.repeats or p.repeats,
            routed_experts=(self.routed_experts or p.moe_experts) if self.ffn == "moe" else None)


# ------------------------------------------------------------------------------------------- the model

def model_config(setup: ModelSpeedSetup) -> ModelConfig:
    """The all-F model of a resolved setup: the preset's config.json with ``layers`` layers of one FFN kind."""
    hf = dict(PRESETS[setup.preset].hf_config, num_hidden_layers=setup.layers,
              mlp_layer_types=["dense" if setup.ffn == "dense" else "sparse"] * setup.layers)
    if setup.ffn == "moe":
        hf["n_routed_experts"] = setup.routed_experts
    try:
        return ModelConfig.from_hf_config(hf)
    except ValueError as err:
        raise ValueError(f"bench model: {err}") from None


def pattern_of(config: str, layers: int) -> str:
    """The F/S pattern of a configuration: all F, or IndexCache's uniform 1/n (F at layers 0, n, 2n, ...)."""
    every = INDEX_CACHE.get(config)
    return IndexCacheConfig.uniform(layers, every).pattern if every else "F" * layers


def selector_of(setup: ModelSpeedSetup, config: str) -> Selector:
    """The F layers' selector: the method's registry defaults, or the preset's options for it."""
    cfg = PRESETS[setup.preset].hf_config
    method = METHOD_OF[config]
    options = dict(PRESETS[setup.preset].options.get(method, {}))
    return Selector.create(method, cfg["index_topk"], **options).check_heads(cfg["index_n_heads"])


def build_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> DSAForCausalLM:
    """Random weights in ``dtype`` (the indexer's LayerNorm and head weights and the router in fp32, as the model
    makes them). On accelerators the model's own initialisers; on CPU, where XLA compiles each initialiser
    apart (about a quarter second each), numpy fills the same parameters: normal with std fan_in^-0.5 for
    matrices, ones for norm scales, zeros for biases."""
    if jax.default_backend() != "cpu":
        return DSAForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DSAForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(abstract):
        a = var.get_value()
        if a.ndim >= 2:
            value = rng.standard_normal(a.shape, np.float32) * a.shape[-2] ** -0.5
        else:
            value = np.zeros(a.shape, np.float32) if "bias" in str(path[-1]) else np.ones(a.shape, np.float32)
        leaves.append((path, var.replace(jnp.asarray(value, a.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def with_index_pattern(model: DSAForCausalLM, pattern: str) -> DSAForCausalLM:
    """The same weights with an IndexCache pattern baked in: S layers are built without an indexer (so they
    neither select nor keep indexer keys); every other parameter is the model's own array, not a copy."""
    if pattern == model.cfg.index_pattern:
        return model
    cfg = model.cfg.with_index_cache(pattern)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DSAForCausalLM(cfg, dtype=model.dtype, rngs=nnx.Rngs(0))))
    own = dict(nnx.to_flat_state(nnx.state(model)))
    return nnx.merge(graphdef, nnx.from_flat_state([(path, var.replace(own[path].get_value()))
                                                    for path, var in nnx.to_flat_state(abstract)]))


def indexer_layers(model: DSAForCausalLM) -> list[int]:
    """The layers that have an indexer (the F layers of the model as built)."""
    return [i for i, layer in enumerate(model.layers) if layer.self_attn.indexer is not None]


# ----------------------------------------------------------------------------------- the timed functions

def stack_fn(graphdef, selector: Selector) -> Callable:
    """(state, x [B,T,D], caches) -> (hidden [B,T,D], caches): the model's layer loop (prefill and decode)."""
    def run(state, x, caches):
        out = nnx.merge(graphdef, state).run_layers(x, caches=caches, selector=selector)
        return out.hidden, out.caches
    return run


def layer0_inputs_fn(graphdef) -> Callable:
    """(layer-0 state, x, x_new) -> (normed x, query latent) of each: what layer 0's indexer reads in the stack."""
    def run(state, *xs):
        layer = nnx.merge(graphdef, state)
        attn, out = layer.self_attn, []
        for x in xs:
            xn = layer.input_layernorm(x)
            out += [xn, attn.q_a_layernorm(attn.q_a_proj(xn)) if attn.cfg.mla.q_lora_rank else xn]
        return tuple(out)
    return run


def selection_fn(graphdef, selector: Selector) -> Callable:
    """(indexer state, x, qr, keys cache) -> (Selection, cache): indexer + key-cache append + top-k, as
    ``DSAAttention`` runs them with a cache. The cache's latent is zero-wide: the latent rows are the
    attention's, not the selection's."""
    def run(state, x, qr, cache):
        indexer = nnx.merge(graphdef, state)
        B, T, _ = x.shape
        slots = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        act = indexer(x, qr, slots)
        cache = cache.append(jnp.zeros((B, T, 0), cache.latent.dtype), act.k, act.k_scale)
        selection = selector.select(act.q, cache.index_keys, act.w, k_scale=cache.index_key_scale, q_positions=slots,
                                    kv_lengths=cache.lengths, block_sums=cache.block_sums)
        return selection, cache
    return run


def attention_fn(cfg: ModelConfig) -> Callable:
    """(q [B,T,H,Dk], rows [B,S,Dk], indices, valid) -> [B,T,H,kv_lora]: the sparse MLA call of ``DSAAttention``."""
    mla = cfg.layer_config(0).mla

    def run(q, rows, indices, valid):
        return sparse_mla_op.sparse_mla(q, rows, indices, valid, scale=mla.softmax_scale, v_dim=mla.kv_lora_rank,
                                        query_chunk=mla.query_chunk)
    return run


def _keys_only(cache: DSACache) -> DSACache:
    return dataclasses.replace(cache, latent=jnp.zeros((*cache.latent.shape[:2], 0), cache.latent.dtype))


def _repeat(tree, n: int):
    """Every array of ``tree`` repeated n times along the batch axis, always as new buffers (they get donated)."""
    return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0) if n > 1 else jnp.copy(a), tree)


def _normal(seed: int, shape: tuple[int, ...], dtype) -> jax.Array:
    """Standard normal values made on the device by XLA's RngBitGenerator (``rbg``: compiles in a fraction of the
    default threefry's time; the values only feed timed calls)."""
    return jax.random.normal(jax.random.key(seed, impl="rbg"), shape, dtype)


def _feed_cache(args: tuple, result: tuple) -> tuple:
    """The next call's arguments: the same, with the cache the previous call returned (always the last one)."""
    return (*args[:-1], result[1])


# ------------------------------------------------------------------------------------------------ the run

class _Run:
    """The measurements of one run: per length, each configuration's prefill then decode, and the components of
    each method right after the first configuration that uses it (on that configuration's prefill cache)."""

    def __init__(self, setup: ModelSpeedSetup, log: Callable[[str], None] | None):
        self.setup, self.log = setup, log or (lambda text: None)
        self.started = time.perf_counter()
        self.compiler_options = PRESETS[setup.preset].compiler_options
        self.cfg = model_config(setup)
        self.selectors = {c: selector_of(setup, c) for c in setup.configs}
        self.patterns = {c: pattern_of(c, setup.layers) for c in setup.configs}
        self.base = build_model(self.cfg, setup.seed, PRESETS[setup.preset].dtype)
        self.models = {p: with_index_pattern(self.base, p) for p in dict.fromkeys(self.patterns.values())}
        self.results = {c: {"pattern": self.patterns[c], "selector": self.selectors[c].as_dict(),
                            "indexer_layers": indexer_layers(self.models[self.patterns[c]]), **{m: {} for m in MODES}}
                        for c in setup.configs}
        self.method_owner: dict[str, str] = {}  # method -> the first configuration using it (measures its components)
        for c in setup.configs:
            self.method_owner.setdefault(METHOD_OF[c], c)
        self.components = {m: {"selection": {method: {} for method in self.method_owner}, "attention": {}}
                           for m in MODES}

    def time_call(self, fn: Callable, args: Callable[[], tuple], **timing):
        """``time_call`` with the preset's compiler options; where this XLA does not know one, without them."""
        if self.compiler_options:
            try:
                return time_call(fn, args(), self.setup.repeats, compiler_options=self.compiler_options, **timing)
            except Exception as err:
                if "No such compile option" not in str(err):
                    raise
                self.log(f"this XLA refuses the preset's compiler options ({error_line(err)}): compiling without")
                self.compiler_options = None
        return time_call(fn, args(), self.setup.repeats, **timing)

    def measure(self, what: str, fn: Callable, args: Callable[[], tuple], **timing) -> tuple[dict[str, Any], Any]:
        """(cell, result): a guarded ``time_call``; ``args`` makes the arguments (not made once the budget is
        spent). The cell records the timing, or why there is none."""
        skipped = self.over_budget()
        if skipped is not None:
            return skipped, None
        try:
            timing_, result = self.time_call(fn, args, **timing)
        except Exception as err:  # noqa: BLE001  (recorded in one line; the rest of the run goes on)
            cell = failed_cell(err)
            self.log(f"{what}: {cell['status']}: {cell['reason']}")
            return cell, None
        cell = {"status": "ok", **timing_.as_dict()}
        self.log(f"{what}: {cell['median_ms']:.3f} ms (compiled in {cell['compile_ms'] / 1e3:.1f} s)")
        return cell, result

    def over_budget(self) -> dict[str, str] | None:
        """The cell of a measurement not started because ``max_seconds`` is spent, or None."""
        elapsed = time.perf_counter() - self.started
        if self.setup.max_seconds is not None and elapsed > self.setup.max_seconds:
            return {"status": "skipped", "reason": f"time budget --max-seconds {self.setup.max_seconds:g} exceeded "
                                                   f"({elapsed:.0f} s)"}
        return None

    def fail_length(self, T: int, err: BaseException | dict[str, str]) -> None:
        """Records ``err`` (or a cell) in every cell of length T not measured yet."""
        cell = err if isinstance(err, dict) else failed_cell(err)
        self.log(f"T={T}: {cell['status']}: {cell['reason']}")
        cells = [res[mode] for res in self.results.values() for mode in MODES]
        cells += [c for mode in MODES for c in (*self.components[mode]["selection"].values(),
                                                 self.components[mode]["attention"])]
        for c in cells:
            c.setdefault(str(T), cell)

    def length(self, T: int) -> None:
        s, base, key = self.setup, self.base, str(T)
        skipped = self.over_budget()
        if skipped is not None:
            return self.fail_length(T, skipped)
        ids = np.random.default_rng([s.seed, T]).integers(0, self.cfg.vocab_size, (1 + s.decode_batch, T))
        x, x_new = base.embed(jnp.asarray(ids[:1])), base.embed(jnp.asarray(ids[1:, :1]))
        layer0_def, layer0_state = nnx.split(base.layers[0])
        try:  # what layer 0's indexer reads in the stack, prefill and decode
            inputs = jax.jit(layer0_inputs_fn(layer0_def))(layer0_state, x, x_new)
        except Exception as err:  # noqa: BLE001
            inputs = err
        selection: dict[str, Selection] = {}  # per mode, the first configuration's: what the attention component uses

        for config in s.configs:
            model, selector = self.models[self.patterns[config]], self.selectors[config]
            graphdef, state = nnx.split(model)
            stack = stack_fn(graphdef, selector)
            cell, out = self.measure(f"T={T} {config} prefill", stack,
                                     lambda: (state, x, model.init_caches(1, T + CACHE_SLACK, selector)))
            self.results[config]["prefill"][key] = cell
            caches = out[1] if out is not None else None
            del out
            if caches is None:
                cell = {"status": "skipped", "reason": f"needs the prefill's cache; prefill: {cell['reason']}"}
            else:
                cell, _ = self.measure(f"T={T} {config} decode", stack,
                                       lambda: (state, x_new, _repeat(caches, s.decode_batch)),
                                       donate_argnums=(2,), feed=_feed_cache)
            self.results[config]["decode"][key] = cell
            if self.method_owner[selector.method] == config:
                self.selection(T, selector, inputs, caches, selection)
            if config == s.configs[0]:
                self.attention(T, caches, selection)
            caches = None  # this configuration's cache is freed before the next one's prefill

    def selection(self, T: int, selector: Selector, inputs, caches, selection: dict[str, Selection]) -> None:
        """The selection component of ``selector``'s method in both modes: layer 0's indexer on its stack inputs;
        prefill into an empty keys cache, decode on the keys the prefill cached."""
        s, method, key = self.setup, selector.method, str(T)
        cells = {mode: self.components[mode]["selection"][method] for mode in MODES}
        if isinstance(inputs, Exception):
            for mode in MODES:
                cells[mode][key] = {"status": "skipped", "reason": f"layer 0's inputs: {error_line(inputs)}"}
            return
        xn, qr, xn_new, qr_new = inputs
        ix_def, ix_state = nnx.split(self.base.layers[0].self_attn.indexer)
        select = selection_fn(ix_def, selector)
        attn_cfg = self.base.layers[0].self_attn.cfg
        cells["prefill"][key], result = self.measure(
            f"T={T} selection {method} prefill", select,
            lambda: (ix_state, xn, qr, _keys_only(DSACache.create(attn_cfg, 1, T + CACHE_SLACK, self.base.dtype,
                                                                  selector))))
        if result is not None and self.method_owner[method] == s.configs[0]:
            selection["prefill"] = result[0]
        del result
        if caches is None:
            cells["decode"][key] = {"status": "skipped", "reason": "needs the prefill's cache"}
            return
        cells["decode"][key], result = self.measure(
            f"T={T} selection {method} decode", select,
            lambda: (ix_state, xn_new, qr_new, _repeat(_keys_only(caches[0]), s.decode_batch)),
            donate_argnums=(3,), feed=_feed_cache)
        if result is not None and self.method_owner[method] == s.configs[0]:
            selection["decode"] = result[0]

    def attention(self, T: int, caches, selection: dict[str, Selection]) -> None:
        """The sparse MLA component of both modes, on the first configuration's selection (DSA's when dsa runs)
        and layer 0's cached latent rows."""
        s, mla = self.setup, self.cfg.layer_config(0).mla
        for mode, batch, queries in (("prefill", 1, T), ("decode", s.decode_batch, 1)):
            if caches is None or mode not in selection:
                self.components[mode]["attention"][str(T)] = {
                    "status": "skipped", "reason": f"needs the prefill cache and the selection of {s.configs[0]}"}
                continue
            shape = (batch, queries, mla.num_heads, mla.kv_lora_rank + mla.qk_rope_head_dim)
            sel = selection[mode]
            self.components[mode]["attention"][str(T)], _ = self.measure(
                f"T={T} attention {mode}", attention_fn(self.cfg),
                lambda: (_normal(s.seed + T, shape, self.base.dtype), _repeat(caches[0].latent, batch), sel.indices,
                         sel.valid))


def _backends() -> dict[str, dict[str, str]]:
    """The implementation each op serves this benchmark's calls with (``auto``), and why."""
    return backend_choices({"dsa_topk": lambda: dsa_topk_op.backend_for(),
                            "hisa_topk": lambda: hisa_topk_op.backend_for(),
                            "misa_topk": lambda: misa_topk_op.backend_for(),
                            "sparse_mla": lambda: sparse_mla_op.backend_for(q_dtype=jnp.bfloat16)})


def layer_shares(stack_ms: float, selection_ms: float, attention_ms: float, f_layers: int,
                 layers: int) -> dict[str, Any]:
    """Shares of the stack's time: selection (F layers x one layer's), attention (layers x one), the rest."""
    selection, attention = f_layers * selection_ms, layers * attention_ms
    parts = selection + attention
    whole = max(stack_ms, parts)
    return {"selection": selection / whole, "attention": attention / whole,
            "rest": max(0.0, 1.0 - parts / whole), "selection_ms": selection, "attention_ms": attention,
            "rest_ms": stack_ms - parts, "layer_ms": stack_ms / layers, "components_exceed_stack": parts > stack_ms}


def _shares(setup: ModelSpeedSetup, results, components) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in MODES}
    for mode in MODES:
        for config, res in results.items():
            cells = out[mode][config] = {}
            for T in map(str, setup.lengths):
                stack = res[mode].get(T, {})
                sel = components[mode]["selection"][METHOD_OF[config]].get(T, {})
                attn = components[mode]["attention"].get(T, {})
                if all(c.get("status") == "ok" for c in (stack, sel, attn)):
                    cells[T] = layer_shares(stack["median_ms"], sel["median_ms"], attn["median_ms"],
                                            len(res["indexer_layers"]), setup.layers)
    return out


def _ratios(results) -> dict[str, dict[str, dict[str, float]]]:
    """Speedup of every configuration over dsa (dsa ms / its ms), per mode and length; none without dsa."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    if BASELINE not in results:
        return out
    for mode in MODES:
        base = results[BASELINE][mode]
        out[f"{mode}_speedup_vs_{BASELINE}"] = {
            config: {T: base[T]["median_ms"] / c["median_ms"] for T, c in res[mode].items()
                     if c.get("status") == "ok" and base.get(T, {}).get("status") == "ok"}
            for config, res in results.items()}
    return out


def run(setup: ModelSpeedSetup, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Times every configuration at every length, the components, and derives shares and ratios; returns the
    report. ``log`` gets one line per measurement (the library prints nothing)."""
    setup = setup.resolved()
    bench = _Run(setup, log)
    for T in setup.lengths:
        try:
            bench.length(T)
        except Exception as err:  # noqa: BLE001  (outside a measurement: the length's remaining cells say why)
            bench.fail_length(T, err)
    cfg = bench.cfg
    state = nnx.state(bench.base)
    params = sum(x.size for x in jax.tree.leaves(state))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    mla = cfg.layer_config(0).mla
    dtype = jnp.dtype(PRESETS[setup.preset].dtype).name
    return {
        "benchmark": "model: prefill and decode of a DeepSeek-V3.2-shaped stack per selection configuration, with the "
                     "selection / attention / rest shares of its time",
        "environment": environment(),
        "setup": {**dataclasses.asdict(setup), "preset_summary": PRESETS[setup.preset].summary, "batch": 1,
                  "cache_max_len": f"T + {CACHE_SLACK}",
                  "model": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                            "mla": {"heads": mla.num_heads, "q_lora_rank": mla.q_lora_rank,
                                    "kv_lora_rank": mla.kv_lora_rank, "qk_rope_head_dim": mla.qk_rope_head_dim,
                                    "qk_nope_head_dim": mla.qk_nope_head_dim, "v_head_dim": mla.v_head_dim,
                                    "query_chunk": mla.query_chunk},
                            "indexer": {"heads": cfg.index_n_heads, "head_dim": cfg.index_head_dim,
                                        "topk": cfg.index_topk},
                            "ffn": ({"kind": "dense", "intermediate_size": cfg.intermediate_size}
                                    if setup.ffn == "dense" else
                                    {"kind": "moe", "routed_experts": cfg.n_routed_experts,
                                     "experts_per_token": cfg.num_experts_per_tok,
                                     "shared_experts": cfg.n_shared_experts,
                                     "moe_intermediate_size": cfg.moe_intermediate_size}),
                            "vocab_size": cfg.vocab_size, "parameters": params, "parameter_bytes": param_bytes},
                  "dtypes": {"weights": f"{dtype} (indexer LayerNorm + head weights, router: float32)",
                             "activations": dtype, "indexer_w": "float32", "latent_cache": dtype,
                             "index_key_cache": dtype, "block_sums": "float32"},
                  "timed": {"prefill": f"run_layers over T tokens writing caches of T + {CACHE_SLACK} slots (embedding "
                                       f"and LM head not timed)",
                            "decode": "run_layers over one token per sequence, cache donated (updated in place)",
                            "selection": "layer-0 indexer + key-cache append + Selector.select, per F layer",
                            "attention": f"sparse MLA call alone ({METHOD_OF[setup.configs[0]]}'s selection, random "
                                         f"absorbed queries), per layer",
                            "rest": "stack - F layers x selection - layers x attention"}},
        "backends": _backends(),
        "results": bench.results,
        "components": bench.components,
        "shares": _shares(setup, bench.results, bench.components),
        "ratios": _ratios(bench.results),
        "elapsed_s": time.perf_counter() - bench.started,
    }


# ------------------------------------------------------------------------------------------------ output

def format_table(report: dict[str, Any]) -> str:
    setup, env = report["setup"], report["environment"]
    lengths = [str(T) for T in setup["lengths"]]
    model = setup["model"]
    ffn = model["ffn"]
    ffn_text = (f"dense FFN {ffn['intermediate_size']}" if ffn["kind"] == "dense" else
                f"MoE {ffn['routed_experts']} experts ({ffn['experts_per_token']} per token + {ffn['shared_experts']} "
                f"shared) x {ffn['moe_intermediate_size']}")
    indexer = model["indexer"]
    lines = [f"{env['device_kind']} ({env['platform']}), jax {env['jax']}; preset {setup['preset']}: {model['layers']} "
             f"layers, hidden {model['hidden_size']}, MLA {model['mla']['heads']} heads, indexer {indexer['heads']} x "
             f"{indexer['head_dim']} top-{indexer['topk']}, {ffn_text}, {setup['dtypes']['activations']}; prefill "
             f"batch 1, decode batch {setup['decode_batch']}, {setup['repeats']} repeats"]
    head = [*[length_label(int(T)) for T in lengths]]
    results = report["results"]

    def name(config):
        return f"{config} ({results[config]['pattern']})"

    def section(title, row):
        lines.extend(["", " | ".join([title, *head]), " | ".join("---" for _ in range(len(head) + 1))])
        for config in results:
            lines.append(" | ".join([name(config), *[row(config, T) for T in lengths]]))

    def ms(mode):
        def cell(config, T):
            c = results[config][mode].get(T, {})
            return f"{c['median_ms']:.3f}" if c.get("status") == "ok" else c.get("status", "-")
        return cell

    def speedup(mode):
        values = report["ratios"][f"{mode}_speedup_vs_{BASELINE}"]
        return lambda config, T: f"{values[config][T]:.2f}x" if T in values.get(config, {}) else "-"

    def share(mode):
        def cell(config, T):
            sh = report["shares"][mode].get(config, {}).get(T)
            if sh is None:
                return "-"
            text = f"{100 * sh['selection']:.0f} / {100 * sh['attention']:.0f} / {100 * sh['rest']:.0f}"
            return text + (" *" if sh["components_exceed_stack"] else "")
        return cell

    for mode in MODES:
        section(f"{mode} ms", ms(mode))
    if report["ratios"]:
        for mode in MODES:
            section(f"{mode} speedup vs {BASELINE}", speedup(mode))
    else:
        lines += ["", f"no speedups: {BASELINE}, their baseline, is not in this run"]
    for mode in MODES:
        section(f"{mode} % selection / attention / rest", share(mode))
    if any(sh["components_exceed_stack"] for m in MODES for cells in report["shares"][m].values()
           for sh in cells.values()):
        lines.append("* the components timed alone add up to more than the stack: shares of their sum (rest 0)")
    lines.append("")
    lines.append(" | ".join(["component ms (one layer)", *head]))
    lines.append(" | ".join("---" for _ in range(len(head) + 1)))
    for mode in MODES:
        comp = report["components"][mode]
        rows = [(f"{mode} selection {method}", cells) for method, cells in comp["selection"].items()]
        for label, cells in [*rows, (f"{mode} attention", comp["attention"])]:
            lines.append(" | ".join([label, *[f"{cells[T]['median_ms']:.3f}" if cells.get(T, {}).get("status") == "ok"
                                              else cells.get(T, {}).get("status", "-") for T in lengths]]))
    stack_rows = [(f"{config} {mode}", res[mode]) for config, res in results.items() for mode in MODES]
    component_rows = [row for mode in MODES for row in (
        *[(f"selection {m} {mode}", c) for m, c in report["components"][mode]["selection"].items()],
        (f"attention {mode}", report["components"][mode]["attention"]))]
    lines += not_timed_lines([*stack_rows, *component_rows])
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path | None:
    """Three panels against length, one colour per configuration, prefill solid and decode dashed: the stack's
    median ms (log-log), the speedup over dsa timed in the same run (dsa ms / ms), and the selection share of the
    stack's time (indexer + top-k, %)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (times, ratios, share_ax) = plt.subplots(1, 3, figsize=(18, 5.6), dpi=120)
    lengths = sorted(int(T) for T in report["setup"]["lengths"])
    colors = dict(zip(report["results"], plt.get_cmap("tab10").colors))
    styles = dict(zip(MODES, ("-", "--")))

    def lines(ax, values_of):
        for config in report["results"]:
            for mode in MODES:
                pts = sorted((int(T), v) for T, v in values_of(config, mode).items())
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, linestyle=styles[mode], color=colors[config],
                            label=f"{config} {mode}")

    results = report["results"]
    lines(times, lambda config, mode: {T: c["median_ms"] for T, c in results[config][mode].items()
                                       if c.get("status") == "ok"})
    env = report["environment"]
    times.set(yscale="log", ylabel="median ms", title=f"{report['setup']['layers']} layers, {env['device_kind']}: "
                                                      f"median ms\nprefill solid, decode dashed")
    if report["ratios"]:
        lines(ratios, lambda config, mode: report["ratios"][f"{mode}_speedup_vs_{BASELINE}"].get(config, {}))
        ratios.axhline(1.0, color="grey", linewidth=0.8)
        ratios.set(yscale="log", ylabel=f"{BASELINE} ms / ms (x)",
                   title=f"speedup over {BASELINE} timed in this run (> 1 = faster)\nprefill solid, decode dashed")
    else:
        no_data(ratios, f"no speedups: {BASELINE}, their baseline, is not in this run")
    lines(share_ax, lambda config, mode: {T: 100 * sh["selection"]
                                          for T, sh in report["shares"][mode].get(config, {}).items()})
    share_ax.set(ylabel="% of stack time", title="selection (indexer + top-k) share of the stack's time\n"
                                                "prefill solid, decode dashed")
    share_ax.set_ylim(bottom=0)
    for ax in (times, ratios, share_ax):
        if ax.get_legend_handles_labels()[0]:
            length_axis(ax, lengths, "context T (tokens)")
            if ax.get_yscale() == "log":
                plain_log_y(ax)
            ax.grid(alpha=0.3)
            ax.grid(alpha=0.1, which="minor")
    if times.get_legend_handles_labels()[0]:  # one legend for the three panels: colour = configuration, style = mode
        from matplotlib.lines import Line2D  # noqa: PLC0415  (matplotlib is optional: imported once it is there)

        key = [Line2D([], [], color=colors[c], marker="o", markersize=3, label=f"{c} ({results[c]['pattern']})")
               for c in results] + [Line2D([], [], color="black", linestyle=styles[m], label=m) for m in MODES]
        fig.legend(handles=key, fontsize=8, ncol=len(key), loc="lower center", frameon=False)
    return save_figure(fig, path, rect=(0, 0.05, 1, 1))


def save(report: dict[str, Any], path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Writes the JSON report and the PNG next to it (same name, .png); returns both paths."""
    out = save_json(report, path)
    return out, plot(report, out.with_suffix(".png"))
