"""HF checkpoint -> Flax NNX model, and the Orbax round trip.

Loading builds the model abstractly (``nnx.eval_shape``: no memory), checks every parameter's shape
against the checkpoint headers before reading it, then fills one parameter at a time. Every
parameter must be found with the right shape, and every checkpoint tensor must be used (the MTP
layers past ``num_hidden_layers`` are skipped).

What a host reads: without a sharding, each tensor whole, converted and put on the default device
before the next one. With a sharding, each parameter is built by ``jax.make_array_from_callback``
whose callback reads (``CheckpointReader.get_dequantized(..., index)``) only the slice one device
holds, mapped to the stored HF layout: a host reads, per parameter, just the distinct slices of its
own devices, each once (devices that replicate a slice share one read), plus for FP8 the scale
blocks covering them. Its peak is those slices in float32, never a whole stacked expert tensor.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.models.convert.safetensors_reader import CheckpointError, CheckpointReader, scale_name_of
from sparse_index_jax.models.deepseek import DSAForCausalLM

ORBAX_MARKER = "sparse_index_jax.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def hf_name(path: tuple) -> tuple[str, str]:
    """(HF tensor name, how to convert) for one NNX parameter path.

    Kinds: ``copy``; ``t`` (nnx.Linear kernels are [in, out], HF weights [out, in]); ``experts``
    (per-expert HF weights, stacked then transposed). For ``experts`` the name has an ``{e}`` slot.
    """
    parts = [str(p) for p in path]
    if parts == ["embed_tokens", "embedding"]:
        return "model.embed_tokens.weight", "copy"
    if parts == ["norm", "weight"]:
        return "model.norm.weight", "copy"
    if parts == ["lm_head", "kernel"]:
        return "lm_head.weight", "t"
    if parts[0] != "layers":
        raise KeyError(f"no checkpoint name for parameter {'.'.join(parts)}")
    prefix = f"model.layers.{parts[1]}."
    rest, leaf = parts[2:-1], parts[-1]
    if rest[:2] == ["mlp", "experts"]:
        return prefix + f"mlp.experts.{{e}}.{leaf}.weight", "experts"
    if leaf == "kernel":
        return prefix + ".".join(rest) + ".weight", "t"
    if leaf == "scale":  # nnx.LayerNorm calls its weight "scale"
        return prefix + ".".join(rest) + ".weight", "copy"
    return prefix + ".".join(rest + [leaf]), "copy"


def _names(name: str, kind: str, cfg: ModelConfig) -> list[str]:
    """The checkpoint tensors one parameter is made of: one, or one per routed expert."""
    return [name.format(e=e) for e in range(cfg.n_routed_experts)] if kind == "experts" else [name]


def _check_shape(reader: CheckpointReader, names: list[str], kind: str, expected: tuple, param_path) -> None:
    """Compares the headers' shapes, in NNX layout, with the parameter's before anything is read."""
    for name in names:
        stored = reader.info(name)[0]
        converted = {"copy": stored, "t": stored[::-1], "experts": (len(names), *stored[::-1])}[kind]
        if converted != expected:
            raise CheckpointError(f"{reader.file_of(name)}: tensor {name!r} has shape {converted} after conversion, "
                                  f"the model expects {expected} (parameter {'.'.join(map(str, param_path))})")


def _read(reader: CheckpointReader, names: list[str], kind: str, block, index: tuple) -> np.ndarray:
    """``parameter[index]`` (``index``: one slice per NNX dimension) as float32 in NNX layout, reading only it.

    nnx.Linear kernels are [in, out] and HF weights [out, in], so a kernel's index is swapped for the
    stored tensor; experts are [E, in, out], each from its own [out, in] tensor: only the experts in
    ``index[0]`` are read, each sliced by the swapped rest of the index.
    """
    if kind == "copy":
        return reader.get_dequantized(names[0], block, index)
    if kind == "t":
        return reader.get_dequantized(names[0], block, index[::-1]).T
    return np.stack([reader.get_dequantized(name, block, index[1:][::-1]).T for name in names[index[0]]])


def place_slices(read, shape: tuple, dtype, sharding) -> jax.Array:
    """The parameter on ``sharding``, each device's slice from ``read(index)``. Devices that replicate a slice
    (over the other mesh axes) get the one read of it: a cache per distinct slice, dropped on return."""
    cache: dict[tuple, np.ndarray] = {}

    def callback(index: tuple) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))  # slices are not hashable before Python 3.12
        if key not in cache:
            cache[key] = read(index).astype(dtype)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _abstract_model(cfg: ModelConfig, dtype) -> DSAForCausalLM:
    return nnx.eval_shape(lambda: DSAForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def progress_bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        return items
    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr)


def load_hf_checkpoint(path: str | pathlib.Path, *, dtype=jnp.bfloat16, sharding=None, progress: bool = True,
                       index_pattern: str | None = None, selector: dict | None = None,
                       prefill_chunk: int | None = None) -> DSAForCausalLM:
    """Loads an HF safetensors checkpoint (single file or sharded; bf16, fp32, or FP8 + block scales).

    ``sharding(path, shape) -> jax.sharding.Sharding | None`` places each parameter as it is read
    (None: the default device). ``index_pattern`` / ``selector``: see ``ModelConfig.with_index_cache``;
    the indexer weights of layers the pattern makes S are left unread.
    """
    path = pathlib.Path(path)
    checkpoint_cfg = ModelConfig.from_pretrained(path)
    cfg = dataclasses.replace(checkpoint_cfg.with_index_cache(index_pattern, selector), prefill_chunk=prefill_chunk)
    dropped = {i for i, (new, old) in enumerate(zip(cfg.index_pattern, checkpoint_cfg.index_pattern)) if new != old}
    graphdef, state = nnx.split(_abstract_model(cfg, dtype))
    flat = list(nnx.to_flat_state(state))
    with CheckpointReader(path) as reader:
        plan = _plan(reader, flat, cfg, dropped)  # every header check before the first byte of data is read
        leaves = []
        for (param_path, var), (names, kind) in zip(progress_bar(flat, progress, f"loading {path.name}"), plan):
            shape, param_dtype = tuple(var.get_value().shape), var.get_value().dtype  # f32: indexer heads, router

            def read(index, names=names, kind=kind):
                return _read(reader, names, kind, cfg.weight_block_size, index)

            if sharding is None:
                array = jnp.asarray(read((slice(None),) * len(shape)), param_dtype)
            else:  # each device (each host, on multi-host) reads only its own slice
                array = place_slices(read, shape, param_dtype, sharding(param_path, shape))
            leaves.append((param_path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _plan(reader: CheckpointReader, flat: list, cfg: ModelConfig, dropped: set[int]) -> list[tuple[list[str], str]]:
    """(checkpoint names, kind) per parameter, from the headers alone: every shape is checked, and every
    checkpoint tensor must have a place (the MTP layer and the indexers of layers made S are skipped)."""
    plan, used = [], set()
    for param_path, var in flat:
        name, kind = hf_name(param_path)
        names = _names(name, kind, cfg)
        _check_shape(reader, names, kind, tuple(var.get_value().shape), param_path)
        plan.append((names, kind))
        used.update(names + [scale_name_of(n) for n in names if scale_name_of(n) in reader])

    def skipped(name: str) -> bool:
        m = _LAYER.match(name)
        return bool(m) and (int(m.group(1)) >= cfg.num_hidden_layers
                            or (int(m.group(1)) in dropped and ".self_attn.indexer." in name))

    unexpected = sorted(n for n in reader.names() - used if not skipped(n))
    if unexpected:
        shown = ", ".join(f"{n} ({reader.file_of(n).name})" for n in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise CheckpointError(f"{reader.folder}: {len(unexpected)} checkpoint tensor(s) the model has no place for: "
                              f"{shown}{more}. Is config.json the one this checkpoint was saved with?")
    return plan


def is_converted(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / ORBAX_MARKER).is_file()


def check_new_folder(out_dir: str | pathlib.Path) -> pathlib.Path:
    """``out_dir`` as an absolute path if ``save_converted`` may write there (it does not exist, or is an empty
    folder); else ``FileExistsError`` saying what is in the way. Call it before the (long) load."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not a folder; choose a new folder for the converted model")
    if out.is_dir() and any(out.iterdir()):
        what = "a converted model" if is_converted(out) else "files"
        raise FileExistsError(f"{out} exists and is not empty (it holds {what}); choose a new folder, or delete this "
                              f"one first: convert never overwrites")
    return out


def _key(param_path: tuple) -> str:
    return "/".join(map(str, param_path))


def _checksum(array) -> dict:
    """crc32 of an array's bytes (C order), with its dtype and shape: what ``load_converted`` compares."""
    if jnp.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    value = np.ascontiguousarray(np.asarray(array))
    return {"crc32": zlib.crc32(value.reshape(-1).view(np.uint8)), "dtype": str(value.dtype),
            "shape": list(value.shape)}


def save_converted(model: DSAForCausalLM, hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes ``out_dir`` = config.json (copied) + an Orbax checkpoint of the model state + a marker file.

    The marker holds a crc32 of every array's bytes (one more pass over the weights, on the host; arrays that
    span hosts are left out), which ``load_converted`` checks: Orbax itself keeps no checksums, so a flipped
    byte in its files would otherwise load silently as a wrong weight.
    """
    import orbax.checkpoint as ocp

    out = check_new_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(pathlib.Path(hf_dir) / "config.json", out / "config.json")
    state = nnx.state(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "state", state)
    checksums = {_key(p): _checksum(v.get_value()) for p, v in nnx.to_flat_state(state)
                 if getattr(v.get_value(), "is_fully_addressable", True)}
    checkpointer.wait_until_finished()
    dtype = str(jnp.dtype(model.dtype))
    marker = {"format": "orbax", "dtype": dtype, "source": str(pathlib.Path(hf_dir).absolute()),
              "checksums": checksums}
    (out / ORBAX_MARKER).write_text(json.dumps(marker, indent=1))
    return out


def load_converted(path: str | pathlib.Path, *, dtype=None, sharding=None, prefill_chunk: int | None = None,
                   verify: bool = True) -> DSAForCausalLM:
    """Restores a folder written by ``save_converted``, in ``dtype`` (default: the dtype it was saved in),
    each parameter straight onto ``sharding(path, shape)`` when given; ``prefill_chunk``: ``ModelConfig``'s.

    ``verify`` (default on) compares every array with the crc32 stored at convert time: one pass over the
    restored bytes on the host (for a 1.3 TB model, minutes); arrays are restored in their stored dtype for the
    check and cast to ``dtype`` after it. A mismatch raises ``CheckpointError`` naming the array and the folder.
    Folders converted before checksums were stored (or arrays spanning hosts) are not checked.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    try:
        info = json.loads((path / ORBAX_MARKER).read_text())
        checksums = (info.get("checksums") or {}) if verify else {}
        saved_dtype = jnp.dtype(info["dtype"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / ORBAX_MARKER}: unreadable marker of a converted model ({err!r}); "
                              f"convert the HF checkpoint again") from None
    cfg = dataclasses.replace(ModelConfig.from_pretrained(path), prefill_chunk=prefill_chunk)
    graphdef, abstract = nnx.split(_abstract_model(cfg, dtype or saved_dtype))
    wanted = {_key(p): v.get_value().dtype for p, v in nnx.to_flat_state(abstract)}

    def restore_as(p, v):
        stored = checksums.get(_key(p), {}).get("dtype")
        value = v.get_value()
        return v.replace(jax.ShapeDtypeStruct(value.shape, jnp.dtype(stored) if stored else value.dtype,
                                              sharding=sharding(p, value.shape) if sharding is not None else None))

    abstract = nnx.from_flat_state([(p, restore_as(p, v)) for p, v in nnx.to_flat_state(abstract)])
    try:
        state = ocp.StandardCheckpointer().restore(path / "state", abstract)  # casts to the abstract dtypes
    except Exception as err:  # TensorStore and Orbax raise many kinds; the folder is what the user can act on
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: the converted checkpoint could not be read ({type(err).__name__}: {first}); "
                              f"it is damaged or incomplete: convert the HF checkpoint again") from err
    leaves = []
    for p, v in nnx.to_flat_state(state):
        value, expected = v.get_value(), checksums.get(_key(p))
        if expected is not None and getattr(value, "is_fully_addressable", True):
            got = _checksum(value)
            if got != expected:
                raise CheckpointError(f"{path}: array {_key(p)!r} does not match the checksum stored when it was "
                                      f"converted (crc32 {got['crc32']:#010x}, expected {expected['crc32']:#010x}; "
                                      f"{got['dtype']} {got['shape']} vs {expected['dtype']} {expected['shape']}): "
                                      f"the checkpoint is damaged; convert {info.get('source', 'the HF checkpoint')} "
                                      f"again")
        if value.dtype != wanted[_key(p)]:
            value = value.astype(wanted[_key(p)])
        leaves.append((p, v.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
