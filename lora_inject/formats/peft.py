"""PEFT's adapter folder: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``) and
``adapter_config.json`` (PEFT's field names, translated in ``peft_config.py``). The default format: what PEFT,
transformers, vLLM and this library's ``save_adapter`` read and write."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, preview
from ..version import __version__
from .adapter import Adapter
from .folder import listing, read_legacy_bin, read_safetensors, safetensors_writer, text_writer, write_atomically
from .hub import missing_path_error
from .peft_config import PEFT_PREFIX, from_peft_dict, to_peft_dict
from .registry import AdapterFormat, register_format

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
DESCRIPTION = f"a PEFT adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME})"


def claims(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _config_bytes(directory: str | os.PathLike) -> bytes:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).exists():
        raise missing_path_error("adapter folder", directory)
    if not path.is_file():
        raise AdapterFileError(
            f"No {CONFIG_NAME} in {str(directory)!r}: expected {DESCRIPTION}. "
            f"Found: {preview(listing(directory)) or 'nothing'}."
        )
    return path.read_bytes()


def read_config_dict(directory: str | os.PathLike, raw: bytes | None = None) -> dict:
    """``adapter_config.json`` as a dict, PEFT's field names; refuses what is not a readable JSON object."""
    path = Path(directory) / CONFIG_NAME
    raw = _config_bytes(directory) if raw is None else raw
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}). The file is damaged; re-save the adapter.") from None
    except (RecursionError, ValueError) as exc:  # nested thousands deep; an integer of thousands of digits
        raise AdapterFileError(f"{path} is JSON no adapter config can be ({type(exc).__name__}: {str(exc)[:120]}). "
                               "The file is damaged or hostile; re-save the adapter.") from None


def read_config(directory: Path) -> LoraConfig:
    return from_peft_dict(read_config_dict(directory), str(Path(directory) / CONFIG_NAME))


def read_tensors(directory: str | os.PathLike) -> dict:
    """The tensors of the folder, keys without the ``base_model.model.`` prefix (the canonical names).

    Reads safetensors; an old ``adapter_model.bin`` only through ``torch.load(weights_only=True)``.
    """
    return _tensors_and_metadata(Path(directory))[0]


def _tensors_and_metadata(directory: Path) -> tuple[dict, dict]:
    if (directory / WEIGHTS_NAME).is_file():
        tensors, metadata = read_safetensors(directory / WEIGHTS_NAME, with_metadata=True)
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        tensors, metadata = read_legacy_bin(directory / LEGACY_WEIGHTS_NAME), {}
    else:
        raise AdapterFileError(
            f"No {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {str(directory)!r}. "
            f"Found: {preview(listing(directory)) or 'nothing'}."
        )
    return _without_prefix(tensors, directory), metadata


def _without_prefix(tensors: dict, directory: Path) -> dict:
    """PEFT's keys less ``base_model.model.``; a key present both with and without the prefix takes the prefixed
    copy, as PEFT does (it reads prefixed keys), and says so."""
    out = {key: value for key, value in tensors.items() if not key.startswith(PEFT_PREFIX)}
    both = [key for key in tensors if key.startswith(PEFT_PREFIX) and key.removeprefix(PEFT_PREFIX) in out]
    out.update({key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items() if key.startswith(PEFT_PREFIX)})
    if both:
        warnings.warn(f"{directory}: {len(both)} tensor(s) are stored both with and without the "
                      f"'{PEFT_PREFIX}' prefix ({both[0]!r}, ...); the prefixed copies are used, as PEFT does.",
                      stacklevel=4)
    return out


# What decides the update's scale and form, recorded in the weights' metadata when we save: a folder whose config
# says otherwise was caught between the two renames of a save into a folder holding other files (or edited).
SCALE_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")
SCALES_KEY = "lora_inject_scales"


def _scales(data: dict) -> str:
    return json.dumps({name: data.get(name) for name in SCALE_FIELDS}, sort_keys=True, default=str)


def _warn_if_config_differs(directory: Path, data: dict, metadata: dict) -> None:
    saved = metadata.get(SCALES_KEY)
    if saved is None or saved == _scales(data):
        return
    try:
        was = json.loads(saved)
    except ValueError:
        return
    differ = [f"{name}: {data.get(name)!r} (saved with {was.get(name)!r})" for name in SCALE_FIELDS
              if json.dumps(data.get(name), sort_keys=True, default=str) != json.dumps(was.get(name), sort_keys=True,
                                                                                       default=str)]
    if differ:
        warnings.warn(
            f"{directory}: {CONFIG_NAME} is not the config these weights were saved with ({'; '.join(differ[:3])}). "
            "A save interrupted between its two files leaves such a folder: save the adapter again. If you edited "
            "the config on purpose, the edited values are used.", stacklevel=4)


def read(directory: Path) -> Adapter:
    raw = _config_bytes(directory)
    data = read_config_dict(directory, raw)
    config = from_peft_dict(data, str(Path(directory) / CONFIG_NAME))
    tensors, metadata = _tensors_and_metadata(Path(directory))
    _warn_if_config_differs(Path(directory), data, metadata)
    notes = {"peft_version": data.get("peft_version"), "fan_in_fan_out": data.get("fan_in_fan_out", False),
             "written_by_us": "lora_inject_version" in metadata}
    return Adapter(config, tensors, str(directory), "peft", notes=notes)


def write(adapter: Adapter, directory: Path, model: nn.Module) -> Path:
    """Both files at once (``folder.write_atomically``): an interrupted save leaves the previous adapter, whole."""
    peft_config = to_peft_dict(model, adapter.name, adapter.config)
    tensors = {PEFT_PREFIX + key: value for key, value in adapter.tensors.items()}
    config_text = json.dumps(peft_config, indent=2, sort_keys=True)
    metadata = {"format": "pt", "lora_inject_version": __version__, SCALES_KEY: _scales(peft_config)}
    return write_atomically(directory, {
        WEIGHTS_NAME: safetensors_writer(tensors, metadata),
        CONFIG_NAME: text_writer(config_text),
    })


PEFT = register_format(AdapterFormat("peft", DESCRIPTION, claims, read_config, read_tensors, read, write))
