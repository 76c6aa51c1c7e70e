"""Input checks shared by the entry points: they run before tracing and name the bad argument."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def matmul_dtype(*xs) -> jnp.dtype:
    """The dtype the dot products run in: the promoted input dtype, float8 upcast to bfloat16 (exact)."""
    dtypes = [jnp.bfloat16 if x.dtype in _FP8 else x.dtype for x in xs]
    return functools.reduce(jnp.promote_types, dtypes)


def concrete(x) -> np.ndarray | None:
    """The value of ``x`` as numpy if it is known now (not traced) and whole in this process, else None (a
    global array of several processes: each holds only its shards)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def is_positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


def check_positive_int(op: str, name: str, value) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return int(value)


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def check_indexer_inputs(op: str, q, k, w, k_scale, q_positions, kv_lengths):
    """Validates the indexer activations of the selection contract; returns [B,T] positions, [B] lengths.

    q [B,T,H,d], k [B,S,d], w [B,T,H] (head weights with every scaling folded in), k_scale [B,S] or None,
    q_positions [T] or [B,T] int (default: the last T positions of each sequence), kv_lengths [B] int.
    """
    for name, x, rank, shape in (("q", q, 4, "[B, T, H, d]"), ("k", k, 3, "[B, S, d]"), ("w", w, 3, "[B, T, H]")):
        if not hasattr(x, "shape") or x.ndim != rank:
            got = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"{op}: {name} must have shape {shape} (rank {rank}), got {got}")
        if not _is_float(x):
            raise TypeError(f"{op}: {name} must be a floating dtype (bf16, f16, f32 or float8), got {x.dtype}")
    B, T, H, d = q.shape
    if 0 in (B, T, H, d):
        raise ValueError(f"{op}: q has an empty dimension {q.shape}; need B, T, H, d >= 1")
    if k.shape[0] != B or k.shape[2] != d:
        raise ValueError(f"{op}: k must have shape [B={B}, S, d={d}] to match q {q.shape}, got {k.shape}")
    if w.shape != (B, T, H):
        raise ValueError(f"{op}: w must have shape [B, T, H] = {(B, T, H)} to match q {q.shape}, got {w.shape}")
    S = k.shape[1]
    if S == 0:
        raise ValueError(f"{op}: k has no keys (S = 0); there is nothing to select from")
    if k_scale is not None:
        if k_scale.shape != (B, S) or not _is_float(k_scale):
            raise ValueError(f"{op}: k_scale must be a float [B, S] = {(B, S)} array, got "
                             f"{k_scale.shape} {k_scale.dtype}")

    if kv_lengths is None:
        kv_lengths = jnp.full((B,), S, jnp.int32)
    else:
        kv_lengths = jnp.asarray(kv_lengths)
        if kv_lengths.shape != (B,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
            raise ValueError(f"{op}: kv_lengths must be an int array of shape [B] = ({B},), got "
                             f"{kv_lengths.shape} {kv_lengths.dtype}")
        values = concrete(kv_lengths)
        if values is not None and (values.min() < 0 or values.max() > S):
            raise ValueError(f"{op}: kv_lengths must lie in [0, S={S}], got {values.tolist()}")
        kv_lengths = kv_lengths.astype(jnp.int32)

    if q_positions is None:
        q_positions = kv_lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
    else:
        q_positions = jnp.asarray(q_positions)
        if not jnp.issubdtype(q_positions.dtype, jnp.integer) or q_positions.shape not in ((T,), (B, T)):
            raise ValueError(f"{op}: q_positions must be an int array of shape [T] = ({T},) or [B, T] = "
                             f"{(B, T)}, got {q_positions.shape} {q_positions.dtype}")
        q_positions = jnp.broadcast_to(q_positions.astype(jnp.int32), (B, T))
    return q_positions, kv_lengths
