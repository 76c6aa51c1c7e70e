"""The one timer of the harness: compile apart, warm up once, then time repeated calls.

``time_call`` jits ``fn``, compiles it for ``args`` (timed apart as ``compile_ms``), runs it once to warm
up, then ``repeats`` times, each ended by ``jax.block_until_ready``. Functions of NNX modules are timed
on their state: ``nnx.split`` the module and merge it inside ``fn``, so ``args`` are arrays only.

A call that updates a buffer in place (a decode step writing its token into the cache) is timed with
``donate_argnums`` and ``feed``: each call consumes the donated arguments, and ``feed(args, result)``,
run outside the timed region, hands the next call its arguments (the updated cache), so no call pays
for a copy of the buffer that a server, donating it, would not make.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    compile_ms: float  # lowering and compilation
    median_ms: float   # of the timed calls
    min_ms: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def time_call(fn: Callable, args: tuple, repeats: int, *, donate_argnums: tuple[int, ...] = (),
              feed: Callable[[tuple, Any], tuple] | None = None,
              compiler_options: Mapping[str, Any] | None = None) -> tuple[Timing, Any]:
    """(timing, the last result) of ``jax.jit(fn)(*args)``: compilation timed apart, one warm-up call,
    then ``repeats`` >= 1 timed calls.

    With ``donate_argnums`` the first call consumes the caller's donated arguments (they are deleted), and
    ``feed(args, result)`` must give each next call's arguments from the previous call's result.
    ``compiler_options``: XLA options of this compilation (``{"xla_backend_optimization_level": 0}``)."""
    if repeats < 1:
        raise ValueError(f"time_call: repeats must be >= 1, got {repeats}")
    if donate_argnums and feed is None:
        raise ValueError("time_call: donated arguments are consumed by each call; pass feed= to hand the next "
                         "call its arguments")
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile(
        compiler_options=dict(compiler_options) if compiler_options else None)
    compile_s = time.perf_counter() - start
    result = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        if feed is not None:
            args = feed(args, result)
        start = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(compile_s * 1e3, statistics.median(times) * 1e3, min(times) * 1e3), result
