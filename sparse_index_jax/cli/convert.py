"""``sparse-index convert``: an HF DeepSeek-V3.2 / GLM-5 checkpoint, once, into an Orbax checkpoint."""

from __future__ import annotations

import argparse

from sparse_index_jax.cli.arguments import mesh

DESCRIPTION = (
    "Reads an HF checkpoint folder (config.json + safetensors; single file or sharded; bf16, fp32, or FP8 with block "
    "scales, which are dequantised) tensor by tensor and writes OUT_DIR: config.json, an Orbax checkpoint of the "
    "Flax NNX state, and a marker file. sparse_index_jax.models.from_pretrained(OUT_DIR) then restores it without "
    "re-converting. The multi-token-prediction layer is skipped.")


def add_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert an HF DeepSeek-V3.2 / GLM-5 checkpoint once into an Orbax "
                                          "checkpoint", description=DESCRIPTION)
    conv.add_argument("hf_dir", help="HF checkpoint folder")
    conv.add_argument("out_dir", help="new folder for the converted model (must not exist or be empty)")
    conv.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                      help="weight dtype to store (default bfloat16; the indexer head weights and the router stay "
                           "float32)")
    conv.add_argument("--mesh", help="shard while loading, e.g. tensor=8 or tensor=4,expert=2 (product = device "
                                     "count); without it every weight lands on the default device")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import jax.numpy as jnp

    from sparse_index_jax import models
    from sparse_index_jax.models.convert.loader import check_new_folder

    check_new_folder(args.out_dir)  # before the load, which can take hours: convert never overwrites
    start = time.perf_counter()
    out = models.convert(args.hf_dir, args.out_dir, dtype=jnp.dtype(args.dtype), progress=not args.quiet,
                         mesh=mesh(args.mesh))
    print(f"converted {args.hf_dir} -> {out} ({models.parameter_count(out):,} parameters, {args.dtype}) in "
          f"{time.perf_counter() - start:.1f} s; load it with sparse_index_jax.models.from_pretrained({str(out)!r})")
    return 0
