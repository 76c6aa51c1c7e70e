"""``training.memory_plan`` and ``sparse-index plan``: the exact parts equal real shards on 8 devices, the
estimated parts scale as they should, the built-in configs load, and the command line runs and fails clearly.

Run as a script (with 8 forced host devices) this file prints the real per-device shard bytes of a tiny model
and of its optimizer state; ``test_exact_parts_equal_the_shards_on_eight_devices`` does that in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparse_index_jax.cli import main
from sparse_index_jax.models.config import ModelConfig
from sparse_index_jax.training.memory_plan import builtin_config, plan_memory

# Several experts and heads, so the tensor and expert axes really split leaves; data splits the hidden dim (FSDP).
TINY = dict(model_type="deepseek_v32", vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=2, topk_group=1, index_topk=4, index_head_dim=16, index_n_heads=16)
MESH = {"data": 2, "tensor": 2, "expert": 2}


def real_shard_bytes() -> dict[str, int]:
    """Per-device bytes of the tiny model's parameters, of its indexer parameters and of adamw's mu and nu, each
    leaf placed with ``sharding.param_sharding`` on a real 8-device mesh (needs 8 devices)."""
    import jax
    import optax
    from flax import nnx

    from sparse_index_jax.layers.sharding import make_mesh, param_sharding
    from sparse_index_jax.models.deepseek import DSAForCausalLM

    assert jax.device_count() == 8, jax.devices()
    sharding = param_sharding(make_mesh(**MESH))
    model = DSAForCausalLM(ModelConfig.from_hf_config(TINY), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.All(nnx.Param, nnx.PathContains("indexer")))
    params = dict(nnx.to_flat_state(nnx.state(model)))

    def on_one_device(path, value, param_path) -> int:
        return jax.device_put(value, sharding(param_path, value.shape)).addressable_shards[0].data.nbytes

    out = {"parameters": 0, "indexer_parameters": 0, "optimizer_state": 0}
    for path, variable in params.items():
        nbytes = on_one_device(path, variable.get_value(), path)
        out["parameters"] += nbytes
        out["indexer_parameters"] += nbytes if "indexer" in path and isinstance(variable, nnx.Param) else 0
    for path, variable in nnx.to_flat_state(nnx.state(optimizer)):
        if "mu" in path or "nu" in path:  # not adam's step counters
            param_path = next(path[i:] for i in range(len(path)) if path[i:] in params)
            out["optimizer_state"] += on_one_device(path, variable.get_value(), param_path)
    return out


def test_exact_parts_equal_the_shards_on_eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    real = json.loads(done.stdout.strip().splitlines()[-1])
    plan = plan_memory(ModelConfig.from_hf_config(TINY), MESH, seq_len=64, batch_size=2)
    for stage in ("dense", "sparse"):  # indexers alone train in both stages by default
        part = plan.stage(stage)
        assert part.parameters == real["parameters"]
        assert part.gradients == real["indexer_parameters"]
        assert part.optimizer_state == real["optimizer_state"] == 2 * real["indexer_parameters"]


def test_the_builtin_configs_load_with_their_parameter_counts():
    v32, glm5 = builtin_config("deepseek-v3.2"), builtin_config("glm-5")
    assert (v32.model_type, v32.num_hidden_layers, v32.hidden_size, v32.vocab_size, v32.index_n_heads) == (
        "deepseek_v32", 61, 7168, 129280, 64)
    assert v32.weight_block_size == (128, 128) and v32.rope.factor == 40 and v32.index_pattern == "F" * 61
    assert (glm5.model_type, glm5.num_hidden_layers, glm5.hidden_size, glm5.vocab_size, glm5.index_n_heads) == (
        "glm_moe_dsa", 78, 6144, 154880, 32)
    assert (glm5.qk_nope_head_dim, glm5.v_head_dim, glm5.q_lora_rank, glm5.rope.theta) == (192, 256, 2048, 1e6)
    # DeepSeek-V3's 671,026,419,200 without MTP + the indexers; GLM-5's 744B without its MTP layer
    assert plan_memory(v32, {}, seq_len=4096, batch_size=1).parameter_count == 671_877_944_064
    assert plan_memory(glm5, {}, seq_len=4096, batch_size=1).parameter_count == 743_911_218_432


def test_activations_scale_with_the_sequence_and_remat_and_train_base_act_as_expected():
    cfg, mesh = builtin_config("deepseek-v3.2"), {"data": 2, "tensor": 4, "expert": 8}
    short, long = (plan_memory(cfg, mesh, seq_len=n, batch_size=2) for n in (32768, 65536))
    for stage in ("dense", "sparse"):
        for part in ("activations_remat", "activations_no_remat", "selection_buffers"):
            ratio = getattr(long.stage(stage), part) / getattr(short.stage(stage), part)
            assert 1.8 < ratio < 2.2, (stage, part, ratio)
        assert long.stage(stage).parameters == short.stage(stage).parameters  # exact parts ignore the length
    for train_base in (False, True):
        plan = plan_memory(cfg, mesh, seq_len=32768, batch_size=2, train_base=train_base)
        for part in plan.stages:
            assert part.total(remat=True) < part.total(remat=False)
    base = plan_memory(cfg, mesh, seq_len=32768, batch_size=2, train_base=True)
    assert base.stage("sparse").optimizer_state > 10 * short.stage("sparse").optimizer_state
    assert base.stage("dense").optimizer_state == short.stage("dense").optimizer_state  # the warm-up: indexers
    assert plan_memory(cfg, mesh, seq_len=32768, batch_size=2, optimizer="sgd").stage("sparse").optimizer_state == 0


def test_the_plan_splits_the_batch_sequence_and_model_over_the_mesh():
    cfg = builtin_config("glm-5")
    one = plan_memory(cfg, {"tensor": 8, "expert": 8}, seq_len=8192, batch_size=4, stage="sparse")
    more_data = plan_memory(cfg, {"data": 4, "tensor": 8, "expert": 8}, seq_len=8192, batch_size=4, stage="sparse")
    more_context = plan_memory(cfg, {"context": 4, "tensor": 8, "expert": 8}, seq_len=8192, batch_size=4,
                               stage="sparse")
    assert [p.stage for p in one.stages] == ["sparse"]
    assert more_data.stage("sparse").parameters < one.stage("sparse").parameters / 3  # data shards them (FSDP)
    assert more_context.stage("sparse").parameters == one.stage("sparse").parameters  # context replicates them
    for split in (more_data, more_context):
        assert 3.5 < one.stage("sparse").activations_remat / split.stage("sparse").activations_remat <= 4
    smaller_model = plan_memory(cfg, {"tensor": 4, "expert": 8}, seq_len=8192, batch_size=4, stage="sparse")
    assert smaller_model.stage("sparse").parameters > one.stage("sparse").parameters
    assert one.fits(one.total) and not one.fits(one.total - 1)


@pytest.mark.parametrize("model", ["deepseek-v3.2", "glm-5"])
def test_the_command_prints_the_table_and_whether_it_fits(capsys, model):
    assert main(["plan", "--model", model, "--mesh", "tensor=8,expert=8", "--seq-len", "4K", "--batch-size", "1",
                 "--device-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    for line in ("parameters (exact)", "optimizer state (exact)", "activations, remat per layer",
                 "activations, no remat", "selection buffers", "total, remat per layer", "total, no remat"):
        assert line in out, line
    assert "fits in 131.32 GiB with remat per layer: yes (headroom" in out


def test_the_command_reads_a_config_file_or_folder(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    for source in (tmp_path, tmp_path / "config.json"):
        assert main(["plan", "--model", str(source), "--mesh", "data=2", "--seq-len", "256", "--batch-size", "2",
                     "--stage", "dense", "--device-memory", "1G", "--no-remat"]) == 0
        out = capsys.readouterr().out
        assert "dense warm-up" in out and "sparse stage" not in out
        assert "fits in 1.00 GiB without remat: yes" in out


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=2,tensr=4"], "AXIS=SIZE with AXIS in data, context, tensor, expert"),
    (["--mesh", "data=0"], "SIZE a positive integer"),
    (["--model", "deepseek-v4"], "neither a built-in model (deepseek-v3.2, glm-5)"),
    (["--mesh", "data=3"], "batch_size 2 does not split over data=3"),
    (["--device-memory", "lots"], "expected a size like 95G"),
    (["--pattern", "SF"], "layer 0 must be F"),
])
def test_bad_arguments_exit_2_with_a_clear_message(capsys, argv, message):
    base = {"--model": "glm-5", "--mesh": "tensor=8", "--seq-len": "1K", "--batch-size": "2"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as done:
        main(["plan", *(item for pair in base.items() for item in pair)])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


if __name__ == "__main__":
    print(json.dumps(real_shard_bytes()))
