"""Block sizes of the Mosaic TPU selection kernels: defaults per TPU generation and their alignment checks.

TPU vector registers are 8 sublanes x 128 lanes (32-bit): a block's last dimension must be a multiple
of 128 and its second-to-last a multiple of 8 (or span the whole array axis). ``check`` says which field
breaks that, before anything is traced. Defaults per generation follow the VMEM each core has (v5e: 128
MiB, v5p: 95 MiB, v6e: 128 MiB) and the MXU width (128 on v5e/v5p, 256 on v6e), keeping a block's
working set a few MiB so Pallas can double-buffer it.
"""

from __future__ import annotations

import dataclasses

import jax

SUBLANES, LANES = 8, 128


@dataclasses.dataclass(frozen=True)
class DsaTpuBlockSizes:
    """DSA scoring: ``block_q`` queries x ``block_k`` keys per grid step (all heads inside the step);
    the threshold search holds ``search_rows`` query rows of all keys in VMEM at once."""

    block_q: int = 128
    block_k: int = 512
    search_rows: int = 8

    def check(self) -> "DsaTpuBlockSizes":
        for name, unit, what in (("block_q", SUBLANES, "sublanes"), ("block_k", LANES, "lanes"),
                                 ("search_rows", SUBLANES, "sublanes")):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % unit:
                example = unit * max(1, round(value / unit)) if isinstance(value, int) else unit
                raise ValueError(f"DsaTpuBlockSizes.{name}={value!r}: must be a positive multiple of {unit} (TPU "
                                 f"{what}); e.g. {example}")
        if self.block_q % self.search_rows:
            raise ValueError(f"DsaTpuBlockSizes: block_q={self.block_q} must be a multiple of search_rows="
                             f"{self.search_rows}")
        return self


# Per generation (device_kind -> defaults). v6e's MXU is 256 wide: wider key blocks fill it.
DSA_BLOCK_SIZES = {
    "v5e": DsaTpuBlockSizes(block_q=128, block_k=512),
    "v5p": DsaTpuBlockSizes(block_q=128, block_k=512),
    "v6e": DsaTpuBlockSizes(block_q=128, block_k=1024),
}


def tpu_generation(device_kind: str | None = None) -> str:
    """"v5e" | "v5p" | "v6e" from a device kind ("TPU v5 lite", "TPU v5p", "TPU v6 lite", ...); v5p otherwise."""
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    if "v6" in kind:
        return "v6e"
    if "v5" in kind and ("lite" in kind or "v5e" in kind):
        return "v5e"
    return "v5p"


def dsa_block_sizes(generation: str | None = None) -> DsaTpuBlockSizes:
    """The defaults of ``generation`` (default: this machine's TPU; v5p's off TPU)."""
    gen = generation or tpu_generation()
    if gen not in DSA_BLOCK_SIZES:
        raise ValueError(f"unknown TPU generation {gen!r}; known: {sorted(DSA_BLOCK_SIZES)}")
    return DSA_BLOCK_SIZES[gen]
