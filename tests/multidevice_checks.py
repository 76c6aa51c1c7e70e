"""Checks that need 8 devices. Run by tests/test_multidevice.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (JAX fixes the device count at start-up)."""

from __future__ import annotations

import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from sparse_index_jax import Selection, select_topk  # noqa: E402
from sparse_index_jax.selection.context_parallel import select_topk_context_parallel  # noqa: E402
from sparse_index_jax.layers.sharding import make_mesh  # noqa: E402


def check_context_parallel_selection():
    """Every method, sharded keys vs one device: same indices, same validity, ragged lengths and positions."""
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    methods = {"dsa": {"key_chunk": 8}, "hisa": {"block_size": 4, "num_blocks": 4},
               "misa": {"block_size": 4, "active_heads": 2}, "misa_h": {"block_size": 4, "active_heads": 1,
                                                                         "candidates": 20}}
    for mesh in (make_mesh(context=8), make_mesh(data=2, context=4)):
        for integer in (True, False):
            B, T, S, H, d, topk = 2, 40, 64, 3, 8, 12
            draw = (lambda *s: rng.integers(-2, 3, s).astype(np.float32)) if integer else (
                lambda *s: rng.standard_normal(s).astype(np.float32))
            q, k, w = draw(B, T, H, d), draw(B, S, d), draw(B, T, H)
            kv = np.array([64, 37], np.int32)
            pos = rng.integers(-1, 70, (B, T)).astype(np.int32)
            for method, opts in methods.items():
                ref = select_topk(q, k, w, topk=topk, method=method, q_positions=pos, kv_lengths=kv, **opts)
                got = select_topk_context_parallel(q, k, w, topk=topk, method=method, mesh=mesh, q_positions=pos,
                                                   kv_lengths=kv, **opts)
                np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(ref.indices),
                                              err_msg=f"{method} {mesh.shape} integer={integer}")
                np.testing.assert_array_equal(np.asarray(got.valid), np.asarray(ref.valid))
    for bad, message in (({"k": k[:, :60]}, "must split evenly"),
                         ({"method": "hisa", "block_size": 16}, "whole blocks of 16")):
        args = {"q": q, "k": k, "w": w, "topk": 4, "mesh": make_mesh(context=8), **bad}
        try:
            select_topk_context_parallel(**args)
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"{bad} must be refused")


def check_context_parallel_sparse_attention():
    """Cache rows sharded over 8 devices: the combined partial softmaxes equal one-device sparse MLA."""
    from sparse_index_jax.kernels.sparse_mla import sparse_mla
    from sparse_index_jax.layers.context_parallel_attention import sparse_mla_context_parallel

    rng = np.random.default_rng(4)
    B, T, S, H, D, v_dim, topk = 2, 24, 64, 4, 20, 16, 10
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
    idx = np.stack([np.stack([rng.choice(S, topk, replace=False) for _ in range(T)]) for _ in range(B)])
    valid = rng.random((B, T, topk)) < 0.8
    valid[0, 0] = False  # a query with no selected key returns zeros
    sel = Selection(jnp.asarray(np.where(valid, idx, -1), jnp.int32), jnp.asarray(valid))
    ref = sparse_mla(q, kv, sel.indices, sel.valid, scale=0.3, v_dim=v_dim)
    got = sparse_mla_context_parallel(q, kv, sel, scale=0.3, v_dim=v_dim, mesh=make_mesh(context=8), query_chunk=7)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6)
    assert not np.any(np.asarray(got)[0, 0])


def check_sharded_model_forward():
    from sparse_index_jax import models
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=3)
        ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, (4, 12)))
        plain = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
        expected = np.asarray(plain(ids).logits)
        mesh = make_mesh(data=2, tensor=2, expert=2)
        sharded = models.from_pretrained(folder, dtype=jnp.float32, progress=False, mesh=mesh)
        experts = sharded.layers[1].mlp.experts.gate_proj[...]
        assert experts.sharding.spec[0] == "expert", experts.sharding
        assert len({s.device for s in experts.addressable_shards}) == 8
        q_b = sharded.layers[0].self_attn.q_b_proj.kernel[...]
        assert q_b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), q_b.sharding
        shard_rows = {s.data.shape for s in q_b.addressable_shards}
        assert shard_rows == {(q_b.shape[0], q_b.shape[1] // 2)}, shard_rows  # no device holds the whole weight
        ids_sharded = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        got = np.asarray(sharded(ids_sharded).logits)
        np.testing.assert_allclose(got, expected, atol=2e-5)


def check_context_parallel_model():
    """A DSA model's forward and its distillation losses with the sequence over 8 devices (the layers select
    and attend context-parallel) equal the one-device ones: same selections, logits and losses to rounding."""
    from sparse_index_jax import models
    from sparse_index_jax.layers.sharding import activation_sharding
    from sparse_index_jax.training.distill import distill_losses
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=3, initializer_range=0.3)
        model = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
        rng = np.random.default_rng(5)
        ids, targets = (jnp.asarray(rng.integers(0, 96, (2, 32))) for _ in range(2))
        plain = model(ids)
        chunked = models.from_pretrained(folder, dtype=jnp.float32, progress=False, prefill_chunk=12)
        with activation_sharding(make_mesh(context=8)):
            parallel = model(ids)
            parallel_chunked = chunked(ids)  # the query side 12 queries at a time (a ragged last chunk)
            cp_losses = {stage: distill_losses(model, ids, targets, "FSF", stage)[1] for stage in ("dense", "sparse")}
        for a, b in zip(parallel.selections, plain.selections):
            np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
        np.testing.assert_allclose(np.asarray(parallel.logits), np.asarray(plain.logits), atol=2e-5)
        np.testing.assert_allclose(np.asarray(parallel_chunked.logits), np.asarray(plain.logits), atol=2e-5)
        for stage, got in cp_losses.items():
            want = distill_losses(model, ids, targets, "FSF", stage)[1]
            for key in ("indexer_kl", "lm_loss"):
                np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=f"{stage} {key}")


def check_data_parallel_distillation():
    from sparse_index_jax import models
    from flax import nnx
    from sparse_index_jax.training.data import PackedDataset
    from sparse_index_jax.training.distill import DistillConfig, distill
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=3, initializer_range=0.3)
        data = PackedDataset(np.random.default_rng(2).integers(0, 96, 6000).astype(np.int32), 16, seed=0)
        # SGD: updates are linear in the gradients, so the data-parallel reduction order (a last-bit
        # difference) stays a last-bit difference; Adam would amplify it on near-zero gradients.
        cfg = DistillConfig(pattern="FSF", warmup_steps=2, sparse_steps=1, batch_size=8, warmup_lr=0.5,
                            sparse_lr=0.05, optimizer="sgd", save_every=100, train_base=True)
        parallel = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
        distill(parallel, data, cfg, pathlib.Path(tmp) / "run", progress=False, mesh=make_mesh(data=8))
        single = _train_on_one_device(folder, data, cfg)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(parallel)), nnx.to_flat_state(nnx.state(single))):
            np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=2e-5,
                                       err_msg=str(path))
        leaf = nnx.state(parallel, nnx.Param)["layers"][0]["self_attn"]["indexer"]["wk"]["kernel"][...]
        assert len(leaf.sharding.device_set) == 8  # replicated over the data axis


def check_context_parallel_distillation():
    """``distill`` on a (data 2 x context 4) mesh: each sequence split over 4 devices, the layers selecting
    and attending context-parallel; equal to one-device training."""
    from sparse_index_jax import models
    from flax import nnx
    from sparse_index_jax.training.data import PackedDataset
    from sparse_index_jax.training.distill import DistillConfig, distill, evaluate
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=3, initializer_range=0.3)
        data = PackedDataset(np.random.default_rng(2).integers(0, 96, 6000).astype(np.int32), 16, seed=0)
        cfg = DistillConfig(pattern="FSF", warmup_steps=2, sparse_steps=1, batch_size=8, warmup_lr=0.5,
                            sparse_lr=0.05, optimizer="sgd", save_every=100, train_base=True)
        parallel = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
        distill(parallel, data, cfg, pathlib.Path(tmp) / "run", progress=False, mesh=make_mesh(data=2, context=4))
        evaluate(parallel, data, "FSF", 8, 1)
        single = _train_on_one_device(folder, data, cfg)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(parallel)), nnx.to_flat_state(nnx.state(single))):
            np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=2e-5,
                                       err_msg=str(path))
        mesh = nnx.state(parallel, nnx.Param)["layers"][0]["self_attn"]["indexer"]["wk"]["kernel"][...].sharding.mesh
        assert dict(mesh.shape)["context"] == 4 and dict(mesh.shape)["data"] == 2


def check_context_parallel_search():
    """The greedy IndexCache search on a (data 2 x context 4) mesh makes the same flips, with the same
    losses, as on one device."""
    from sparse_index_jax import models
    from sparse_index_jax.training.index_cache_search import greedy_search
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=4, initializer_range=0.3)
        rng = np.random.default_rng(6)
        batches = [(rng.integers(0, 96, (2, 16)), rng.integers(0, 96, (2, 16))) for _ in range(2)]
        model = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
        parallel = greedy_search(model, batches, 0.5, progress=False, mesh=make_mesh(data=2, context=4))
        single = greedy_search(models.from_pretrained(folder, dtype=jnp.float32, progress=False), batches, 0.5,
                               progress=False)
        _assert_same_search(parallel, single)


def _assert_same_search(parallel, single):
    """Two greedy searches made the same flips with the same losses."""
    assert parallel.pattern == single.pattern, (parallel.pattern, single.pattern)
    np.testing.assert_allclose([h["loss"] for h in parallel.history], [h["loss"] for h in single.history], rtol=1e-5)


def _assert_shares(module, shardings):
    """Every variable of ``module`` lives where ``shardings`` says, each device holding only its share."""
    for path, var in nnx.to_flat_state(nnx.state(module)):
        x, want = var.get_value(), shardings[path]
        assert x.sharding.is_equivalent_to(want, x.ndim), (path, x.sharding, want)
        assert all(s.data.shape == want.shard_shape(x.shape) for s in x.addressable_shards), path


def _sharded_run(mesh_sizes: dict, pattern: str):
    """``distill`` (the sparse stage training everything) on a mesh vs one device, then an AdamW step whose model
    and optimizer state must stay split as the logical-axis rules say. The comparison trains with SGD: its updates
    are linear in the gradients, so the sharded reductions' last-bit differences stay last-bit; Adam turns them
    into up to lr-sized steps where an expert's gradient is almost zero."""
    import dataclasses

    from sparse_index_jax import models
    from sparse_index_jax.training.data import PackedDataset
    from sparse_index_jax.training.distill import DistillConfig, _new_optimizer, distill, train_step
    from sparse_index_jax.training.distributed import batch_sharding, layers_context, param_shardings, put_batch
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=len(pattern), initializer_range=0.3)
        data = PackedDataset(np.random.default_rng(2).integers(0, 96, 6000).astype(np.int32), 16, seed=0)
        cfg = DistillConfig(pattern=pattern, warmup_steps=2, sparse_steps=2, batch_size=4, warmup_lr=1e-2,
                            sparse_lr=0.05, optimizer="sgd", save_every=100, train_base=True)
        mesh = make_mesh(**mesh_sizes)
        sharded = models.from_pretrained(folder, dtype=jnp.float32, progress=False, mesh=mesh)
        distill(sharded, data, cfg, pathlib.Path(tmp) / "run", progress=False, mesh=mesh)
        single = _train_on_one_device(folder, data, cfg)
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(single))):
            np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=2e-5,
                                       err_msg=str(path))
        params = param_shardings(sharded, mesh)
        cfg = dataclasses.replace(cfg, optimizer="adamw")
        optimizer, placement = _new_optimizer(sharded, cfg, "sparse", mesh, params)
        inputs, targets = (put_batch(x, batch_sharding(mesh)) for x in data.train_batch(0, cfg.batch_size))
        with layers_context(mesh):
            train_step(sharded, optimizer, inputs, targets, cfg, pattern, "sparse", placement)
        _assert_shares(sharded, params)
        _assert_shares(optimizer, placement.optimizer)
        if mesh_sizes == {"data": 2, "tensor": 2, "expert": 2}:
            _fits_only_sharded(folder, mesh_sizes, cfg, sharded, optimizer)
        moments = dict(nnx.to_flat_state(nnx.state(optimizer)))
        split = {str(p): v.get_value().sharding.spec for p, v in moments.items() if "mu" in map(str, p)}
        if mesh.shape["expert"] > 1:  # the routed experts' moments are split over the expert axis
            assert any(spec and spec[0] == "expert" for spec in split.values()), split
        assert any("tensor" in spec for spec in split.values()), split  # heads / MLP width


def _fits_only_sharded(folder, mesh_sizes, cfg, model, optimizer):
    """A per-device budget from ``sparse-index plan`` that the model's training state (parameters and AdamW
    moments) does not fit on one device: on the mesh every device stays within it, holding what the plan says."""
    from sparse_index_jax.models.config import ModelConfig
    from sparse_index_jax.training.memory_plan import plan_memory

    plan = lambda mesh: plan_memory(ModelConfig.from_pretrained(folder), mesh, seq_len=16,  # noqa: E731
                                    batch_size=cfg.batch_size, train_base=True, dtype=jnp.float32).stage("sparse")
    state = lambda p: p.parameters + p.optimizer_state  # noqa: E731
    one, sharded = state(plan({})), state(plan(mesh_sizes))
    budget = (one + sharded) // 2
    assert sharded <= budget < one, (one, sharded)
    held = {}
    for module in (model, optimizer):
        for _, var in nnx.to_flat_state(nnx.state(module)):
            for shard in var.get_value().addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    assert len(held) == 8 and max(held.values()) <= budget, (held, budget)
    counters = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(optimizer)) if v.get_value().ndim == 0)
    assert max(held.values()) - counters == sharded, (held, counters, sharded)  # the plan leaves out step counters


def check_sharded_distillation():
    """DeepSeek-V3.2-shaped, 8 routed experts: data=2 x tensor=2 x expert=2 trains like one device."""
    _sharded_run({"data": 2, "tensor": 2, "expert": 2}, "FSF")


def check_sharded_context_distillation():
    """The same with each sequence split over 2 devices: data=2 x context=2 x tensor=2."""
    _sharded_run({"data": 2, "context": 2, "tensor": 2}, "FSF")


def check_sharded_search():
    """The greedy search on data=2 x tensor=2 x expert=2 makes the one-device search's flips with its losses."""
    from sparse_index_jax import models
    from sparse_index_jax.training.index_cache_search import greedy_search
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=4, initializer_range=0.3)
        rng = np.random.default_rng(7)
        batches = [(rng.integers(0, 96, (2, 16)), rng.integers(0, 96, (2, 16))) for _ in range(2)]
        mesh = make_mesh(data=2, tensor=2, expert=2)
        model = models.from_pretrained(folder, dtype=jnp.float32, progress=False, mesh=mesh)
        parallel = greedy_search(model, batches, 0.5, progress=False, mesh=mesh)
        experts = model.layers[1].mlp.experts.gate_proj[...]
        assert experts.sharding.spec[0] == "expert" and experts.addressable_shards[0].data.shape[0] == 4
        single = greedy_search(models.from_pretrained(folder, dtype=jnp.float32, progress=False), batches, 0.5,
                               progress=False)
        _assert_same_search(parallel, single)


def check_distill_command_on_a_mesh():
    """``sparse-index distill --mesh data=2,tensor=2,expert=2`` end to end: the model is read onto its shards,
    trained there (the experts stay split over the expert axis) and evaluated; a mesh that does not match the
    device count or a batch the data axis does not split is refused with exit code 2."""
    import json

    from sparse_index_jax.cli import main
    from tiny_models import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(pathlib.Path(tmp) / "m", num_hidden_layers=3, initializer_range=0.3)
        tokens = pathlib.Path(tmp) / "tokens.npy"
        np.save(tokens, np.random.default_rng(6).integers(0, 96, 3000).astype(np.uint16))
        common = ["distill", "--model", str(folder), "--data", str(tokens), "--seq-len", "16", "--dtype", "float32",
                  "--quiet", "--warmup-steps", "1", "--sparse-steps", "1", "--eval-batches", "1"]
        out = pathlib.Path(tmp) / "d"
        assert main([*common, "--mesh", "data=2,tensor=2,expert=2", "--batch-size", "4", "--out", str(out)]) == 0
        assert json.loads((out / "run.json").read_text())["mesh"] == {"data": 2, "context": 1, "tensor": 2,
                                                                      "expert": 2}
        for bad in (["--mesh", "data=2,tensor=2", "--batch-size", "4"], ["--mesh", "data=8", "--batch-size", "4"]):
            try:
                main([*common, *bad, "--out", str(pathlib.Path(tmp) / "bad")])
            except SystemExit as exit_:
                assert exit_.code == 2
            else:
                raise AssertionError(f"{bad} was accepted")


def _train_on_one_device(folder, data, cfg):
    """The reference: the same steps, one device, one process."""
    from sparse_index_jax import models
    from sparse_index_jax.training.distill import train_step, trainable

    single = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
    opt, opt_stage = None, None
    for step in range(cfg.total_steps):
        stage = cfg.stage(step)
        if stage != opt_stage:
            opt, opt_stage = nnx.Optimizer(single, cfg.tx(stage), wrt=trainable(stage, cfg.train_base)), stage
        inputs, targets = data.train_batch(step, cfg.batch_size)
        train_step(single, opt, jnp.asarray(inputs), jnp.asarray(targets), cfg, cfg.pattern, stage)
    return single


def check_multi_process_distillation(process_id: str, port: str, folder: str, out: str):
    """One of 2 processes (2 devices each): ``distill`` over all 4 devices equals one-device training."""
    from sparse_index_jax.training.distributed import initialize, is_main_process, training_mesh

    initialize(f"localhost:{port}", 2, int(process_id))
    from sparse_index_jax import models
    from sparse_index_jax.training.data import PackedDataset
    from sparse_index_jax.training.distill import DistillConfig, distill, evaluate

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    data = PackedDataset(np.random.default_rng(2).integers(0, 96, 6000).astype(np.int32), 16, seed=0)
    cfg = DistillConfig(pattern="FSF", warmup_steps=2, sparse_steps=1, batch_size=8, warmup_lr=0.5,
                        sparse_lr=0.05, optimizer="sgd", save_every=2)
    model = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
    history = distill(model, data, cfg, pathlib.Path(out), progress=False, mesh=training_mesh(cfg.batch_size))
    evaluate(model, data, "FSF", cfg.batch_size, 1)  # held-out batches go to the same 4 devices
    single = _train_on_one_device(folder, data, cfg)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(single))):
        a, b = a.get_value(), np.asarray(b.get_value())
        assert len(a.sharding.device_set) == 4  # over both hosts' devices (FSDP: each holds its share)
        for shard in a.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), b[shard.index], atol=2e-5, err_msg=str(path))
    logged = (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines() if is_main_process() else []
    assert len(history) == cfg.total_steps and len(logged) == (cfg.total_steps if is_main_process() else 0)


def check_multi_process_search(process_id: str, port: str, folder: str, out: str):
    """One of 2 processes (2 devices each): the greedy IndexCache search over all 4 devices makes the same
    flips, with the same losses, as a one-device search; only process 0 writes the resumable state."""
    from sparse_index_jax.training.distributed import initialize, is_main_process, training_mesh

    initialize(f"localhost:{port}", 2, int(process_id))
    from sparse_index_jax import models
    from sparse_index_jax.training.index_cache_search import greedy_search

    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 96, (4, 12)), rng.integers(0, 96, (4, 12))) for _ in range(2)]
    model = models.from_pretrained(folder, dtype=jnp.float32, progress=False)
    state_path = pathlib.Path(out) / "search_state.json"
    parallel = greedy_search(model, batches, 0.5, state_path=state_path, progress=False,
                             mesh=training_mesh(4, what="search"))  # all 4 devices of both hosts on data
    single = greedy_search(models.from_pretrained(folder, dtype=jnp.float32, progress=False), batches, 0.5,
                           progress=False)
    _assert_same_search(parallel, single)
    if is_main_process():
        assert state_path.is_file()


if __name__ == "__main__":
    globals()[f"check_{sys.argv[1]}"](*sys.argv[2:])
    print("ok")
