"""``sparse-index search``: IndexCache's training-free pattern search on a real model."""

from __future__ import annotations

import argparse

from sparse_index_jax.cli.arguments import (
    add_distributed_args,
    add_model_data_args,
    load_model_and_data,
    mesh,
    positive,
    resumable_out,
    resumable_out_help,
)

DESCRIPTION = (
    "Greedy IndexCache pattern search: start from the checkpoint's pattern (every layer runs its own indexer, F, "
    "unless it is an IndexShare checkpoint), repeatedly flip to S (reuse the nearest earlier F layer's selection) "
    "the layer whose flip raises the LM loss on fixed held-out calibration batches least, until --keep of the "
    "layers remain F. Writes OUT/search.json and OUT/search.png to --out (OUT, default a fresh folder per run); "
    "resumable: an interrupted run goes on from OUT/search_state.json when run again with the same --out. With "
    "--seq-len <= topk every query selects all its keys (dense), so no flip costs anything: keep --seq-len above "
    "topk.")


def add_parser(sub) -> None:
    search = sub.add_parser("search", help="IndexCache: find which layers may reuse an earlier layer's top-k "
                                           "(training-free)", description=DESCRIPTION)
    add_model_data_args(search, "shipped")
    search.add_argument("--keep", type=float, default=0.25, help="fraction of layers that stay F (default 0.25)")
    search.add_argument("--calib-batches", **positive(default=4, help="calibration batches (default 4)"))
    search.add_argument("--out", default=None, help=resumable_out_help(
        "search", "search_state.json (the resumable state), search.json, search.png"))
    add_distributed_args(search)
    search.set_defaults(func=run)


def dense_regime_warning(seq_len: int, topk: int) -> str | None:
    """The warning of a search that cannot learn anything: with seq_len <= topk every query selects all its keys."""
    if seq_len > topk:
        return None
    return (f"sparse-index search: warning: --seq-len {seq_len} <= the selector's topk {topk}: every query selects "
            "all its keys (the dense regime), so every flip to S costs 0 and the pattern found means nothing. Raise "
            f"--seq-len above {topk} (several times topk to measure sparse selection), or lower --topk.")


def run(args: argparse.Namespace) -> int:
    import sys

    from sparse_index_jax.bench.plots import search_plot
    from sparse_index_jax.bench.reports import save_json
    from sparse_index_jax.training.distributed import initialize, is_main_process, training_mesh
    from sparse_index_jax.training.index_cache_search import greedy_search

    out = resumable_out(args, "search")
    if args.distributed:
        initialize(args.coordinator, args.num_processes, args.process_id)
    device_mesh = training_mesh(args.batch_size, mesh(args.mesh), "search")
    from sparse_index_jax.models import family

    if family(args.model) == "llama" and device_mesh is not None and device_mesh.shape["context"] > 1:
        raise ValueError("--mesh context=N applies to the DSA models; the Llama retrofit's layers do not split the "
                         "sequence")
    model, data = load_model_and_data(args, device_mesh)
    warning = dense_regime_warning(args.seq_len, model.selector.topk)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    batches = data.heldout_batches(args.batch_size, args.calib_batches)
    state = greedy_search(model, batches, args.keep, state_path=out / "search_state.json",
                          fingerprint=data.fingerprint(), progress=not args.quiet, log=print,
                          mesh=device_mesh)
    if not is_main_process():
        return 0
    report = {**state.report(), "calibration": {"batches": len(batches), "batch_size": args.batch_size,
                                                "seq_len": args.seq_len, "data": data.fingerprint()}}
    save_json(report, out / "search.json")
    png = search_plot(report, out / "search.png")
    print(f"pattern {state.pattern} ({report['kept_layers']} of {len(state.pattern)} layers F): LM loss "
          f"{state.base_loss:.4f} -> {report['final_loss']:.4f}; wrote {out / 'search.json'}"
          + (f" and {png}" if png else " (matplotlib is not installed: no plot)"))
    return 0
