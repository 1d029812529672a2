"""Write a safetensors file one tensor (or one row chunk) at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a merged 70B shard
would not fit. The format is simple: an 8-byte little-endian header length, a JSON header
of names, dtypes, shapes and byte offsets, then the raw bytes in header order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import BinaryIO

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class StreamWriter:
    """Declare every tensor first (name, dtype, shape), then write their bytes in the same order."""

    def __init__(self, handle: BinaryIO, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.handle = handle
        self.order: list[tuple[str, int]] = []
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((name, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        self.total_bytes = offset
        self._index, self._written = 0, 0

    def write(self, chunk: torch.Tensor) -> int:
        """Append ``chunk`` (all or some leading rows of the current tensor); returns bytes written."""
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self._written += data.nbytes
        name, size = self.order[self._index]
        if self._written > size:
            raise ValueError(f"{name}: wrote {self._written} bytes, declared {size}")
        if self._written == size:
            self._index, self._written = self._index + 1, 0
        return data.nbytes

    def close(self) -> None:
        if self._index != len(self.order):
            name = self.order[self._index][0] if self._index < len(self.order) else "?"
            raise ValueError(f"safetensors stream ended early at tensor {name!r}")


class ShardReader:
    """Read a safetensors file's tensors, or row ranges of them, with plain ``pread`` calls.

    ``safe_open`` memory-maps the file: every page a merge reads stays mapped, and counted in the
    process's RSS, until the file is closed (a whole 500 MB shard by its end). Reading into fresh
    buffers keeps only the rows in flight in memory; the page cache is the kernel's, not ours.
    """

    def __init__(self, path) -> None:
        self.path = str(path)
        with open(self.path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        self._metadata = header.pop("__metadata__", None)
        self._header = header
        self._start = 8 + length
        self._fd = None

    def __enter__(self) -> ShardReader:
        import os

        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc) -> None:
        import os

        os.close(self._fd)
        self._fd = None

    def keys(self) -> list[str]:
        return list(self._header)

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def get_slice(self, key: str) -> TensorRows:
        return TensorRows(self, key)

    def read(self, key: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of tensor ``key`` (its first dimension), as a new tensor."""
        import os

        info = self._header[key]
        shape, dtype = tuple(info["shape"]), DTYPES[info["dtype"]]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        begin = self._start + info["data_offsets"][0] + first * row_bytes
        size = (last - first) * row_bytes if shape else dtype.itemsize
        buffer = torch.empty(size, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < size:
            got = os.preadv(self._fd, [view[done:]], begin + done)
            if got == 0:
                raise OSError(f"{self.path}: ends inside tensor {key!r}; the file is truncated.")
            done += got
        out = buffer.view(dtype)
        return out.view(last - first, *shape[1:]) if shape else out.view(())


class TensorRows:
    """``safe_open``'s slice interface over :class:`ShardReader`: ``get_shape``, ``get_dtype``, ``[i:j]``."""

    def __init__(self, reader: ShardReader, key: str) -> None:
        self.reader, self.key = reader, key
        self._info = reader._header[key]

    def get_shape(self) -> list[int]:
        return list(self._info["shape"])

    def get_dtype(self) -> str:
        return self._info["dtype"]

    def __getitem__(self, index: slice) -> torch.Tensor:
        shape = self._info["shape"]
        if not shape:
            return self.reader.read(self.key, 0, 1)
        first, last, _ = index.indices(shape[0])
        return self.reader.read(self.key, first, last)
