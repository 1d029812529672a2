"""What every format shares on disk: reading safetensors files (and PEFT's legacy ``.bin`` without unpickling
anything), listing a folder for messages, and the atomic write of several files into one folder."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import shutil
import stat
import tempfile
import threading
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
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # mapped: read where used
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
    """Write ``{file name: writer(temporary path)}`` into ``directory``, each file whole.

    A folder is built beside its place (files written and fsynced) and put in place at once, so no reader
    ever sees part of it: renamed in where there was none; exchanged with the previous folder in one step
    (Linux ``renameat2``; elsewhere two renames, the previous folder put back by the next write if a crash
    falls between them) where that held nothing but files this write replaces. A folder holding other
    files too (a Trainer checkpoint, which the other ranks write into meanwhile) keeps them: each file goes
    to a temporary name (fsynced), then all are renamed into place, the weights first; a failure while
    writing leaves the folder as it was.
    """
    directory = Path(directory)
    if directory.parent.exists() and not directory.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(directory.parent))
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _writing_to(directory):  # this process's threads take turns on one folder
        return _write(directory, files)


_FOLDER_LOCKS: dict[str, threading.Lock] = {}


def _writing_to(directory: Path) -> threading.Lock:
    key = os.path.realpath(directory)
    return _FOLDER_LOCKS.setdefault(key, threading.Lock())


def _write(directory: Path, files: Mapping[str, Callable[[str], object]]) -> Path:
    put_back_leftovers(directory)
    if directory.is_symlink():
        return _rename_files(directory, files)
    if not directory.exists() and _create_whole(directory, files):
        return directory
    if len(files) > 1 and _only(directory, files) and _create_whole(directory, files, replacing=True):
        return directory
    return _rename_files(directory, files)


def _only(directory: Path, files: Mapping[str, object]) -> bool:
    """Whether ``directory`` is a folder of ours holding some of ``files`` and nothing else: not an empty one (a
    checkpoint folder other ranks are about to write into), not one another user owns or with extended
    attributes or ACLs (a folder made anew would lose them)."""
    entries = set(listing(directory)) if directory.is_dir() else set()
    if not entries or not entries <= set(files):
        return False
    try:
        info = directory.stat()
        if hasattr(os, "geteuid") and (info.st_uid != os.geteuid() or info.st_gid != _new_folder_gid(directory)):
            return False
        return not (hasattr(os, "listxattr") and os.listxattr(directory))
    except OSError:
        return False


def _new_folder_gid(directory: Path) -> int:
    """The group a folder made beside ``directory`` gets: the parent's on a set-group-id parent, else ours."""
    parent = directory.parent.stat()
    return parent.st_gid if parent.st_mode & stat.S_ISGID else os.getegid()


# Names of our staging folders carry the process id: entries of another live process are left alone, as are
# those this process's other threads are writing now (_WRITING); the rest are leftovers of killed writers.
_WRITING: set[str] = set()


def _staging(directory: Path, kind: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f".{directory.name}.{kind}-{os.getpid()}-", dir=directory.parent))
    _WRITING.add(path.name)
    return path


def _create_whole(directory: Path, files: Mapping[str, Callable[[str], object]], replacing: bool = False) -> bool:
    """Build ``directory`` beside its place and put it there (``replacing``: in place of the folder there now);
    False where that cannot be done (a parent we may not write in, another writer that made or changed the
    folder meanwhile): then the files go in one by one. A writer's own failure propagates, leaving nothing."""
    try:
        staging = _staging(directory, "saving")
    except OSError:
        return False
    try:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o777 & ~umask
        if replacing:
            with contextlib.suppress(OSError):
                mode = stat.S_IMODE(os.stat(directory).st_mode)  # a shared folder's group bits stay
        os.chmod(staging, mode)  # mkdtemp's 0700 would make the adapter unreadable to others
        for name, write in files.items():
            write(str(staging / name))
            _readable(staging / name)
            _fsync(staging / name)
        _fsync(staging)
        if replacing and not _only(directory, files):  # another writer put a file there meanwhile: keep it
            return False
        try:
            if replacing:
                _replace_folder(staging, directory)
                _keep_others(staging, directory, files)
            else:
                os.rename(staging, directory)  # fails if another writer made the folder meanwhile: nothing replaced
        except OSError:
            return False
        _fsync_folder(directory.parent)
        return True
    finally:
        _remove_staging(staging, files)
        _WRITING.discard(staging.name)


def _keep_others(previous: Path, directory: Path, files: Mapping[str, object]) -> None:
    """A file another writer put into the previous folder after the last look moves into the new one."""
    for name in listing(previous):
        if name not in files:
            with contextlib.suppress(OSError):
                os.rename(previous / name, directory / name)


def _remove_staging(staging: Path, files: Mapping[str, object]) -> None:
    """Remove the files this write made (or the previous folder's copies of them), then the folder if empty:
    never anything else another writer may have put there."""
    for name in files:
        with contextlib.suppress(OSError):
            os.unlink(staging / name)
    with contextlib.suppress(OSError):
        os.rmdir(staging)


def _replace_folder(staging: Path, directory: Path) -> None:
    """Put ``staging`` in place of ``directory``; afterwards ``staging`` holds the previous folder."""
    if _exchange(staging, directory):
        return
    aside = _staging(directory, "old")
    try:
        os.rmdir(aside)  # a fresh unique name: the folder moves there
        os.rename(directory, aside)
        try:
            os.rename(staging, directory)
        except OSError:
            os.rename(aside, directory)
            raise
        os.rename(aside, staging)
    finally:
        _WRITING.discard(aside.name)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # old kernel, a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _libc():
    if os.name == "nt":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except Exception:  # noqa: BLE001 (no C library to open here: the two-rename way is taken)
        return None


def put_back_leftovers(target: Path) -> None:
    """What killed writers of ``target`` (a save, ``lora-inject merge``) left beside it: a previous ``target``
    moved aside (``.<name>.old-<pid>-*``), put back when ``target`` is gone, and staging folders
    (``.<name>.saving-<pid>-*``, ``.<name>.partial-<pid>-*``) of processes that no longer run, removed."""
    for entry in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        kind, _, rest = entry.name.removeprefix(f".{target.name}.").partition("-")
        owner = rest.partition("-")[0]
        if not owner.isdigit() or kind not in ("old", "saving", "partial") or entry.name in _WRITING:
            continue
        if _alive(int(owner)) and int(owner) != os.getpid():
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


def _readable(path: str | os.PathLike) -> None:
    """The umask's permissions: mkstemp, and safetensors' own atomic write, leave files 0600 (unreadable to the
    other users of a shared checkpoint folder)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename into it); some systems refuse that for folders: then nothing to do."""
    with contextlib.suppress(OSError):
        _fsync(path)


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
        _readable(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
