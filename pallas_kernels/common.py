"""What every op entry point shares: input checks, backend choice, and the deterministic ranking key.

The ranking key is the heart of the tie rule. A float32 score is mapped to an int32 whose integer
order equals the float order (-0.0 and +0.0 equal, NaN ranked as -inf), and keys that are not
eligible (future or past ``kv_lengths``) get INT32_MIN, below every eligible key, -inf included.
``lax.top_k`` on those keys returns the larger key first and, among equal keys, the lower index
first, so: higher score wins, an exact tie goes to the lower position, eligibility never depends on
the score's value.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

INELIGIBLE_KEY = np.int32(np.iinfo(np.int32).min)  # numpy scalar: kernels may not capture jax arrays

IMPLEMENTATIONS = ("auto", "xla", "pallas")


_FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def matmul_dtype(*xs) -> jnp.dtype:
    # float8 values are exact in bfloat16, and CPU/GPU XLA dots accept bf16 everywhere.
    dtypes = [jnp.bfloat16 if x.dtype in _FP8 else x.dtype for x in xs]
    return functools.reduce(jnp.promote_types, dtypes)


def to_shard(positions: jax.Array, key_offset, shard_len: int) -> tuple[jax.Array, jax.Array]:
    """Global key positions -> (positions inside a shard holding ``key_offset .. key_offset + shard_len``,
    clipped into it so gathers stay in bounds; whether each position really lies in the shard)."""
    local = positions - key_offset
    return jnp.clip(local, 0, shard_len - 1), (local >= 0) & (local < shard_len)


def ordered_keys(scores: jax.Array) -> jax.Array:
    """int32 keys whose integer order is the float order of ``scores``; also used inside kernels."""
    s = scores.astype(jnp.float32)
    s = jnp.where(s != s, -jnp.inf, s)  # NaN ranks as -inf
    s = jnp.where(s == 0, 0.0, s)  # -0.0 -> +0.0 so both zeros tie
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    return jnp.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def ranking_keys(scores: jax.Array, eligible: jax.Array) -> jax.Array:
    """int32 keys ordered like ``scores`` (float32); ineligible entries get ``INELIGIBLE_KEY``."""
    return jnp.where(eligible, ordered_keys(scores), INELIGIBLE_KEY)


def top_k_by_key(keys: jax.Array, topk: int, *, return_keys: bool = False):
    """Top-``topk`` along the last axis of int32 ``keys``: (indices int32 with -1 padding, valid bool),
    plus the selected keys (INELIGIBLE_KEY on padding) with ``return_keys``.

    When the axis is shorter than ``topk`` the result is padded; slots whose key is ineligible are
    padding too. Order: best first, ties by lower index, padding last.
    """
    n = keys.shape[-1]
    kk = min(topk, n)
    values, idx = jax.lax.top_k(keys, kk)
    valid = values != INELIGIBLE_KEY
    idx = jnp.where(valid, idx.astype(jnp.int32), -1)
    if kk < topk:
        pad = [(0, 0)] * (keys.ndim - 1) + [(0, topk - kk)]
        idx = jnp.pad(idx, pad, constant_values=-1)
        valid = jnp.pad(valid, pad, constant_values=False)
        values = jnp.pad(values, pad, constant_values=INELIGIBLE_KEY)
    return (idx, valid, values) if return_keys else (idx, valid)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= n: the padded extent of a block-tiled axis."""
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, fill=0) -> jax.Array:
    """``x`` padded with ``fill`` at the end of ``axis`` to length ``size`` (>= its length)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=fill) if size != x.shape[axis] else x


def chunk_axis(x: jax.Array, axis: int, size: int, fill) -> jax.Array:
    """Pads ``axis`` to a multiple of ``size`` with ``fill`` and moves the chunk index to the front."""
    count = -(-x.shape[axis] // size)
    x = pad_axis(x, axis, count * size, fill)
    x = x.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def map_query_chunks(fn, chunk: int, *inputs: tuple[jax.Array, object]):
    """Runs ``fn`` over chunks of ``chunk`` queries and stitches the outputs back to [B, T, ...].

    ``inputs`` are (array [B, T, ...], padding value) pairs; the last chunk is padded with those values
    (use position -1 for query positions: nothing is eligible, so padded rows are pure padding).
    """
    T = inputs[0][0].shape[1]
    chunk = min(chunk, T)
    out = jax.lax.map(lambda args: fn(*args), tuple(chunk_axis(x, 1, chunk, fill) for x, fill in inputs))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:])[:, :T], out)


@dataclasses.dataclass(frozen=True)
class Backend:
    """Which implementation serves a call, and why (``auto`` records its reason)."""

    name: str
    reason: str


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): Triton tensors have power-of-two shapes."""
    return 1 << max(0, int(n) - 1).bit_length()


def pallas_interpret(override: bool | None = None) -> bool:
    """Whether Pallas GPU kernels run interpreted: ``override`` when given, else as the platform says
    (on CPU they are interpreted: slow, exact, what the tests use; on GPU compiled)."""
    return jax.default_backend() == "cpu" if override is None else override


def implementations_here(has_gpu_kernel: bool, has_tpu_kernel: bool = False) -> tuple[str, ...]:
    """The implementations of an op on the current platform, best first.

    GPU: the Pallas GPU kernel first. TPU: the Pallas TPU kernel first where the op has one. CPU: the
    plain-JAX reference first; ``"pallas"`` still runs there (the GPU kernels, interpreted), so kernels
    can be tested without an accelerator (the TPU kernels' tests call them in TPU interpret mode).
    """
    platform = jax.default_backend()
    if platform == "tpu":
        return ("pallas", "xla") if has_tpu_kernel else ("xla",)
    if not has_gpu_kernel or platform not in ("gpu", "cpu"):
        return ("xla",)
    return ("pallas", "xla") if platform == "gpu" else ("xla", "pallas")


def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Compiler parameters for the Pallas Triton lowering (jax 0.10 and 0.11 name them alike)."""
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (GPU-only import)
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def choose_backend(op: str, implementation: str, available: Sequence[str]) -> Backend:
    """Resolves ``implementation`` for ``op``.

    ``available`` lists the implementations this op has on the current platform, best first;
    ``"xla"`` (the plain-JAX reference) is always one of them.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    platform = jax.default_backend()
    if implementation == "auto":
        name = available[0]
        return Backend(name, f"auto picked {name!r}: best of {list(available)} on platform {platform!r}")
    if implementation not in available:
        raise ValueError(
            f"{op}: implementation={implementation!r} cannot serve this call on platform {platform!r}; "
            f"this op has {list(available)} here. Use implementation='auto' or one of those.")
    return Backend(implementation, f"requested {implementation!r}")


def concrete(x) -> np.ndarray | None:
    """The value of ``x`` as numpy if it is known now (not traced), else None."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
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
