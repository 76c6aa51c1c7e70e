"""Token data for calibration (IndexCache search) and indexer distillation.

Files are read as token ids: ``.npy`` (any integer dtype), ``.bin`` (raw little-endian integers,
``uint16`` by default as nanoGPT-style dumps are), or text (``.txt``, ``.md``, ``.py``, ...) tokenised
with a ``tokenizers`` JSON tokenizer. Tokens of all files are concatenated (an EOS id between files
when given) and packed into fixed-length sequences of ``seq_len + 1`` tokens (inputs and next-token
targets). Sequences are split into train and held-out by a seeded permutation, and training batches
follow a seeded permutation per epoch: batch ``step`` is a pure function of (seed, step), so a
resumed run sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Sequence

import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".c", ".h"}


BIN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")  # what --bin-dtype names; any numpy integer works
_INT_OF_SIZE = {2: "uint16", 4: "int32", 8: "int64", 1: "uint8"}  # the order guesses are tried in
_INT32 = np.iinfo(np.int32)
_SAMPLE_BYTES = 1 << 20  # how much of each .bin file the dtype sanity check looks at


def parse_bin_dtype(name) -> np.dtype:
    """The numpy dtype of ``--bin-dtype``: integers only (token ids are integers; a float dtype would read
    each id's bytes as a float and turn it into garbage)."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise ValueError(f"--bin-dtype {name!r} is not a dtype; .bin token files hold integers: "
                         f"{', '.join(BIN_DTYPES)}") from None
    if dtype.kind not in "iu":
        raise ValueError(f"--bin-dtype {name!r} is {dtype}, not an integer dtype; .bin token files hold integer ids "
                         f"({', '.join(BIN_DTYPES)}); convert a file of float ids first, e.g. "
                         f"np.fromfile(path, np.{dtype}).astype(np.int32).tofile(new_path)")
    return dtype


def read_tokens(files: Sequence[str | pathlib.Path], *, bin_dtype: str = "uint16", tokenizer=None,
                eos_id: int | None = None, vocab_size: int | None = None) -> np.ndarray:
    """All files' tokens as one int32 array (EOS between files when ``eos_id`` is given).

    A ``.bin`` file's bytes say nothing of their dtype, so each is checked before use: its size must be a whole
    number of ``bin_dtype`` ids, and its first MiB must look like ids of that dtype (not every other id 0, as a
    wider dtype read narrow gives; not whole-number floats; with ``vocab_size``, every id in the vocabulary),
    else the error names the dtype the file likely holds. Ids that int32 cannot hold are refused (no wrapping).
    """
    if not files:
        raise ValueError("read_tokens: no data files given")
    parts = []
    for file in map(pathlib.Path, files):
        if not file.is_file():
            raise FileNotFoundError(f"data file {file} does not exist")
        suffix = file.suffix.lower()
        if suffix == ".npy":
            tokens = _load_npy(file)
        elif suffix == ".bin":
            dtype, size = parse_bin_dtype(bin_dtype), file.stat().st_size
            if size == 0:
                raise ValueError(f"{file} is empty: it holds no tokens")
            if size % dtype.itemsize:
                raise ValueError(f"{file}: {size} bytes is not a whole number of {dtype} tokens; is --bin-dtype "
                                 f"right?{_sizes_that_fit(size)}")
            problem = _bin_problem(np.fromfile(file, np.uint8, count=_SAMPLE_BYTES), dtype, vocab_size)
            if problem:
                raise ValueError(f"{file} read as {dtype}: {problem}")
            tokens = np.memmap(file, dtype=dtype.newbyteorder("<"), mode="r")
        elif suffix in TEXT_SUFFIXES:
            if tokenizer is None:
                raise ValueError(f"{file} is text: pass a tokenizer (e.g. the model folder's tokenizer.json), or "
                                 f"give token ids as .npy / .bin files")
            tokens = np.asarray(tokenizer.encode(file.read_text(errors="replace")).ids, np.int64)
        else:
            raise ValueError(f"{file}: unknown data format {suffix!r}; use .npy, .bin, or text "
                             f"({sorted(TEXT_SUFFIXES)})")
        if len(tokens) and not np.can_cast(tokens.dtype, np.int32):  # one pass: ids past int32 would wrap
            low, high = int(tokens.min()), int(tokens.max())
            if low < _INT32.min or high > _INT32.max:
                hint = "; is --bin-dtype right?" if suffix == ".bin" else ": these are not token ids"
                raise ValueError(f"{file}: ids span [{low}, {high}], past int32 (no vocabulary is that large){hint}")
        parts.append(np.asarray(tokens, np.int32))
        if eos_id is not None:
            parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts)


def _load_npy(file: pathlib.Path) -> np.ndarray:
    try:
        tokens = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{file}: not a readable .npy array ({err}); save token ids with np.save(path, ids)") from None
    if not isinstance(tokens, np.ndarray):  # np.load opens a zip (an .npz renamed .npy) as an NpzFile
        names = list(getattr(tokens, "files", []))
        getattr(tokens, "close", lambda: None)()
        raise ValueError(f"{file}: an .npz archive (arrays {names}), not one .npy array; save the token ids alone: "
                         f"np.save('ids.npy', np.load('{file}')[{(names or ['name'])[0]!r}])")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{file}: expected a 1-D integer array of token ids, got {tokens.shape} {tokens.dtype}")
    return tokens


def _bin_problem(raw: np.ndarray, dtype: np.dtype, vocab_size: int | None) -> str | None:
    """Why bytes ``raw`` (a file's first MiB) do not look like token ids of ``dtype``, naming the dtype they likely
    are; None when they do."""
    raw = raw[:len(raw) - len(raw) % 8] if len(raw) >= 8 else raw[:len(raw) - len(raw) % dtype.itemsize]
    floats = _float_ids(raw, vocab_size)
    if floats:
        return (f"its bytes are whole numbers as {floats} (token ids stored as floats); convert the file: "
                f"np.fromfile(path, np.{floats}).astype(np.int32).tofile(new_path), then pass --bin-dtype int32")
    ids = raw.view(dtype.newbyteorder("<"))
    for wide in (8, 4, 2):  # a wider dtype read narrow: the upper half of every `wide` bytes is 0 (little-endian)
        k = wide // dtype.itemsize
        if k < 2 or len(ids) < 16 * k:
            continue
        rows = ids[:len(ids) - len(ids) % k].reshape(-1, k)
        if (rows[:, k // 2:] == 0).mean() >= 0.99 and (rows[:, :k // 2] == 0).all(axis=1).mean() < 0.5:
            return (f"{'every other id is' if k == 2 else f'the last {k // 2} of every {k} ids are'} 0: the file "
                    f"likely holds {_INT_OF_SIZE[wide]} ids; pass --bin-dtype {_INT_OF_SIZE[wide]}")
    if vocab_size is not None and len(ids):
        low, high = int(ids.min()), int(ids.max())
        if vocab_size > int(np.iinfo(dtype).max) + 1:
            return (f"the model's vocabulary has {vocab_size} tokens, more than {dtype} can hold"
                    + _guess(raw, dtype, vocab_size, ", so the file likely holds {0} ids; pass --bin-dtype {0}"))
        if low < 0 or high >= vocab_size:
            return (f"ids in its first MiB span [{low}, {high}] but the model's vocabulary is [0, {vocab_size})"
                    + _guess(raw, dtype, vocab_size, ": the file likely holds {0} ids; pass --bin-dtype {0}",
                             ": wrong tokenizer, or a file that is not token ids?"))
    return None


def _float_ids(raw: np.ndarray, vocab_size: int | None) -> str | None:
    """The float dtype under which ``raw`` is all whole numbers in [0, vocab) (at least half of them non-zero)."""
    for name in ("float32", "float64", "float16"):
        itemsize = np.dtype(name).itemsize
        if len(raw) < 4 * itemsize or len(raw) % itemsize:
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            values = raw.view(np.dtype(name).newbyteorder("<")).astype(np.float64)
        if (np.isfinite(values).all() and (values == np.round(values)).all() and (values >= 0).all()
                and values.max() < (vocab_size or 1 << 24) and (values != 0).mean() >= 0.5):
            return name
    return None


def _guess(raw: np.ndarray, dtype: np.dtype, vocab_size: int, found: str, otherwise: str = "") -> str:
    """``found`` formatted with the integer dtype under which ``raw`` is ids in [0, vocab) (not half zeros)."""
    for itemsize, name in _INT_OF_SIZE.items():
        if itemsize == dtype.itemsize or len(raw) % itemsize or not len(raw):
            continue
        ids = raw.view(np.dtype(name).newbyteorder("<"))
        if ids.min() >= 0 and ids.max() < vocab_size and (ids == 0).mean() < 0.5 and \
                (itemsize > 1 or vocab_size <= 256):
            return found.format(name)
    return otherwise


def _sizes_that_fit(size: int) -> str:
    """" (its size fits uint8, ...)": the integer dtypes of which ``size`` bytes is a whole number."""
    fits = [name for itemsize, name in sorted(_INT_OF_SIZE.items()) if size % itemsize == 0]
    return f" (its size fits {', '.join(fits)})"


def check_token_range(tokens: np.ndarray, vocab_size: int, *, bin_dtype: str = "uint16") -> None:
    """Token ids must index the model's vocabulary: an id past it would embed as garbage (or NaN)."""
    dtype = parse_bin_dtype(bin_dtype)
    if vocab_size > int(np.iinfo(dtype).max) + 1:
        wider = "uint16" if vocab_size <= 65536 else "uint32"
        raise ValueError(f"the model's vocabulary has {vocab_size} tokens, more than {dtype} .bin files can hold; "
                         f"pass --bin-dtype {wider} (and write the files that way)")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but the model's vocabulary is "
                         f"[0, {vocab_size}): wrong tokenizer or --bin-dtype?")


def load_tokenizer(model_dir: str | pathlib.Path):
    """The ``tokenizer.json`` of a model folder, or None if it has none."""
    path = pathlib.Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(f"{path} needs the 'tokenizers' package to read text data: pip install tokenizers") from None
    return Tokenizer.from_file(str(path))


@dataclasses.dataclass
class PackedDataset:
    """Fixed-length LM sequences with a seeded train / held-out split and seeded epoch shuffling."""

    tokens: np.ndarray
    seq_len: int
    seed: int = 0
    heldout_fraction: float = 0.1

    def __post_init__(self):
        if self.seq_len <= 0:
            raise ValueError(f"PackedDataset: seq_len must be positive, got {self.seq_len}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"PackedDataset: heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        n = (len(self.tokens) - 1) // self.seq_len
        if n < 1:
            raise ValueError(f"PackedDataset: {len(self.tokens)} tokens do not fill one sequence of "
                             f"{self.seq_len} + 1 tokens")
        order = np.random.default_rng([self.seed, 0]).permutation(n)
        n_heldout = int(round(n * self.heldout_fraction))
        if self.heldout_fraction > 0:
            n_heldout = min(max(n_heldout, 1), n - 1) if n > 1 else 0
        self.heldout_ids = np.sort(order[:n_heldout])
        self.train_ids = np.sort(order[n_heldout:])

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        chunk = np.asarray(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1], np.int32)
        return chunk[:-1], chunk[1:]

    def _stack(self, ids) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sequence(int(i)) for i in ids]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def train_batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``step``: a pure function of (seed, step). An epoch is one seeded permutation of the train
        sequences cut into full batches (the remainder, n % batch_size sequences, waits for a later epoch)."""
        n = len(self.train_ids)
        if batch_size > n:
            raise ValueError(f"PackedDataset: batch_size {batch_size} exceeds the {n} training sequences")
        per_epoch = n // batch_size
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
        return self._stack(self.train_ids[order[k * batch_size:(k + 1) * batch_size]])

    def heldout_batches(self, batch_size: int, max_batches: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = self.heldout_ids if len(self.heldout_ids) else self.train_ids
        batches = [self._stack(ids[i:i + batch_size]) for i in range(0, len(ids) - batch_size + 1, batch_size)]
        if not batches:
            raise ValueError(f"PackedDataset: only {len(ids)} held-out sequences for batches of {batch_size}")
        return batches[:max_batches] if max_batches else batches

    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.asarray(self.tokens[: 1 << 20]).tobytes())
        digest.update(f"{len(self.tokens)}/{self.seq_len}/{self.seed}/{self.heldout_fraction}".encode())
        return digest.hexdigest()[:16]


def python_stdlib_files(split: str = "train", heldout_every: int = 10, *, packages: bool = False) -> list[pathlib.Path]:
    """CPython's own standard-library sources (the top-level ``*.py`` files): an offline text corpus on every
    machine with Python, sorted by name. A file is ``"heldout"`` when the CRC-32 of its name is divisible by
    ``heldout_every``, else ``"train"``: held-out text is never trained on, and a module keeps its side across
    Python versions (whose file lists differ). Compare runs by ``PackedDataset.fingerprint``.

    ``packages`` adds, to the train split only, the sources inside the standard library's packages (asyncio/,
    email/, ...; test suites and site-packages left out): about 2.8x the tokens (3M with SmolLM2's tokenizer on
    CPython 3.11, against 1.1M), for long-sequence runs that would otherwise repeat the top-level files many
    times. The held-out files stay the same (all top-level)."""
    import sysconfig
    import zlib

    if split not in ("train", "heldout"):
        raise ValueError(f"python_stdlib_files: split must be 'train' or 'heldout', got {split!r}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError("no standard-library sources found next to this Python (a stripped install?)")
    chosen = [f for f in files if (zlib.crc32(f.name.encode()) % heldout_every == 0) == (split == "heldout")]
    if packages and split == "train":
        skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
        chosen += sorted(f for f in root.glob("*/**/*.py") if not skip & set(f.relative_to(root).parts[:-1]))
    return chosen
