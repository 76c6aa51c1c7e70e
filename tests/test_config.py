"""Configs from HF config.json dictionaries, validation messages, and rotary frequencies."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_index_jax import DSAConfig, IndexerConfig, MLAConfig, RopeConfig
from sparse_index_jax.layers.rope import apply_rope, inverse_frequencies, rotary_cos_sin

V32_YARN = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
V32 = {"model_type": "deepseek_v32", "hidden_size": 7168, "num_attention_heads": 128, "q_lora_rank": 1536,
       "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
       "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, "rms_norm_eps": 1e-6}


def test_deepseek_v32_new_and_old_key_styles_agree():
    new = DSAConfig.from_hf_config({**V32, "rope_parameters": {**V32_YARN, "rope_theta": 10000.0}})
    old = DSAConfig.from_hf_config({**V32, "rope_theta": 10000.0, "rope_scaling": {**V32_YARN, "type": "yarn"}})
    assert new == old
    assert new.indexer.rope_layout == "half" and new.indexer.n_heads == 64 and new.indexer.q_input_dim == 1536
    # qk_head_dim^-0.5 * mscale^2 with mscale = 0.1 ln 40 + 1 (spec: ~0.1352)
    assert new.mla.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert new.mla.softmax_scale == pytest.approx(0.1352, abs=1e-4)
    assert new.mla.rope.attention_factor == pytest.approx(1.0)


def test_glm5_indexer_is_interleaved():
    glm = {**V32, "model_type": "glm_moe_dsa", "index_n_heads": 32, "q_lora_rank": 2048, "rope_theta": 1e6}
    cfg = DSAConfig.from_hf_config(glm)
    assert cfg.indexer.rope_layout == "interleaved" and cfg.indexer.n_heads == 32
    assert cfg.mla.rope.rope_type == "default" and cfg.mla.rope.theta == 1e6


@pytest.mark.parametrize("build, message", [
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, n_heads=0), "IndexerConfig.n_heads"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, head_dim=64, rope_dim=65), "IndexerConfig.rope_dim"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, rope_layout="neox"), "IndexerConfig.rope_layout"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, topk=-1), "IndexerConfig.topk"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, head_dim=96, use_hadamard=True), "power of two"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, method="flat"), "IndexerConfig.method"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, method="hisa", topk=64, block_size=8, num_blocks=4),
     "IndexerConfig.num_blocks"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, n_heads=4, method="misa", active_heads=5),
     "IndexerConfig.active_heads"),
    (lambda: IndexerConfig(hidden_size=8, q_input_dim=8, method="misa_h", topk=16, candidates=8),
     "IndexerConfig.candidates"),
    (lambda: MLAConfig(hidden_size=8, qk_rope_head_dim=3), "MLAConfig.qk_rope_head_dim"),
    (lambda: RopeConfig(theta=-1.0), "RopeConfig.theta"),
    (lambda: RopeConfig.from_hf_config({"rope_scaling": {"type": "longrope"}}), "RopeConfig.rope_type"),
    (lambda: IndexerConfig.from_hf_config({**V32, "model_type": "llama"}), "IndexerConfig.rope_layout"),
    (lambda: DSAConfig(mla=MLAConfig(hidden_size=8, q_lora_rank=4),
                       indexer=IndexerConfig(hidden_size=8, q_input_dim=8, rope_dim=64)), "indexer.q_input_dim"),
])
def test_invalid_values_name_the_field(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build()


def test_default_frequencies():
    inv = inverse_frequencies(RopeConfig(theta=10000.0), 8)
    np.testing.assert_allclose(inv, [10000.0 ** (-i / 8) for i in range(0, 8, 2)], rtol=1e-6)


def test_yarn_frequencies_interpolate_only_the_slow_dims():
    cfg = RopeConfig(theta=10000.0, rope_type="yarn", factor=40, original_max_position_embeddings=4096)
    plain = inverse_frequencies(RopeConfig(theta=10000.0), 64)
    yarn = inverse_frequencies(cfg, 64)
    # beta_fast = 32 rotations -> dims below floor(correction_dim(32)) untouched; beyond ceil(corr(1)): / factor
    corr = lambda rot: 64 * math.log(4096 / (rot * 2 * math.pi)) / (2 * math.log(10000.0))
    low, high = math.floor(corr(32)), math.ceil(corr(1))
    np.testing.assert_allclose(yarn[:low], plain[:low], rtol=1e-6)
    np.testing.assert_allclose(yarn[high:], plain[high:] / 40, rtol=1e-6)
    assert np.all((yarn[low:high] <= plain[low:high]) & (yarn[low:high] >= plain[low:high] / 40))


def test_rope_pairings_are_pinned():
    """half rotates (i, i + n/2); interleaved rotates (2i, 2i + 1); both keep element positions."""
    x = jnp.zeros((1, 4)).at[0, 0].set(1.0)
    angle = 0.3
    cos, sin = jnp.full((1, 2), math.cos(angle)), jnp.full((1, 2), math.sin(angle))
    half = np.asarray(apply_rope(x, cos, sin, "half"))[0]
    inter = np.asarray(apply_rope(x, cos, sin, "interleaved"))[0]
    np.testing.assert_allclose(half, [math.cos(angle), 0, math.sin(angle), 0], atol=1e-7)
    np.testing.assert_allclose(inter, [math.cos(angle), math.sin(angle), 0, 0], atol=1e-7)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_dot_products_depend_on_distance_only(layout):
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 16)), jnp.float32) for _ in range(2))
    cfg = RopeConfig(theta=500.0)

    def dot(tq, tk):
        cq, sq = rotary_cos_sin(cfg, jnp.array([tq]), 16)
        ck, sk = rotary_cos_sin(cfg, jnp.array([tk]), 16)
        return float(jnp.sum(apply_rope(q, cq, sq, layout) * apply_rope(k, ck, sk, layout)))

    assert dot(9, 4) == pytest.approx(dot(105, 100), rel=1e-4)
    assert dot(9, 4) != pytest.approx(dot(9, 5), rel=1e-4)


def test_model_config_key_styles_and_extras():
    from sparse_index_jax.models import ModelConfig

    base = {"model_type": "deepseek_v32", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "moe_intermediate_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 4,
            "kv_lora_rank": 4, "q_lora_rank": 4, "qk_rope_head_dim": 2, "v_head_dim": 2, "qk_nope_head_dim": 2,
            "num_experts_per_tok": 2, "first_k_dense_replace": 1, "some_future_key": [1, 2]}
    new = ModelConfig.from_hf_config({**base, "rope_parameters": {**V32_YARN, "rope_theta": 1e4}})
    old = ModelConfig.from_hf_config({**base, "rope_theta": 1e4, "rope_scaling": V32_YARN})
    assert new == old and new.rope.rope_type == "yarn"
    assert new.mlp_layer_types == ("dense", "sparse") and new.extra == {"some_future_key": [1, 2]}
    freq = ModelConfig.from_hf_config({**base, "num_hidden_layers": 6, "index_topk_freq": 2,
                                       "index_skip_topk_offset": 2})
    assert freq.indexer_types == ("full", "full", "shared", "full", "shared", "full")
    with pytest.raises(ValueError, match="ModelConfig.model_type"):
        ModelConfig.from_hf_config({**base, "model_type": "llama"})
    with pytest.raises(ValueError, match="ModelConfig.num_experts_per_tok"):
        ModelConfig.from_hf_config({**base, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="ModelConfig.vocab_size: missing"):
        ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "vocab_size"})
