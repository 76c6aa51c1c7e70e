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
step is a pure function of (seed, step), so a resumed run continues bit for bit. A folder resumes only the run
of the same data (``run.json``'s fingerprint; ``check_resumable``); a damaged newest checkpoint is moved aside
and the newest intact one resumed. A step whose loss or gradient is not finite is not applied: the run stops
there with ``DivergenceError``, the state before it checkpointed, never the bad one. ``metrics.jsonl`` is strict
JSON: a non-finite value is written as the string "nan", "inf" or "-inf" (``read_metrics`` reads them back).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
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
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class DivergenceError(RuntimeError):
    """Training met a non-finite loss or gradient: the step was not applied and the run stopped (a runtime fault,
    not an input error). ``step`` is the step that diverged (1-based, as in ``metrics.jsonl``), ``metrics`` its
    values, ``checkpoint`` the step of the newest checkpoint (the state to resume from; None: none saved)."""

    def __init__(self, message: str, step: int, metrics: dict, checkpoint: int | None):
        super().__init__(message)
        self.step, self.metrics, self.checkpoint = step, metrics, checkpoint


def _json_value(value):
    """A metric for strict JSON: non-finite floats as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_metrics(path: str | pathlib.Path, *, partial_last_line: bool = False) -> list[dict]:
    """The rows of a ``metrics.jsonl``, the strings "nan" / "inf" / "-inf" read back as floats. A line that is not
    a JSON object with a "step" raises ValueError naming the file and the line; with ``partial_last_line`` a last
    line without its newline that does not parse (a run killed while writing it) is left out instead."""
    path = pathlib.Path(path)
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer \"step\"")
        except ValueError as err:
            if partial_last_line and number == len(lines):  # no newline after it: the write never finished
                break
            raise ValueError(f"{path}, line {number}: not a metrics record ({err}); delete that line (or the "
                             f"file: the checkpoints do not need it)") from None
        rows.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) and k != "stage" else v for k, v in row.items()})
    return rows


def check_resumable(out_dir: str | pathlib.Path, data: PackedDataset) -> None:
    """Refuses (ValueError) to resume the run in ``out_dir`` on other data: its ``run.json`` names the data it
    trained on (``PackedDataset.fingerprint``: the tokens, ``seq_len``, the seed), and a run with checkpoints must go
    on with the same. A folder without checkpoints or without ``run.json`` starts (or resumes) as before."""
    out = pathlib.Path(out_dir)
    run_file, checkpoints = out / "run.json", out / "checkpoints"
    if not run_file.is_file() or not checkpoints.is_dir() or not any(
            p.name.isdigit() for p in checkpoints.iterdir()):
        return
    try:
        saved = json.loads(run_file.read_text()).get("data")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{run_file} is not valid JSON ({err}): it records the data the checkpoints in "
                         f"{checkpoints} were trained on; restore it, or start afresh with another --out "
                         f"(or delete {out})") from None
    new = data.fingerprint()
    if saved is not None and saved != new:
        raise ValueError(f"{out} holds a run on other data (fingerprint {saved}; this --data / --seq-len gives "
                         f"{new}): resuming would mix the two. Pass the same --data and --seq-len to resume it, or "
                         f"start afresh with another --out (or delete {out})")


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
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    # what a non-finite step keeps: the values now (tree.map copies the Variables; a State would alias them)
    old_params, old_opt = jax.tree.map(lambda x: x, (nnx.state(model, wrt), nnx.state(optimizer)))
    optimizer.update(model, grads)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    nnx.update(model, keep(nnx.state(model, wrt), old_params))  # a non-finite step changes nothing
    nnx.update(optimizer, keep(nnx.state(optimizer), old_opt))
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


@functools.lru_cache(maxsize=16)
def _tx(cfg: DistillConfig, stage: str) -> optax.GradientTransformation:
    """``cfg.tx(stage)``, one object per (config, stage): the optimizer's graph holds it as static metadata, so a
    new one would make every run (each resume, each test) trace and compile ``train_step`` again."""
    return cfg.tx(stage)


def _new_optimizer(model, cfg: DistillConfig, stage: str, mesh, params) -> tuple[nnx.Optimizer, Placement | None]:
    """The optimizer of ``stage`` over what it trains, its moments placed like their parameters on ``mesh``."""
    optimizer = nnx.Optimizer(model, _tx(cfg, stage), wrt=trainable(stage, cfg.train_base))
    if mesh is None:
        return optimizer, None
    placement = Placement(params, state_shardings(nnx.state(optimizer), params, mesh))
    place_state(optimizer, placement.optimizer)
    return optimizer, placement


def _record_line(record: dict) -> str:
    """One line of ``metrics.jsonl``: strict JSON (``read_metrics`` reads the non-finite strings back)."""
    return json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False) + "\n"


def _restore(manager, model, cfg: DistillConfig, out: pathlib.Path, mesh, params, log):
    """Restores the newest intact checkpoint onto the model and a new optimizer of its stage (straight onto the
    target's shards); returns (manager, step, optimizer, placement), step 0 and no optimizer without checkpoints.
    A newer checkpoint that does not restore while an older one does is damaged: it is moved to
    ``out/damaged-checkpoints`` (kept, never deleted) and the run says so. None restoring: ValueError naming them."""
    import orbax.checkpoint as ocp

    steps = sorted(manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
        stage = cfg.stage(step - 1)
        optimizer, placement = _new_optimizer(model, cfg, stage, mesh, params)
        target = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:  # noqa: BLE001  (TensorStore, Orbax and OS errors alike: tried older ones next)
            failed.append((step, " ".join(str(err).split())[:300]))
            continue
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["opt"])
        if failed:
            manager = _set_aside(manager, out, cfg, [s for s, _ in failed], log)
            log(f"warning: checkpoint step {failed[0][0]} in {out / 'checkpoints'} is damaged ({failed[0][1]}); "
                f"moved to {out / 'damaged-checkpoints'}; resumed from step {step}, the newest intact one")
        else:
            log(f"resumed from step {step} ({out / 'checkpoints'})")
        return manager, step, optimizer, placement
    if failed:
        folders = ", ".join(str(out / "checkpoints" / str(s)) for s, _ in failed)
        raise ValueError(f"no checkpoint in {out / 'checkpoints'} restores (newest, step {failed[0][0]}: "
                         f"{failed[0][1]}); if the model, --pattern and options are those of the run that wrote them, "
                         f"they are damaged: delete {folders} (or the whole folder) to start afresh, or use another "
                         f"--out")
    return manager, 0, None, None


def _set_aside(manager, out: pathlib.Path, cfg: DistillConfig, steps: list[int], log):
    """Moves damaged step folders out of the checkpoints folder (so a later save of that step does not meet
    them); returns a new manager over what is left. Process 0 moves; every process waits for it."""
    manager.close()
    if is_main_process():
        aside = out / "damaged-checkpoints"
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(out / "checkpoints" / str(step)), str(target))
    multihost_utils.sync_global_devices("distill: damaged checkpoints set aside")
    return _checkpoint_manager(out / "checkpoints", cfg)


def _diverged(manager, model, optimizer, cfg: DistillConfig, step: int, stage: str, record: dict,
              out: pathlib.Path) -> DivergenceError:
    """The error of a non-finite step ``step + 1`` (not applied): the state after ``step`` steps is checkpointed
    first when it is not already and its optimizer is the one a resume expects (not a stage's first step)."""
    import orbax.checkpoint as ocp

    if step and manager.latest_step() != step and cfg.stage(step - 1) == stage:
        manager.save(step, args=ocp.args.StandardSave({"model": nnx.state(model), "opt": nnx.state(optimizer)}))
        manager.wait_until_finished()
    saved = manager.latest_step()
    where = (f"the newest checkpoint, step {saved}, in {out / 'checkpoints'} holds the last good state: rerun with "
             f"the same --out and a lower learning rate to go on from it" if saved else
             "no checkpoint was saved: check the model's weights and the data, or lower the learning rate")
    return DivergenceError(f"training diverged at step {step + 1} ({stage} stage): loss {record['loss']:.4g} (indexer "
                           f"KL {record['indexer_kl']:.4g}, LM loss {record['lm_loss']:.4g}, gradient norm "
                           f"{record['grad_norm']:.4g}); the step was not applied and the run stopped; {where}",
                           step + 1, {k: record[k] for k in ("loss", "indexer_kl", "lm_loss", "grad_norm")}, saved)


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

    check_resumable(out, data)
    manager, step, optimizer, placement = _restore(manager, model, cfg, out, mesh, params, log)
    opt_stage = cfg.stage(step - 1) if step else None
    log_path = out / "metrics.jsonl" if main else pathlib.Path(os.devnull)
    if main and log_path.is_file():  # steps logged after the checkpoint we resume from run again: drop them
        kept = [row for row in read_metrics(log_path, partial_last_line=True) if row["step"] <= step]
        log_path.write_text("".join(_record_line(row) for row in kept))
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
    try:
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
                record = {"step": step + 1, "stage": stage, **metrics, "seconds": time.perf_counter() - start}
                metrics_file.write(_record_line(record))
                metrics_file.flush()
                if not all(math.isfinite(v) for v in metrics.values()):  # the step was not applied: stop here
                    raise _diverged(manager, model, optimizer, cfg, step, stage, record, out)
                step += 1
                done_here += 1
                history.append(record)
                if step % cfg.save_every == 0 or step == cfg.total_steps or (stop_after and done_here == stop_after):
                    manager.save(step, args=ocp.args.StandardSave({"model": nnx.state(model),
                                                                   "opt": nnx.state(optimizer)}))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stage=stage, kl=f"{metrics['indexer_kl']:.4f}", lm=f"{metrics['lm_loss']:.3f}")
    finally:
        manager.wait_until_finished()
        manager.close()
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
