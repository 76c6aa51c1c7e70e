"""``sparse-index``: the command line. One module per command; each parses, calls the library, prints.

    demo      SmolLM2-135M with DSA retrofitted on held-out text (or one random DSA layer)
    generate  text from a model with DSA, streamed (sampling, stop tokens, chat template)
    convert   an HF DeepSeek-V3.2 / GLM-5 checkpoint into an Orbax checkpoint
    search    IndexCache's training-free pattern search
    distill   indexer distillation (dense warm-up, then sparse), IndexCache-aware
    plan      per-device memory of indexer distillation on a mesh, from the config alone
    bench     the benchmark harness (speed, fidelity, roofline, selector-sweep)
"""

from __future__ import annotations

import argparse
import sys

from sparse_index_jax.cli import bench, convert, demo, distill, generate, plan, search


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-index",
        description="DeepSeek-style sparse attention selection in JAX: the DSA lightning indexer picks the "
                    "top-k keys of every query and MLA attends only to those.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (demo, generate, convert, search, distill, plan, bench):
        command.add_parser(sub)
    return parser


def version() -> str:
    """The installed distribution's version: built from ``sparse_index_jax.__version__``, its one source (the
    package root is not imported from inside, see tests/test_architecture.py)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sparse-index-jax")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # input errors say what is wrong: no traceback
        parser.exit(2, f"sparse-index {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
