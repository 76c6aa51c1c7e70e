"""8-device checks (XLA's forced host devices), each in its own process: context-parallel selection equals
single-device selection, a sharded model forward equals the unsharded one, data-parallel distillation
equals single-device training."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

CHECKS = ["context_parallel_selection", "context_parallel_sparse_attention", "sharded_model_forward",
          "data_parallel_distillation"]


@pytest.mark.parametrize("check", CHECKS)
def test_on_eight_devices(check):
    if not check.startswith("context_parallel"):
        pytest.importorskip("torch", reason="builds an HF checkpoint with torch")
    script = pathlib.Path(__file__).with_name("multidevice_checks.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), check], env=env, capture_output=True, text=True,
                          timeout=900, cwd=script.parent.parent)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-6000:]
