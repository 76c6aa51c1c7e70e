"""Tiny random HF checkpoints (saved by transformers 5.23) shared by the model and IndexCache tests."""

from __future__ import annotations

import pathlib

import pytest

torch = pytest.importorskip("torch", reason="these tests build HF checkpoints with torch (pip install -e '.[parity]')")
transformers = pytest.importorskip("transformers", reason="these tests need transformers 5.23")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_attention_heads=4,
              num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
              kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16,
              num_experts_per_tok=2, first_k_dense_replace=1, index_topk=4, index_head_dim=16, index_n_heads=16,
              max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)
FAMILIES = {
    "deepseek_v32": (transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM, dict(
        num_hidden_layers=3, n_group=2, topk_group=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0})),
    "glm_moe_dsa": (transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM, dict(
        num_hidden_layers=4, n_group=1, topk_group=1, rms_norm_eps=1e-5,
        indexer_types=["full", "full", "shared", "full"],
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
}


def hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()


def save_tiny(folder: pathlib.Path, family: str = "deepseek_v32", seed: int = 0, **overrides) -> pathlib.Path:
    hf_model(family, seed, **overrides).save_pretrained(folder)
    return folder
