"""What every format shares on disk: reading safetensors files (and PEFT's legacy ``.bin`` without unpickling
anything), listing a folder for messages, and the atomic write of several files into one folder."""

from __future__ import annotations

import errno
import os
import shutil
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


def read_safetensors(path: Path, with_metadata: bool = False):
    """``{name: tensor}`` of a safetensors file (and its metadata dict with ``with_metadata``)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return (tensors, handle.metadata() or {}) if with_metadata else tensors
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]}). It is truncated "
            "or corrupt; re-save or re-download the adapter."
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
    """Write ``{file name: writer(temporary path)}`` into ``directory``, all files at once.

    The new folder is built beside the old one (the files written and fsynced, whatever else the old folder
    holds hard-linked in) and swapped in by renames of whole folders: a reader sees the old files or the new
    ones, never new weights with an old config. A failure while writing leaves the folder as it was; a crash in
    the instant between the two renames leaves no folder (an error on load, never a wrong adapter) and the
    previous one beside it as ``.<name>.old-<pid>``, put back by the next save. Where a folder cannot be swapped
    (the working directory, a symlink, another file system), the files are renamed into place one by one.
    """
    directory = Path(directory)
    if directory.parent.exists() and not directory.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(directory.parent))
    directory.parent.mkdir(parents=True, exist_ok=True)
    put_back_leftovers(directory)
    if _swappable(directory):
        return _swap_folder(directory, files)
    return _rename_files(directory, files)


def _swappable(directory: Path) -> bool:
    if directory.is_symlink():
        return False
    resolved, cwd = directory.resolve(), Path.cwd().resolve()
    return resolved != cwd and resolved not in cwd.parents


def _swap_folder(directory: Path, files: Mapping[str, Callable[[str], object]]) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-{os.getpid()}-", dir=directory.parent))
    try:
        if directory.is_dir():
            _link_tree(directory, staging, skip=set(files))
        for name, write in files.items():
            write(str(staging / name))
            _fsync(staging / name)
        _fsync(staging)
        if not directory.exists():
            os.rename(staging, directory)
            return directory
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.rename(directory, old)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return directory
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return _rename_files(directory, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Everything in ``source`` but ``skip`` (top level), into ``target``: hard links where the file system allows,
    copies elsewhere."""
    for entry in source.iterdir():
        if entry.name in skip or entry.name.startswith((".tmp", f".{source.name}.")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(entry), str(target / entry.name))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def put_back_leftovers(target: Path) -> None:
    """What killed writers of ``target`` (a save, ``lora-inject merge``) left beside it: a previous ``target``
    moved aside (``.<name>.old-<pid>``), put back when ``target`` is gone, and staging folders
    (``.<name>.saving-<pid>-*``, ``.<name>.partial-<pid>-*``) of processes that no longer run, removed."""
    for entry in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = entry.name.removeprefix(f".{target.name}.").partition("-")
        owner = rest.partition("-")[0]
        if not owner.isdigit() or _alive(int(owner)) or kind not in ("old", "saving", "partial"):
            continue
        if kind == "old" and not target.exists():
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_files(directory: Path, files: Mapping[str, Callable[[str], object]]) -> Path:
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
