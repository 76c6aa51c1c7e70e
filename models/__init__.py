"""Models: DeepSeek-V3.2 and GLM-5 in Flax NNX, loaded from HF checkpoints without torch; the Llama family
with DSA retrofitted (``llama``, ``retrofit``); the shared layer loop (``causal_lm``)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.sharding import param_sharding
from sparse_index_jax.models.causal_lm import CausalLMOutput, generate
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.models.convert.loader import is_converted, load_converted, load_hf_checkpoint, save_converted
from sparse_index_jax.models.convert.safetensors_reader import CheckpointError
from sparse_index_jax.models.deepseek import DSAForCausalLM
from sparse_index_jax.selection.methods import Selector

__all__ = ["CausalLMOutput", "CheckpointError", "DSAForCausalLM", "ModelConfig", "from_pretrained", "generate",
           "convert", "parameter_count"]


def from_pretrained(path: str | pathlib.Path, dtype=None, *, mesh=None, progress: bool = True,
                    index_pattern: str | None = None, selector: Selector | dict | None = None,
                    prefill_chunk: int | None = None) -> DSAForCausalLM:
    """Loads a DeepSeek-V3.2 (``deepseek_v32``) or GLM-5 (``glm_moe_dsa``) model.

    ``path`` is an HF checkpoint folder (config.json + safetensors, single or sharded, bf16/fp32 or FP8 with
    block scales) or a folder written by ``convert``. ``dtype`` is the compute and storage dtype of the
    weights (default: bfloat16 for HF checkpoints, the converted dtype for converted folders); the
    indexer's LayerNorm and head-weight projection and the MoE router stay float32.

    ``index_pattern`` ("F"/"S" per layer) bakes an IndexCache pattern in: S layers reuse the last F
    layer's selection and their indexer weights are not loaded. ``selector`` (a ``Selector``, or its
    fields such as ``{"method": "hisa", "block_size": 128, "num_blocks": 64}``) is the F layers' default
    (HF checkpoints only: a converted folder keeps what it was converted with; any model also takes
    ``selector=`` per call).

    ``prefill_chunk``: every layer runs its query side (query projections, sparse MLA, output projection)
    that many queries at a time (``MLAConfig.prefill_chunk``), so a long prefill never holds the absorbed
    query [T, heads, 576] whole; None: all at once.

    ``mesh`` (``sparse_index_jax.layers.sharding.make_mesh``): every parameter is placed on its shards as
    it is read, by the logical-axis rules of ``sparse_index_jax.layers.sharding``; no device ever holds the
    whole model unless the rules replicate it.
    """
    sharding = param_sharding(mesh) if mesh is not None else None
    if is_converted(path):
        if index_pattern is not None or selector is not None:
            raise ValueError(f"{path} is a converted folder: index_pattern / selector apply when loading an HF "
                             f"checkpoint (convert again, or call the model with index_pattern=...)")
        return load_converted(path, dtype=dtype, sharding=sharding, prefill_chunk=prefill_chunk)
    return load_hf_checkpoint(path, dtype=dtype or jnp.bfloat16, sharding=sharding, progress=progress,
                              index_pattern=index_pattern, selector=selector, prefill_chunk=prefill_chunk)


def convert(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, dtype=jnp.bfloat16, progress: bool = True,
            mesh=None) -> pathlib.Path:
    """Converts an HF checkpoint once into an Orbax checkpoint that ``from_pretrained`` restores directly.
    With ``mesh`` the weights are sharded while read (the whole model never sits on one device)."""
    sharding = param_sharding(mesh) if mesh is not None else None
    model = load_hf_checkpoint(hf_dir, dtype=dtype, progress=progress, sharding=sharding)
    return save_converted(model, hf_dir, out_dir)


def parameter_count(path: str | pathlib.Path) -> int:
    """Parameters of the DeepSeek-V3.2 / GLM-5 model a checkpoint folder describes (counted without loading)."""
    abstract = nnx.eval_shape(lambda: DSAForCausalLM(ModelConfig.from_pretrained(path), rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
