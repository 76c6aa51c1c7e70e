"""Generation with decode caches (models/generation.py) on a tiny Llama-family model with DSA retrofitted.

The contract: decoding with caches equals recomputing the whole sequence, for dense attention and every
selector (and an IndexCache pattern); ragged prompts decode as they would alone; ``stream`` gives
``generate``'s tokens; sampling follows temperature / top-k / top-p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_index_jax import models
from sparse_index_jax.models.generation import Sampling, next_tokens
from sparse_index_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sparse_index_jax.selection import Selector

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, eos_token_id=(5,))

# topk 6 of up to 24 keys, so every selector really prunes; blocks of 4 make HISA / MISA pool partial blocks
SELECTORS = {
    "dense": None,
    "dsa": Selector("dsa", 6),
    "hisa": Selector.create("hisa", 6, block_size=4, num_blocks=3),
    "misa": Selector.create("misa", 6, block_size=4, active_heads=2),
    "misa_h": Selector.create("misa_h", 6, block_size=4, active_heads=1, candidates=9),
}


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    cfg = LlamaConfig(**TINY).with_indexer(n_heads=3, head_dim=8, rope_dim=4, topk=6)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))


def _call(selector, pattern=None):
    return dict(dense=selector is None, selector=selector, index_pattern=pattern)


@nnx.jit(static_argnames=("selector", "pattern"))
def _full_logits(model, ids, selector, pattern):
    return model(ids, **_call(selector, pattern)).logits


@nnx.jit(static_argnames=("selector", "pattern"))
def _cached_logits(model, ids, caches, selector, pattern):
    out = model(ids, caches=caches, **_call(selector, pattern))
    return out.logits, out.caches


@pytest.mark.parametrize("name,pattern", [*((n, None) for n in SELECTORS), ("dsa", "FSF")])
def test_cached_decoding_equals_recomputing(model, name, pattern):
    selector = SELECTORS[name]
    ids = jax.random.randint(jax.random.key(0), (2, 22), 0, TINY["vocab_size"])
    full = _full_logits(model, ids, selector, pattern)
    caches = model.init_caches(2, 24, selector)
    logits, caches = _cached_logits(model, ids[:, :7], caches, selector, pattern)  # a prefill, then chunks of 1 and 3
    steps = [logits]
    for start, stop in [(7, 8), (8, 11), *((t, t + 1) for t in range(11, 22))]:
        logits, caches = _cached_logits(model, ids[:, start:stop], caches, selector, pattern)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)
    assert np.asarray(caches[0].lengths).tolist() == [22, 22]


def _greedy_by_recomputing(model, prompts, n, selector) -> list[list[int]]:
    """Greedy tokens from whole-sequence forwards (no cache) over one fixed buffer: attention is causal, so
    the tokens after position t (padding, or not yet chosen) cannot change the logits at t."""
    buffer = np.zeros((len(prompts), max(map(len, prompts)) + n), np.int32)
    for b, p in enumerate(prompts):
        buffer[b, : len(p)] = p
    ends = np.array([len(p) for p in prompts])
    for step in range(n):
        logits = np.asarray(_full_logits(model, jnp.asarray(buffer), selector, None))
        rows = np.arange(len(prompts))
        buffer[rows, ends + step] = logits[rows, ends + step - 1].argmax(-1)
    return [buffer[b, e: e + n].tolist() for b, e in enumerate(ends)]


@pytest.mark.parametrize("name", ["dense", "dsa", "hisa", "misa_h"])
def test_ragged_batch_generates_what_each_prompt_generates_alone(model, name):
    selector = SELECTORS[name]
    prompts = [[3, 14, 15, 92, 65, 35, 89], [7, 9], [23, 84, 62, 64]]
    out = models.generate(model, prompts, 6, stop_tokens=(), selector=selector, dense=selector is None)
    assert out.sequences.shape == (3, 7 + 6)
    assert out.prompt_lengths.tolist() == [7, 2, 4] and out.lengths.tolist() == [13, 8, 10]
    assert out.new_tokens() == _greedy_by_recomputing(model, prompts, 6, selector)
    for prompt, row in zip(prompts, out.sequences):
        assert row[: len(prompt)].tolist() == prompt
        assert (row[len(prompt) + 6:] == 0).all()  # padding after the row's end


def test_stop_tokens_end_a_row_and_the_rest_go_on(model):
    prompts = [[3, 14, 15], [7, 9, 11]]
    free = models.generate(model, prompts, 5, stop_tokens=())
    stop = free.new_tokens()[0][1]  # row 0's second token
    assert stop not in free.new_tokens()[1][:4], "pick prompts whose rows differ"
    out = models.generate(model, prompts, 5, stop_tokens=(stop,), pad_id=96)
    row0 = out.new_tokens()[0]
    assert row0 == free.new_tokens()[0][: row0.index(stop) + 1]  # ends at its first stop token, which it keeps
    assert (out.sequences[0, out.lengths[0]:] == 96).all()
    assert out.new_tokens()[1] == free.new_tokens()[1][: len(out.new_tokens()[1])]
    # every row stopped: the loop ends early on the device
    both = models.generate(model, [[3, 14, 15]] * 2, 50, stop_tokens=(stop,))
    assert both.lengths.tolist() == [3 + row0.index(stop) + 1] * 2


def test_default_stop_token_is_the_models_eos(model):
    out = models.generate(model, [[1, 2, 3]], 40)
    new = out.new_tokens()[0]
    assert 5 not in new[:-1] and (len(new) == 40 or new[-1] == 5)


def test_stream_yields_generates_tokens(model):
    prompts = [[3, 14, 15, 92, 65], [7, 9]]
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=3)
    out = models.generate(model, prompts, 7, sampling=sampling, selector=SELECTORS["hisa"])
    got = [[], []]
    for tokens, new in models.stream(model, prompts, 7, sampling=sampling, selector=SELECTORS["hisa"]):
        for b in np.flatnonzero(new):
            got[b].append(int(tokens[b]))
    assert got == out.new_tokens()


def test_sampling_is_seeded_and_follows_its_filters(model):
    prompts = [[3, 14, 15]] * 4
    a = models.generate(model, prompts, 8, sampling=Sampling(temperature=1.0, seed=0), stop_tokens=())
    b = models.generate(model, prompts, 8, sampling=Sampling(temperature=1.0, seed=0), stop_tokens=())
    c = models.generate(model, prompts, 8, sampling=Sampling(temperature=1.0, seed=1), stop_tokens=())
    assert a.new_tokens() == b.new_tokens() != c.new_tokens()
    assert len({tuple(r) for r in a.new_tokens()}) > 1, "rows of one batch draw independently"
    greedy = models.generate(model, prompts[:1], 8, stop_tokens=()).new_tokens()
    narrow = Sampling(temperature=2.0, top_k=1, seed=5)  # top_p's nucleus: test_next_tokens_draws_only_...
    assert models.generate(model, prompts[:1], 8, sampling=narrow, stop_tokens=()).new_tokens() == greedy


def test_next_tokens_draws_only_from_the_top_p_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k: next_tokens(logits, k, Sampling(temperature=1.0, top_p=0.7))[0])(keys)
    counts = np.bincount(np.asarray(draw), minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0  # 0.5 + 0.3 reach 0.7: tokens 2, 3 are cut
    draw = jax.vmap(lambda k: next_tokens(logits, k, Sampling(temperature=1.0, top_k=3))[0])(keys)
    counts = np.bincount(np.asarray(draw), minlength=4)
    assert counts[3] == 0 and counts[2] > 0


@pytest.mark.parametrize("call,message", [
    (lambda m: models.generate(m, [[1, 2], []], 3), "at least one token"),
    (lambda m: models.generate(m, [[1, 97]], 3), "outside the model's vocabulary"),
    (lambda m: models.generate(m, [[1, 2]], 0), "max_new_tokens"),
    (lambda m: models.generate(m, [[1.5, 2.0]], 3), "token ids"),
    (lambda m: Sampling(top_p=0.0), "top_p"),
    (lambda m: Sampling(temperature=-1.0), "temperature"),
])
def test_bad_arguments_are_named(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def test_a_cache_for_another_selector_is_refused(model):
    caches = model.init_caches(1, 8, SELECTORS["dsa"])
    with pytest.raises(ValueError, match="pools key blocks"):
        model(jnp.asarray([[1, 2]]), caches=caches, selector=SELECTORS["hisa"])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_generate_command_streams_from_a_folder_with_a_chat_template(tmp_path, monkeypatch, capsys):
    """``sparse-index generate`` on an HF Llama folder: the chat template applied (or not, --raw), the prompt
    from the argument or stdin, dense without indexers, a selector with fresh ones."""
    import io
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers

    from sparse_index_jax.cli import main

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(tok_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    hf.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))

    assert main(["generate", "hi", "--model", str(tmp_path), "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    chat = len(tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").ids)
    assert f"{chat} prompt tokens, dense, greedy" in err and "[5 tokens in" in err

    monkeypatch.setattr("sys.stdin", io.StringIO("hello"))
    assert main(["generate", "--model", str(tmp_path), "--raw", "--indexers", "fresh", "--topk", "4",
                 "--max-new-tokens", "3", "--temperature", "0.7", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "5 prompt tokens, dsa top-4, sampling T=0.7" in err and "[3 tokens in" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi", "--model", str(tmp_path), "--raw", "--system", "be brief"])
    assert exit_info.value.code == 2 and "--system needs a chat template" in capsys.readouterr().err
