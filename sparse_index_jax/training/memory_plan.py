"""Per-device memory of one indexer-distillation step, from abstract shapes: no weights, no devices.

``plan_memory(cfg, {"data": 2, "tensor": 4, "expert": 8}, seq_len=131072, batch_size=16)`` tells, before a TPU
pod or a GPU cluster is rented, whether distilling a model's indexers fits. For each stage (the dense warm-up,
the sparse stage) it reports per device:

* **parameters, gradients, optimizer state: exact.** The model is built abstractly (``nnx.eval_shape``), each
  leaf is placed by ``sharding.partition_spec`` and its shard counted: leaf bytes / the product of the sizes of
  the mesh axes its spec names. The data axis splits the parameters' hidden dimension (FSDP), tensor and
  expert their heads, widths and experts; the context axis replicates them. Gradients and adam's mu and nu
  (optax keeps both in the parameter's dtype) exist for the trainable parameters only, sharded like them: the
  indexers (paths with "indexer") in the dense warm-up, and in the sparse stage too unless ``train_base``.
  adam's step counters (a few scalars) are left out.
* **activations and selection buffers: an estimate from the shapes**, by the formulas of ``_Shapes`` below.
  XLA may fuse some of these arrays away, or keep more (the gradients of activations in the backward, copies
  around collectives, padding to hardware tiles): read them as the size of what a step must hold, not as
  what a profiler will show.

The multi-token-prediction layer of the checkpoints is not part of the model here, so it is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax import models
from sparse_index_jax.layers.index_cache import check_pattern
from sparse_index_jax.layers.sharding import MESH_AXES, partition_spec
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.models.deepseek import DSAForCausalLM

GIB = 1 << 30
STAGES = ("dense", "sparse")
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0}  # arrays per trainable parameter: adam's mu and nu
BUILTIN_CONFIGS = {"deepseek-v3.2": "deepseek_v32.json", "glm-5": "glm_5.json"}  # in sparse_index_jax.models
KL_QUERY_CHUNK = 64         # query rows per step of the indexer KL (DistillConfig.kl_query_chunk)
DENSE_KL_KEY_CHUNK = 512    # keys per step of the dense warm-up's KL, never [T, T] (DistillConfig.kl_key_chunk)


def builtin_config(name: str) -> ModelConfig:
    """The shipped HF config.json of a model by name: ``deepseek-v3.2`` or ``glm-5``."""
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_CONFIGS)}")
    file = pathlib.Path(models.__file__).parent / "configs" / BUILTIN_CONFIGS[name]
    return ModelConfig.from_hf_config(json.loads(file.read_text()))


# ---- parameters: exact, from the abstract model ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple
    shape: tuple[int, ...]
    nbytes: int
    is_param: bool      # an nnx.Param (trainable); False for buffers such as the router's correction bias

    @property
    def is_indexer(self) -> bool:
        return "indexer" in (str(p) for p in self.path)

    def shard_bytes(self, mesh: Mapping[str, int]) -> int:
        """Bytes of this leaf on one device: split over every mesh axis its partition spec names."""
        ways = 1
        for entry in partition_spec(self.path, self.shape, mesh):
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                ways *= mesh.get(axis, 1)
        return self.nbytes // ways


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` while the model is built abstractly: every initializer gets the same key, as
    only shapes and dtypes matter. ``nnx.Rngs`` bumps a traced counter per draw, and Flax asks that tracer for
    its sharding, which JAX answers by scanning the whole trace so far: quadratic in the model's size (84 s for
    DeepSeek-V3.2, 165 s for GLM-5; 5 s each with this)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


@functools.lru_cache(maxsize=4)
def _leaves(cfg: ModelConfig, dtype) -> tuple[_Leaf, ...]:
    """Every variable of the model, with the dtype it really has (bf16 except the indexer's LayerNorm and
    head-weight projection and the MoE router, which stay float32)."""
    model = nnx.eval_shape(lambda: DSAForCausalLM(cfg, dtype=dtype, rngs=_ShapeOnlyRngs()))
    leaves = []
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        leaves.append(_Leaf(tuple(path), tuple(value.shape), value.size * value.dtype.itemsize,
                            isinstance(variable, nnx.Param)))
    return tuple(leaves)


# ---- activations and selection buffers: estimated from the shapes -----------------------------------------

def _split(size: int, ways: int) -> int:
    """A dimension's size on one device: split ``ways`` ways when that divides it, as ``partition_spec`` does."""
    return size // ways if size % ways == 0 else size


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """The arrays of one training step on one device, in bytes.

    Per device: b = batch / data sequences of t = seq_len / context tokens (``tokens`` = b * t); attention heads,
    indexer heads, MLP widths and the vocabulary split over ``tensor`` and routed experts over ``expert`` where
    the parameters are split so (``partition_spec``); the hidden size is never split. Activations are in the
    model dtype (``act`` bytes), except where the code makes them float32.
    """

    cfg: ModelConfig
    b: int
    t: int
    seq_len: int                # every key of a sequence: what dense attention reads
    tensor: int
    expert: int
    act: int
    query_chunk: int            # queries per step of sparse / dense MLA (MLAConfig.query_chunk)

    @property
    def tokens(self) -> int:
        return self.b * self.t

    @property
    def heads(self) -> int:
        return _split(self.cfg.num_attention_heads, self.tensor)

    @property
    def latent(self) -> int:
        """Width of one cached row, [latent | rope key], which the absorbed query scores."""
        return self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim

    def layer_input(self) -> int:
        """[b, t, hidden]: what per-layer rematerialisation keeps of a layer."""
        return self.tokens * self.cfg.hidden_size * self.act

    def attention(self, stage: str) -> int:
        """One layer's MLA: its projections and, for one query chunk, float32 logits and their exponentials over
        the keys each query attends (index_topk rows gathered per query; every key in the dense warm-up)."""
        c, heads, latent = self.cfg, self.heads, self.latent
        per_token = (c.hidden_size                                         # the normed input
                     + 2 * (c.q_lora_rank or 0)                            # query latent, before and after its norm
                     + 2 * latent                                          # kv_a projection and the latent rows
                     + heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)   # per-head query
                     + heads * latent                                      # absorbed query (W_UK folded in)
                     + heads * c.kv_lora_rank                              # attention output in the latent space
                     + heads * c.v_head_dim                                # ... mapped back by W_UV
                     + c.hidden_size)                                      # o_proj output
        if stage == "sparse":
            chunk = self.b * self.query_chunk * c.index_topk * (2 * heads * 4 + latent * self.act)
        else:
            chunk = self.b * self.query_chunk * self.seq_len * 2 * heads * 4
        return self.tokens * per_token * self.act + chunk

    def indexer(self) -> int:
        """One F layer's indexer activations: q [b,t,heads,d] and k [b,t,d] in the model dtype, w [b,t,heads]
        float32."""
        c = self.cfg
        heads = _split(c.index_n_heads, self.tensor)
        return self.tokens * ((heads + 1) * c.index_head_dim * self.act + heads * 4)

    def indexer_inputs(self) -> int:
        """What the indexer's weight gradients read: the normed layer input and the query latent."""
        return self.tokens * (self.cfg.hidden_size + (self.cfg.q_lora_rank or 0)) * self.act

    def teacher(self) -> int:
        """A layer's dense-warm-up target, its attention's inputs: absorbed query [b,t,heads,latent] and rows
        [b,t,latent] (``dsa_attention.Teacher``)."""
        return self.tokens * (self.heads + 1) * self.latent * self.act

    def mlp(self, kind: str) -> int:
        """One layer's feed-forward: a dense SwiGLU, or the MoE (router, routed experts, shared experts)."""
        c = self.cfg
        per_token = 2 * c.hidden_size                                      # normed input, output
        if kind == "dense":
            return self.tokens * (per_token + 3 * _split(c.intermediate_size, self.tensor)) * self.act  # gate, up, h
        ep = self.expert if c.n_routed_experts % self.expert == 0 else 1
        routed = self.tokens * c.num_experts_per_tok // ep                 # token copies this device's experts run
        width = _split(c.moe_intermediate_size, self.tensor)
        shared = _split(c.moe_intermediate_size * c.n_shared_experts, self.tensor)
        return (self.tokens * c.n_routed_experts * 4                       # float32 router scores
                + routed * (2 * c.hidden_size + 3 * width) * self.act      # dispatched rows, gate, up, h, output
                + self.tokens * (per_token + 3 * shared) * self.act)       # shared experts

    def loss(self, stage: str) -> int:
        """The loss after the layer loop: [b, t, vocab] float32 logits and their log-softmax (the LM loss, computed
        in both stages) and one query chunk of the indexer KL: scores over the slots and the keys gathered for
        them (sparse), or one 512-key chunk of the teacher's float32 logits and exponentials (dense)."""
        c = self.cfg
        logits = 2 * self.tokens * _split(c.vocab_size, self.tensor) * 4
        if stage == "sparse":
            return logits + self.b * KL_QUERY_CHUNK * c.index_topk * (4 + c.index_head_dim * self.act)
        return logits + self.b * KL_QUERY_CHUNK * DENSE_KL_KEY_CHUNK * (2 * self.heads * 4 + 4)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Bytes per device of one stage of the step."""

    stage: str                  # "dense" (warm-up) or "sparse"
    trains_base: bool           # every parameter trains (else the indexers alone)
    parameters: int
    gradients: int
    optimizer_state: int
    activations_remat: int      # each layer rematerialised in the backward from its kept input
    activations_no_remat: int
    selection_buffers: int

    def total(self, remat: bool = True) -> int:
        activations = self.activations_remat if remat else self.activations_no_remat
        return self.parameters + self.gradients + self.optimizer_state + activations + self.selection_buffers


def _activations(shapes: _Shapes, cfg: ModelConfig, pattern: str, stage: str, trains_base: bool) -> tuple[int, int]:
    """(with per-layer remat, without) for one stage; see ``plan_memory``."""
    working = [shapes.attention(stage) + shapes.mlp(kind) + (shapes.indexer() if letter == "F" else 0)
               for letter, kind in zip(pattern, cfg.mlp_layer_types)]
    peak = max(max(working), shapes.loss(stage))  # one layer at a time, or the loss after the loop
    if trains_base:
        inputs = len(pattern) * shapes.layer_input()
        return inputs + peak, inputs + sum(working) + shapes.loss(stage)
    # The gradient never enters the base layers (the indexers see detached inputs): it needs only the F layers,
    # from their inputs (remat) or from what their indexers read.
    n_full = pattern.count("F")
    return n_full * shapes.layer_input() + peak, n_full * shapes.indexer_inputs() + peak


def _selection_buffers(shapes: _Shapes, cfg: ModelConfig, pattern: str, stage: str) -> int:
    """What the layers hand to the loss (``training.distill.distill_losses``). Each layer's KL term is taken as
    soon as the layer has run and its target dropped, so one target lives at a time: the teacher (warm-up) or
    the head-averaged float32 probabilities over the selected slots (sparse stage), with the current F layer's
    indexer activations; per layer the KL leaves gradients the size of those activations for the backward.
    The sparse stage also keeps every F layer's selection (int32 indices, bool valid: the S layers' and the
    backward's)."""
    n_full, n_layers = pattern.count("F"), len(pattern)
    kept = (n_layers + 1) * shapes.indexer()
    if stage == "sparse":
        slots = shapes.tokens * cfg.index_topk
        return kept + slots * 4 + n_full * slots * (4 + 1)
    return kept + shapes.teacher()


# ---- the plan ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of an indexer-distillation step, per stage; ``table()`` prints it."""

    model: str                  # one line: type, layers, parameters, dtype, pattern
    parameter_count: int        # of the model as built (no multi-token-prediction layer)
    mesh: Mapping[str, int]
    seq_len: int
    batch_size: int
    optimizer: str
    remat: bool
    stages: tuple[StagePlan, ...]
    pattern: str

    def stage(self, name: str) -> StagePlan:
        for plan in self.stages:
            if plan.stage == name:
                return plan
        raise ValueError(f"this plan has no {name!r} stage; it has {[p.stage for p in self.stages]}")

    @property
    def total(self) -> int:
        """The larger stage's total, with or without remat as planned."""
        return max(plan.total(self.remat) for plan in self.stages)

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes

    def table(self, device_bytes: int | None = None) -> str:
        """The plan as text: one line per part in GiB per device, a column per stage, and with ``device_bytes``
        whether it fits."""
        devices = math.prod(self.mesh.values())
        mesh = " ".join(f"{axis}={self.mesh.get(axis, 1)}" for axis in MESH_AXES)
        b, t = self.batch_size // self.mesh.get("data", 1), self.seq_len // self.mesh.get("context", 1)
        trains = ", ".join(f"{p.stage}: {'all parameters' if p.trains_base else 'indexers'}" for p in self.stages)
        names = {"dense": "dense warm-up", "sparse": "sparse stage"}
        rows = [("parameters (exact)", lambda p: p.parameters), ("gradients (exact)", lambda p: p.gradients),
                ("optimizer state (exact)", lambda p: p.optimizer_state),
                ("activations, remat per layer", lambda p: p.activations_remat),
                ("activations, no remat", lambda p: p.activations_no_remat),
                ("selection buffers", lambda p: p.selection_buffers),
                ("total, remat per layer", lambda p: p.total(True)), ("total, no remat", lambda p: p.total(False))]
        lines = [f"model    {self.model}",
                 f"mesh     {mesh} ({devices} devices; parameters split over data (FSDP), tensor, expert)",
                 f"step     batch {self.batch_size} x {self.seq_len} tokens -> {b} x {t} per device; "
                 f"{self.optimizer}; trains {trains}",
                 f"{'GiB per device':32}" + "".join(f"{names[p.stage]:>16}" for p in self.stages)]
        for label, part in rows:
            lines.append(f"{label:32}" + "".join(f"{part(p) / GIB:16.2f}" for p in self.stages))
        lines.append("activations and selection buffers are estimates from the shapes (XLA may fuse or keep more)")
        if device_bytes is not None:
            mode = "with remat per layer" if self.remat else "without remat"
            need = self.total
            verdict = (f"yes (headroom {(device_bytes - need) / GIB:.2f} GiB)" if self.fits(device_bytes) else
                       f"no (needs {need / GIB:.2f} GiB, {(need - device_bytes) / GIB:.2f} GiB over)")
            lines.append(f"fits in {device_bytes / GIB:.2f} GiB {mode}: {verdict}")
        return "\n".join(lines)


def _check_mesh(mesh: Mapping[str, int]) -> dict[str, int]:
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are unknown; axes: {', '.join(MESH_AXES)}")
    bad = {axis: size for axis, size in mesh.items() if isinstance(size, bool) or not isinstance(size, int)
           or size <= 0}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers, got {bad}")
    return {axis: mesh.get(axis, 1) for axis in MESH_AXES}


def plan_memory(cfg: ModelConfig, mesh: Mapping[str, int], *, seq_len: int, batch_size: int,
                train_base: bool = False, optimizer: str = "adamw", dtype=jnp.bfloat16, remat: bool = True,
                pattern: str | None = None, stage: str = "both") -> MemoryPlan:
    """Per-device memory of one ``training.distill`` step of ``cfg`` on a mesh of these axis sizes
    ({"data": 8, "tensor": 8, "expert": 8}; axes left out have size 1; no devices are needed).

    ``train_base``: the sparse stage trains every parameter (the dense warm-up always trains the indexers
    alone). ``optimizer``: adamw, adam (mu and nu per trainable parameter) or sgd (no state). ``dtype``: the
    weights' and activations' dtype. ``remat``: whether ``total`` and ``fits`` assume per-layer
    rematerialisation (both totals are reported). ``pattern``: the IndexCache F/S pattern the step runs
    (default: the model's own; the parameters stay the model's as loaded). ``stage``: dense, sparse or both.

    Activations (the formulas of ``_Shapes``; all per device):

    * a layer's working set: its attention (projections, the per-head and absorbed queries, the attention
      output, and for one query chunk float32 logits over index_topk gathered rows, or over every key in the
      dense warm-up), its MLP (dense SwiGLU, or the MoE: router scores, tokens x experts-per-token / expert rows
      of moe_intermediate width, shared experts) and on F layers the indexer (q, k, w).
    * the loss, after the layer loop: the logits [b, t, vocab / tensor] float32 and their log-softmax, and one
      query chunk of the indexer KL.
    * training everything, with remat: every layer's input [b, t, hidden] + the larger of one working set and
      the loss; without remat: every layer's input and working set + the loss.
    * training the indexers alone, the gradient never flows through the base layers (the indexers see detached
      inputs), so only the F layers keep anything for it: with remat their inputs [b, t, hidden], without remat
      what their indexers read (normed input, query latent); + the larger of one working set (the forward holds
      one layer at a time) and the loss.

    Selection buffers: what the layers hand to the loss, each layer's KL taken as the layer runs. One target at
    a time (the warm-up's teacher: absorbed query [b, t, heads, kv_lora_rank + rope] and latent rows; the sparse
    stage's float32 probabilities over the index_topk slots) and one F layer's q, k, w; per layer the gradients
    its KL keeps for the backward (the size of q, k, w); in the sparse stage every F layer's int32 indices and
    bool valid [b, t, index_topk]. The warm-up's KL walks 512-key chunks: never [t, t].
    """
    sizes = _check_mesh(mesh)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if stage not in (*STAGES, "both"):
        raise ValueError(f"stage must be dense, sparse or both, got {stage!r}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size % sizes["data"]:
        raise ValueError(f"batch_size {batch_size} does not split over data={sizes['data']} (distill splits the "
                         f"batch evenly)")
    if seq_len % sizes["context"]:
        raise ValueError(f"seq_len {seq_len} does not split over context={sizes['context']}")
    pattern = check_pattern(pattern, cfg.num_hidden_layers, cfg.index_pattern) if pattern else cfg.index_pattern

    leaves = _leaves(cfg, jnp.dtype(dtype))
    shards = [(leaf, leaf.shard_bytes(sizes)) for leaf in leaves]
    parameters = sum(nbytes for _, nbytes in shards)
    shapes = _Shapes(cfg, batch_size // sizes["data"], seq_len // sizes["context"], seq_len, sizes["tensor"],
                     sizes["expert"], jnp.dtype(dtype).itemsize, cfg.layer_config(0).mla.query_chunk)
    plans = []
    for name in STAGES if stage == "both" else (stage,):
        trains_base = train_base and name == "sparse"
        trained = sum(nbytes for leaf, nbytes in shards if leaf.is_param and (trains_base or leaf.is_indexer))
        remat_bytes, no_remat_bytes = _activations(shapes, cfg, pattern, name, trains_base)
        plans.append(StagePlan(name, trains_base, parameters, trained, OPTIMIZER_STATES[optimizer] * trained,
                               remat_bytes, no_remat_bytes, _selection_buffers(shapes, cfg, pattern, name)))
    count = sum(math.prod(leaf.shape) for leaf in leaves)
    model = (f"{cfg.model_type}: {cfg.num_hidden_layers} layers, {count / 1e9:.2f}B parameters, "
             f"{jnp.dtype(dtype).name}, IndexCache pattern {pattern.count('F')} F / {pattern.count('S')} S")
    return MemoryPlan(model, count, sizes, seq_len, batch_size, optimizer, remat, tuple(plans), pattern)
