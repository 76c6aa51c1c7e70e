"""Slice-first checkpoint loading: the safetensors reader reads exactly a slice's bytes (and, for FP8, the scale
blocks covering it), and a model loaded onto a mesh equals the unsharded load while each host reads every weight
byte once per distinct shard.

The 8-device check runs in a subprocess (JAX fixes the device count at start-up): ``python
tests/test_slice_loading.py sharded_fp8_load`` with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparse_index_jax.models.convert.safetensors_reader import CheckpointError, CheckpointReader, SafetensorsFile

BLOCK = (16, 16)


def quantize_fp8(w: np.ndarray, block=BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled e4m3 as the official checkpoints store it: weight, weight_scale_inv (dequant = multiply)."""
    (bo, bi), (rows, cols) = block, w.shape
    grid = (-(-rows // bo), -(-cols // bi))
    padded = np.zeros((grid[0] * bo, grid[1] * bi), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(grid[0], bo, grid[1], bi)
    scale = (np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4) / 448.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def dequantize_fp8(q: np.ndarray, scale: np.ndarray, block=BLOCK) -> np.ndarray:
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[:q.shape[0], :q.shape[1]]
    return q.astype(np.float32) * full


def covered_blocks(bounds: list[tuple[int, int]], block=BLOCK) -> int:
    """How many FP8 scale blocks the rows x columns ``bounds`` touch (partial blocks count whole)."""
    return math.prod(-(-stop // b) - start // b for (start, stop), b in zip(bounds, block))


# ---- the reader ----

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(folder, {name: array}): two files, fp32 3-D and 1-D tensors; a bf16 matrix and an FP8 weight of 70 x 45
    in 16 x 16 blocks (a 5 x 3 scale grid whose last row and column of blocks are ragged). The arrays are what
    was written: safetensors' own numpy reader cannot load F8_E4M3."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("slices")
    q, scale = quantize_fp8(rng.standard_normal((70, 45)).astype(np.float32))
    files = {"a.safetensors": {"cube": rng.standard_normal((6, 5, 7)).astype(np.float32),
                               "vector": rng.standard_normal(37).astype(np.float32)},
             "b.safetensors": {"half": rng.standard_normal((33, 20)).astype(ml_dtypes.bfloat16),
                               "w.weight": q, "w.weight_scale_inv": scale}}
    for file, tensors in files.items():
        save_file(tensors, root / file)
    return root, {name: t for tensors in files.values() for name, t in tensors.items()}


def random_index(rng, shape) -> tuple[slice, ...]:
    """Any contiguous slice per dimension: sometimes whole (so runs merge), often ragged."""
    index = []
    for n in shape:
        if rng.random() < 0.25:
            index.append(slice(None))
        else:
            start = int(rng.integers(0, n))
            index.append(slice(start, int(rng.integers(start + 1, n + 1))))
    return tuple(index)


@pytest.mark.parametrize("name", ["cube", "vector", "half"])
def test_slices_read_exactly_their_bytes(folder, name):
    rng = np.random.default_rng(1)
    folder, arrays = folder
    full = arrays[name]
    with CheckpointReader(folder) as reader:
        assert reader.info(name) == (full.shape, full.dtype) and reader.bytes_read == 0  # the header only
        np.testing.assert_array_equal(reader.get(name), full)
        assert reader.bytes_read == full.nbytes
        for _ in range(60):
            index = random_index(rng, full.shape)
            before = reader.bytes_read
            got = reader.get(name, index)
            assert got.dtype == full.dtype
            np.testing.assert_array_equal(got, full[index], err_msg=str(index))
            assert reader.bytes_read - before == full[index].nbytes, index
            np.testing.assert_array_equal(reader.get_dequantized(name, None, index), full[index].astype(np.float32))


def test_fp8_slices_read_their_bytes_and_covering_scale_blocks(folder):
    rng = np.random.default_rng(2)
    folder, arrays = folder
    full = dequantize_fp8(arrays["w.weight"], arrays["w.weight_scale_inv"])
    aligned = (slice(16, 48), slice(0, 32))  # whole blocks only
    edges = (slice(64, 70), slice(32, 45))  # the ragged corner block
    with CheckpointReader(folder) as reader:
        assert reader.info("w.weight") == ((70, 45), np.dtype(ml_dtypes.float8_e4m3fn))
        for index in [aligned, edges, (slice(15, 17), slice(44, 45))] + [random_index(rng, full.shape)
                                                                          for _ in range(60)]:
            before = reader.bytes_read
            got = reader.get_dequantized("w.weight", BLOCK, index)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, full[index], err_msg=str(index))
            bounds = [s.indices(n)[:2] for s, n in zip(index, full.shape)]
            assert reader.bytes_read - before == full[index].size + 4 * covered_blocks(bounds), index
        np.testing.assert_array_equal(reader.get_dequantized("w.weight", BLOCK), full)


def test_bytes_read_sums_over_files_and_runs_merge(folder, monkeypatch):
    """A slice whose trailing dimensions are whole is one positional read; a column slice is one per row."""
    calls = []
    original = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: calls.append(offset) or original(fd, buffers, offset))
    with CheckpointReader(folder[0]) as reader:
        reader.get("cube", (slice(1, 4), slice(None), slice(None)))
        assert len(calls) == 1
        reader.get("cube", (slice(1, 4), slice(2, 3), slice(None)))
        assert len(calls) == 1 + 3
        reader.get("half", (slice(None), slice(5, 9)))
        assert len(calls) == 4 + 33
        files = reader._files.values()
        assert all(f.bytes_read > 0 for f in files) and reader.bytes_read == sum(f.bytes_read for f in files)


def test_bad_indices_and_a_file_truncated_after_opening(folder, tmp_path):
    folder = folder[0]
    with CheckpointReader(folder) as reader:
        with pytest.raises(CheckpointError, match=r"b\.safetensors: tensor 'half': index .* has step 2"):
            reader.get("half", (slice(None, None, 2), slice(None)))
        with pytest.raises(CheckpointError, match=r"one slice per dimension of the stored shape \(33, 20\)"):
            reader.get("half", (slice(None),))
        with pytest.raises(CheckpointError, match=r"'nothing' is missing from the checkpoint"):
            reader.info("nothing")
    copy = tmp_path / "a.safetensors"
    copy.write_bytes((folder / "a.safetensors").read_bytes())
    file = SafetensorsFile(copy)
    copy.write_bytes(copy.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=r"a\.safetensors: tensor 'vector': the file ends at byte \d+; it was "
                                              r"truncated after it was opened"):
        file.read("vector")
    file.close()


# ---- a tiny FP8 DeepSeek-V3.2 on 8 devices ----

NOT_FP8 = ("norm", "weights_proj", "mlp.gate.", "embed_tokens", "lm_head")


def write_fp8_checkpoint(hf_folder: pathlib.Path, out: pathlib.Path) -> dict[str, int]:
    """The fp32 checkpoint in ``hf_folder`` as FP8 in 16 x 16 blocks, in two files with an index; returns
    {tensor: bytes} of what it wrote."""
    tensors = {}
    for name, w in load_file(hf_folder / "model.safetensors").items():
        if w.ndim == 2 and name.endswith("proj.weight") and not any(s in name for s in NOT_FP8):
            tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = quantize_fp8(w)
        else:
            tensors[name] = w
    out.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for file, part in (("model-1.safetensors", names[::2]), ("model-2.safetensors", names[1::2])):
        save_file({n: tensors[n] for n in part}, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((hf_folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(config))
    return {n: t.nbytes for n, t in tensors.items()}


def expected_scale_bytes(model, mesh, sizes: dict[str, int]) -> collections.Counter:
    """Per scale tensor: 4 bytes per block covering each distinct shard of its weight, in the stored [out, in]
    layout (a block cut by a shard boundary is read by both shards)."""
    from flax import nnx

    from sparse_index_jax.layers.sharding import param_sharding
    from sparse_index_jax.models.convert.loader import hf_name

    expected = collections.Counter()
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name, kind = hf_name(path)
        shape = var.get_value().shape
        distinct = {tuple(s.indices(n)[:2] for s, n in zip(index, shape))
                    for index in param_sharding(mesh)(path, shape).devices_indices_map(shape).values()}
        for bounds in distinct:
            experts, stored = (range(*bounds[0]), bounds[1:][::-1]) if kind == "experts" else ([None], bounds[::-1])
            for e in experts:
                scale = name.format(e=e).removesuffix(".weight") + ".weight_scale_inv"
                if scale in sizes:
                    expected[scale] += 4 * covered_blocks(list(stored))
    return expected


def check_sharded_fp8_load():
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from tiny_models import save_tiny

    from sparse_index_jax import models
    from sparse_index_jax.layers.sharding import make_mesh, param_sharding

    assert jax.device_count() == 8, jax.devices()
    reads = collections.Counter()
    original = SafetensorsFile.read

    def counting_read(self, name, index=None):
        before = self.bytes_read
        out = original(self, name, index)
        reads[name] += self.bytes_read - before
        return out

    SafetensorsFile.read = counting_read
    with tempfile.TemporaryDirectory() as tmp:
        # hidden 64 in blocks of 16: tensor=2 shards hold whole blocks; moe_intermediate 24 and o_proj's 48
        # heads*v rows split at 12 and 24, inside a block
        hf = save_tiny(pathlib.Path(tmp) / "hf", num_hidden_layers=2, initializer_range=0.3)
        sizes = write_fp8_checkpoint(hf, pathlib.Path(tmp) / "fp8")
        plain = models.from_pretrained(pathlib.Path(tmp) / "fp8", dtype=jnp.float32, progress=False)
        assert reads == sizes, "the unsharded load reads every tensor whole, once"
        reads.clear()
        mesh = make_mesh(data=2, tensor=2, expert=2)
        sharded = models.from_pretrained(pathlib.Path(tmp) / "fp8", dtype=jnp.float32, progress=False, mesh=mesh)

    expected = dict(sizes)  # the distinct shards of any sharding partition the weight: every byte read once
    expected.update(expected_scale_bytes(sharded, mesh, sizes))
    wrong = {n: (reads[n], expected[n]) for n in sorted(expected) if reads[n] != expected[n]}
    assert dict(reads) == expected, f"(read, expected) bytes of {len(wrong)} tensors: {dict(list(wrong.items())[:6])}"
    cut, whole = (f"model.layers.{n}.weight_scale_inv" for n in ("1.mlp.experts.0.gate_proj", "0.self_attn.q_b_proj"))
    assert reads[cut] > sizes[cut], "12-row shards of 16-row blocks: the cut blocks are read by both shards"
    assert reads[whole] == sizes[whole], "48-row shards of 16-row blocks: each block read once"

    plain_state = dict(nnx.to_flat_state(nnx.state(plain)))
    for path, var in nnx.to_flat_state(nnx.state(sharded)):
        value = var.get_value()
        assert value.sharding == param_sharding(mesh)(path, value.shape), (path, value.sharding)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(plain_state[path].get_value()), err_msg=str(path))
    # experts over expert, their width over tensor, the hidden dimension over data (FSDP)
    assert sharded.layers[1].mlp.experts.gate_proj[...].sharding.spec == P("expert", "data", "tensor")
    assert sharded.layers[0].self_attn.o_proj.kernel[...].sharding.spec == P("tensor", "data")


def test_sharded_fp8_load_reads_each_distinct_shard_once():
    """A tiny FP8 DeepSeek-V3.2 (8 experts) on data=2 x tensor=2 x expert=2 equals the unsharded load, every
    parameter has its NamedSharding, and the bytes read per tensor are those of its distinct shards."""
    pytest.importorskip("torch", reason="builds an HF checkpoint with torch")
    script = pathlib.Path(__file__)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), "sharded_fp8_load"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=script.parent.parent)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-6000:]


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    globals()[f"check_{sys.argv[1]}"]()
    print("ok")
