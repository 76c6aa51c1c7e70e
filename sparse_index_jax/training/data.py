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


def read_tokens(files: Sequence[str | pathlib.Path], *, bin_dtype: str = "uint16", tokenizer=None,
                eos_id: int | None = None) -> np.ndarray:
    """All files' tokens as one int32 array (EOS between files when ``eos_id`` is given)."""
    if not files:
        raise ValueError("read_tokens: no data files given")
    parts = []
    for file in map(pathlib.Path, files):
        if not file.is_file():
            raise FileNotFoundError(f"data file {file} does not exist")
        suffix = file.suffix.lower()
        if suffix == ".npy":
            tokens = np.load(file, mmap_mode="r")
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"{file}: expected a 1-D integer array of token ids, got {tokens.shape} "
                                 f"{tokens.dtype}")
        elif suffix == ".bin":
            itemsize = np.dtype(bin_dtype).itemsize
            if file.stat().st_size % itemsize:
                raise ValueError(f"{file}: {file.stat().st_size} bytes is not a whole number of {bin_dtype} "
                                 f"tokens; is --bin-dtype right?")
            tokens = np.memmap(file, dtype=np.dtype(bin_dtype), mode="r")
        elif suffix in TEXT_SUFFIXES:
            if tokenizer is None:
                raise ValueError(f"{file} is text: pass a tokenizer (e.g. the model folder's tokenizer.json), or "
                                 f"give token ids as .npy / .bin files")
            tokens = np.asarray(tokenizer.encode(file.read_text(errors="replace")).ids, np.int64)
        else:
            raise ValueError(f"{file}: unknown data format {suffix!r}; use .npy, .bin, or text "
                             f"({sorted(TEXT_SUFFIXES)})")
        parts.append(np.asarray(tokens, np.int32))
        if eos_id is not None:
            parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts)


def check_token_range(tokens: np.ndarray, vocab_size: int, *, bin_dtype: str = "uint16") -> None:
    """Token ids must index the model's vocabulary: an id past it would embed as garbage (or NaN)."""
    if np.dtype(bin_dtype).itemsize == 2 and vocab_size > 65536:
        raise ValueError(f"the model's vocabulary has {vocab_size} tokens, more than uint16 .bin files can hold; "
                         f"pass --bin-dtype uint32 (and write the files that way)")
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
