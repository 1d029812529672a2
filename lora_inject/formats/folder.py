"""What every format shares on disk: reading safetensors files (and PEFT's legacy ``.bin`` without unpickling
anything), listing a folder for messages, and the atomic write of several files into one folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterFileError

__all__ = ["listing", "read_safetensors", "read_legacy_bin", "write_atomically", "save_file"]


def listing(directory: str | os.PathLike) -> list[str]:
    try:
        return [p.name for p in Path(directory).iterdir()]
    except OSError:
        return []


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({exc}). It is truncated or corrupt; re-save or "
            "re-download the adapter."
        ) from None


def read_legacy_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFileError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
            "It is corrupt, or holds pickled objects other than tensors, which lora_inject never unpickles."
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdapterFileError(f"{path} does not hold a flat {{name: tensor}} dict.")
    return data


def safetensors_writer(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[str], object]:
    """A writer for :func:`write_atomically` (``save_file`` is looked up at call time, so tests can fail it)."""
    return lambda path: save_file(dict(tensors), path, metadata=metadata)


def text_writer(text: str) -> Callable[[str], object]:
    return lambda path: Path(path).write_text(text, encoding="utf-8")


def write_atomically(directory: str | os.PathLike, files: Mapping[str, Callable[[str], object]]) -> Path:
    """Write ``{file name: writer(temporary path)}`` into ``directory``: every file to a temporary name first
    (fsynced), then each renamed into place. A failure while writing leaves the folder as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    try:
        for name, write in files.items():
            written[name] = _written_tmp(directory, name, write)
    except BaseException:
        for tmp in written.values():
            os.unlink(tmp)
        raise
    for name, tmp in written.items():
        os.replace(tmp, directory / name)
    return directory


def _written_tmp(directory: Path, final_name: str, write: Callable[[str], object]) -> str:
    """Write to a fresh temporary file next to ``final_name``, fsync it, and return its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
