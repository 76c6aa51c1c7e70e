"""Corrupt and wrong files of every format (issue 21): a clear error naming the file and the fix, or a correct load.

safetensors: header offsets must tile the data section exactly (the ``safetensors`` package is the oracle: random
byte flips and truncations either raise ``CheckpointError`` or load what the package loads, never other weights);
FP8 block scales must be float. Token files: a wrong ``--bin-dtype`` is refused with the dtype the file likely has.
GGUF truncations, non-safetensors indexer files, converting into a used folder, and a flipped byte in a converted
Orbax checkpoint (checked against the crc32 stored at convert time) each give one clear error.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import tempfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save, save_file

from sparse_index_jax.models.convert.safetensors_reader import CheckpointError, CheckpointReader, SafetensorsFile
from sparse_index_jax.training.data import check_token_range, parse_bin_dtype, read_tokens

# ---- safetensors -----------------------------------------------------------------------------------------------

TENSORS = {"a": np.arange(15, dtype=np.float32).reshape(3, 5) / 7, "b": np.arange(-3, 4, dtype=np.int32),
           "c": np.linspace(-1, 1, 4).astype(np.float16), "d": np.arange(5, dtype=np.uint8)}
GOOD = save(TENSORS, metadata={"format": "np"})


def raw_file(path: pathlib.Path, header: dict, data: bytes) -> pathlib.Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def read_all(path: pathlib.Path) -> dict:
    file = SafetensorsFile(path)
    try:
        return {name: file.read(name) for name in file.keys()}
    finally:
        file.close()


def package_refuses(path: pathlib.Path) -> bool:
    try:
        load_file(path)
    except Exception:
        return True
    return False


def f32(n: int, begin: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


@pytest.mark.parametrize("header, size, message", [
    ({"a": f32(4, 0), "b": f32(4, 8)}, 24, "'b' starts at byte 8 of the data section and overlaps 'a'"),
    ({"a": f32(4, 0), "b": f32(4, 0)}, 16, "overlaps 'a'"),  # two names, one set of bytes
    ({"a": f32(4, 0), "b": f32(4, 17)}, 33, r"leaves bytes \[16, 17\) that no tensor owns"),
    ({"a": f32(4, 1), "b": f32(4, 17)}, 33, r"'a' starts at byte 1 .* leaves bytes \[0, 1\)"),  # shifted by one
    ({"a": f32(4, 0), "b": f32(4, 16)}, 40, "8 bytes follow the last tensor's data"),
    ({"a": f32(4, 0), "b": f32(4, 16)}, 30, "'b' ends at byte 32 of the data section but the file holds 30: the "
                                            "file is truncated"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12, r"\(12 bytes\) but shape \[4\] of F32 is 16"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}}, 16, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "non-negative integers"),
    ({"a": {"dtype": "F31", "shape": [4], "data_offsets": [0, 16]}}, 16, "dtype 'F31'"),
    ({"a": {"dtype": "F32", "shape": [4]}}, 16, "malformed header entry"),
])
def test_offsets_must_tile_the_data_section(tmp_path, header, size, message):
    path = raw_file(tmp_path / "bad.safetensors", header, bytes(range(size)))
    with pytest.raises(CheckpointError, match=message) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and ("download it again" in str(err.value) or "save it again" in
                                            str(err.value))
    assert package_refuses(path)  # the safetensors package refuses each of them too
    with pytest.raises(CheckpointError, match="bad.safetensors"):  # and a folder of it names the file
        CheckpointReader(tmp_path)


def test_duplicate_header_keys_are_refused(tmp_path):
    text = b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, ' \
           b'"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x01\x02\x03\x04")
    with pytest.raises(CheckpointError, match="key 'a' appears twice"):
        SafetensorsFile(path)


def test_a_good_file_loads_as_the_package_loads_it(tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(GOOD)
    got = read_all(path)
    for name, want in TENSORS.items():
        assert got[name].dtype == want.dtype
        np.testing.assert_array_equal(got[name], want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_byte_flips_and_truncations_give_an_error_or_what_the_file_says(data):
    """Any one damage to the file: either a CheckpointError naming it, or exactly what the safetensors package
    loads from the same bytes (a flip inside tensor data changes that tensor for both: the format has no checksum)."""
    blob = bytearray(GOOD)
    header_end = 8 + int.from_bytes(GOOD[:8], "little")
    kind = data.draw(st.sampled_from(["flip_header", "flip_anywhere", "truncate", "append"]))
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "append":
        blob += bytes(data.draw(st.integers(1, 9)))
    else:
        at = data.draw(st.integers(0, (header_end if kind == "flip_header" else len(blob)) - 1))
        blob[at] = data.draw(st.integers(0, 255).filter(lambda b: b != GOOD[at]))
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "damaged.safetensors"
        path.write_bytes(bytes(blob))
        try:
            ours = read_all(path)
        except CheckpointError as err:
            assert str(path) in str(err)
            return
        theirs = load_file(path)  # we loaded it: the package must load the same tensors
        assert sorted(ours) == sorted(theirs)
        for name, value in theirs.items():
            assert ours[name].dtype == value.dtype and ours[name].shape == value.shape
            assert ours[name].tobytes() == value.tobytes(), name


def fp8_folder(tmp_path: pathlib.Path, scale: np.ndarray) -> pathlib.Path:
    weight = (np.arange(32 * 16).reshape(32, 16) % 7 - 3).astype(ml_dtypes.float8_e4m3fn)
    save_file({"w.weight": weight, "w.weight_scale_inv": scale}, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("scale, message", [
    (np.ones((2, 1), np.int32), r"'w.weight_scale_inv' is int32; block scales must be a float dtype"),
    (np.ones((2, 1), np.uint8), "is uint8; block scales must be a float dtype"),
    (np.array([[1.0], [np.nan]], np.float32), "non-finite block scales"),
])
def test_fp8_scales_must_be_finite_floats(tmp_path, scale, message):
    with CheckpointReader(fp8_folder(tmp_path, scale)) as reader:
        with pytest.raises(CheckpointError, match=message) as err:
            reader.get_dequantized("w.weight", (16, 16))
        assert "model.safetensors" in str(err.value)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_fp8_float_scales_dequantize(tmp_path, dtype):
    scale = np.array([[0.5], [2.0]], dtype)
    with CheckpointReader(fp8_folder(tmp_path, scale)) as reader:
        got = reader.get_dequantized("w.weight", (16, 16))
    weight = (np.arange(32 * 16).reshape(32, 16) % 7 - 3).astype(np.float32)
    np.testing.assert_array_equal(got, weight * np.repeat(np.array([[0.5], [2.0]]), 16, axis=0))


# ---- token files and --bin-dtype -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("foo", "--bin-dtype 'foo' is not a dtype"), ("float32", "not an integer dtype"), ("float16", "not an integer"),
    ("bool", "not an integer dtype"), ("complex64", "not an integer dtype")])
def test_bin_dtype_names_are_checked(tmp_path, name, message):
    np.arange(64, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match=message):
        parse_bin_dtype(name)
    with pytest.raises(ValueError, match=message):
        read_tokens([tmp_path / "t.bin"], bin_dtype=name)


CAPACITY = {"uint8": 256, "uint16": 65536, "uint32": 1 << 31, "int32": 1 << 31, "int64": 1 << 31}


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(64, 3000),
       vocab=st.sampled_from([200, 1000, 49152, 65536, 129280]),
       written=st.sampled_from(["uint8", "uint16", "uint32", "int32", "int64", "float32"]),
       read_as=st.sampled_from(["uint8", "uint16", "uint32", "int32", "int64"]), vocab_known=st.booleans())
def test_a_wrong_bin_dtype_is_never_silent(seed, n, vocab, written, read_as, vocab_known):
    """Ids written as one dtype and read as another: refused (with or without the vocabulary given to
    read_tokens; check_token_range always sees it); read as the dtype they were written in: the same ids."""
    if written in CAPACITY and CAPACITY[written] < vocab:
        return  # such a file cannot hold this vocabulary's ids
    ids = np.random.default_rng(seed).integers(0, vocab, n)
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "ids.bin"
        ids.astype(written).tofile(path)
        right = written != "float32" and np.dtype(written).itemsize == np.dtype(read_as).itemsize
        if right and CAPACITY[read_as] >= vocab:
            tokens = read_tokens([path], bin_dtype=read_as, vocab_size=vocab if vocab_known else None)
            check_token_range(tokens, vocab, bin_dtype=read_as)
            np.testing.assert_array_equal(tokens, ids)
            return
        with pytest.raises(ValueError) as err:
            tokens = read_tokens([path], bin_dtype=read_as, vocab_size=vocab if vocab_known else None)
            check_token_range(tokens, vocab, bin_dtype=read_as)
        message = str(err.value)
        assert "bin-dtype" in message or "float32" in message or "vocabulary" in message, message


@pytest.mark.parametrize("written, read_as, likely", [
    ("uint16", "uint8", "likely holds uint16 ids; pass --bin-dtype uint16"),
    ("int32", "uint16", "every other id is 0: the file likely holds int32 ids"),
    ("int64", "int32", "every other id is 0: the file likely holds int64 ids"),
    ("int64", "uint16", "the last 2 of every 4 ids are 0: the file likely holds int64 ids"),
    ("uint16", "uint32", "likely holds uint16 ids"),
    ("float32", "uint16", "whole numbers as float32"),
])
def test_the_error_names_the_dtype_the_file_likely_has(tmp_path, written, read_as, likely):
    ids = np.random.default_rng(0).integers(0, 1000, 4096)
    ids.astype(written).tofile(tmp_path / "ids.bin")
    with pytest.raises(ValueError, match=likely) as err:
        read_tokens([tmp_path / "ids.bin"], bin_dtype=read_as, vocab_size=1000)
    assert "ids.bin" in str(err.value)


def test_ids_past_int32_never_wrap(tmp_path):
    np.array([5, 2 ** 31 + 7], np.int64).tofile(tmp_path / "big.bin")
    with pytest.raises(ValueError, match=r"ids span \[5, 2147483655\], past int32"):
        read_tokens([tmp_path / "big.bin"], bin_dtype="int64")
    np.save(tmp_path / "big.npy", np.array([5, 2 ** 32], np.uint64))
    with pytest.raises(ValueError, match="big.npy: ids span .* past int32"):
        read_tokens([tmp_path / "big.npy"])


def test_bad_npy_files_are_named(tmp_path):
    np.savez(tmp_path / "ids.npz", tokens=np.arange(10))
    (tmp_path / "ids.npz").rename(tmp_path / "renamed.npy")
    with pytest.raises(ValueError, match=r"renamed.npy: an .npz archive \(arrays \['tokens'\]\)"):
        read_tokens([tmp_path / "renamed.npy"])
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(ValueError, match="text.npy: not a readable .npy array"):
        read_tokens([tmp_path / "text.npy"])
    np.save(tmp_path / "cut.npy", np.arange(1000))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.npy: not a readable .npy array"):
        read_tokens([tmp_path / "cut.npy"])
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin is empty"):
        read_tokens([tmp_path / "empty.bin"])
    with pytest.raises(ValueError, match="more than uint8 .bin files can hold; pass --bin-dtype uint16"):
        check_token_range(np.arange(10), 1000, bin_dtype="uint8")


# ---- GGUF, indexer files, convert ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(48, dtype=np.float32).reshape(6, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_gguf_files_are_named(gguf_file, cut):
    from sparse_index_jax.models.convert.gguf import _reader

    blob = gguf_file.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "cut.gguf"
        path.write_bytes(blob[:int(cut * len(blob))])
        try:
            reader = _reader(path)[1]
        except CheckpointError as err:
            assert str(path) in str(err) and "download it again" in str(err)
            return
        # only alignment padding after the last tensor was cut: every tensor is whole
        tensors = {t.name: np.array(t.data) for t in reader.tensors}
        np.testing.assert_array_equal(tensors["token_embd.weight"], np.arange(48).reshape(6, 8))
        np.testing.assert_array_equal(tensors["output_norm.weight"], np.ones(8))


def test_truncated_gguf_through_the_loader(gguf_file, tmp_path):
    from sparse_index_jax.models.convert.gguf import load_gguf_llama

    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_file.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        load_gguf_llama(path, progress=False)


def test_indexer_files_that_are_not_safetensors(tmp_path):
    from sparse_index_jax.models.retrofit import read_indexer_file

    with open(tmp_path / "ix.safetensors", "wb") as f:  # an .npz under the name
        np.savez(f, a=np.arange(3))
    with pytest.raises(ValueError, match="ix.safetensors is not a readable safetensors file") as err:
        read_indexer_file(tmp_path / "ix.safetensors")
    assert "--indexers takes" in str(err.value)
    with pytest.raises(ValueError, match="is a folder"):
        read_indexer_file(tmp_path)
    save_file({"w": np.ones(2, np.float16)}, tmp_path / "meta.safetensors", metadata={"indexer": "{broken"})
    with pytest.raises(ValueError, match="metadata is damaged"):
        read_indexer_file(tmp_path / "meta.safetensors")
    save_file({"w": np.ones(2, np.float16)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no 'indexer' metadata"):
        read_indexer_file(tmp_path / "plain.safetensors")
    with safe_open(str(tmp_path / "plain.safetensors"), "np"):  # the file itself is fine
        pass


def test_convert_into_a_used_folder_exits_2_before_loading(tmp_path, capsys):
    from sparse_index_jax.cli import main

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out, message in [("used", "exists and is not empty"), ("file", "exists and is a file")]:
        with pytest.raises(SystemExit) as exit_:  # the HF folder does not even exist: refused before loading
            main(["convert", str(tmp_path / "no_such_checkpoint"), str(tmp_path / out), "--quiet"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF folder, converted folder) of a tiny DeepSeek-V3.2 checkpoint."""
    import jax.numpy as jnp
    from tiny_models import save_tiny

    from sparse_index_jax import models

    root = tmp_path_factory.mktemp("orbax")
    hf = save_tiny(root / "hf", "deepseek_v32")
    return hf, models.convert(hf, root / "converted", dtype=jnp.bfloat16, progress=False)


def test_a_flipped_byte_in_a_converted_checkpoint_is_caught(converted, tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparse_index_jax.models.convert.loader import ORBAX_MARKER, load_converted

    _, folder = converted
    marker = json.loads((folder / ORBAX_MARKER).read_text())
    assert "layers/0/mlp/down_proj/kernel" in marker["checksums"]
    good = load_converted(folder)
    wider = load_converted(folder, dtype=jnp.float32)  # checked in the stored dtype, then cast
    for a, b in zip(jax.tree.leaves(nnx.state(good)), jax.tree.leaves(nnx.state(wider))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    data = sorted((folder / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)[-1]
    for at in (0.3, 0.7):
        damaged = tmp_path / f"damaged_{at}"
        shutil.copytree(folder, damaged)
        target = damaged / data.relative_to(folder)
        blob = bytearray(target.read_bytes())
        blob[int(at * len(blob))] ^= 0x08
        target.write_bytes(bytes(blob))
        with pytest.raises(CheckpointError, match="damaged") as err:
            load_converted(damaged)
        assert str(damaged) in str(err.value)
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    marker["checksums"]["layers/0/mlp/down_proj/kernel"]["crc32"] ^= 1
    (edited / ORBAX_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="array 'layers/0/mlp/down_proj/kernel' does not match the checksum"):
        load_converted(edited)
    load_converted(edited, verify=False)  # the opt-out skips the pass
    (edited / ORBAX_MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable marker"):
        load_converted(edited)
    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    (missing / data.relative_to(folder)).unlink()
    with pytest.raises(CheckpointError, match="could not be read"):
        load_converted(missing)
