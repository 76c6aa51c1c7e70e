"""Distillation at length: the warm-up's KL a key chunk at a time and the sparse stage's over the slots (both
exact against the plain formulas, gradients included), the warm-up's memory linear in T (from XLA's compiled
memory analysis), and per-layer remat changing nothing but memory. No torch: the model is built from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_index_jax.kernels.candidate_topk import gathered_scores
from sparse_index_jax.kernels.dsa_topk.reference import index_scores
from sparse_index_jax.layers.dsa_attention import Teacher
from sparse_index_jax.layers.indexer import IndexerActivations
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.models.deepseek import DSAForCausalLM
from sparse_index_jax.training.distill import distill_losses, trainable
from sparse_index_jax.selection.contract import Selection
from sparse_index_jax.training.losses import dense_indexer_kl, indexer_kl, slot_indexer_kl

TINY = dict(model_type="deepseek_v32", vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, num_experts_per_tok=2,
            first_k_dense_replace=1, index_topk=4, index_head_dim=16, index_n_heads=4, n_group=1, topk_group=1)


def tiny_model(layers: int = 3) -> DSAForCausalLM:
    cfg = ModelConfig.from_hf_config({**TINY, "num_hidden_layers": layers})
    return DSAForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))


def dense_kl_reference(act: IndexerActivations, teacher: Teacher) -> jax.Array:
    """The same sum over rows, from the whole [T, S] probabilities (what the chunked form must equal)."""
    T = act.q.shape[1]
    logits = jnp.einsum("btgrd,bsgd->btgrs", teacher.q, teacher.k) * teacher.scale
    causal = jnp.tril(jnp.ones((T, T), bool))
    p = jnp.mean(jax.nn.softmax(jnp.where(causal[:, None, None], logits, -jnp.inf), axis=-1), axis=(2, 3))
    valid = jnp.broadcast_to(causal, p.shape)
    return indexer_kl([p], index_scores(act.q, act.k, act.w, act.k_scale), valid) * p.shape[0] * T


@pytest.mark.parametrize("chunks", [(8, 8), (5, 16), (64, 512), (7, 3)])
def test_dense_kl_in_chunks_equals_the_whole_formula(chunks):
    """Grouped teacher heads (2 groups of 3, as GQA), ragged query and key chunks, T not a multiple of either;
    the gradients reach the indexer's q, w and k and equal those of the [T, S] formula."""
    rng = np.random.default_rng(0)
    B, T, H, d = 2, 37, 4, 8
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    act = IndexerActivations(f32(B, T, H, d), f32(B, T, d), f32(B, T, H), jnp.asarray(rng.uniform(0.5, 2, (B, T)),
                                                                                           jnp.float32))
    teacher = Teacher(f32(B, T, 2, 3, 16), f32(B, T, 2, 16), 0.3)

    def chunked(q, w, k):
        total, rows = dense_indexer_kl(IndexerActivations(q, k, w, act.k_scale), teacher, query_chunk=chunks[0],
                                       key_chunk=chunks[1])
        assert rows == B * T
        return total

    def whole(q, w, k):
        return dense_kl_reference(IndexerActivations(q, k, w, act.k_scale), teacher)

    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(act.q, act.w, act.k)
    want, want_grads = jax.value_and_grad(whole, argnums=(0, 1, 2))(act.q, act.w, act.k)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b, name in zip(got_grads, want_grads, "qwk"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)


def test_dense_stage_of_the_model_equals_the_probability_formula():
    """The model's dense-stage KL (teacher = the MLA absorbed query over the latent rows, softmax scale included)
    equals the KL against the captured [B, T, T] probabilities; pattern FSF: layer 0 also serves layer 1."""
    model = tiny_model()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 19)))
    _, metrics = distill_losses(model, ids, ids, "FSF", "dense", kl_chunks=(4, 6))
    run = model.run_layers(model.embed(ids), index_pattern="FSF", dense=True, capture=True)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((19, 19), bool)), (2, 19, 19))
    want = 0.0
    for full, served in ((0, (0, 1)), (2, (2,))):
        act = run.attention[full].indexer
        scores = index_scores(act.q, act.k, act.w, act.k_scale)
        want += indexer_kl([run.attention[j].probs for j in served], scores, causal)
    np.testing.assert_allclose(float(metrics["indexer_kl"]), float(want), rtol=1e-5)


def warmup_temp_bytes(T: int) -> int:
    model = tiny_model(2)
    ids = jnp.zeros((1, T), jnp.int32)

    def grads(m):
        loss = lambda m: distill_losses(m, ids, ids, "FF", "dense", kl_chunks=(64, 128))[0]  # noqa: E731
        return nnx.grad(loss, argnums=nnx.DiffState(0, trainable("dense")))(m)

    return nnx.jit(grads).lower(model).compile().memory_analysis().temp_size_in_bytes


def test_warmup_memory_grows_linearly_in_length():
    """XLA's own figure for a warm-up step's buffers: doubling T doubles it (quadratic would quadruple), and at
    T = 2048 it is below what ONE [T, T] float32 array would take."""
    small, large = warmup_temp_bytes(1024), warmup_temp_bytes(2048)
    assert 1.6 < large / small < 2.4, (small, large)
    assert large < 2048 * 2048 * 4, large


def test_remat_changes_memory_not_gradients():
    """Per-layer remat (sparse stage, the model training too): the same loss and gradients."""
    model = tiny_model()
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 96, (2, 16)))

    def grads(remat):
        loss = lambda m: distill_losses(m, ids[:, :-1], ids[:, 1:], "FSF", "sparse", remat=remat)  # noqa: E731
        return nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, trainable("sparse", True)), has_aux=True))(model)

    (plain, plain_metrics), (remat, remat_metrics) = grads(False), grads(True)
    assert float(plain_metrics["loss"]) == pytest.approx(float(remat_metrics["loss"]), rel=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(remat)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_slot_kl_equals_the_gathered_formula(chunk):
    """The sparse stage's KL over the selected slots (gradients pulled back in the forward pass): -1 padding, a
    query with no slot, an fp8-style key scale; equal to ``indexer_kl`` over the gathered scores."""
    rng = np.random.default_rng(3)
    B, T, S, H, d, K = 2, 13, 20, 4, 8, 6
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, w = f32(B, T, H, d), f32(B, S, d), f32(B, T, H)
    k_scale = jnp.asarray(rng.uniform(0.5, 2, (B, S)), jnp.float32)
    idx = np.stack([np.stack([rng.choice(S, K, replace=False) for _ in range(T)]) for _ in range(B)])
    valid = rng.random((B, T, K)) < 0.8
    valid[0, 3] = False
    sel = Selection(jnp.asarray(np.where(valid, idx, -1), jnp.int32), jnp.asarray(valid))
    p = jnp.where(sel.valid, jax.nn.softmax(jnp.where(sel.valid, f32(B, T, K), -jnp.inf), -1), 0.0)

    def chunked(q, w, k):
        total, rows = slot_indexer_kl(IndexerActivations(q, k, w, k_scale), sel, p, query_chunk=chunk)
        return total / rows

    def whole(q, w, k):
        return indexer_kl([p], gathered_scores(q, w, k, k_scale, sel.indices), sel.valid)

    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(q, w, k)
    want, want_grads = jax.value_and_grad(whole, argnums=(0, 1, 2))(q, w, k)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for a, b, name in zip(got_grads, want_grads, "qwk"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=name)
