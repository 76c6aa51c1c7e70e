"""The one timer of the harness: compile apart, warm up once, then time repeated calls.

``time_call`` jits ``fn``, compiles it for ``args`` (timed apart as ``compile_ms``), runs it once to warm
up, then ``repeats`` times, each ended by ``jax.block_until_ready``. Functions of NNX modules are timed
on their state: ``nnx.split`` the module and merge it inside ``fn``, so ``args`` are arrays only.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    compile_ms: float  # lowering and compilation
    median_ms: float   # of the timed calls
    min_ms: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def time_call(fn: Callable, args: tuple, repeats: int) -> tuple[Timing, Any]:
    """(timing, the last result) of ``jax.jit(fn)(*args)``: compilation timed apart, one warm-up call,
    then ``repeats`` >= 1 timed calls."""
    if repeats < 1:
        raise ValueError(f"time_call: repeats must be >= 1, got {repeats}")
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    result = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(compile_s * 1e3, statistics.median(times) * 1e3, min(times) * 1e3), result
