"""DSA retrofitted onto a pretrained Llama-family model: the indexers' weights file, what a loader's ``indexers``
argument means (``indexer_spec``), and the SmolLM2 preset.

Only the indexers are new; the base model's weights stay as shipped. The indexers' weights go in one small
safetensors file (float16) whose metadata holds what the weights are (``IndexerWeights`` fields), the
selector they were distilled with, and how they were made; ``load_indexers`` checks the weights' fields
against the model before filling anything in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Iterator, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.layers.config import IndexerWeights
from sparse_index_jax.models.convert.gguf import load_smollm2
from sparse_index_jax.models.llama import LlamaForCausalLM
from sparse_index_jax.selection.methods import Selector

# New SmolLM2-135M indexers (``indexers="fresh"``): DSA-shaped, a head pool large enough for MISA's regime (4 of
# 16 heads routed is DeepSeek-V3.2's 16 of 64 ratio; 2 of 16 its 8 of 64): 16 heads x 32 dims (16 of them rotary),
# ~9.7M parameters over 30 layers, 19 MB as float16. The shipped file is older: 6 heads x 32 (its metadata says so).
SMOLLM2_INDEXER = {"n_heads": 16, "head_dim": 32, "rope_dim": 16}
SMOLLM2_SELECTOR = Selector("dsa", 256)
SMOLLM2_INDEXERS = pathlib.Path(__file__).parent / "weights" / "smollm2_135m_indexers.safetensors"


class IndexersFile(NamedTuple):
    """What an indexers file says besides its tensors."""

    weights: dict        # IndexerWeights fields
    info: dict           # how the weights were made (free-form)
    selector: Selector   # the selector they were distilled with
    num_layers: int | None = None  # layers the file was written for (None in files written before it was kept)


def _indexer_params(model: LlamaForCausalLM) -> dict[str, nnx.Variable]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("indexer"))))
    return {".".join(map(str, path)): var for path, var in flat}


def save_indexers(model: LlamaForCausalLM, path: str | pathlib.Path, info: dict | None = None) -> pathlib.Path:
    """Writes every layer's indexer weights (float16) with their fields, the model's selector and ``info``."""
    from safetensors.numpy import save_file

    if model.cfg.indexer is None:
        raise ValueError("save_indexers: this model has no indexers")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(var.get_value(), np.float16) for name, var in _indexer_params(model).items()}
    meta = {"indexer": json.dumps(dataclasses.asdict(model.cfg.indexer.weights())),
            "selector": json.dumps(model.selector.as_dict()), "info": json.dumps(info or {}),
            "num_layers": str(model.cfg.num_hidden_layers)}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_indexer_file(path: str | pathlib.Path) -> IndexersFile:
    """The weights' fields, info and selector stored in an indexers file."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    written_by = "--indexers takes the .safetensors file that distill (save_indexers) writes"
    if path.is_dir():
        raise ValueError(f"indexer weights {path} is a folder; {written_by}")
    if not path.is_file():
        raise FileNotFoundError(f"indexer weights {path} do not exist (distil them: sparse-index distill --model "
                                f"smollm2 ...)")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError (not a ValueError) for any bad file
        raise ValueError(f"{path} is not a readable safetensors file ({err}); {written_by}") from None
    if "indexer" not in meta:
        raise ValueError(f"{path} is not an indexers file written by save_indexers (no 'indexer' metadata); "
                         f"{written_by}")
    try:
        fields = json.loads(meta["indexer"])
        weights = {name: fields[name] for name in IndexerWeights.field_names() if name in fields}
        if "selector" in meta:
            selector = Selector.from_dict(json.loads(meta["selector"]))
        else:  # earlier files kept method and topk among the indexer fields (their option fields held defaults)
            selector = Selector(fields.get("method", "dsa"), fields.get("topk", SMOLLM2_SELECTOR.topk))
        info = json.loads(meta.get("info", "{}"))
        num_layers = int(meta["num_layers"]) if "num_layers" in meta else None
    except (json.JSONDecodeError, TypeError, AttributeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: the indexers file's metadata is damaged ({err!r}); distil again or restore "
                         f"the file") from None
    return IndexersFile(weights, info, selector, num_layers)


def load_indexers(model: LlamaForCausalLM, path: str | pathlib.Path) -> dict:
    """Fills the model's indexers from ``path``; the shapes must match. Returns the file's info."""
    from safetensors.numpy import load_file

    stored = read_indexer_file(path)
    ix = model.cfg.indexer
    if ix is None:
        raise ValueError("load_indexers: the model has no indexers; build it with the file's indexer config")
    wrong = {f: (stored.weights.get(f), getattr(ix, f)) for f in IndexerWeights.field_names()
             if stored.weights.get(f) != getattr(ix, f)}
    if wrong:
        raise ValueError(f"{path}: indexer {', '.join(f'{f}={a!r} (model: {b!r})' for f, (a, b) in wrong.items())}")
    if stored.num_layers is not None and stored.num_layers != model.cfg.num_hidden_layers:
        raise ValueError(f"{path}: indexer num_layers={stored.num_layers} (model: {model.cfg.num_hidden_layers})")
    tensors = load_file(str(path))
    params = _indexer_params(model)
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{path}: tensors do not match the model's indexers (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); was it written for a model with another number of layers?")
    for name, var in params.items():
        if tensors[name].shape != var.get_value().shape:
            raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, the model needs {var.get_value().shape}")
        var.set_value(jnp.asarray(tensors[name], var.get_value().dtype))
    return stored.info


@contextlib.contextmanager
def indexers_swapped(model: LlamaForCausalLM, path: str | pathlib.Path) -> Iterator[dict]:
    """Runs the block with the indexers of ``path`` (same shape) in ``model``, then puts the model's own back;
    yields the file's info. One base model serves several indexer files (e.g. full and IndexCache-trained)."""
    own = {name: var.get_value() for name, var in _indexer_params(model).items()}
    try:
        yield load_indexers(model, path)
    finally:
        for name, var in _indexer_params(model).items():
            var.set_value(own[name])


def resolve_indexers(indexers: str | pathlib.Path | None) -> pathlib.Path | None:
    """``"shipped"`` -> the distilled SmolLM2 indexers in ``models/weights``; ``"fresh"`` or None -> None
    (new, untrained indexers); anything else is a path to an indexers file."""
    if indexers is None or indexers == "fresh":
        return None
    return SMOLLM2_INDEXERS if indexers == "shipped" else pathlib.Path(indexers)


def indexer_spec(indexers: str | pathlib.Path | None, shape: dict | None = None,
                 selector: Selector | dict | None = None) -> tuple[pathlib.Path | None, dict | None]:
    """(indexers file or None, ``IndexerConfig`` fields or None) for a Llama-family loader's arguments.

    ``indexers``: None (no indexers: the plain dense model), ``"fresh"`` (new indexers of shape
    ``SMOLLM2_INDEXER``, or ``shape``'s ``n_heads`` / ``head_dim`` / ``rope_dim``, to distil), ``"shipped"``
    (the distilled SmolLM2-135M file) or an indexers file (its metadata fixes the shape; ``load_indexers``
    then checks it against the model, field by field). The selector is the file's (DSA top-256 for fresh
    indexers); ``selector`` (a ``Selector`` or some of its fields) changes it.
    """
    unknown = sorted(set(shape or {}) - set(SMOLLM2_INDEXER))
    if unknown:
        raise ValueError(f"unknown indexer shape fields {unknown}; choose from {sorted(SMOLLM2_INDEXER)}")
    if indexers is None:
        if shape or selector:
            raise ValueError("an indexer shape or selector needs indexers: pass indexers='fresh' or a file")
        return None, None
    path = resolve_indexers(indexers)
    if shape and path is not None:
        raise ValueError(f"an indexer shape ({shape}) applies to fresh indexers only; {path} fixes its own shape")
    weights, base = {**SMOLLM2_INDEXER, **(shape or {})}, SMOLLM2_SELECTOR
    if path is not None:
        stored = read_indexer_file(path)
        weights = {k: v for k, v in stored.weights.items() if k not in ("hidden_size", "q_input_dim")}
        base = stored.selector
    if isinstance(selector, Selector):
        chosen = selector
    else:
        chosen = base.replace(**selector) if selector else base
    return path, {**weights, **chosen.as_dict()}


def smollm2(indexers: str | pathlib.Path | None = "shipped", *, dtype=jnp.float32, progress: bool = True,
            shape: dict | None = None, **selector) -> tuple[LlamaForCausalLM, object]:
    """(model, tokenizer): SmolLM2-135M-Instruct with DSA retrofitted.

    ``indexers``: ``"shipped"`` (the distilled weights in ``models/weights``), ``"fresh"`` (new indexers of
    shape ``SMOLLM2_INDEXER``, or ``shape``'s ``n_heads`` / ``head_dim`` / ``rope_dim``, to distil) or an
    indexers file (its metadata fixes the shape); see ``indexer_spec``. The selector is the file's (DSA
    top-256 for fresh indexers); ``selector`` fields change it, e.g. ``method="hisa", block_size=64,
    num_blocks=16``. ``models.load("smollm2", ...)`` is the same for every source.
    """
    path, indexer = indexer_spec(indexers, shape, selector)
    model, tokenizer = load_smollm2(dtype=dtype, indexer=indexer, progress=progress)
    if path is not None:
        load_indexers(model, path)
    return model, tokenizer
