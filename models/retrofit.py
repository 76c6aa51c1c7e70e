"""DSA retrofitted onto a pretrained Llama-family model: the indexers' weights file, and the SmolLM2 preset.

Only the indexers are new; the base model's weights stay as shipped. The indexers' weights go in one small
safetensors file (float16) whose metadata holds the indexer shape (``IndexerConfig`` fields) and how the
weights were made; ``load_indexers`` checks the shape against the model before filling anything in.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert.gguf import load_smollm2
from models.llama import LlamaForCausalLM

# The SmolLM2-135M retrofit: 6 heads x 32 dims (16 of them rotary), top-256; ~4M parameters over 30 layers.
SMOLLM2_INDEXER = {"n_heads": 6, "head_dim": 32, "rope_dim": 16, "topk": 256}
SMOLLM2_INDEXERS = pathlib.Path(__file__).parent / "weights" / "smollm2_135m_indexers.safetensors"
# The fields that fix the weights' shapes and meaning; the selector (method, topk, options) may change freely.
_SHAPE_FIELDS = ("n_heads", "head_dim", "rope_dim", "rope_layout", "norm_eps", "use_hadamard", "fp8")


def _indexer_params(model: LlamaForCausalLM) -> dict[str, nnx.Variable]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.PathContains("indexer"))))
    return {".".join(map(str, path)): var for path, var in flat}


def save_indexers(model: LlamaForCausalLM, path: str | pathlib.Path, info: dict | None = None) -> pathlib.Path:
    """Writes every layer's indexer weights (float16) with the indexer config and ``info`` as metadata."""
    from safetensors.numpy import save_file

    if model.cfg.indexer is None:
        raise ValueError("save_indexers: this model has no indexers")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(var.get_value(), np.float16) for name, var in _indexer_params(model).items()}
    meta = {"indexer": json.dumps(dataclasses.asdict(model.cfg.indexer)), "info": json.dumps(info or {}),
            "num_layers": str(model.cfg.num_hidden_layers)}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_indexer_file(path: str | pathlib.Path) -> tuple[dict, dict]:
    """(indexer config fields, info) stored in an indexers file."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"indexer weights {path} do not exist (distil them: sparse-index distill --model "
                                f"smollm2 ...)")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if "indexer" not in meta:
        raise ValueError(f"{path} is not an indexers file written by save_indexers (no 'indexer' metadata)")
    return json.loads(meta["indexer"]), json.loads(meta.get("info", "{}"))


def load_indexers(model: LlamaForCausalLM, path: str | pathlib.Path) -> dict:
    """Fills the model's indexers from ``path``; the shapes must match. Returns the file's info."""
    from safetensors.numpy import load_file

    stored, info = read_indexer_file(path)
    ix = model.cfg.indexer
    if ix is None:
        raise ValueError("load_indexers: the model has no indexers; build it with the file's indexer config")
    wrong = {f: (stored.get(f), getattr(ix, f)) for f in _SHAPE_FIELDS if stored.get(f) != getattr(ix, f)}
    if wrong:
        raise ValueError(f"{path}: indexer {', '.join(f'{f}={a!r} (model: {b!r})' for f, (a, b) in wrong.items())}")
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
    return info


def smollm2(indexers: str | pathlib.Path | None = SMOLLM2_INDEXERS, *, dtype=jnp.float32, progress: bool = True,
            **selector):
    """(model, tokenizer): SmolLM2-135M-Instruct with DSA retrofitted.

    ``indexers``: a weights file (default: the distilled ones shipped in ``models/weights``), or None for
    freshly initialised indexers of shape ``SMOLLM2_INDEXER`` (to distil). ``selector`` overrides the selector
    fields of the indexer config, e.g. ``method="hisa", block_size=64, num_blocks=16`` or ``topk=512``.
    """
    fields = dict(SMOLLM2_INDEXER)
    if indexers is not None:
        stored, _ = read_indexer_file(indexers)
        fields = {k: v for k, v in stored.items() if k not in ("hidden_size", "q_input_dim")}
    model, tokenizer = load_smollm2(dtype=dtype, indexer={**fields, **selector}, progress=progress)
    if indexers is not None:
        load_indexers(model, indexers)
    return model, tokenizer
