"""DeepSeek-V3.2 and GLM-5 against HF transformers 5.23 (torch, CPU) on tiny random checkpoints.

Each family is saved three ways: fp32 in one file, bf16 in several shards, and an FP8 block-scaled
copy this test makes itself. ``index_topk`` is smaller than the sequence, so the indexer decides
what attention sees. The models have 16 indexer heads: with ReLU heads, a key scores exactly 0 for a
query when every head is negative, and torch.topk orders such exact ties differently from our
documented rule (lower position first); 16 heads make a tie at the cut vanishingly rare.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tiny_models import COMMON, FAMILIES, hf_model, torch  # noqa: E402  (skips without torch/transformers)
from safetensors.numpy import load_file, save_file  # noqa: E402

from sparse_index_jax import models  # noqa: E402
from sparse_index_jax.models import CheckpointError, ModelConfig  # noqa: E402
from sparse_index_jax.cli import main  # noqa: E402

FP8_BLOCK = [16, 16]  # 24 and 112 rows are not multiples: ragged edge blocks
NOT_FP8 = ("norm", "weights_proj", "mlp.gate.", "embed_tokens", "lm_head")


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled e4m3 as the official checkpoints store it: weight, weight_scale_inv (dequant = multiply)."""
    bo, bi = FP8_BLOCK
    rows, cols = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
    scale = np.zeros((rows, cols), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            block = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi]
            scale[r, c] = max(np.abs(block).max(), 1e-4) / 448.0
            q[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = (block / scale[r, c]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    out = q.astype(np.float32)
    bo, bi = FP8_BLOCK
    for r, c in np.ndindex(*scale.shape):
        out[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] *= scale[r, c]
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoints(request, tmp_path_factory):
    """{form: folder} for one family: fp32, bf16 (sharded), fp8, and fp8_reference (its dequantised fp32 twin)."""
    family = request.param
    hf = hf_model(family)
    root = tmp_path_factory.mktemp(family)
    hf.save_pretrained(root / "fp32")
    hf.to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="60KB")
    assert (root / "bf16" / "model.safetensors.index.json").is_file(), "the bf16 copy must be sharded"

    tensors = load_file(root / "fp32" / "model.safetensors")
    fp8, dequant = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and name.endswith("proj.weight") and not any(s in name for s in NOT_FP8):
            q, scale = quantize_fp8(w)
            fp8[name], fp8[name.removesuffix(".weight") + ".weight_scale_inv"] = q, scale
            dequant[name] = dequantize_fp8(q, scale)
        else:
            fp8[name] = dequant[name] = w
    config = json.loads((root / "fp32" / "config.json").read_text())
    for form, weights, cfg in (("fp8", fp8, {**config, "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": FP8_BLOCK}}),
            ("fp8_reference", dequant, config)):
        (root / form).mkdir()
        save_file(weights, root / form / "model.safetensors")
        (root / form / "config.json").write_text(json.dumps(cfg))
    return family, {form: root / form for form in ("fp32", "bf16", "fp8", "fp8_reference")}


def hf_logits(folder: pathlib.Path, family: str, ids: np.ndarray) -> np.ndarray:
    model = FAMILIES[family][1].from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 12))


@pytest.mark.parametrize("form", ["fp32", "bf16", "fp8"])
def test_logits_match_transformers(checkpoints, form):
    family, folders = checkpoints
    reference = hf_logits(folders["fp8_reference" if form == "fp8" else form], family, IDS)
    model = models.from_pretrained(folders[form], dtype=jnp.float32, progress=False)
    out = model(jnp.asarray(IDS))
    assert out.logits.shape == (2, 12, COMMON["vocab_size"])
    np.testing.assert_allclose(np.asarray(out.logits), reference, atol=1e-4, rtol=0)
    # the indexer really prunes: late queries see index_topk of their > index_topk keys
    assert int(out.selections[0].counts()[0, -1]) == COMMON["index_topk"]
    if form == "fp32":  # every layer's query side in chunks of 5 queries (a ragged last chunk): the same logits
        chunked = models.from_pretrained(folders[form], dtype=jnp.float32, progress=False, prefill_chunk=5)
        np.testing.assert_allclose(np.asarray(chunked(jnp.asarray(IDS)).logits), reference, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(checkpoints):
    family, folders = checkpoints
    hf = FAMILIES[family][1].from_pretrained(folders["fp32"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor(IDS[:, :6]), max_new_tokens=8, do_sample=False, min_new_tokens=8).numpy()
    model = models.from_pretrained(folders["fp32"], dtype=jnp.float32, progress=False)
    got = models.generate(model, jnp.asarray(IDS[:, :6]), max_new_tokens=8, stop_tokens=())
    np.testing.assert_array_equal(got.sequences, expected)


def test_config_reads_families_and_index_share(checkpoints):
    family, folders = checkpoints
    cfg = ModelConfig.from_pretrained(folders["fp32"])
    assert cfg.model_type == family
    assert cfg.indexer_rope_layout == ("half" if family == "deepseek_v32" else "interleaved")
    if family == "glm_moe_dsa":
        assert cfg.indexer_types == ("full", "full", "shared", "full")
        assert cfg.layer_config(2).indexer is None and cfg.rms_norm_eps == 1e-5
        assert cfg.layer_config(0).mla.latent_norm_eps == 1e-6  # HF and the official code ignore rms_norm_eps here


def test_convert_round_trip(checkpoints, tmp_path, capsys):
    family, folders = checkpoints
    out = tmp_path / "converted"
    assert main(["convert", str(folders["bf16"]), str(out), "--dtype", "float32", "--quiet"]) == 0
    assert "converted" in capsys.readouterr().out
    direct = models.from_pretrained(folders["bf16"], dtype=jnp.float32, progress=False)
    restored = models.from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(restored(jnp.asarray(IDS)).logits),
                                  np.asarray(direct(jnp.asarray(IDS)).logits))
    with pytest.raises(SystemExit) as refused:  # never overwrites
        main(["convert", str(folders["bf16"]), str(out)])
    assert refused.value.code == 2 and "exists and is not empty" in capsys.readouterr().err


# ---- broken and mismatched checkpoints: every error names what and where ----

def copy_of(folder: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def rewrite(folder: pathlib.Path, edit) -> None:
    """Edits a single-file checkpoint with numpy arrays (through torch, which can carry float8)."""
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    tensors = torch_load(folder / "model.safetensors")
    arrays = {k: v for k, v in tensors.items()}
    edit(arrays)
    torch_save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()},
               folder / "model.safetensors")


def test_truncated_file(checkpoints, tmp_path):
    folder = copy_of(checkpoints[1]["fp32"], tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* the file is truncated"):
        models.from_pretrained(folder, progress=False)


def test_bad_header(checkpoints, tmp_path):
    folder = copy_of(checkpoints[1]["fp32"], tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:12] = b"#$%&"
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        models.from_pretrained(folder, progress=False)


def test_missing_tensor(checkpoints, tmp_path):
    folder = copy_of(checkpoints[1]["fp32"], tmp_path)
    rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.indexer.wk.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.indexer\.wk\.weight' is missing"):
        models.from_pretrained(folder, progress=False)


def test_wrong_shape(checkpoints, tmp_path):
    folder = copy_of(checkpoints[1]["fp32"], tmp_path)
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": np.zeros((64, 7), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj"
                                              r"\.weight' has shape \(7, 64\)"):
        models.from_pretrained(folder, progress=False)


def test_unexpected_tensor_but_mtp_layer_is_skipped(checkpoints, tmp_path):
    folder = copy_of(checkpoints[1]["fp32"], tmp_path)
    n = ModelConfig.from_pretrained(folder).num_hidden_layers
    rewrite(folder, lambda t: t.update({f"model.layers.{n}.eh_proj.weight": np.zeros((4, 4), np.float32)}))
    models.from_pretrained(folder, progress=False)  # the MTP layer (index n) is skipped
    rewrite(folder, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros((4,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model has no place for: model\.layers\.0\.mystery\.weight "
                                              r"\(model\.safetensors\)"):
        models.from_pretrained(folder, progress=False)


def test_missing_shard_and_missing_scale(checkpoints, tmp_path):
    family, folders = checkpoints
    sharded = copy_of(folders["bf16"], tmp_path)
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard missing"):
        models.from_pretrained(sharded, progress=False)
    fp8 = tmp_path / "fp8"
    shutil.copytree(folders["fp8"], fp8)
    rewrite(fp8, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"FP8 tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has no"):
        models.from_pretrained(fp8, progress=False)


def test_invalid_config_names_the_field(checkpoints, tmp_path):
    folder = copy_of(checkpoints[1]["fp32"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_group": 3}))
    with pytest.raises(ValueError, match=r"ModelConfig\.n_group: n_routed_experts=8 is not divisible"):
        models.from_pretrained(folder, progress=False)
    pattern = "S" + "F" * (cfg["num_hidden_layers"] - 1)
    (folder / "config.json").write_text(json.dumps({**cfg, "indexer_types": None, "index_topk_pattern": pattern}))
    with pytest.raises(ValueError, match=r"ModelConfig\.indexer_types"):
        models.from_pretrained(folder, progress=False)
