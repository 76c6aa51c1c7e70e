"""Training-aware IndexCache: multi-layer indexer distillation in two stages.

Stage "dense" (warm-up): every layer attends densely; only the indexers train (every other weight is
frozen and, through the optimizer's ``wrt`` filter, carries no optimizer state); loss = indexer KL.
Stage "sparse": F layers select their top-k, S layers reuse it; the indexer KL is restricted to the
selected slots and the indexers see detached inputs, so they learn only from the KL while the rest of
the model learns only from the LM loss (loss = LM + KL, the two gradient paths never mix). With
``train_base=False`` (a retrofit onto a frozen pretrained model) the sparse stage trains the indexers alone.

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

from sparse_index_jax.kernels.candidate_topk import gathered_scores
from sparse_index_jax.kernels.chunking import map_query_chunks
from sparse_index_jax.kernels.dsa_topk.reference import index_scores
from sparse_index_jax.layers.index_cache import IndexCacheConfig
from sparse_index_jax.training.data import PackedDataset
from sparse_index_jax.training.distributed import data_parallel, is_main_process, layers_context, put_batch
from sparse_index_jax.training.losses import indexer_kl_rows, lm_loss

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
    train_base: bool = True             # False: the sparse stage trains the indexers alone (a frozen retrofit)
    context: int = 1                    # devices each sequence is split over (context parallelism)

    def __post_init__(self):
        for name in ("warmup_steps", "sparse_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "save_every", "keep_checkpoints", "context"):
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


def trainable(stage: str, train_base: bool = True):
    """What a stage trains: the indexers alone in the dense warm-up, every parameter in the sparse stage
    (the indexers alone there too without ``train_base``: the LM loss is then only watched)."""
    return nnx.Param if stage == "sparse" and train_base else INDEXER_PARAMS


def chunked_indexer_kl(act, selection, targets: jax.Array, chunk: int = 64, *, dense: bool = False) -> jax.Array:
    """``indexer_kl`` of one F layer, ``chunk`` query rows at a time under ``jax.checkpoint``: the scores
    [B, chunk, k] (and the gathered keys [B, chunk, k, d] they come from) exist for one chunk at a time, also
    in backward. ``dense``: the selection is ``causal_selection`` (slot s = key s), so the scores come from
    one matmul against all keys instead of a gather of every key per query."""

    @jax.checkpoint
    def one_chunk(q, w, indices, valid, p):
        if dense:
            scores = index_scores(q, act.k, w, act.k_scale)
        else:
            scores = gathered_scores(q, w, act.k, act.k_scale, indices)
        return indexer_kl_rows(jnp.moveaxis(p, 2, 0), scores, valid)

    kl, has_keys = map_query_chunks(one_chunk, chunk, (act.q, 0), (act.w, 0), (selection.indices, -1),
                                    (selection.valid, False), (targets, 0))
    return jnp.sum(kl) / jnp.maximum(jnp.sum(has_keys), 1)


def distill_losses(model, inputs: jax.Array, targets: jax.Array, pattern: str, stage: str):
    """(loss, metrics) of one batch; see the module docstring for what each stage optimises."""
    run = model.run_layers(model.embed(inputs), index_pattern=pattern, dense=stage == "dense", capture=True)
    kl = 0.0
    for full, served in IndexCacheConfig(pattern).groups():
        attn = run.attention[full]
        attention = jnp.stack([run.attention[j].probs for j in served], axis=2)  # [B, T, m, k]
        kl = kl + chunked_indexer_kl(attn.indexer, attn.selection, attention, dense=stage == "dense")
    lm = lm_loss(model.logits(run.hidden), targets)
    loss = kl if stage == "dense" else lm + kl
    return loss, {"loss": loss, "indexer_kl": kl, "lm_loss": lm}


@nnx.jit(static_argnames=("pattern", "stage", "train_base"))
def train_step(model, optimizer, inputs, targets, pattern: str, stage: str, train_base: bool = True):
    def loss_fn(model):
        return distill_losses(model, inputs, targets, pattern, stage)

    wrt = trainable(stage, train_base)
    grads, metrics = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    return metrics


@nnx.jit(static_argnames=("pattern", "stage"))
def eval_step(model, inputs, targets, pattern: str, stage: str):
    return distill_losses(model, inputs, targets, pattern, stage)[1]


def _checkpoint_manager(folder: pathlib.Path, cfg: DistillConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, save_interval_steps=1,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(folder.absolute(), options=options)


def _batch_sharding_like(model, batch_size: int):
    """Batches for a model ``distill`` has spread over a data mesh go the same way (None: one device)."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.size == 1:
        return None
    data = sharding.mesh.shape.get("data", 1)
    spec = jax.sharding.PartitionSpec("data" if batch_size % data == 0 else None)
    return jax.sharding.NamedSharding(sharding.mesh, spec)


def distill(model, data: PackedDataset, cfg: DistillConfig, out_dir: str | pathlib.Path, *, progress: bool = True,
            log: Callable[[str], None] | None = None, stop_after: int | None = None) -> list[dict]:
    """Runs (or resumes) the two stages; writes ``out_dir/checkpoints`` and ``out_dir/metrics.jsonl``.

    Multi-process (after ``training.distributed.initialize``): every process runs this with the same data;
    each feeds its devices' rows of every batch, all take part in checkpointing, and only process 0 writes
    metrics, ``run.json``, the log (``log``: a callable taking one line, e.g. ``print``) and the progress bar.

    ``stop_after`` ends the run after that many steps of this call (an interruption, for tests and
    time-boxed jobs); a later call resumes from the latest checkpoint. Returns this call's metrics.
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
    sharding = data_parallel(model, cfg.batch_size, context=cfg.context)

    step = manager.latest_step() or 0
    optimizer, opt_stage = None, None
    if step:
        saved_stage = cfg.stage(step - 1)
        saved_opt = nnx.Optimizer(model, cfg.tx(saved_stage), wrt=trainable(saved_stage, cfg.train_base))
        target = {"model": nnx.state(model), "opt": nnx.state(saved_opt)}
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        nnx.update(model, restored["model"])
        nnx.update(saved_opt, restored["opt"])
        optimizer, opt_stage = saved_opt, saved_stage
        log(f"resumed from step {step} ({out / 'checkpoints'})")
    log_path = out / "metrics.jsonl" if main else pathlib.Path(os.devnull)
    if main and log_path.is_file():  # steps logged after the checkpoint we resume from run again: drop them
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    if main:
        (out / "run.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "pattern": pattern,
                                                  "data": data.fingerprint()}, indent=2))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.total_steps, initial=step, desc="distill", unit="step", file=sys.stderr)
    history = []
    done_here = 0
    # host batch -> its devices in one transfer (each process gives its own devices' rows)
    put = lambda batch: put_batch(batch, sharding)
    with open(log_path, "a") as metrics_file, layers_context(sharding):
        while step < cfg.total_steps and (stop_after is None or done_here < stop_after):
            stage = cfg.stage(step)
            if opt_stage != stage:  # a stage starts: new optimizer over what that stage trains
                optimizer, opt_stage = nnx.Optimizer(model, cfg.tx(stage), wrt=trainable(stage, cfg.train_base)), stage
            inputs, targets = map(put, data.train_batch(step, cfg.batch_size))
            start = time.perf_counter()
            metrics = {k: float(v) for k, v in train_step(model, optimizer, inputs, targets, pattern, stage,
                                                                   cfg.train_base).items()}
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
    sharding = _batch_sharding_like(model, batch_size)
    rows = {"dense": [], "sparse": []}
    with layers_context(sharding):
        for inputs, targets in data.heldout_batches(batch_size, max_batches):
            inputs, targets = put_batch(inputs, sharding), put_batch(targets, sharding)
            for stage in STAGES:
                rows[stage].append(eval_step(model, inputs, targets, pattern, stage))
    mean = lambda xs, key: float(np.mean([float(x[key]) for x in xs]))
    return {"lm_loss_dense": mean(rows["dense"], "lm_loss"), "lm_loss_sparse": mean(rows["sparse"], "lm_loss"),
            "indexer_kl_dense": mean(rows["dense"], "indexer_kl"),
            "indexer_kl_sparse": mean(rows["sparse"], "indexer_kl")}
