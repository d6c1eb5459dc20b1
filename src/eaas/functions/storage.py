"""Reading safetensors checkpoints: headers, sharded indexes, raw expert bytes.

Headers are parsed here (8-byte little-endian length + JSON, per the safetensors
format spec) so that a truncated file, a missing shard or a missing tensor is
reported with the file and tensor it concerns, before any tensor is read.
Tensor data itself is read by :mod:`eaas.functions.shard` through
``safetensors.safe_open`` (memory-mapped, ``get_slice``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from eaas.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20

#: safetensors dtype code -> (torch dtype, element bytes)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``.

    Raises:
        CheckpointError: the name is not a torch floating dtype.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"unknown dtype {name!r}: expected e.g. 'float32', 'bfloat16', 'float16'")
    return dtype


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file.

    Attributes:
        name: tensor name.
        file: the ``.safetensors`` file holding it.
        st_dtype: safetensors dtype code (``"F32"``, ``"BF16"``, ...).
        shape: tensor shape.
        start: absolute byte offset of the data in ``file``.
        end: absolute byte offset one past the data.
    """

    name: str
    file: Path
    st_dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return ST_DTYPES[self.st_dtype][0]

    def row_range(self, index: int) -> tuple[int, int]:
        """Absolute byte range of ``tensor[index]`` (a dim-0 slice, contiguous on disk)."""
        row_bytes = self.nbytes // self.shape[0]
        return self.start + index * row_bytes, self.start + (index + 1) * row_bytes


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check the file holds all its data.

    Raises:
        CheckpointError: the file is missing, not safetensors, or truncated.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{file}: truncated or not a safetensors file (header of {header_len} bytes, file of {size} bytes)"
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a safetensors file (bad header: {e})") from None
    base = 8 + header_len
    out: dict[str, TensorInfo] = {}
    max_end = base
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype, shape, (lo, hi) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}: {meta!r}") from None
        if st_dtype not in ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {st_dtype!r}")
        out[name] = TensorInfo(name, file, st_dtype, shape, base + lo, base + hi)
        max_end = max(max_end, base + hi)
    if size < max_end:
        raise CheckpointError(
            f"{file}: truncated safetensors file: header needs {max_end} bytes, file has {size}"
        )
    return out


class CheckpointFiles:
    """All tensors of a checkpoint directory (single file or sharded index).

    Attributes:
        directory: the checkpoint directory.
        tensors: tensor name -> :class:`TensorInfo`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map = {}
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            self.tensors.update(read_header(self.directory / fname))
        for name, fname in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != fname:
                raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname} but not stored there")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> TensorInfo:
        """Return a tensor's location.

        Raises:
            CheckpointError: the checkpoint has no tensor of that name.
        """
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}") from None

    @staticmethod
    def sha256(ranges: list[tuple[Path, int, int]], chunk_bytes: int = 8 << 20) -> str:
        """sha256 hex of the byte ranges ``(file, start, end)`` read in order, streamed."""
        digest = hashlib.sha256()
        handles: dict[Path, BinaryIO] = {}
        try:
            for file, start, end in ranges:
                f = handles.get(file)
                if f is None:
                    f = handles[file] = open(file, "rb")
                f.seek(start)
                left = end - start
                while left > 0:
                    chunk = f.read(min(left, chunk_bytes))
                    if not chunk:
                        raise CheckpointError(f"{file}: truncated while reading bytes {start}..{end}")
                    digest.update(chunk)
                    left -= len(chunk)
        finally:
            for f in handles.values():
                f.close()
        return digest.hexdigest()
