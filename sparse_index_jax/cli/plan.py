"""``sparse-index plan``: will indexer distillation fit? Per-device memory of a training step, from the config alone."""

from __future__ import annotations

import argparse
import json
import pathlib
import re

from sparse_index_jax.cli.arguments import lengths, positive
from sparse_index_jax.layers.sharding import MESH_AXES

DESCRIPTION = (
    "Per-device memory of one indexer-distillation step (sparse-index distill) of a DeepSeek-V3.2 / GLM-5 model on a "
    "mesh of any size, from the model's config alone: no weights are read and no devices are needed, so it answers "
    "before a TPU slice or a GPU cluster is rented. For the dense warm-up and the sparse stage it prints, in GiB per "
    "device: parameters, gradients and optimizer state (exact: the abstract model's leaves, each sharded by the "
    "library's partition rules: data splits the hidden dimension (FSDP), context replicates), activations with "
    "and without per-layer rematerialisation and the selection buffers handed to the loss (estimates from the "
    "shapes: XLA may fuse some arrays away or keep more), and the totals. The multi-token-prediction layer is not "
    "counted. With --device-memory it also says whether the step fits.")

_UNITS = {"": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TIB": 1 << 40, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}


def memory_size(text: str) -> int:
    """``"95G"`` / ``"95GiB"`` -> 95 * 2**30 bytes; ``"141GB"`` -> 141 * 10**9 (an H200's 141 GB is 131.3 GiB);
    a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 95G, 95GiB, 141GB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def mesh_sizes(text: str) -> dict[str, int]:
    """``"data=8,tensor=8,expert=8"`` -> {"data": 8, "tensor": 8, "expert": 8} (no devices involved)."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = (s.strip() for s in part.partition("="))
        if name not in MESH_AXES or not value.isdigit() or int(value) == 0:
            raise argparse.ArgumentTypeError(f"expected comma-separated AXIS=SIZE with AXIS in {', '.join(MESH_AXES)} "
                                             f"and SIZE a positive integer, got {part.strip()!r}")
        if name in sizes:
            raise argparse.ArgumentTypeError(f"axis {name!r} is given twice")
        sizes[name] = int(value)
    return sizes


def model_config(source: str):
    """--model: a built-in name, a config.json, or a folder holding one."""
    from sparse_index_jax.models.config import ModelConfig
    from sparse_index_jax.training.memory_plan import BUILTIN_CONFIGS, builtin_config

    if source in BUILTIN_CONFIGS:
        return builtin_config(source)
    path = pathlib.Path(source)
    if path.is_dir():
        return ModelConfig.from_pretrained(path)
    if path.is_file():
        try:
            return ModelConfig.from_hf_config(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"--model: {path} is not valid JSON: {err}") from None
    raise ValueError(f"--model: {source!r} is neither a built-in model ({', '.join(BUILTIN_CONFIGS)}) nor a "
                     f"config.json nor a folder holding one")


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help="per-device memory of indexer distillation on a mesh, from the config alone",
                          description=DESCRIPTION)
    plan.add_argument("--model", required=True,
                      help="built-in 'deepseek-v3.2' or 'glm-5' (their HF config.json ship with the package), an HF "
                           "config.json, or a checkpoint folder holding one")
    plan.add_argument("--mesh", required=True, type=mesh_sizes,
                      help="mesh axis sizes, e.g. data=8,tensor=8,expert=8 (axes: data splits the batch, context the "
                           "sequence, tensor heads / MLP widths / vocabulary, expert the routed experts; unnamed axes "
                           "have size 1). Any sizes: the plan does not need the devices")
    plan.add_argument("--seq-len", required=True, type=lengths, metavar="N",
                      help="tokens per sequence, e.g. 131072 or 128K")
    plan.add_argument("--batch-size", required=True, **positive(help="sequences per step (split over data)"))
    plan.add_argument("--train-base", action="store_true",
                      help="the sparse stage trains every parameter (gradients and optimizer state for all); default: "
                           "the indexers alone in both stages (the dense warm-up always trains the indexers alone)")
    plan.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw",
                      help="adamw / adam keep two arrays (mu, nu) per trainable parameter, sgd none (default adamw)")
    plan.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                      help="weights and activations dtype (default bfloat16)")
    plan.add_argument("--pattern", help="IndexCache pattern the step runs, e.g. FSSF... (default: the model's own)")
    plan.add_argument("--stage", choices=("dense", "sparse"),
                      help="plan one stage: the dense warm-up or the sparse stage (default: both)")
    plan.add_argument("--no-remat", action="store_true",
                      help="judge the fit without per-layer rematerialisation (both totals are printed either way)")
    plan.add_argument("--device-memory", type=memory_size, metavar="SIZE",
                      help="memory of one device, e.g. 95G (TPU v5p), 141GB (H200: 131.3 GiB) or 80GB; G / GiB = 2^30 "
                           "bytes, GB = 10^9 bytes. Adds a line saying whether the step fits (default: no such line)")
    plan.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from sparse_index_jax.training.memory_plan import plan_memory

    if len(args.seq_len) != 1:
        raise ValueError(f"--seq-len: give one length, got {len(args.seq_len)}")
    plan = plan_memory(model_config(args.model), args.mesh, seq_len=args.seq_len[0], batch_size=args.batch_size,
                       train_base=args.train_base, optimizer=args.optimizer, dtype=jnp.dtype(args.dtype),
                       remat=not args.no_remat, pattern=args.pattern, stage=args.stage or "both")
    print(plan.table(args.device_memory))
    return 0
