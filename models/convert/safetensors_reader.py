"""A safetensors reader that needs neither torch nor the safetensors package, and reads slices.

The format is simple: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then each tensor's raw bytes in row-major order. ``SafetensorsFile.read(name, index)``
reads ``tensor[index]`` (one contiguous slice per stored dimension) with positional reads
(``os.preadv``) of exactly its bytes, one read per contiguous run: an index that keeps the trailing
dimensions whole is few long runs, a slice of a weight's columns is one run per row. Nothing is
memory-mapped, so the bytes a loader touches are the bytes it asked for, and ``bytes_read`` counts them.
``CheckpointReader.get_dequantized(name, block, index)`` reads an FP8 weight's slice and only the
``weight_scale_inv`` blocks that cover it.

Opening a file checks its header as the format (and the ``safetensors`` package) requires: every entry's size is
numel * itemsize, and sorted by offset the tensors tile the data section exactly, from byte 0 to the end of the
file (an overlap, gap or trailing bytes would mean wrong weights); block scales must be finite floats (F32, BF16,
F16). Errors (``CheckpointError``, a ``ValueError``) name the file, the tensor and the fix.

Why not ``safetensors.safe_open(..., framework="np").get_slice``: with the installed safetensors 0.8.0
it slices F32 and BF16 (as ml_dtypes.bfloat16) but fails on F8_E4M3 (``AttributeError: module 'numpy'
has no attribute 'float8_e4m3fn'``), the dtype of the official DeepSeek-V3.2 and GLM-5 weights; its
errors do not say which file of a sharded checkpoint is broken; and it cannot say how many bytes it read.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 256 * 1024 * 1024
# the dtypes a block-scale (``weight_scale_inv``) may have: DeepSeek-V3.2 and GLM-5 store float32
SCALE_DTYPES = (DTYPES["F32"], DTYPES["BF16"], DTYPES["F16"])
_FIX = "the file is corrupt or was not written by a safetensors writer: download it again (compare its sha256 with " \
       "the one the hub lists) or save it again"


def scale_name_of(weight_name: str) -> str:
    """The block-scale tensor stored next to an FP8 weight."""
    return weight_name.removesuffix(".weight") + ".weight_scale_inv"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed or does not fit the model."""


Index = tuple[slice, ...]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    """A JSON object's pairs as a dict; a key given twice (the later one would silently win) is refused."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: pathlib.Path, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked as the format requires."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or not isinstance(info.get("shape"), list) \
            or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r} (it needs dtype, shape "
                              f"and data_offsets [begin, end]); {_FIX}")
    if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which this reader does not know "
                              f"(known: {', '.join(sorted(DTYPES))}); {_FIX}")
    if not all(map(_is_count, info["shape"])) or not all(map(_is_count, info["data_offsets"])):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {info['shape']} and data_offsets "
                              f"{info['data_offsets']}: both must hold non-negative integers; {_FIX}")
    dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes) but "
                              f"shape {list(shape)} of {info['dtype']} is {math.prod(shape) * dtype.itemsize} bytes; "
                              f"{_FIX}")
    return dtype, shape, begin, end


def _check_tiling(path: pathlib.Path, entries: dict, data_size: int) -> None:
    """The format's rule (which the ``safetensors`` package enforces too): sorted by offset, the tensors tile the
    data section exactly, from byte 0 to the end of the file: no overlap (two tensors sharing bytes), no gap, no
    trailing bytes. An offset that breaks it means the header and the data disagree: some weights would be wrong."""
    position, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            what = (f"overlaps {previous!r}, which ends at byte {position}" if begin < position else
                    f"leaves bytes [{position}, {begin}) that no tensor owns")
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data section and {what} "
                                  f"(invalid offset); {_FIX}")
        position, previous = end, name
    if position > data_size:
        raise CheckpointError(f"{path}: tensor {previous!r} ends at byte {position} of the data section but the file "
                              f"holds {data_size}: the file is truncated; download it again")
    if position < data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes follow the last tensor's data (the header "
                              f"accounts for {position} of {data_size}); {_FIX}")


def _slice_bounds(index: Index | None, shape: tuple[int, ...], where: str) -> list[tuple[int, int]]:
    """[(start, stop)] per dimension of ``shape`` for ``index`` (None: everything), clamped as numpy clamps."""
    if index is None:
        return [(0, n) for n in shape]
    if len(index) != len(shape) or not all(isinstance(s, slice) for s in index):
        raise CheckpointError(f"{where}: index {index!r} must be one slice per dimension of the stored shape {shape}")
    bounds = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise CheckpointError(f"{where}: index {index!r} has step {step}; only contiguous slices are read")
        bounds.append((start, max(start, stop)))
    return bounds


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked on open, tensor data read on demand.

    ``bytes_read`` counts the data bytes read so far (headers excluded).
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated file ({size} bytes): no safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: bad header length {n} for a file of {size} bytes "
                                      f"(truncated or not a safetensors file)")
            raw = f.read(n)
        try:
            header = json.loads(raw, object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _DuplicateKey) as err:
            raise CheckpointError(f"{self.path}: the header is not valid JSON ({err}); {_FIX}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the header is not a JSON object; {_FIX}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: __metadata__ must be a JSON object of strings; {_FIX}")
        self.metadata = metadata
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = _entry(self.path, name, info)
        _check_tiling(self.path, self.entries, size - self._data_start)
        self.bytes_read = 0
        self._file = None  # opened on the first read: only the files a host reads from hold a descriptor

    def keys(self):
        return self.entries.keys()

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(stored shape, dtype) from the header; reads no data."""
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """``tensor[index]`` (one slice per stored dimension; None: all of it) as a new array, reading only its bytes.

        Dimensions after the last partial one are whole, so each index of the leading dimensions is one contiguous
        run of the file: one positional read per run.
        """
        dtype, shape, begin, _ = self.entries[name]
        bounds = _slice_bounds(index, shape, f"{self.path}: tensor {name!r}")
        out = np.empty([stop - start for start, stop in bounds], dtype)
        if out.size == 0:
            return out
        partial = len(shape)  # dimensions [partial:] are whole and merge into the runs
        while partial > 0 and bounds[partial - 1] == (0, shape[partial - 1]):
            partial -= 1
        strides = [math.prod(shape[d + 1:]) * dtype.itemsize for d in range(len(shape))]
        run_dim = max(partial - 1, 0)  # the runs span [start, stop) of this dimension and everything after it
        run = (bounds[run_dim][1] - bounds[run_dim][0]) * strides[run_dim] if shape else dtype.itemsize
        first = self._data_start + begin + sum(start * stride for (start, _), stride in zip(bounds, strides))
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        for k, lead in enumerate(itertools.product(*(range(stop - start) for start, stop in bounds[:run_dim]))):
            offset = first + sum(i * stride for i, stride in zip(lead, strides))
            self._read_into(buffer[k * run:(k + 1) * run], offset, name)
        return out

    def _read_into(self, buffer: memoryview, offset: int, name: str) -> None:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        while len(buffer):  # a read may return less than asked (Linux caps one read at ~2 GiB)
            n = os.preadv(self._file.fileno(), [buffer], offset)
            if n == 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: the file ends at byte {offset}; it was "
                                      f"truncated after it was opened")
            buffer, offset = buffer[n:], offset + n
            self.bytes_read += n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CheckpointReader:
    """All tensors of an HF checkpoint folder: one file, or shards listed in ``model.safetensors.index.json``.

    A context manager: leaving it closes the files.
    """

    def __init__(self, folder: str | pathlib.Path):
        self.folder = pathlib.Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
            for name, file in weight_map.items():
                shard = self._open(file, f"listed in {index.name} for tensor {name!r}")
                if name not in shard.entries:
                    raise CheckpointError(f"{shard.path}: {index.name} says it holds tensor {name!r}, but it does not")
                self._where[name] = file
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no model.safetensors.index.json")
            for file in files:
                for name in self._open(file, "").entries:
                    if name in self._where:
                        raise CheckpointError(f"tensor {name!r} appears in both {self._where[name]} and {file}")
                    self._where[name] = file

    def _open(self, file: str, why: str) -> SafetensorsFile:
        if file not in self._files:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"{path}: shard missing ({why})")
            self._files[file] = SafetensorsFile(path)
        return self._files[file]

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        for file in self._files.values():
            file.close()

    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> pathlib.Path:
        return self.folder / self._where[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def bytes_read(self) -> int:
        """Data bytes read so far from all files."""
        return sum(file.bytes_read for file in self._files.values())

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.folder} "
                                  f"({len(self._files)} file(s) searched)")
        return self._files[self._where[name]]

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(stored shape, dtype) of a tensor, from its file's header: no data is read."""
        return self._file(name).info(name)

    def get(self, name: str, index: Index | None = None) -> np.ndarray:
        """``tensor[index]`` in its stored dtype, reading only those bytes (None: the whole tensor)."""
        return self._file(name).read(name, index)

    def get_dequantized(self, name: str, block_size: tuple[int, int] | None, index: Index | None = None) -> np.ndarray:
        """``tensor[index]`` as float32 (upcast); FP8 weights are multiplied by their ``weight_scale_inv`` blocks,
        of which only those covering the slice are read. ``index``: one slice per stored dimension (None: all)."""
        shape, dtype = self.info(name)
        if dtype not in (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"]):
            if not np.issubdtype(dtype, np.floating) and dtype != DTYPES["BF16"]:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} is {dtype}, expected a float")
            return np.asarray(self.get(name, index), np.float32)
        scale_name = scale_name_of(name)
        if scale_name not in self:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale_name!r}")
        if block_size is None:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} but config.json has no "
                                  f"quantization_config.weight_block_size")
        if len(shape) != 2:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} must be 2-D, got {shape}")
        scale_dtype = self.info(scale_name)[1]
        if scale_dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} is {scale_dtype}; block scales must be "
                                  f"a float dtype ({', '.join(map(str, SCALE_DTYPES))}; DeepSeek-V3.2 and GLM-5 "
                                  f"store float32): the checkpoint was saved wrongly; re-quantise or download it again")
        bo, bi = block_size
        grid = (-(-shape[0] // bo), -(-shape[1] // bi))
        if self.info(scale_name)[0] != grid:
            raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} has shape {self.info(scale_name)[0]}; "
                                  f"a {shape} weight in blocks of {list(block_size)} needs {grid}")
        (r0, r1), (c0, c1) = _slice_bounds(index, shape, f"{self.file_of(name)}: tensor {name!r}")
        value = self.get(name, (slice(r0, r1), slice(c0, c1))).astype(np.float32)
        if value.size == 0:
            return value
        # the blocks covering rows [r0, r1) and columns [c0, c1); a slice may start or end inside a block
        rows, cols = np.arange(r0, r1) // bo, np.arange(c0, c1) // bi
        scale = np.asarray(self.get(scale_name, (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))),
                           np.float32)
        if not np.isfinite(scale).all():
            raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} holds non-finite block scales (NaN or "
                                  f"inf) for rows [{r0}, {r1}) x columns [{c0}, {c1}) of {name!r}: the file is "
                                  f"corrupt; download it again")
        return value * scale[np.ix_(rows - rows[0], cols - cols[0])]  # the checkpoint stores the inverse: MULTIPLY
