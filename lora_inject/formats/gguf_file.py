"""A GGUF v3 file writer: metadata key/values and tensors, nothing else (no dependency on ``gguf``).

The layout (ggml's ``docs/gguf.md``): ``b"GGUF"``, version (u32), tensor count (u64), key/value count (u64); the
key/values (a string key, a u32 type, the value); one info per tensor (name, dimension count, the dimensions in
ggml's order, i.e. torch's shape reversed, the ggml type, the data offset); padding to the alignment; the tensor
data, each tensor starting at a multiple of the alignment. Everything little-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import BinaryIO

import torch

ALIGNMENT = 32  # ggml's default (``general.alignment`` unset)
VERSION = 3

# ggml tensor types and the torch dtype each is written from
GGML_TYPES: dict[str, tuple[int, torch.dtype]] = {
    "f32": (0, torch.float32),
    "f16": (1, torch.float16),
    "bf16": (30, torch.bfloat16),
}

_UINT32, _FLOAT32, _STRING = 4, 6, 8


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value: object) -> bytes:
    """A typed GGUF value: str -> string, float -> f32, int -> u32 (what adapter files hold)."""
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, float):
        return struct.pack("<If", _FLOAT32, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return struct.pack("<II", _UINT32, value)
    raise TypeError(f"no GGUF value type for {type(value).__name__}")


def _padding(offset: int) -> int:
    return -offset % ALIGNMENT


def _raw(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes, row-major little-endian (bfloat16 through its int16 bits: numpy has no bfloat16)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    array = tensor.numpy()
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def write_gguf(handle: BinaryIO, metadata: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a whole GGUF file to ``handle``; tensors must already be in the dtype they are stored in."""
    types = {dtype: code for code, dtype in GGML_TYPES.values()}
    header = bytearray(b"GGUF" + struct.pack("<IQQ", VERSION, len(tensors), len(metadata)))
    for key, value in metadata.items():
        header += _string(key) + _value(value)
    offset, blobs = 0, []
    for name, tensor in tensors.items():
        if tensor.dtype not in types:
            raise TypeError(f"{name}: no ggml type for {tensor.dtype}")
        dims = tuple(reversed(tensor.shape))
        header += _string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        header += struct.pack("<IQ", types[tensor.dtype], offset)
        blob = _raw(tensor)
        blobs.append(blob)
        offset += len(blob) + _padding(len(blob))
    header += bytes(_padding(len(header)))
    handle.write(bytes(header))
    for blob in blobs:
        handle.write(blob)
        handle.write(bytes(_padding(len(blob))))

