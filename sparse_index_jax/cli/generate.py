"""``sparse-index generate``: text from a model with DSA, streamed as it is decoded."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from sparse_index_jax.cli.arguments import add_selector_args, apply_selector_args, non_negative, positive

DESCRIPTION = (
    "Generates text with decode caches (KV, indexer keys and, for HISA / MISA, pooled block sums) and prints it as "
    "it comes. The prompt is the argument, or standard input when there is none (or it is '-'). When the "
    "tokenizer has a chat template (SmolLM2-Instruct's GGUF does) the prompt is sent as one user message; "
    "--raw sends it as is. Decoding stops at the model's end-of-sequence tokens or after --max-new-tokens. "
    "Sampling: --temperature 0 (default) is greedy; otherwise temperature, then --top-k, then --top-p, as HF "
    "transformers applies them; --seed fixes the draws. The first token's time includes compilation.")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with DSA (streamed; sampling; chat template)",
                       description=DESCRIPTION)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read standard input)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default), an HF folder (Llama / Qwen2 / Mistral with DSA retrofitted, or "
                        "DeepSeek-V3.2 / GLM-5), a converted folder, or a .gguf file")
    p.add_argument("--indexers", default="default",
                   help="Llama family: a file written by distill, 'shipped' (SmolLM2's distilled indexers) or 'fresh' "
                        "(random: use --dense). Default: shipped for smollm2; none for other Llama-family models, "
                        "which then run dense")
    p.add_argument("--max-new-tokens", **positive(default=128, help="tokens generated at most (default 128)"))
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", **non_negative(default=0, help="sample from the k most likely tokens (0: off)"))
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of probability p (1: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draws (default 0)")
    p.add_argument("--dense", action="store_true", help="dense attention: the model as it was, the baseline")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is the text to continue")
    p.add_argument("--system", default=None, help="a system message before the prompt (chat template only)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="weights dtype (default float32 for smollm2, bfloat16 otherwise)")
    add_selector_args(p, topk_help="keys per query (default: the model's)")
    p.set_defaults(func=run)


def chat_template(source: str) -> str | None:
    """The chat template a checkpoint ships: a GGUF's ``tokenizer.chat_template``, or an HF folder's
    ``tokenizer_config.json`` ``chat_template``; None when it has none."""
    from sparse_index_jax.models.convert.gguf import smollm2_path

    path = smollm2_path() if source == "smollm2" else pathlib.Path(source)
    if path.suffix == ".gguf":
        import gguf

        field = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
        return None if field is None else field.contents()
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def render_chat(template: str, messages: list[dict]) -> str:
    """The prompt text of ``messages`` under a Jinja chat template, ending with the assistant's turn opened."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token="", eos_token="")


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from sparse_index_jax import models

    prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("the prompt is empty: pass it as an argument or on standard input")
    dtype = args.dtype or ("float32" if args.model == "smollm2" else "bfloat16")
    indexers = args.indexers if models.family(args.model) == "llama" else None  # a DSA checkpoint brings its own
    model, tokenizer = models.load(args.model, indexers=indexers, dtype=jnp.dtype(dtype), progress=False)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer found (an HF folder needs tokenizer.json)")
    dense = args.dense or model.cfg.indexer is None  # a Llama-family model loaded without indexers
    if not dense:
        apply_selector_args(args, model)
    template = None if args.raw else chat_template(args.model)
    if template is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = render_chat(template, messages)
    elif args.system:
        raise ValueError("--system needs a chat template, and this tokenizer has none (or --raw was given)")
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    sampling = models.Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    how = "dense" if dense else f"{model.selector.method} top-{model.selector.topk}"
    print(f"[{args.model}: {len(ids)} prompt tokens, {how}, "
          f"{'greedy' if sampling.greedy else f'sampling T={args.temperature} top-k={args.top_k} top-p={args.top_p}'}]",
          file=sys.stderr)

    new, shown, start, first = [], "", time.perf_counter(), None
    for tokens, fresh in models.stream(model, [ids], args.max_new_tokens, sampling=sampling, dense=dense):
        if not fresh[0]:
            continue
        first = first or time.perf_counter() - start
        new.append(int(tokens[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    seconds = time.perf_counter() - start
    rest = max(len(new) - 1, 1)
    print(f"\n[{len(new)} tokens in {seconds:.1f} s: first after {first or 0:.1f} s (compilation included), then "
          f"{rest / max(seconds - (first or 0), 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
