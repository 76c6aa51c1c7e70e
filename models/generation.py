"""Generation with decode caches, for every causal LM here (DeepSeek-V3.2, GLM-5, the Llama family).

``generate`` runs the whole decode loop as one compiled ``lax.while_loop``: no host round trip per token,
and it stops on the device once every row has. ``stream`` runs the same step one call at a time and
yields each step's tokens one step late, so the device is already computing the next token while the
host prints the last one. Both give the same tokens for the same arguments (the random key of step t is
``fold_in(seed, t)``).

Ragged prompts in one batch, as Meta's reference Llama decoder does it: the prompts are prefilled up to
the shortest one's length, then every step feeds each row its next prompt token while it has one and a
generated token after. Nothing is padded inside the caches, so every row decodes exactly as it would
alone (and ``tests/test_generation.py`` checks that cached decoding equals recomputing the sequence).

Sampling follows HF transformers' logits processors in this order: temperature, top-k, top-p. A
temperature of 0 is greedy decoding (vLLM's convention).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.selection.methods import Selector


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0: greedy (argmax); otherwise logits / temperature,
    then ``top_k`` (0: off) keeps the k most likely tokens, ``top_p`` (1.0: off) the smallest set of most
    likely tokens whose probability reaches top_p; ``seed`` fixes the draws."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"Sampling.top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1] (1: off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] -> the next token per row [B] int32, by ``sampling``."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)  # the first token is always kept
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generation(NamedTuple):
    """``sequences`` [B, P + n]: each row's prompt then its new tokens, padded with ``pad_id`` after
    ``lengths[b]`` (which counts prompt and new tokens, a stop token included); ``prompt_lengths`` [B]."""

    sequences: np.ndarray
    prompt_lengths: np.ndarray
    lengths: np.ndarray

    def new_tokens(self) -> list[list[int]]:
        """Each row's generated tokens (a stop token, when one ended the row, included)."""
        return [row[p:n].tolist() for row, p, n in zip(self.sequences, self.prompt_lengths, self.lengths)]


class _State(NamedTuple):
    t: jax.Array          # position of the token this step chooses
    caches: tuple
    logits: jax.Array     # [B, V] the model's prediction for position t
    tokens: jax.Array     # [B, P + n] prompts then chosen tokens
    lengths: jax.Array    # [B] prompt + generated tokens so far
    done: jax.Array       # [B] the row has stopped


class _Run(NamedTuple):
    """One call's model (split once: a static graph definition and its parameters) and fixed inputs."""

    graphdef: object
    params: object
    prompt_lengths: jax.Array  # [B]
    stop: jax.Array            # [n] stop token ids (-1: none)
    key: jax.Array

    def args(self):
        return self.graphdef, self.params

    def inputs(self):
        return self.prompt_lengths, self.stop, self.key


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run needs besides the arrays (static under jit)."""

    sampling: Sampling
    max_new_tokens: int
    pad_id: int
    selector: Selector | None
    index_pattern: str | None
    dense: bool

    def call(self, model, ids, caches):
        # ids checked on the host (_setup) or chosen by the model; caches sized for every step: no host callbacks
        out = model(ids, caches=caches, selector=self.selector, index_pattern=self.index_pattern, dense=self.dense,
                    runtime_checks=False)
        return out.logits[:, -1], out.caches


def _step(model, state: _State, prompt_lengths, stop, key, plan: _Plan) -> _State:
    """Chooses the token at position t for every row (its prompt's while it has one), records it, feeds it."""
    t = state.t
    chosen = next_tokens(state.logits, jax.random.fold_in(key, t), plan.sampling)
    prompted = t < prompt_lengths
    token = jnp.where(prompted, state.tokens[:, t], jnp.where(state.done, plan.pad_id, chosen))
    generated = ~prompted & ~state.done
    tokens = state.tokens.at[:, t].set(token)
    lengths = state.lengths + generated
    done = state.done | (generated & (jnp.isin(token, stop) | (lengths >= prompt_lengths + plan.max_new_tokens)))
    logits, caches = plan.call(model, token[:, None], state.caches)
    return _State(t + 1, caches, logits, tokens, lengths, done)


# The compiled functions take the model split once (``nnx.split``: a static graph definition and its
# parameters): a per-token call then costs no walk over the module tree (tens of ms for a 30-layer model).

@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "start"))
def _prefill(graphdef, params, tokens, prompt_lengths, caches, *, start: int, plan: _Plan) -> _State:
    logits, caches = plan.call(nnx.merge(graphdef, params), tokens[:, :start], caches)
    B = tokens.shape[0]
    return _State(jnp.asarray(start, jnp.int32), caches, logits, tokens, prompt_lengths, jnp.zeros((B,), bool))


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _decode_all(graphdef, params, state: _State, prompt_lengths, stop, key, *, plan: _Plan) -> _State:
    end = state.tokens.shape[1]

    def body(s):
        return _step(nnx.merge(graphdef, params), s, prompt_lengths, stop, key, plan)

    return jax.lax.while_loop(lambda s: (s.t < end) & ~jnp.all(s.done), body, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _decode_one(graphdef, params, state: _State, prompt_lengths, stop, key, *, plan: _Plan) -> _State:
    return _step(nnx.merge(graphdef, params), state, prompt_lengths, stop, key, plan)


def _setup(model, prompts, max_new_tokens: int, *, sampling, stop_tokens, pad_id, selector, index_pattern, dense):
    """Checks the arguments and prefills; returns (plan, prefilled state, ``_Run``)."""
    rows = [np.asarray(p).reshape(-1) for p in prompts] if not hasattr(prompts, "ndim") else list(np.asarray(prompts))
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError("generate: need at least one prompt, each with at least one token")
    if any(not np.issubdtype(r.dtype, np.integer) for r in rows):
        raise ValueError(f"generate: prompts must be token ids (integers), got {rows[0].dtype}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    vocab = model.cfg.vocab_size
    ids = np.concatenate(rows)
    bad = ids[(ids < 0) | (ids >= vocab)][:3].tolist()
    if bad:
        raise ValueError(f"generate: token ids {bad} are outside the model's vocabulary [0, {vocab})")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"generate: pad_id={pad_id} is outside the model's vocabulary [0, {vocab}) (it is fed to "
                         f"the rows that have stopped)")
    lengths = np.array([r.size for r in rows], np.int32)
    tokens = np.full((len(rows), int(lengths.max()) + max_new_tokens), pad_id, np.int32)
    for b, r in enumerate(rows):
        tokens[b, : r.size] = r
    stop = tuple(model.cfg.eos_token_id if stop_tokens is None else stop_tokens)
    sampling = sampling or Sampling()
    # the seed only makes the key (traced): plans differing in it share one compilation
    plan = _Plan(dataclasses.replace(sampling, seed=0), max_new_tokens, int(pad_id), selector, index_pattern, dense)
    caches = model.init_caches(len(rows), tokens.shape[1], None if dense else selector)
    graphdef, params = nnx.split(model)
    state = _prefill(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), caches, start=int(lengths.min()),
                     plan=plan)
    stop_ids = jnp.asarray(stop or (-1,), jnp.int32)  # -1 matches no token
    run = _Run(graphdef, params, jnp.asarray(lengths), stop_ids, jax.random.key(sampling.seed))
    return plan, state, run


def generate(model, prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array, max_new_tokens: int, *,
             sampling: Sampling | None = None, stop_tokens: Sequence[int] | None = None, pad_id: int = 0,
             selector: Selector | None = None, index_pattern: str | None = None, dense: bool = False) -> Generation:
    """Up to ``max_new_tokens`` new tokens per prompt, with decode caches (``model.init_caches``).

    ``prompts``: a [B, T] array, or B token lists of any lengths. ``sampling`` (default greedy);
    ``stop_tokens`` end a row when generated (default: the model's EOS ids; ``()`` for none; the stop token
    is kept). ``selector`` / ``index_pattern`` / ``dense`` as for a model call. Returns a ``Generation``.
    """
    plan, state, run = _setup(model, prompts, max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                              pad_id=pad_id, selector=selector, index_pattern=index_pattern, dense=dense)
    state = _decode_all(*run.args(), state, *run.inputs(), plan=plan)
    return Generation(np.asarray(state.tokens), np.asarray(run.prompt_lengths), np.asarray(state.lengths))


def stream(model, prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array, max_new_tokens: int, *,
           sampling: Sampling | None = None, stop_tokens: Sequence[int] | None = None, pad_id: int = 0,
           selector: Selector | None = None, index_pattern: str | None = None,
           dense: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``generate``'s tokens as they come (same arguments): yields (tokens [B], new [B] bool) per step, ``new``
    marking the rows whose token is generated (not a prompt token, not padding after the row stopped)."""
    plan, state, run = _setup(model, prompts, max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                              pad_id=pad_id, selector=selector, index_pattern=index_pattern, dense=dense)
    prompt_lengths, end = np.asarray(run.prompt_lengths), state.tokens.shape[1]
    t, in_flight = int(prompt_lengths.min()), None  # the host counts steps itself: reading state.t would wait

    def read(t, done_before, after):
        return (np.asarray(after.tokens[:, t]), (t >= prompt_lengths) & ~np.asarray(done_before)), bool(
            jnp.all(after.done))

    while t < end:
        before, state = state, _decode_one(*run.args(), state, *run.inputs(), plan=plan)  # dispatched, not awaited
        if in_flight is not None:  # the step before: read while the device runs the one just dispatched
            step, finished = read(*in_flight)
            yield step
            if finished:
                return
        in_flight, t = (t, before.done, state), t + 1
    if in_flight is not None:
        yield read(*in_flight)[0]
