"""8-device checks (XLA's forced host devices), each in its own process: context-parallel selection equals
single-device selection, a sharded model forward equals the unsharded one, data-parallel distillation
equals single-device training; and two processes (multi-host, jax.distributed) distill like one device."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

CHECKS = ["context_parallel_selection", "context_parallel_sparse_attention", "context_parallel_model",
          "sharded_model_forward", "data_parallel_distillation", "context_parallel_distillation",
          "context_parallel_search", "sharded_distillation", "sharded_context_distillation", "sharded_search",
          "distill_command_on_a_mesh"]


@pytest.mark.parametrize("check", CHECKS)
def test_on_eight_devices(check):
    if not check.startswith("context_parallel") or check.endswith(("model", "distillation", "search")):
        pytest.importorskip("torch", reason="builds an HF checkpoint with torch")
    script = pathlib.Path(__file__).with_name("multidevice_checks.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), check], env=env, capture_output=True, text=True,
                          timeout=900, cwd=script.parent.parent)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-6000:]


def _two_processes(check: str, tmp_path: pathlib.Path, layers: int) -> pathlib.Path:
    """Runs ``check`` in two processes of 2 CPU devices each (jax.distributed over Gloo) on a tiny checkpoint;
    returns the output folder they share."""
    pytest.importorskip("torch", reason="builds an HF checkpoint with torch")
    import socket

    from tiny_models import save_tiny

    folder = save_tiny(tmp_path / "m", num_hidden_layers=layers, initializer_range=0.3)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = pathlib.Path(__file__).with_name("multidevice_checks.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "run"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), check, str(i), str(port), str(folder), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=script.parent.parent) for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0 and stdout.strip().endswith("ok"), stdout[-3000:] + stderr[-6000:]
    return out


def test_two_processes_distill_like_one_device(tmp_path):
    """Data-parallel ``distill`` over the 4 devices of two processes equals one-device training; only process 0
    writes metrics."""
    _two_processes("multi_process_distillation", tmp_path, layers=3)


def test_two_processes_search_like_one_device(tmp_path):
    """``greedy_search`` data-parallel over the 4 devices of two processes makes the same flips as on one
    device, and process 0 writes its state."""
    out = _two_processes("multi_process_search", tmp_path, layers=4)
    assert (out / "search_state.json").is_file()
