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


def user_error(err: BaseException) -> str | None:
    """The one line a user error is reported with, or None for an error that is a bug (shown with its traceback).

    User errors: ValueError (the library's input errors, ``OptionError``, ``json.JSONDecodeError``...), OS
    errors (missing, unreadable or misplaced files and folders: ``FileNotFoundError``, ``PermissionError``,
    ``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError``, a full disk), and a ValueError raised on
    the device side of a compiled call (the model's id and cache checks, ``models.causal_lm.fail_if``), which JAX
    wraps in a ``JaxRuntimeError`` whose message ends with it."""
    if isinstance(err, (ValueError, OSError)):
        if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err):
            return f"{err}: {err.filename}"
        return str(err)
    if type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
        last = str(err).rstrip().splitlines()[-1] if str(err).strip() else ""
        if last.startswith("ValueError: "):
            return last[len("ValueError: "):]
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs a command. Exit codes: 0 done, 1 training diverged (a non-finite loss or gradient; one line naming
    the step, the last good checkpoint kept), 2 a user error (one line on standard error, no traceback: see
    ``user_error``), 130 interrupted (Ctrl-C; one line). Anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    name = " ".join(filter(None, (args.command, getattr(args, "bench", None))))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nsparse-index {name}: interrupted\n")
        return 130
    except Exception as err:
        if type(err).__name__ == "DivergenceError":  # training.distill's (not imported here: it brings jax)
            parser.exit(1, f"sparse-index {name}: error: {err}\n")
        line = user_error(err)
        if line is None:
            raise
        parser.exit(2, f"sparse-index {name}: error: {line}\n")


if __name__ == "__main__":
    sys.exit(main())
