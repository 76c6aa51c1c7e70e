"""Multi-process (multi-host) runs on JAX's own machinery: ``jax.distributed`` and global arrays.

One process per host (per TPU VM, per GPU node); every process runs the same command. Each one reads
the same deterministic global batch from its copy of the data and hands JAX only the rows its own
devices hold, so no host ever sends data to another; parameters are replicated (or sharded) by
``jax.make_array_from_callback`` from each host's identical copy.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx

from sparse_index_jax.layers.sharding import activation_sharding, make_mesh


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the multi-process job. Must run before any other JAX call of the process.

    With no arguments JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI, GKE);
    elsewhere give the coordinator ``host:port`` (process 0's host), the process count and this
    process's id. CPU processes talk through Gloo (used by the tests).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


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


def replicate(tree, sharding: jax.sharding.Sharding):
    """Places every leaf (identical on every process) on all devices of ``sharding``, across hosts."""
    def place(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(place, tree)


def data_parallel(model, batch_size: int, what: str = "distill", context: int = 1):
    """Replicates an NNX model over all devices (all hosts) and returns the sharding that splits a batch of
    ``batch_size`` rows over the ``data`` axis; None on one device (nothing to do). With ``context`` > 1 the
    devices form a (data, context) mesh: each batch row's sequence is split over ``context`` devices (run
    the model inside ``sharding.activation_sharding(sharding.mesh)`` so its layers go context-parallel)."""
    n = jax.device_count()
    if n == 1 and context == 1:
        return None
    if context < 1 or n % context:
        raise ValueError(f"{what}: context={context} must divide the {n} devices")
    data = n // context
    if batch_size % data:
        raise ValueError(f"{what}: batch_size {batch_size} must be divisible by the {data} data-parallel groups "
                         f"({n} devices / context {context})")
    mesh = make_mesh(data=data, context=context)
    nnx.update(model, replicate(nnx.state(model), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def layers_context(sharding):
    """What to run a model's layers inside for the batch ``sharding`` of ``data_parallel``: the mesh's
    ``activation_sharding`` when its context axis has several devices (the DSA layers then go
    context-parallel), else nothing."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and mesh.shape.get("context", 1) > 1:
        return activation_sharding(mesh)
    return contextlib.nullcontext()
