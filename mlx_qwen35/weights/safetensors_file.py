"""The safetensors container, read and written by hand where MLX's `mx.load` / `mx.save_safetensors`
would need whole tensors in memory: headers (names, dtypes, shapes, sizes) without the data, and
files whose header is written first and whose tensors are then filled in one at a time, or one
slice of their first axis at a time."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError

ST_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint8: "U8",
    mx.int32: "I32",
    mx.int64: "I64",
}
# Bytes per element of the dtypes a checkpoint may hold, by their safetensors names.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_METADATA = {"format": "mlx"}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a file: name, shape and dtype (planned, or read from a header)."""

    key: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


def read_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The header entries of a safetensors file (name -> dtype, shape, data_offsets), after
    checking that the file is whole (a truncated download fails here, before anything else)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"the file has {size} bytes but its header describes {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise UserError(
            f"{path}: cannot read this safetensors shard ({e}); it is corrupt or truncated, "
            f"download it again"
        ) from None
    return entries


def read_header(path: Path) -> list[str]:
    """The tensor names of a safetensors file in data order (see `read_entries`)."""
    entries = read_entries(path)
    return sorted(entries, key=lambda k: int(entries[k]["data_offsets"][0]))


def header_bytes(tensors: list[Tensor]) -> bytes:
    """The header of a file holding `tensors` in this order, length prefix included."""
    entries: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for t in tensors:
        if t.dtype not in ST_DTYPES:
            raise UserError(f"{t.key}: dtype {t.dtype} cannot be stored in safetensors")
        entries[t.key] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def file_size(tensors: list[Tensor]) -> int:
    return len(header_bytes(tensors)) + sum(t.nbytes for t in tensors)


class ShardWriter:
    """Writes a safetensors file whose header is known up front; each tensor arrives whole or as
    `count` equal slices of its first axis (`index` 0..count-1, in any order)."""

    def __init__(self, path: Path, tensors: list[Tensor]):
        self.path = path
        header = header_bytes(tensors)
        self.planned = {t.key: t for t in tensors}
        self.offsets: dict[str, int] = {}
        offset = len(header)
        for t in tensors:
            self.offsets[t.key] = offset
            offset += t.nbytes
        self.missing = {t.key: t.nbytes for t in tensors}  # bytes still to be written
        self.file = open(path, "wb")
        self.file.write(header)

    def write(self, key: str, value: mx.array, index: int | None = None) -> None:
        want = self.planned[key]
        shape = want.shape if index is None else want.shape[1:]
        if tuple(value.shape) != shape or value.dtype != want.dtype:
            raise RuntimeError(f"{key}: produced {value.shape} {value.dtype}, planned {want}")
        data = memoryview(value)
        if not data.c_contiguous:
            raise RuntimeError(f"{key}: not row-contiguous")
        offset = self.offsets[key] + (0 if index is None else index * data.nbytes)
        raw = data.cast("B")
        done = 0
        while done < len(raw):  # one pwrite moves at most ~2 GB on Linux
            done += os.pwrite(self.file.fileno(), raw[done:], offset + done)
        self.missing[key] -= data.nbytes

    @property
    def done(self) -> bool:
        return not any(self.missing.values())

    def close(self) -> None:
        self.file.close()
