"""Token files, packing, the seeded split and shuffling, and the checks that keep bad data out."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_index_jax.training.data import PackedDataset, check_token_range, read_tokens


def test_read_and_pack(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(50, dtype=np.uint16))
    np.arange(50, 80, dtype=np.uint32).tofile(tmp_path / "b.bin")
    tokens = read_tokens([tmp_path / "a.npy", tmp_path / "b.bin"], bin_dtype="uint32", eos_id=99)
    assert tokens.tolist() == list(range(50)) + [99] + list(range(50, 80)) + [99]
    data = PackedDataset(tokens, 8, seed=3, heldout_fraction=0.25)
    assert len(data.train_ids) + len(data.heldout_ids) == (len(tokens) - 1) // 8
    assert not set(data.train_ids) & set(data.heldout_ids)
    x, y = data.sequence(2)
    assert x.tolist() == tokens[16:24].tolist() and y.tolist() == tokens[17:25].tolist()
    # batch `step` is a pure function of (seed, step): what a resumed run relies on
    a, b = data.train_batch(5, 2), PackedDataset(tokens, 8, seed=3, heldout_fraction=0.25).train_batch(5, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(data.train_batch(0, 2)[0], PackedDataset(tokens, 8, seed=4).train_batch(0, 2)[0])


def test_bad_data_is_refused(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a whole number of uint16"):
        read_tokens([tmp_path / "odd.bin"])
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="pass a tokenizer"):
        read_tokens([tmp_path / "t.txt"])
    with pytest.raises(FileNotFoundError):
        read_tokens([tmp_path / "missing.npy"])
    with pytest.raises(ValueError, match=r"span \[0, 120\] but the model's vocabulary is \[0, 100\)"):
        check_token_range(np.arange(121), 100, bin_dtype="int32")
    with pytest.raises(ValueError, match="--bin-dtype uint32"):
        check_token_range(np.arange(10), 154880, bin_dtype="uint16")
    with pytest.raises(ValueError, match="do not fill one sequence"):
        PackedDataset(np.arange(5), 8)
    with pytest.raises(ValueError, match="batch_size 13 exceeds the 12 training sequences"):
        PackedDataset(np.arange(100), 8, heldout_fraction=0.0).train_batch(0, 13)


def test_stdlib_packages_add_train_text_only():
    """``packages=True`` adds package sources to the train split; the held-out files never change side, and
    neither test suites nor installed third-party packages get in."""
    from sparse_index_jax.training.data import python_stdlib_files

    train, heldout = python_stdlib_files("train"), python_stdlib_files("heldout")
    more = python_stdlib_files("train", packages=True)
    assert more[:len(train)] == train and len(more) > 2 * len(train)
    assert not set(heldout) & set(more) and python_stdlib_files("heldout", packages=True) == heldout
    assert all(f.suffix == ".py" for f in more)
    assert not any({"site-packages", "test", "tests", "idle_test"} & set(f.parts) for f in more[len(train):])
