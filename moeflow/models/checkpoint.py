"""Read safetensors checkpoints lazily, without copying.

A checkpoint directory holds either `model.safetensors` or several shards listed in
`model.safetensors.index.json`. Each file is memory-mapped once; `Checkpoint.get` returns a
tensor that views the mapping, so bytes are read from disk only when an op touches them and
the page cache, not the process heap, holds them. The mapping is private (copy-on-write):
nothing moeflow does can write to the file.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw data. Everything in the header is
checked before use, and every error names the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or lacks a tensor the model needs."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One memory-mapped .safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            raise CheckpointError(f"{path}: a directory, not a safetensors file")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open it ({exc.strerror or exc})") from None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: header length {header_len} does not fit in a {size}-byte file")
            raw = os.pread(fd, header_len, 8)
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, data_len)

    def _parse_entry(self, name: str, entry: object, data_len: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype = SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported dtype {entry.get('dtype')!r}")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} do not hold shape {shape} of "
                f"{entry.get('dtype')} within {data_len} bytes of data")
        return TensorInfo(dtype, tuple(shape), begin, end)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        numel = (info.end - info.begin) // info.dtype.itemsize
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map, dtype=info.dtype, count=numel,
                                offset=self._data_start + info.begin)
        return flat.view(info.shape)


class Checkpoint:
    """All tensors of a checkpoint directory, by name, mapped lazily."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            self._load_index(index)
        elif single.exists():
            shard = self._open(SINGLE_FILE)
            self._where = {name: SINGLE_FILE for name in shard.tensors}
        else:
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def _open(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            self._files[filename] = SafetensorsFile(self.directory / filename)
        return self._files[filename]

    def _load_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except OSError as exc:
            raise CheckpointError(f"{index}: cannot read it ({exc.strerror or exc})") from None
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or "/" in filename or filename.startswith("."):
                raise CheckpointError(f"{index}: tensor {name!r} maps to a bad file {filename!r}")
            shard = self._open(filename)
            if name not in shard.tensors:
                raise CheckpointError(
                    f"{index}: lists tensor {name!r} in {filename}, which does not contain it")
            self._where[name] = filename

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def file_of(self, name: str) -> Path:
        return self.directory / self._where[name]

    def info(self, name: str) -> TensorInfo:
        self._check_present(name)
        return self._files[self._where[name]].tensors[name]

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name`, viewing the mapped file. With `shape`, a mismatch is an error
        that names the file and the tensor."""
        self._check_present(name)
        filename = self._where[name]
        tensor = self._files[filename].get(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.directory / filename}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"expected {list(shape)}")
        return tensor

    def _check_present(self, name: str) -> None:
        if name not in self._where:
            files = sorted({*self._where.values()}) or [SINGLE_FILE]
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is missing (looked in {', '.join(files)})")
