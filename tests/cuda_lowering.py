"""Lowers a function for CUDA on a machine without a GPU: the Pallas -> Triton IR step runs in Python,
so a kernel that Triton's front end would reject fails here, before any GPU time is spent.

(What only ptxas or the GPU can reject, register pressure or shared-memory size, still needs a GPU.)
"""

from __future__ import annotations

import jax


def lower_for_cuda(fn, *args, **kwargs) -> str:
    """StableHLO text of ``fn(*args, **kwargs)`` lowered for CUDA; raises if any kernel fails to lower."""
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, args)
    exported = jax.export.export(
        jax.jit(lambda *a: fn(*a, **kwargs)), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
    return exported.mlir_module()
