"""A lazy, memory-mapped safetensors reader that needs neither torch nor the safetensors package.

Why our own: the ``safetensors`` numpy API cannot return F8_E4M3 tensors, and its errors do not say
which file of a sharded checkpoint is broken. The format is simple: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data. Each tensor is a view
into a read-only memory map, so nothing is read until used and nothing is held twice.
"""

from __future__ import annotations

import json
import math
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


def scale_name_of(weight_name: str) -> str:
    """The block-scale tensor stored next to an FP8 weight."""
    return weight_name.removesuffix(".weight") + ".weight_scale_inv"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed or does not fit the model."""


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked on open, tensors mapped on demand."""

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
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: the header is not valid JSON ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r} "
                                      f"(known dtypes: {sorted(DTYPES)})") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} claims {end - begin} bytes for shape {shape} "
                                      f"of {info['dtype']}")
            if end > data_size:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {end} of the data section but the "
                                      f"file holds {data_size}: the file is truncated")
            self.entries[name] = (dtype, shape, begin, end)
        self._map: np.memmap | None = None

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + begin: self._data_start + end]
        return raw.view(dtype).reshape(shape)


class CheckpointReader:
    """All tensors of an HF checkpoint folder: one file, or shards listed in ``model.safetensors.index.json``."""

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

    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> pathlib.Path:
        return self.folder / self._where[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.folder} "
                                  f"({len(self._files)} file(s) searched)")
        return self._files[self._where[name]].get(name)

    def get_dequantized(self, name: str, block_size: tuple[int, int] | None) -> np.ndarray:
        """The tensor as float32 (upcast), FP8 weights multiplied by their ``weight_scale_inv`` blocks."""
        value = self.get(name)
        if value.dtype not in (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"]):
            if not np.issubdtype(value.dtype, np.floating) and value.dtype != DTYPES["BF16"]:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} is {value.dtype}, expected a float")
            return np.asarray(value, np.float32)
        scale_name = scale_name_of(name)
        if scale_name not in self:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale_name!r}")
        if block_size is None:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} but config.json has no "
                                  f"quantization_config.weight_block_size")
        if value.ndim != 2:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} must be 2-D, got {value.shape}")
        scale = np.asarray(self.get(scale_name), np.float32)
        bo, bi = block_size
        out_dim, in_dim = value.shape
        grid = (-(-out_dim // bo), -(-in_dim // bi))
        if scale.shape != grid:
            raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} has shape {scale.shape}; a "
                                  f"{value.shape} weight in blocks of {list(block_size)} needs {grid}")
        full = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[:out_dim, :in_dim]
        return value.astype(np.float32) * full  # the checkpoint stores the inverse scale: MULTIPLY
