"""Training-aware IndexCache: multi-layer indexer distillation in two stages.

Stage "dense" (warm-up): every layer attends densely; only the indexers train; loss = indexer KL over every
causal key, computed a key chunk at a time (``losses.dense_indexer_kl``: no [T, T] array at any length).
Stage "sparse": F layers select their top-k, S layers reuse it; the indexer KL is restricted to the
selected slots and the indexers see detached inputs, so they learn only from the KL. What else trains is a
choice: ``train_base=False`` (the default; the run that fits where full training does not) trains the
indexers alone in both stages, the LM loss only watched; ``train_base=True`` follows DeepSeek-V3.2's sparse
stage, the rest of the model learning from the LM loss (loss = LM + KL, the two gradient paths never mix).
Frozen parameters get no gradient and, through the optimizer's ``wrt`` filter, no optimizer state.

On a mesh (``distributed.training_mesh``) parameters and optimizer state are sharded by the logical-axis
rules of ``layers.sharding`` and the step runs under ``jax.jit`` on those placements; ``remat`` recomputes
each layer in the backward pass instead of keeping its activations.

Checkpoints (Orbax ``CheckpointManager``) hold the model, the optimizer and the step; the batch of a
step is a pure function of (seed, step), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from sparse_index_jax.layers.index_cache import IndexCacheConfig
from sparse_index_jax.training.data import PackedDataset
from sparse_index_jax.training.distributed import (
    batch_sharding,
    check_mesh,
    constrain_state,
    is_main_process,
    layers_context,
    mesh_of,
    place_state,
    put_batch,
    shard_model,
    state_shardings,
)
from sparse_index_jax.training.losses import dense_indexer_kl, lm_loss, slot_indexer_kl

STAGES = ("dense", "sparse")
INDEXER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("indexer"))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    pattern: str | None = None          # IndexCache pattern; None: the model's own
    warmup_steps: int = 100             # stage "dense"
    sparse_steps: int = 100             # stage "sparse"
    batch_size: int = 4
    warmup_lr: float = 1e-3             # the V3.2 report's values
    sparse_lr: float = 7.3e-6
    optimizer: str = "adamw"            # adamw | adam | sgd
    schedule: str = "constant"          # constant | cosine (within each stage)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    save_every: int = 50
    keep_checkpoints: int = 3
    train_base: bool = False            # True: the sparse stage also trains the model (on the LM loss)
    remat: bool = True                  # recompute each layer in the backward pass (memory O(layers * T * hidden))
    kl_query_chunk: int = 64            # the dense warm-up's KL: queries per chunk ...
    kl_key_chunk: int = 512             # ... and keys per chunk (memory O(T * chunk) per layer)

    def __post_init__(self):
        for name in ("warmup_steps", "sparse_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "save_every", "keep_checkpoints", "kl_query_chunk", "kl_key_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DistillConfig.{name} must be positive, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"DistillConfig.optimizer must be adamw, adam or sgd, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"DistillConfig.schedule must be constant or cosine, got {self.schedule!r}")

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.sparse_steps

    def stage(self, step: int) -> str:
        return "dense" if step < self.warmup_steps else "sparse"

    def tx(self, stage: str) -> optax.GradientTransformation:
        lr, steps = ((self.warmup_lr, self.warmup_steps) if stage == "dense" else (self.sparse_lr, self.sparse_steps))
        schedule = optax.cosine_decay_schedule(lr, max(steps, 1)) if self.schedule == "cosine" else lr
        opt = {"adamw": lambda: optax.adamw(schedule, weight_decay=self.weight_decay),
               "adam": lambda: optax.adam(schedule), "sgd": lambda: optax.sgd(schedule)}[self.optimizer]()
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), opt) if self.grad_clip else opt


def trainable(stage: str, train_base: bool = False):
    """What a stage trains: the indexers alone in the dense warm-up, every parameter in the sparse stage
    (the indexers alone there too without ``train_base``: the LM loss is then only watched)."""
    return nnx.Param if stage == "sparse" and train_base else INDEXER_PARAMS


def distill_losses(model, inputs: jax.Array, targets: jax.Array, pattern: str, stage: str, *, remat: bool = False,
                   kl_chunks: tuple[int, int] = (64, 512)):
    """(loss, metrics) of one batch; see the module docstring for what each stage optimises. ``kl_chunks``:
    the KL's (query, key) chunk sizes (keys: the dense warm-up's)."""
    groups = IndexCacheConfig(pattern).groups()
    serves = {j: (full, len(served)) for full, served in groups for j in served}  # layer -> (its F layer, m)
    indexers, terms = {}, []

    def observe(i, out):
        """Each layer's KL term against its F layer's indexer, taken as soon as the layer has run: over every
        causal key from the teacher in the warm-up, over the selected slots in the sparse stage. Both losses
        leave only gradients for the backward, and the teacher and probabilities are dropped at once, so no two
        layers' targets are alive together."""
        full, m = serves[i]
        if i == full:
            indexers[i] = out.indexer
        if stage == "dense":
            total, rows = dense_indexer_kl(indexers[full], out.teacher, query_chunk=kl_chunks[0],
                                           key_chunk=kl_chunks[1])
        else:  # an S layer's selection is its F layer's
            total, rows = slot_indexer_kl(indexers[full], out.selection, out.probs, query_chunk=kl_chunks[0])
        terms.append(total / jnp.maximum(rows, 1) / m)
        return out._replace(teacher=None, probs=None)

    run = model.run_layers(model.embed(inputs), index_pattern=pattern, dense=stage == "dense", capture=True,
                           remat=remat, observe=observe)
    kl = sum(terms)
    lm = lm_loss(model.logits(run.hidden), targets)
    loss = kl if stage == "dense" else lm + kl
    return loss, {"loss": loss, "indexer_kl": kl, "lm_loss": lm}


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Where a sharded run's model and optimizer variables live (path -> NamedSharding); hashed by identity,
    so ``train_step`` compiles once per stage."""

    model: dict
    optimizer: dict


@nnx.jit(static_argnames=("cfg", "pattern", "stage", "placement"))
def train_step(model, optimizer, inputs, targets, cfg: DistillConfig, pattern: str, stage: str,
               placement: Placement | None = None):
    """One optimizer step of ``stage``; with ``placement`` the updated model and optimizer state are pinned to
    their shardings (parameters and moments stay sharded, never gathered)."""
    def loss_fn(model):
        return distill_losses(model, inputs, targets, pattern, stage, remat=cfg.remat,
                              kl_chunks=(cfg.kl_query_chunk, cfg.kl_key_chunk))

    wrt = trainable(stage, cfg.train_base)
    grads, metrics = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    if placement is not None:
        constrain_state(model, placement.model)
        constrain_state(optimizer, placement.optimizer)
    return metrics


@nnx.jit(static_argnames=("pattern", "stage"))
def eval_step(model, inputs, targets, pattern: str, stage: str):
    return distill_losses(model, inputs, targets, pattern, stage)[1]


def _checkpoint_manager(folder: pathlib.Path, cfg: DistillConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, save_interval_steps=1,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(folder.absolute(), options=options)


def _new_optimizer(model, cfg: DistillConfig, stage: str, mesh, params) -> tuple[nnx.Optimizer, Placement | None]:
    """The optimizer of ``stage`` over what it trains, its moments placed like their parameters on ``mesh``."""
    optimizer = nnx.Optimizer(model, cfg.tx(stage), wrt=trainable(stage, cfg.train_base))
    if mesh is None:
        return optimizer, None
    placement = Placement(params, state_shardings(nnx.state(optimizer), params, mesh))
    place_state(optimizer, placement.optimizer)
    return optimizer, placement


def distill(model, data: PackedDataset, cfg: DistillConfig, out_dir: str | pathlib.Path, *, mesh=None,
            progress: bool = True, log: Callable[[str], None] | None = None,
            stop_after: int | None = None, time_limit: float | None = None) -> list[dict]:
    """Runs (or resumes) the two stages; writes ``out_dir/checkpoints`` and ``out_dir/metrics.jsonl``.

    ``mesh`` (``layers.sharding.make_mesh``; None: the default device, or wherever the model already is): the
    model's parameters (where ``from_pretrained(mesh=)`` did not already put them), gradients and optimizer
    state are sharded over it by the logical-axis rules, batches split over ``data``, sequences over
    ``context``. Multi-host: pass a mesh over all hosts' devices (``distributed.training_mesh``).

    Multi-process (after ``training.distributed.initialize``): every process runs this with the same data;
    each feeds its devices' rows of every batch, all take part in checkpointing, and only process 0 writes
    metrics, ``run.json``, the log (``log``: a callable taking one line, e.g. ``print``) and the progress bar.

    ``stop_after`` ends the run after that many steps of this call (an interruption, for tests), ``time_limit``
    after the step that passes that many seconds of this call (a time-boxed job); either way the state is
    checkpointed and a later call resumes from it. Returns this call's metrics.
    """
    import orbax.checkpoint as ocp

    pattern = model.check_pattern(cfg.pattern)
    main = is_main_process()
    if not main or log is None:
        log = lambda _: None  # noqa: E731  (the library prints nothing; applications pass print)
    progress = progress and main
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manager = _checkpoint_manager(out / "checkpoints", cfg)
    mesh = check_mesh(cfg.batch_size, mesh)
    params = shard_model(model, mesh)
    sharding = batch_sharding(mesh)

    step = manager.latest_step() or 0
    optimizer, placement, opt_stage = None, None, None
    if step:  # the saved state restores straight onto its shards (the target's placements)
        saved_stage = cfg.stage(step - 1)
        optimizer, placement = _new_optimizer(model, cfg, saved_stage, mesh, params)
        target = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["opt"])
        opt_stage = saved_stage
        log(f"resumed from step {step} ({out / 'checkpoints'})")
    log_path = out / "metrics.jsonl" if main else pathlib.Path(os.devnull)
    if main and log_path.is_file():  # steps logged after the checkpoint we resume from run again: drop them
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    if main:
        (out / "run.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "pattern": pattern,
                                                  "data": data.fingerprint(),
                                                  "mesh": dict(mesh.shape) if mesh is not None else None}, indent=2))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=step, desc="distill", unit="step", file=sys.stderr)
    history = []
    done_here, began = 0, time.perf_counter()
    # every process must stop at the same step: the clock of process 0 decides (a collective of one bool)
    out_of_time = lambda: time_limit is not None and bool(multihost_utils.broadcast_one_to_all(  # noqa: E731
        np.asarray(time.perf_counter() - began >= time_limit)))
    # host batch -> its devices in one transfer (each process gives its own devices' rows)
    put = lambda batch: put_batch(batch, sharding)
    with open(log_path, "a") as metrics_file, layers_context(mesh):
        while step < cfg.total_steps and (stop_after is None or done_here < stop_after):
            if done_here and out_of_time():
                if manager.latest_step() != step:
                    manager.save(step, args=ocp.args.StandardSave({"model": nnx.state(model),
                                                                   "opt": nnx.state(optimizer)}))
                log(f"time limit of {time_limit:.0f} s reached at step {step} of {cfg.total_steps}: checkpointed; "
                    f"run the same command again to go on")
                break
            stage = cfg.stage(step)
            if opt_stage != stage:  # a stage starts: new optimizer over what that stage trains
                (optimizer, placement), opt_stage = _new_optimizer(model, cfg, stage, mesh, params), stage
            inputs, targets = map(put, data.train_batch(step, cfg.batch_size))
            start = time.perf_counter()
            metrics = {k: float(v) for k, v in train_step(model, optimizer, inputs, targets, cfg, pattern, stage,
                                                          placement).items()}
            step += 1
            done_here += 1
            record = {"step": step, "stage": stage, **metrics, "seconds": time.perf_counter() - start}
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % cfg.save_every == 0 or step == cfg.total_steps or (stop_after and done_here == stop_after):
                manager.save(step, args=ocp.args.StandardSave({"model": nnx.state(model), "opt": nnx.state(optimizer)}))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=stage, kl=f"{metrics['indexer_kl']:.4f}", lm=f"{metrics['lm_loss']:.3f}")
    manager.wait_until_finished()
    if bar is not None:
        bar.close()
    return history


def evaluate(model, data: PackedDataset, pattern: str | None, batch_size: int, max_batches: int = 4) -> dict:
    """Held-out indexer KL (sparse slots) and LM loss, dense vs sparse attention."""
    pattern = model.check_pattern(pattern)
    mesh = mesh_of(model)  # where distill (or loading) put the model; batches follow
    sharding = batch_sharding(mesh) if mesh is not None and batch_size % mesh.shape["data"] == 0 else None
    rows = {"dense": [], "sparse": []}
    with layers_context(mesh):
        for inputs, targets in data.heldout_batches(batch_size, max_batches):
            inputs, targets = put_batch(inputs, sharding), put_batch(targets, sharding)
            for stage in STAGES:
                rows[stage].append(eval_step(model, inputs, targets, pattern, stage))
    mean = lambda xs, key: float(np.mean([float(x[key]) for x in xs]))
    return {"lm_loss_dense": mean(rows["dense"], "lm_loss"), "lm_loss_sparse": mean(rows["sparse"], "lm_loss"),
            "indexer_kl_dense": mean(rows["dense"], "indexer_kl"),
            "indexer_kl_sparse": mean(rows["sparse"], "indexer_kl")}
