"""Multi-process (multi-host) runs on JAX's own machinery: ``jax.distributed`` and global arrays.

One process per host (per TPU VM, per GPU node); every process runs the same command. Each one reads
the same deterministic global batch from its copy of the data and hands JAX only the rows its own
devices hold, so no host ever sends data to another.

Training state is sharded over a mesh (``layers.sharding``: data, context, tensor, expert axes) by the
same logical-axis rules that place the model when it is loaded: parameters by their path, the
optimiser's moments like the parameters they belong to, scalars replicated. The step runs under
``jax.jit`` on those placements and pins its outputs back to them (``constrain_state``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_index_jax.layers.sharding import activation_sharding, make_mesh, partition_spec


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> None:
    """Joins the multi-process job. Must run before any other JAX call of the process.

    With no arguments JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI, GKE);
    elsewhere give the coordinator ``host:port`` (process 0's host), the process count and this
    process's id. CPU processes talk through Gloo (used by the tests).

    Joining blocks until every process has joined. It says so on standard error before it waits (the
    coordinator, this process's id, the count, the timeout): the one thing this library writes itself, since
    a silent wait of minutes looks like a hang. When the job has not formed after ``timeout_s`` seconds it
    writes one line naming what it waited for and exits the process with code 2 (JAX's own timeout aborts
    the process with a C++ stack trace, so the watchdog here fires first).
    """
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must lie in 0 .. {num_processes - 1} (--num-processes "
                         f"{num_processes})")
    if coordinator is not None and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0")
    who = (f"process {process_id} of {num_processes}, coordinator {coordinator}" if coordinator is not None else
           "cluster detected by JAX (coordinator, process id and count from the environment)")
    sys.stderr.write(f"distributed: joining the job ({who}); waiting up to {timeout_s} s for every process to "
                     f"join\n")
    sys.stderr.flush()

    def give_up():
        sys.stderr.write(f"distributed: error: the job did not form within {timeout_s} s ({who}): start every "
                         f"process with the same --coordinator and --num-processes and a distinct --process-id, "
                         f"and check that process 0's host and port are reachable from here\n")
        sys.stderr.flush()
        os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s + 60)
    finally:
        watchdog.cancel()


def is_main_process() -> bool:
    """Process 0: the one that writes logs, metrics and progress bars."""
    return jax.process_index() == 0


def put_batch(batch: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A host batch (the same global batch on every process) -> a global array split by ``sharding``.

    Each process contributes only the rows of its own devices (rows ``i * B/n .. (i+1) * B/n`` for
    process i of n; the data mesh lists devices process by process). One process: a plain transfer.
    """
    if sharding is None:
        return jax.numpy.asarray(batch)
    n, i = jax.process_count(), jax.process_index()
    if batch.shape[0] % n:
        raise ValueError(f"put_batch: batch of {batch.shape[0]} rows does not split over {n} processes")
    rows = batch.shape[0] // n
    return jax.make_array_from_process_local_data(sharding, np.asarray(batch[i * rows:(i + 1) * rows]),
                                                  batch.shape)


def training_mesh(batch_size: int, mesh: Mesh | None = None, what: str = "distill") -> Mesh | None:
    """The mesh a command trains (or searches) on: ``mesh`` as given, else every device (all hosts) on the
    ``data`` axis; None on one device. Checks that the batch splits (``check_mesh``)."""
    if mesh is None and jax.device_count() > 1:
        mesh = make_mesh(data=jax.device_count())
    return check_mesh(batch_size, mesh, what)


def check_mesh(batch_size: int, mesh: Mesh | None, what: str = "distill") -> Mesh | None:
    """``mesh`` after checking that a batch of ``batch_size`` rows splits over its data axis and the processes."""
    if mesh is None:
        return None
    data = mesh.shape["data"]
    if batch_size % data or batch_size % jax.process_count():
        raise ValueError(f"{what}: batch_size {batch_size} must be divisible by the data axis ({data} devices) and by "
                         f"the {jax.process_count()} processes; change --batch-size or the mesh's data size")
    return mesh


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """Batches split by rows over the ``data`` axis (the layers split the sequence over ``context`` themselves)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))


def mesh_of(model) -> Mesh | None:
    """The mesh a model's parameters were placed on (``shard_model``, ``from_pretrained(mesh=)``), or None."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    sharding = getattr(leaf, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def param_shardings(model, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """Every variable's placement by the logical-axis rules of ``layers.sharding``: path -> NamedSharding."""
    return {path: NamedSharding(mesh, partition_spec(path, var.get_value().shape, mesh))
            for path, var in nnx.to_flat_state(nnx.state(model))}


def state_shardings(state, params: dict[tuple, NamedSharding], mesh: Mesh) -> dict[tuple, NamedSharding]:
    """Placements of a training state that mirrors the parameters (the optimiser's moments, gradients): a leaf
    whose path ends with a parameter's path (``opt_state/0/mu/layers/3/.../kernel``) and has its rank goes
    where that parameter goes; anything else (step counters, scalars) is replicated."""
    placed = {}
    for path, var in nnx.to_flat_state(state):
        owner = next((path[i:] for i in range(len(path)) if path[i:] in params), None)
        mirrors = owner is not None and var.get_value().ndim == len(params[owner].spec)
        placed[path] = params[owner] if mirrors else NamedSharding(mesh, PartitionSpec())
    return placed


def _place(x, sharding: NamedSharding):
    if getattr(x, "sharding", None) == sharding:
        return x
    if jax.process_count() == 1 or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same full copy (loaded without a mesh)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_state(module, shardings: dict[tuple, NamedSharding]) -> None:
    """Moves every variable of an NNX object (model or optimiser) onto its placement, in place."""
    flat = [(path, var.replace(_place(var.get_value(), shardings[path])))
            for path, var in nnx.to_flat_state(nnx.state(module))]
    nnx.update(module, nnx.from_flat_state(flat))


def constrain_state(module, shardings: dict[tuple, NamedSharding]) -> None:
    """Inside ``jit``: pins every variable of ``module`` to its placement, so updated parameters and optimiser
    state leave the step sharded exactly as they came in (never gathered, never re-laid out)."""
    flat = [(path, var.replace(jax.lax.with_sharding_constraint(var.get_value(), shardings[path])))
            for path, var in nnx.to_flat_state(nnx.state(module))]
    nnx.update(module, nnx.from_flat_state(flat))


def shard_model(model, mesh: Mesh | None) -> dict[tuple, NamedSharding] | None:
    """Places the model's variables on ``mesh`` by the logical-axis rules (a no-op for those already there, as
    after ``from_pretrained(mesh=)``) and returns the placements; None without a mesh."""
    if mesh is None:
        return None
    shardings = param_shardings(model, mesh)
    place_state(model, shardings)
    return shardings


def layers_context(mesh: Mesh | None):
    """What to run a model's layers inside on ``mesh``: its ``activation_sharding`` (activations pinned to the
    batch / sequence / head axes; with a context axis of several devices the DSA layers go context-parallel),
    or nothing without a mesh."""
    return activation_sharding(mesh) if mesh is not None else contextlib.nullcontext()
