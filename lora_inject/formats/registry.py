"""The shape every adapter format shares: the canonical adapter, and the registry of readers and writers.

A format is a pair of functions, registered by name: ``read`` (a file or folder -> :class:`Adapter`) and
``write`` (an :class:`Adapter` -> a file or folder). :func:`lora_inject.load_adapter` picks the reader whose
``claims`` accepts what it is given; :func:`lora_inject.save_adapter` takes ``format=``. Checking an adapter
against a model and the transactional copy into it (``load.py``) and the atomic write (``folder.py``) are shared
by every format, so a format module only translates names and fields.

A *dialect* is a variant of a format whose names or layout only the model can tell apart (adapters saved under
transformers 4 names; PEFT <= 0.19.0's expert layout): a conversion applied after reading, registered here too.
Writing always produces the current form.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError, preview
from .adapter import Adapter
from .validate import validate


@dataclass(frozen=True)
class AdapterFormat:
    """One file format: what it claims, how it reads (config alone, or everything) and how it writes."""

    name: str
    description: str  # what the files look like, for messages ("a PEFT adapter folder (...)")
    claims: Callable[[Path], bool]  # cheap: names and headers only, no tensor read
    read_config: Callable[[Path], LoraConfig]
    read_tensors: Callable[[Path], dict[str, torch.Tensor]]  # canonical names; the config is not read
    read: Callable[[Path], Adapter]
    write: Callable[[Adapter, Path, nn.Module], Path] | None = None  # (adapter, destination, the model it is in)
    reads: bool = True  # False: an export-only format, whose read says so (it is left out of "expected ..." lists)


Stage = Literal["names", "layout"]


@dataclass(frozen=True)
class Dialect:
    """A conversion into the model's current names (stage ``names``: before targets are resolved, given the
    model) or layout (stage ``layout``: after, given ``{path: wrapper}`` of the resolved plan)."""

    name: str
    stage: Stage
    convert: Callable[[Adapter, Any], Adapter]


FORMATS: dict[str, AdapterFormat] = {}
DIALECTS: list[Dialect] = []


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Add ``fmt`` (formats are tried in registration order when a path is read)."""
    FORMATS[fmt.name] = fmt
    return fmt


def register_dialect(dialect: Dialect) -> Dialect:
    DIALECTS.append(dialect)
    return dialect


def format_named(name: str, *, for_writing: bool = False) -> AdapterFormat:
    fmt = FORMATS.get(name)
    if fmt is None or (for_writing and fmt.write is None):
        usable = sorted(n for n, f in FORMATS.items() if f.write is not None or not for_writing)
        raise ConfigError(
            f"Unknown adapter format {name!r}{' for writing' if for_writing else ''}; the formats that "
            f"{'write' if for_writing else 'read'} are: {', '.join(usable)}."
        )
    return fmt


def format_of(path: str | os.PathLike) -> AdapterFormat:
    """The format of the file or folder at ``path``: the first registered format that claims it."""
    path = Path(path)
    if not path.exists():
        from .hub import missing_path_error

        raise missing_path_error("adapter", path)
    for fmt in FORMATS.values():
        if fmt.claims(path):
            return fmt
    from .folder import listing

    found = listing(path) if path.is_dir() else [path.name]
    first, *others = sorted((f for f in FORMATS.values() if f.reads), key=lambda f: f.name != "peft")
    raise AdapterFileError(
        f"No adapter_config.json in {str(path)!r}: expected {first.description}"
        + "".join(f", or {f.description}" for f in others)
        + f". Found: {preview(found) or 'nothing'}."
    )


def read_adapter(path: str | os.PathLike, values: bool = True) -> Adapter:
    """Read any registered format into the canonical form and validate it (``validate.py``): every reader of an
    adapter goes through here. No model is needed; see :func:`convert` for what needs one. ``values=False``:
    the caller checks shapes first and then calls ``validate.checked_values`` before using any value."""
    return validate(format_of(path).read(Path(path)), values=values)


def convert(adapter: Adapter, stage: Stage, context: Any) -> Adapter:
    """Apply every dialect of ``stage``; each returns ``adapter`` itself when it does not apply."""
    for dialect in DIALECTS:
        if dialect.stage == stage:
            adapter = dialect.convert(adapter, context)
    return adapter


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter file or folder in any registered format (ours or PEFT's)."""
    return format_of(path).read_config(Path(path))


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file or folder in the canonical names (PEFT's keys less ``base_model.model.``)."""
    return format_of(path).read_tensors(Path(path))
