"""Which implementation of an op runs, and why: the one home of the implementation names.

Implementations are named by what they are:

* ``xla``: the op's ``reference.py``, plain JAX, on every platform.
* ``triton``: Pallas kernels with the Triton lowering; compiled on GPU, interpreted on CPU.
* ``mosaic_tpu``: Pallas kernels with the Mosaic TPU lowering; compiled on TPU, run in TPU interpret mode on
  CPU (simulated VMEM, SMEM and DMA; out-of-bounds reads raise, uninitialised memory is NaN).

``"auto"`` takes the best implementation of the op on the current platform (GPU: triton, TPU: mosaic_tpu,
CPU: xla), skipping any that cannot serve the call at hand (a dtype it does not take, an output it does
not produce); the returned ``Backend`` says which and why, skips included, so what a benchmark records
is what ran. Each op declares its implementations and their block-size dataclasses in one ``Op``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

AUTO = "auto"
IMPLEMENTATIONS = ("xla", "triton", "mosaic_tpu")
COMPILED_ON = {"triton": "gpu", "mosaic_tpu": "tpu"}  # Pallas backends: where they compile; on CPU they interpret
_AUTO_ORDER = {"gpu": ("triton", "xla"), "tpu": ("mosaic_tpu", "xla")}


def platform() -> str:
    return jax.default_backend()


def runs_here(name: str, on: str | None = None) -> bool:
    """Whether implementation ``name`` can run on platform ``on`` (default: this one)."""
    on = on or platform()
    return name == "xla" or on in (COMPILED_ON[name], "cpu")


def triton_interpret(override: bool | None = None) -> bool:
    """``pallas_call(interpret=...)`` for the Triton kernels: ``override``, else interpreted on CPU only."""
    return platform() == "cpu" if override is None else override


def mosaic_tpu_interpret(override=None):
    """``pallas_call(interpret=...)`` for the Mosaic TPU kernels: ``override``, else compiled on TPU and the
    TPU interpreter elsewhere (how CPU tests run them)."""
    if override is not None:
        return override
    if platform() == "tpu":
        return False
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415  (TPU interpreter, imported on use)

    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Compiler parameters of the Triton lowering (jax 0.10 and 0.11 name them alike)."""
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (GPU lowering, imported on use)

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class Backend:
    """The implementation that serves a call (``name``) and why it was chosen (``reason``)."""

    name: str
    reason: str

    @property
    def interpret(self):
        """What its ``pallas_call`` gets as ``interpret`` on this platform (None for ``xla``)."""
        if self.name == "triton":
            return triton_interpret()
        if self.name == "mosaic_tpu":
            return mosaic_tpu_interpret()
        return None


def _check_name(op: str, implementation: str) -> None:
    if implementation in (AUTO, *IMPLEMENTATIONS):
        return
    hint = ("; 'pallas' is now named by its lowering: 'triton' (GPU kernels) or 'mosaic_tpu' (TPU kernels)"
            if implementation == "pallas" else "")
    raise ValueError(f"{op}: implementation must be one of {(AUTO, *IMPLEMENTATIONS)}, got {implementation!r}{hint}")


@dataclasses.dataclass(frozen=True)
class Op:
    """One op's implementations (name -> function) and the block-size dataclass each Pallas one takes.

    Every function takes the op's arrays and keyword arguments; Pallas ones also ``block_sizes``
    (an instance of their class, or None for the defaults) and ``interpret``.
    """

    name: str
    implementations: Mapping[str, Callable[..., Any]]
    block_sizes: Mapping[str, type]  # every implementation but xla

    def __post_init__(self):
        missing = set(self.implementations) - {"xla"} - set(self.block_sizes)
        if missing:
            raise TypeError(f"Op {self.name}: implementations {sorted(missing)} declare no block-size class")

    def backend_for(self, implementation: str = AUTO, refusals: Mapping[str, str] | None = None) -> Backend:
        """The implementation a call with ``implementation`` would use here, with the reason.

        ``refusals`` maps implementations that cannot serve this particular call to why not.
        """
        _check_name(self.name, implementation)
        refusals = dict(refusals or {})
        here = platform()
        runnable = [n for n in IMPLEMENTATIONS if n in self.implementations and runs_here(n, here)]
        if implementation == AUTO:
            order = [n for n in _AUTO_ORDER.get(here, ("xla",)) if n in runnable]
            skipped = [f"skipped {n!r}: {refusals[n]}" for n in order if n in refusals]
            name = next(n for n in order if n not in refusals)  # xla refuses nothing
            reason = f"auto picked {name!r}: best of {order} on platform {here!r}"
            return Backend(name, "; ".join([reason, *skipped]))
        if implementation not in runnable:
            raise ValueError(
                f"{self.name}: implementation={implementation!r} cannot serve this call on platform {here!r}; this op "
                f"has {runnable} here (triton runs on GPU and, interpreted, on CPU; mosaic_tpu on TPU and, "
                f"interpreted, on CPU). Use implementation='auto' or one of those.")
        if implementation in refusals:
            raise ValueError(f"{self.name}: implementation={implementation!r} cannot serve this call: "
                             f"{refusals[implementation]}; use implementation='xla' or 'auto'")
        interpreted = implementation != "xla" and here == "cpu"
        return Backend(implementation, f"requested {implementation!r}{' (interpreted on cpu)' if interpreted else ''}")

    def run(self, backend: Backend, *args, block_sizes=None, **kwargs):
        """Calls ``backend``'s function; Pallas ones get ``block_sizes`` (type-checked) and ``interpret``."""
        fn = self.implementations[backend.name]
        if backend.name == "xla":
            if block_sizes is not None:
                raise ValueError(f"{self.name}: block_sizes={block_sizes!r} apply to the Pallas implementations; "
                                 f"the xla one takes none")
            return fn(*args, **kwargs)
        expected = self.block_sizes[backend.name]
        if block_sizes is not None and not isinstance(block_sizes, expected):
            raise ValueError(f"{self.name}: block_sizes={block_sizes!r} do not fit implementation "
                             f"{backend.name!r}, which takes {expected.__name__}")
        return fn(*args, block_sizes=block_sizes, interpret=backend.interpret, **kwargs)
