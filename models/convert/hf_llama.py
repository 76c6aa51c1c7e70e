"""HF safetensors checkpoints of the Llama family (``llama``, ``qwen2``, ``mistral``) -> ``LlamaForCausalLM``.

``config.json`` -> ``LlamaConfig.from_hf_config`` (GQA, ``head_dim``, tied heads, RoPE scaling, qwen2's q/k/v
biases, llama's ``attention_bias``); tensors through ``CheckpointReader`` (no torch; one file or the shards of
``model.safetensors.index.json``; fp32, bf16, fp16). HF names map one to one onto the NNX paths
(``model.layers.N.self_attn.q_proj.weight`` -> ``layers[N].self_attn.q_proj.kernel``, transposed; biases and
norms copied). Every parameter's shape is checked from the headers before a byte of data is read, and every
tensor must have a place: only a tied model's ``lm_head.weight`` (HF ignores it too) and old
``rotary_emb.inv_freq`` buffers are skipped. Retrofitted indexers (``indexer=``) are not in the checkpoint:
they start fresh from ``seed`` (``fresh_indexers``).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.indexer import LightningIndexer
from sparse_index_jax.models.convert.loader import place_slices, progress_bar
from sparse_index_jax.models.convert.safetensors_reader import CheckpointError, CheckpointReader
from sparse_index_jax.models.llama import LlamaConfig, LlamaForCausalLM


def read_config(path: str | pathlib.Path) -> dict:
    """The ``config.json`` of a checkpoint folder as a dictionary (errors name the file)."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected an HF checkpoint or a converted model folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None


def checkpoint_dtype(cfg: dict):
    """The dtype a checkpoint is computed in when none is asked for: float32 if it was saved so, else bfloat16."""
    saved = cfg.get("dtype") or cfg.get("torch_dtype")
    return jnp.float32 if saved == "float32" else jnp.bfloat16


def hf_llama_name(path: tuple) -> tuple[str, bool]:
    """(HF tensor name, transposed?) of one NNX parameter path of ``LlamaForCausalLM`` (indexers excluded)."""
    parts = [str(p) for p in path]
    top = {("embed_tokens", "embedding"): "model.embed_tokens.weight", ("norm", "weight"): "model.norm.weight",
           ("lm_head", "kernel"): "lm_head.weight"}
    if tuple(parts) in top:
        return top[tuple(parts)], parts[0] == "lm_head"
    if parts[0] != "layers" or "indexer" in parts:
        raise KeyError(f"no checkpoint name for parameter {'.'.join(parts)}")
    leaf = {"kernel": "weight", "bias": "bias", "weight": "weight"}[parts[-1]]
    return f"model.layers.{parts[1]}.{'.'.join(parts[2:-1])}.{leaf}", parts[-1] == "kernel"


def fresh_indexers(cfg: LlamaConfig, seed: int = 0) -> dict[tuple, jax.Array]:
    """New indexer parameters (float32, as ``LlamaAttention`` keeps them) for every layer of ``cfg``, keyed by
    their path in ``LlamaForCausalLM``; layer i draws from ``nnx.Rngs(seed + i)``. Built one small indexer at a
    time, so a retrofit never initialises the base weights (eager: the ops compile once per shape and process,
    where a jitted initialiser would compile again for every config)."""
    out = {}
    for i in range(cfg.num_hidden_layers):
        indexer = LightningIndexer(cfg.indexer, cfg.rope, dtype=jnp.float32, param_dtype=jnp.float32,
                                   rngs=nnx.Rngs(seed + i))
        for path, var in nnx.to_flat_state(nnx.state(indexer, nnx.Param)):
            out[("layers", i, "self_attn", "indexer", *path)] = var.get_value()
    return out


def load_hf_llama(path: str | pathlib.Path, *, dtype=None, indexer: dict | None = None, sharding=None,
                  progress: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with an HF Llama-family checkpoint's weights.

    ``dtype``: compute and storage dtype (default: float32 if the checkpoint was saved so, else bfloat16).
    ``indexer`` (``IndexerConfig`` fields) retrofits a lightning indexer onto every layer, initialised from
    ``seed`` (distil it, or fill it with ``models.retrofit.load_indexers``). ``sharding(path, shape)`` places
    each parameter as it is read (each device reads only its slice), as ``models.convert.loader`` does.
    """
    path = pathlib.Path(path)
    raw = read_config(path)
    cfg = LlamaConfig.from_hf_config(raw)
    if indexer is not None:
        cfg = cfg.with_indexer(**indexer)
    dtype = dtype or checkpoint_dtype(raw)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
    flat = list(nnx.to_flat_state(state))
    fresh = fresh_indexers(cfg, seed) if cfg.indexer is not None else {}
    with CheckpointReader(path) as reader:
        plan = {}
        for param_path, var in flat:  # every name and shape from the headers before any data is read
            if param_path in fresh:
                continue
            name, transposed = hf_llama_name(param_path)
            stored = reader.info(name)[0]
            expected = tuple(var.get_value().shape)
            if (stored[::-1] if transposed else stored) != expected:
                raise CheckpointError(f"{reader.file_of(name)}: tensor {name!r} has shape {stored} (HF layout); the "
                                      f"{cfg.model_type} config needs {expected[::-1] if transposed else expected}")
            plan[param_path] = (name, transposed)
        skipped = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unexpected = sorted(n for n in reader.names() - {n for n, _ in plan.values()} - skipped
                            if not n.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise CheckpointError(f"{path}: {len(unexpected)} checkpoint tensor(s) the {cfg.model_type} model has no "
                                  f"place for: {', '.join(unexpected[:6])}. Is config.json the one it was saved with?")
        leaves = []
        for param_path, var in progress_bar(flat, progress, f"loading {path.name}"):
            shape, param_dtype = tuple(var.get_value().shape), var.get_value().dtype
            if param_path in fresh:
                value = fresh[param_path]
                array = value if sharding is None else jax.device_put(value, sharding(param_path, shape))
            else:
                name, transposed = plan[param_path]

                def read(index, name=name, transposed=transposed):
                    if transposed:
                        return reader.get_dequantized(name, None, index[::-1]).T
                    return reader.get_dequantized(name, None, index)

                if sharding is None:
                    array = jnp.asarray(read((slice(None),) * len(shape)), param_dtype)
                else:
                    array = place_slices(read, shape, param_dtype, sharding(param_path, shape))
            leaves.append((param_path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
