"""Where an adapter given as a local path or a Hugging Face hub id lies on disk.

A path that exists is used as it is. A name that looks like a path (absolute, ``./``, ``~``,
more than one ``/``) but does not exist is an error saying so, never a hub lookup. Anything
else is taken as a hub repo id and resolved through ``huggingface_hub.snapshot_download``
(its cache, ``revision``, ``token``, and offline mode: ``HF_HUB_OFFLINE=1`` or
``local_files_only=True`` read the cache only). Only the adapter's own files are fetched: PEFT's two, or the
one ``weight_name`` (a single-file LoRA in a repo that holds several, as diffusers' ``weight_name``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AdapterFileError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def looks_like_a_path(name: str | os.PathLike) -> bool:
    """True for names only a file system path can be: a hub id is ``name`` or ``org/name``."""
    text = os.fspath(name)
    return (
        isinstance(name, Path) or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
        or "\\" in text or text.endswith("/")
    )


def missing_path_error(what: str, name: str | os.PathLike) -> AdapterFileError:
    absolute = Path(name).expanduser().absolute()
    return AdapterFileError(
        f"The {what} {os.fspath(name)!r} does not exist (looked for {str(absolute)!r}). Check the path; "
        "a Hugging Face hub id has the form 'org/name'."
    )


def adapter_folder(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    weight_name: str | None = None,
) -> Path:
    """The local folder of the adapter ``name`` (a path, or a hub id fetched into the hub cache); with
    ``weight_name`` the one file of that name in it (a single-file diffusion LoRA, as diffusers names it)."""
    local = Path(os.fspath(name)).expanduser()
    inside = [p for p in (subfolder, weight_name) if p]
    if local.exists():
        return local.joinpath(*inside)
    if looks_like_a_path(name):
        raise missing_path_error("adapter folder", name)
    folder = _download(os.fspath(name), revision, subfolder, cache_dir, token, local_files_only, weight_name)
    return Path(folder).joinpath(*inside)


def _download(repo_id, revision, subfolder, cache_dir, token, local_files_only, weight_name=None) -> str:
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, local_files_only=bool(local_files_only),
            allow_patterns=[prefix + f for f in ((weight_name,) if weight_name else ADAPTER_FILES)],
        )
    except Exception as exc:  # huggingface_hub raises many kinds: invalid id, offline, 404, auth
        raise AdapterFileError(
            f"{repo_id!r} is not a local folder (nothing at {str(Path(repo_id).absolute())!r}) and could not be "
            f"read as a Hugging Face hub repo id: {type(exc).__name__}: {exc}. Check the path, or the repo id, "
            "revision and token; offline (HF_HUB_OFFLINE=1, local_files_only=True) only the hub cache is read."
        ) from None
