"""What ``sparse-index demo`` measures: SmolLM2-135M with DSA on held-out text, or one random DSA layer.

Each function returns a report (a dict); ``sparse_index_jax.cli.demo`` prints it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_index_jax.bench.model_fidelity import dense_layer_outputs, lm_loss_of, row_mean, shared_topk_mass
from sparse_index_jax.bench.timing import time_call
from sparse_index_jax.kernels import dsa_topk, sparse_mla
from sparse_index_jax.kernels.dsa_topk import index_scores
from sparse_index_jax.layers.config import DSAConfig, IndexerConfig, MLAConfig, RopeConfig
from sparse_index_jax.layers.dsa_attention import DSAAttention
from sparse_index_jax.models.generation import generate
from sparse_index_jax.selection import metrics
from sparse_index_jax.training.data import python_stdlib_files, read_tokens


def model_demo(model, tokenizer, *, seq_len: int, show_layer: int, new_tokens: int, prompt: str | None = None,
               context: int = 1024) -> dict[str, Any]:
    """The retrofitted model on held-out CPython sources: LM loss dense vs with its selector, the attention
    mass the selection keeps per layer against the best shared key set, one query's picks, and greedy
    continuations dense vs sparse."""
    selector = model.selector
    files = python_stdlib_files("heldout")
    tokens = read_tokens(files, tokenizer=tokenizer)[: seq_len + 1]
    T = len(tokens) - 1
    inputs, targets = jnp.asarray(tokens[None, :-1]), jnp.asarray(tokens[None, 1:])
    report: dict[str, Any] = {"files": [f.name for f in files[:2]], "tokens": T, "selector": selector.as_dict(),
                              "loss_dense": float(lm_loss_of(model, inputs, targets, dense=True)),
                              "loss_sparse": float(lm_loss_of(model, inputs, targets)),
                              "pair_share": min(selector.topk * T / (T * (T + 1) / 2), 1.0)}

    # Layer by layer: how much of the dense model's attention the selection keeps, against the best possible.
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    late = positions >= T // 2
    kept, best = [], []
    for i, attn in enumerate(dense_layer_outputs(model, inputs)):
        a = attn.indexer
        sel = selector.select(a.q, a.k, a.w, q_positions=positions)
        kept.append(row_mean(metrics.attention_mass_recall(sel, attn.probs), late))
        best.append(row_mean(shared_topk_mass(attn.probs, selector.topk), late))
        if i == show_layer:
            shown = np.asarray(sel.indices[0, T - 1])
            picked = sorted(int(p) for p in shown[shown >= 0][:8])
            report["picks"] = {"layer": i, "position": T - 1,
                               "keys": [(p, tokenizer.decode(tokens[p:p + 1].tolist())) for p in picked]}
    report["kept"], report["best"] = kept, best

    if new_tokens:
        # Default prompt: held-out text longer than top-k, so DSA really prunes while it generates.
        ids = tokenizer.encode(prompt).ids if prompt else tokens[:context].tolist()
        prompt_ids = np.array([ids])
        report["generation"] = {
            "prompt_tokens": len(ids), "prompt_tail": tokenizer.decode(ids[-24:]),
            **{name: tokenizer.decode(generate(model, prompt_ids, new_tokens, dense=dense,
                                               stop_tokens=()).new_tokens()[0])
               for name, dense in (("dense", True), ("DSA", False))}}
    return report


def layer_config(family: str, heads: int, topk: int, fp8: bool) -> DSAConfig:
    """A small DSA layer of the V3.2 (``half`` indexer RoPE) or GLM-5 (``interleaved``) family."""
    hidden, q_lora = 256, 128
    return DSAConfig(
        mla=MLAConfig(hidden_size=hidden, num_heads=8, q_lora_rank=q_lora, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, rope=RopeConfig(theta=10000.0)),
        indexer=IndexerConfig(hidden_size=hidden, q_input_dim=q_lora, n_heads=heads, head_dim=64, topk=topk,
                              rope_dim=16, rope_layout="interleaved" if family == "glm5" else "half",
                              use_hadamard=fp8, fp8=fp8))


def layer_demo(cfg: DSAConfig, *, batch: int, seq_len: int, seed: int, repeats: int,
               decode_steps: int) -> dict[str, Any]:
    """One random DSA layer: prefill time, what a few queries picked (with their scores), and decode
    through the cache checked against prefill."""
    layer = DSAAttention(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (batch, seq_len, cfg.mla.hidden_size), jnp.float32)
    graph, state = nnx.split(layer)
    timing, result = time_call(lambda state, x: nnx.merge(graph, state)(x), (state, x), repeats)
    sel = result.selection
    topk = cfg.indexer.topk
    report: dict[str, Any] = {
        "backends": {"dsa_topk": dsa_topk.backend_for().reason, "sparse_mla": sparse_mla.backend_for().name},
        "prefill": timing.as_dict(), "tokens_per_s": batch * seq_len / (timing.median_ms / 1e3),
        "indices_shape": tuple(sel.indices.shape), "counts": (int(sel.counts().min()), int(sel.counts().max())),
        "dense_rows": int(np.sum(np.arange(seq_len) < topk))}

    # What a few queries picked, with their scores, from the same activations the layer used.
    qr = layer.q_a_layernorm(layer.q_a_proj(x[:1]))
    act = layer.indexer(x[:1], qr, jnp.arange(seq_len, dtype=jnp.int32)[None])
    queries = []
    for t in sorted({min(topk, seq_len - 1), seq_len // 2, seq_len - 1}):
        picked = np.asarray(sel.indices[0, t])
        picked = picked[picked >= 0]
        scores = np.asarray(index_scores(act.q[:, t:t + 1], act.k[:, : t + 1], act.w[:, t:t + 1],
                                         None if act.k_scale is None else act.k_scale[:, : t + 1]))[0, 0]
        queries.append({"position": t, "picked": len(picked), "best": [(int(p), float(scores[p])) for p in picked[:6]],
                        "lowest_kept": float(scores[picked[-1]]),
                        "recent_share": float(np.mean(picked >= t - topk // 4))})
    report["queries"] = queries

    # Decode: the prompt through the cache, then one token at a time; the outputs must equal prefill's.
    steps = min(decode_steps, seq_len)
    prompt = seq_len - steps
    step = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    cache = layer.init_cache(batch, seq_len)
    if prompt:
        cache = step(layer, x[:, :prompt], cache).cache
    outs, before_last = [], cache
    for i in range(prompt, seq_len):
        before_last = cache
        r = step(layer, x[:, i:i + 1], cache)
        cache = r.cache
        outs.append(np.asarray(r.out))
    report["decode"] = {"steps": steps, "prompt": prompt}
    if steps:
        diff = np.abs(np.concatenate(outs, axis=1) - np.asarray(result.out[:, prompt:])).max()
        timing, _ = time_call(lambda state, x, cache: nnx.merge(graph, state)(x, cache=cache),
                              (state, x[:, -1:], before_last), repeats)  # the last step, timed
        report["decode"].update(max_abs_diff=float(diff), step=timing.as_dict())
    return report
