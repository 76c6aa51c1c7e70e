"""Can Pallas' Mosaic GPU lowering express FlashMLA's sparse forward on Hopper? Three probes, lowering only.

FlashMLA's sparse prefill overlaps the row gathers with the matmuls: a producer warpgroup gathers single
cache rows (cp.async) into double-buffered shared memory laid out for wgmma, two consumer warpgroups
multiply. In Pallas Mosaic GPU that needs one of:

1. ``tma_row``: a TMA copy of ONE row into wgmma-ready shared memory (tiled (8, 64), 128-byte swizzle);
2. ``register_gather``: a warpgroup load of rows named by an index vector from GMEM into registers,
   then a store into that shared memory;
3. ``wgmma_untiled``: wgmma reading plain (untiled, unswizzled) shared memory, which single-row TMA
   copies can fill.

Each probe lowers a tiny kernel for CUDA (no GPU needed) and reports ``ok`` or the lowering's error. With
jax 0.10.2 all three fail (1: slices of a tiled dimension must be whole 8-row tiles; 2: "int_indexer_shape
non-empty" is not implemented; 3: wgmma wants swizzled, tiled operands), so the sparse MLA kernels stay on
the Triton lowering, whose gathers are per-thread loads the software pipeliner can overlap.
Run on a newer jax to see whether that changed:

    python -m sparse_index_jax.bench.mosaic_gpu_gather_probe
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sparse_index_jax.bench.reports import error_line

ROWS, WIDTH, CACHE = 64, 128, 500


def _wgmma_layout():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _tma_row(idx, kv):
    def kernel(idx_ref, kv_ref, o_ref, rows, barrier):
        def issue(i, carry):
            plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(idx_ref[i], 1)], rows.at[pl.ds(i, 1)], barrier.at[0])
            return carry
        jax.lax.fori_loop(0, ROWS, issue, 0)
        plgpu.barrier_wait(barrier.at[0])
        o_ref[...] = rows[...]
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ROWS, WIDTH), kv.dtype),
                        scratch_types=[plgpu.SMEM((ROWS, WIDTH), kv.dtype, transforms=_wgmma_layout()),
                                       plgpu.Barrier(num_barriers=1, num_arrivals=ROWS)])(idx, kv)


def _register_gather(idx, kv):
    def kernel(idx_ref, kv_ref, o_ref, rows):
        rows[...] = kv_ref[idx_ref[...], :]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(rows, o_ref)
        plgpu.wait_smem_to_gmem(0)
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((2 * ROWS, WIDTH), kv.dtype),
                        scratch_types=[plgpu.SMEM((2 * ROWS, WIDTH), kv.dtype, transforms=_wgmma_layout())])(idx, kv)


def _wgmma_untiled(a, b):
    def kernel(a_ref, b_ref, o_ref, a_s, b_s, barrier):
        plgpu.copy_gmem_to_smem(a_ref, a_s, barrier.at[0])
        plgpu.copy_gmem_to_smem(b_ref, b_s, barrier.at[1])
        plgpu.barrier_wait(barrier.at[0])
        plgpu.barrier_wait(barrier.at[1])

        def product(acc):
            plgpu.wgmma(acc, a_s, plgpu.transpose_ref(b_s, (1, 0)))
            return acc[...]
        o_ref[...] = pl.run_scoped(product, plgpu.ACC((ROWS, ROWS), jnp.float32))
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ROWS, ROWS), jnp.float32),
                        scratch_types=[plgpu.SMEM((ROWS, ROWS), a.dtype), plgpu.SMEM((ROWS, ROWS), a.dtype),
                                       plgpu.Barrier(num_barriers=2)])(a, b)


def probe() -> dict[str, str]:
    """{probe name: "ok" or the one-line lowering error}."""
    spec = jax.ShapeDtypeStruct
    cases = {"tma_row": (_tma_row, (spec((ROWS,), jnp.int32), spec((CACHE, WIDTH), jnp.bfloat16))),
             "register_gather": (_register_gather, (spec((2 * ROWS,), jnp.int32), spec((CACHE, WIDTH), jnp.bfloat16))),
             "wgmma_untiled": (_wgmma_untiled, (spec((ROWS, ROWS), jnp.bfloat16),) * 2)}
    out = {}
    for name, (fn, args) in cases.items():
        try:
            jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
            out[name] = "ok"
        except Exception as err:  # noqa: BLE001  (the error is the finding)
            out[name] = error_line(err)
    return out


if __name__ == "__main__":
    print(json.dumps({"jax": jax.__version__, **probe()}, indent=1))
