"""One mesh description and the logical-axis rules that place every parameter and the main activations.

Mesh axes: ``data`` (batch; and FSDP: the parameters' hidden dimension), ``context`` (sequence / keys),
``tensor`` (heads, MLP width, vocab), ``expert`` (routed experts). A parameter's logical axes come from its
path (``param_logical_axes``); ``PARAM_RULES`` (parameters) and ``LOGICAL_RULES`` (activations) map logical
axes to mesh axes. A dimension is sharded only when the mesh axis has more than one device and divides it;
otherwise it is replicated (``partition_spec`` says which).
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "context", "tensor", "expert")

LOGICAL_RULES: Mapping[str, str | None] = {
    "batch": "data", "seq": "context", "keys": "context",
    "heads": "tensor", "mlp": "tensor", "vocab": "tensor", "experts": "expert",
    "embed": None, "q_lora": None, "latent": None, "head_dim": None,
}
# Parameters also split their hidden (``embed``) dimension over ``data``: fully sharded data parallelism, as
# MaxText's fsdp axis. The data axis then divides the weights (and gradients and optimizer state) as well as
# the batch; XLA gathers each weight where a layer needs it. Activations keep LOGICAL_RULES (batch on data).
PARAM_RULES: Mapping[str, str | None] = {**LOGICAL_RULES, "embed": "data"}


def make_mesh(data: int = 1, context: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 4-axis mesh over ``devices`` (default: all devices, all hosts)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = (data, context, tensor, expert)
    if min(shape) <= 0:
        raise ValueError(f"make_mesh: axis sizes must be positive, got data={data} context={context} "
                         f"tensor={tensor} expert={expert}")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"make_mesh: data*context*tensor*expert = {int(np.prod(shape))} but there are "
                         f"{len(devices)} devices; the product must equal the device count")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def param_logical_axes(path: Sequence, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of one model parameter, from its NNX path (``layers/3/self_attn/q_b_proj/kernel``)."""
    parts = [str(p) for p in path]
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    if parts[:2] == ["embed_tokens", "embedding"]:
        return ("vocab", "embed")
    if owner == "lm_head":
        return ("embed", "vocab")
    if "experts" in parts and owner == "experts":  # stacked routed experts [E, in, out]
        return ("experts", "embed", "mlp") if leaf in ("gate_proj", "up_proj") else ("experts", "mlp", "embed")
    if leaf == "kernel":
        table = {
            "q_a_proj": ("embed", "q_lora"), "q_b_proj": ("q_lora", "heads"), "q_proj": ("embed", "heads"),
            "kv_a_proj_with_mqa": ("embed", "latent"), "kv_b_proj": ("latent", "heads"),
            "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
            "down_proj": ("mlp", "embed"), "wq_b": ("q_lora", "heads"), "wk": ("embed", "head_dim"),
            "weights_proj": ("embed", None),
        }
        if owner in table:
            return table[owner]
    return (None,) * ndim  # norms, router, biases: small, replicated


def partition_spec(path: Sequence, shape: Sequence[int], mesh: Mesh | Mapping[str, int],
                   rules: Mapping[str, str | None] = PARAM_RULES) -> PartitionSpec:
    """Where one parameter's dimensions go. ``mesh`` is a Mesh or just its axis sizes ({"tensor": 8, ...}),
    so a memory plan can ask for meshes larger than the machine it runs on."""
    axes = param_logical_axes(path, len(shape))
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else {a: mesh.get(a, 1) for a in MESH_AXES}
    spec = []
    for logical, size in zip(axes, shape):
        mesh_axis = rules.get(logical) if logical else None
        if mesh_axis is None or sizes[mesh_axis] == 1 or size % sizes[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_sharding(mesh: Mesh, rules: Mapping[str, str | None] = PARAM_RULES):
    """``(path, shape) -> NamedSharding``: the placement hook ``models.from_pretrained(mesh=...)`` uses."""
    return lambda path, shape: NamedSharding(mesh, partition_spec(path, shape, mesh, rules))


_ACTIVE: list[tuple[Mesh, Mapping[str, str | None]]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES):
    """Inside this context, ``constrain`` pins activations to the mesh by their logical axes."""
    _ACTIVE.append((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes (e.g. ("batch", "seq", "embed")); a no-op outside
    ``activation_sharding``."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    spec = [rules.get(a) if a else None for a in logical_axes]
    spec = [s if s is not None and dim % mesh.shape[s] == 0 and mesh.shape[s] > 1 else None
            for s, dim in zip(spec, x.shape)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def active_context_mesh(axis: str = "context") -> Mesh | None:
    """The mesh of the innermost ``activation_sharding`` when its ``axis`` has more than one device: DSA layers
    then select and attend context-parallel (keys split along the sequence). None otherwise."""
    if _ACTIVE and _ACTIVE[-1][0].shape.get(axis, 1) > 1:
        return _ACTIVE[-1][0]
    return None
