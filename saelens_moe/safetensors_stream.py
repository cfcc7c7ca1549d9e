"""Read and write parts of a safetensors file without holding the whole of it.

The `safetensors` library loads or saves whole tensors (or maps the file, so a
column slice of a row-major matrix brings nearly every page of it into memory).
Dictionaries larger than one device are written and read one expert block at a
time: these helpers seek to a block's bytes with `os.pread`/`os.pwrite`, so memory
holds one block and never the tensor. The format: an 8-byte little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then the
bytes, row-major.
"""

import json
import math
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import torch
from typing_extensions import Self, override

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
HEADER_ALIGNMENT = 8


class TensorEntry(NamedTuple):
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset of the tensor's first element from the start of the file."""

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the elements after the first dimension)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file and where their bytes lie."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header: dict[str, Any] = json.loads(file.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    return {
        name: TensorEntry(
            DTYPES[entry["dtype"]],
            tuple(entry["shape"]),
            start + entry["data_offsets"][0],
        )
        for name, entry in header.items()
    }


def _from_bytes(
    data: bytes, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _to_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().tobytes())


class _OpenFile:
    """A file descriptor closed on leaving the `with` block."""

    _fd: int

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class SliceReader(_OpenFile):
    """Rows or column blocks of the tensors of one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """`tensor[start:stop]`, read alone. [stop - start, ...]"""
        entry = self.entries[name]
        offset = entry.offset + start * entry.row_bytes
        data = os.pread(self._fd, (stop - start) * entry.row_bytes, offset)
        return _from_bytes(data, entry.dtype, (stop - start, *entry.shape[1:]))

    def columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        """`tensor[:, start:stop]` of a matrix, read row by row. [rows, stop - start]"""
        entry = self.entries[name]
        n_rows, _ = entry.shape
        width = (stop - start) * entry.dtype.itemsize
        first = entry.offset + start * entry.dtype.itemsize
        data = b"".join(
            os.pread(self._fd, width, first + row * entry.row_bytes)
            for row in range(n_rows)
        )
        return _from_bytes(data, entry.dtype, (n_rows, stop - start))

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor (for the small, replicated ones)."""
        return self.rows(name, 0, self.entries[name].shape[0])


class BlockWriter(_OpenFile):
    """Writes a safetensors file whose tensors arrive in blocks, in any order.

    The header is written first from the declared dtypes and shapes; every byte of
    every tensor must then be written once (`rows`, `columns`) before closing.
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        cursor = 0
        for name, (dtype, shape) in tensors.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [cursor, cursor + size],
            }
            cursor += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(encoded)) + encoded, 0)
        os.ftruncate(self._fd, 8 + len(encoded) + cursor)
        start = 8 + len(encoded)
        self.entries = {
            name: TensorEntry(dtype, shape, start + header[name]["data_offsets"][0])
            for name, (dtype, shape) in tensors.items()
        }

    @override
    def close(self) -> None:
        """Flush the file to disk and close it."""
        os.fsync(self._fd)
        super().close()

    def rows(self, name: str, start: int, block: torch.Tensor) -> None:
        """Write `block` as `tensor[start:start + len(block)]`."""
        entry = self._checked(name, block)
        os.pwrite(self._fd, _to_bytes(block), entry.offset + start * entry.row_bytes)

    def columns(self, name: str, start: int, block: torch.Tensor) -> None:
        """Write `block` [rows, width] as `tensor[:, start:start + width]`, row by row."""
        entry = self._checked(name, block)
        first = entry.offset + start * entry.dtype.itemsize
        for row, data in enumerate(block.detach().to("cpu").contiguous()):
            os.pwrite(self._fd, _to_bytes(data), first + row * entry.row_bytes)

    def whole(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor."""
        self.rows(name, 0, tensor)

    def _checked(self, name: str, block: torch.Tensor) -> TensorEntry:
        entry = self.entries[name]
        if block.dtype != entry.dtype:
            raise TypeError(
                f"{name} is {entry.dtype} in {self.path}, got {block.dtype}"
            )
        return entry
