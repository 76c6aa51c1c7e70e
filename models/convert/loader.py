"""HF checkpoint -> Flax NNX model, and the Orbax round trip.

Loading builds the model abstractly (``nnx.eval_shape``: no memory), then fills one parameter at a
time from the memory-mapped checkpoint, converting and placing it before the next one is read, so
the host never holds the checkpoint twice. Every parameter must be found with the right shape, and
every checkpoint tensor must be used (the MTP layers past ``num_hidden_layers`` are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import sys

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


def _read(reader: CheckpointReader, name: str, kind: str, cfg: ModelConfig) -> tuple[np.ndarray, list[str]]:
    """The parameter's value as float32 numpy in NNX layout, and the checkpoint names it used."""
    block = cfg.weight_block_size
    if kind == "experts":
        names = [name.format(e=e) for e in range(cfg.n_routed_experts)]
        value = np.stack([reader.get_dequantized(n, block).T for n in names])
    else:
        names = [name]
        value = reader.get_dequantized(name, block)
        value = value.T if kind == "t" else value
    used = names + [scale_name_of(n) for n in names if scale_name_of(n) in reader]
    return value, used


def _abstract_model(cfg: ModelConfig, dtype) -> DSAForCausalLM:
    return nnx.eval_shape(lambda: DSAForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def _progress(items, enabled: bool, desc: str):
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
    reader = CheckpointReader(path)
    graphdef, state = nnx.split(_abstract_model(cfg, dtype))
    flat = list(nnx.to_flat_state(state))
    used: set[str] = set()
    leaves = []
    for param_path, var in _progress(flat, progress, f"loading {path.name}"):
        name, kind = hf_name(param_path)
        value, names = _read(reader, name, kind, cfg)
        expected = tuple(var.get_value().shape)
        if value.shape != expected:
            shown = name.format(e=0) if kind == "experts" else name
            raise CheckpointError(f"{reader.file_of(shown)}: tensor {name!r} has shape {value.shape} after conversion, "
                                  f"the model expects {expected} (parameter {'.'.join(map(str, param_path))})")
        param_dtype = var.get_value().dtype  # float32 for the indexer head weights and router, else dtype
        if sharding is None:
            array = jnp.asarray(value, param_dtype)
        else:  # each device (each host, on multi-host) receives only its own shard
            array = jax.make_array_from_callback(expected, sharding(param_path, expected),
                                                 lambda index, value=value: value[index].astype(param_dtype))
        leaves.append((param_path, var.replace(array)))
        used.update(names)

    def skipped(name: str) -> bool:  # the MTP layer, and indexers of layers the pattern made S
        m = _LAYER.match(name)
        return bool(m) and (int(m.group(1)) >= cfg.num_hidden_layers
                            or (int(m.group(1)) in dropped and ".self_attn.indexer." in name))

    unexpected = sorted(n for n in reader.names() - used if not skipped(n))
    if unexpected:
        shown = ", ".join(f"{n} ({reader.file_of(n).name})" for n in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise CheckpointError(f"{path}: {len(unexpected)} checkpoint tensor(s) the model has no place for: "
                              f"{shown}{more}. Is config.json the one this checkpoint was saved with?")
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def is_converted(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / ORBAX_MARKER).is_file()


def save_converted(model: DSAForCausalLM, hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Writes ``out_dir`` = config.json (copied) + an Orbax checkpoint of the model state + a marker file."""
    import orbax.checkpoint as ocp

    out = pathlib.Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(pathlib.Path(hf_dir) / "config.json", out / "config.json")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "state", nnx.state(model))
    checkpointer.wait_until_finished()
    dtype = str(jnp.dtype(model.dtype))
    (out / ORBAX_MARKER).write_text(json.dumps({"format": "orbax", "dtype": dtype, "source": str(hf_dir)}, indent=2))
    return out


def load_converted(path: str | pathlib.Path, *, dtype=None, sharding=None,
                   prefill_chunk: int | None = None) -> DSAForCausalLM:
    """Restores a folder written by ``save_converted``, in ``dtype`` (default: the dtype it was saved in),
    each parameter straight onto ``sharding(path, shape)`` when given; ``prefill_chunk``: ``ModelConfig``'s."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    info = json.loads((path / ORBAX_MARKER).read_text())
    cfg = dataclasses.replace(ModelConfig.from_pretrained(path), prefill_chunk=prefill_chunk)
    graphdef, abstract = nnx.split(_abstract_model(cfg, dtype or jnp.dtype(info["dtype"])))
    if sharding is not None:
        abstract = nnx.from_flat_state([
            (p, v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                               sharding=sharding(p, v.get_value().shape))))
            for p, v in nnx.to_flat_state(abstract)])
    state = ocp.StandardCheckpointer().restore(path / "state", abstract)  # casts to the abstract dtypes
    return nnx.merge(graphdef, state)
