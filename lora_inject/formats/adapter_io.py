"""Adapter folders on disk: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``.

Saving is atomic (temporary files in the target folder, then renames). Loading is
transactional: the whole folder is read and checked against the model before the model
changes, so a bad file leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError, LoraInjectError, preview
from ..guards import SHARDED_LOAD, check_not_distributed, check_not_sharded, unwrap
from ..inject import (
    _require_adapter,
    adapter_configs,
    adapter_state,
    carried_paths,
    check_adapter_name,
    delete_adapter,
    inject_resolved,
    lora_layers,
    require_new_adapter,
)
from ..layers import LoraLayer, ModulesToSave, TrainableTokens
from ..layers.parameter import LoraParameter
from ..layers.principal import is_principal_init
from ..targeting.plan import Plan, PlannedLayer, logical_modules, resolve
from ..targeting.tokens import TokenTarget
from .hub import adapter_folder, missing_path_error
from .peft_config import IGNORED_KEY_SUFFIXES, PEFT_PREFIX, disk_key, from_peft_dict, to_peft_dict

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


# ----- saving -------------------------------------------------------------------------------
def adapter_tensors(
    model: nn.Module,
    adapter: str = "default",
    full_state: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: bool | str = "auto",
    principal_as_lora: bool = True,
) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in PEFT's files (``base_model.model.<path>.lora_A.weight``).

    ``full_state`` (keys as in ``model.state_dict()``) supplies the values instead of the model,
    e.g. tensors gathered from a sharded model. ``save_embedding_layers`` and ``principal_as_lora``
    as in :func:`save_adapter`.
    """
    out = {}
    for key, tensor in adapter_state(model, adapter).items():
        if full_state is not None:
            if key not in full_state:
                raise AdapterFileError(f"{key} is missing from the gathered state dict; was the adapter trainable?")
            tensor = full_state[key]
        if tensor.device.type == "meta":
            raise AdapterFileError(
                f"{key} is on the meta device (no data). Materialise the model (to_empty + load weights, "
                "then reset_adapters) before saving."
            )
        out[PEFT_PREFIX + disk_key(key, adapter)] = tensor.detach().to("cpu").contiguous().clone()
    for key, tensor in _carried_weights(model, full_state, _embedding_paths(model, save_embedding_layers)).items():
        out.setdefault(PEFT_PREFIX + key, tensor.detach().to("cpu").contiguous().clone())
    if principal_as_lora:
        _principal_as_lora(model, adapter, out)
    return out


def _principal_as_lora(model: nn.Module, adapter: str, out: dict[str, torch.Tensor]) -> None:
    """PiSSA/OLoRA factors rewritten for the original base weight: ``s * (B @ A - B0 @ A0)`` as the rank-2r
    LoRA ``[B, -B0] @ [A; A0]`` (the config is rewritten to match by :func:`principal_as_lora_config`)."""
    for path, layer in lora_layers(model):
        if adapter not in layer.principal:
            continue
        a0, b0 = layer.principal[adapter]
        a_key, b_key = f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"
        out[a_key] = torch.cat([out[a_key], a0.to("cpu", out[a_key].dtype)], dim=0).contiguous()
        out[b_key] = torch.cat([out[b_key], -b0.to("cpu", out[b_key].dtype)], dim=1).contiguous()


def _principal_from_lora(model: nn.Module, adapter: str, tensors: dict, where: str) -> dict:
    """Undo :func:`_principal_as_lora` for a PiSSA/OLoRA adapter still injected (resuming from a checkpoint
    saved in plain LoRA form): ``[A; A0]`` -> A, ``[B, -B0]`` -> B, after checking that the second halves are
    this adapter's initial factors (else the file belongs to another run, and is refused)."""
    for path, layer in lora_layers(model):
        if adapter not in layer.principal:
            continue
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        a, b = tensors.get(a_key), tensors.get(b_key)
        r = layer.r[adapter]
        if a is None or b is None or a.shape[0] != 2 * r or b.shape[1] != 2 * r:
            continue  # residual form, or a mismatch the shape check reports
        a0, b0 = layer.principal[adapter]
        same_start = torch.allclose(a[r:], a0.to(a), rtol=1e-5, atol=1e-6) and torch.allclose(
            -b[:, r:], b0.to(b), rtol=1e-5, atol=1e-6)
        if not same_start:
            raise AdapterFileError(
                f"{where}: {path} holds a PiSSA/OLoRA adapter saved as plain LoRA, but its initial factors are not "
                "this model's: it was initialised from other weights. Load it with load_adapter on the original base."
            )
        tensors = {**tensors, a_key: a[:r].contiguous(), b_key: b[:, :r].contiguous()}
    return tensors


def principal_as_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA/OLoRA adapter saved as plain LoRA: every rank doubled and every alpha scaled so
    that each module's scale is unchanged (x2, or x sqrt(2) under rsLoRA, patterns included); init plain."""
    factor = math.sqrt(2.0) if config.rslora else 2.0
    return config.replace(
        r=2 * config.r, alpha=config.alpha * factor, init=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )


def _embedding_paths(model: nn.Module, mode: bool | str) -> set[str]:
    """The module paths whose full weight is written: ``"auto"`` those that travel with the adapter,
    ``True`` also the input and (untied) output embeddings, ``False`` none (said out loud if some travel)."""
    if mode not in (True, False, "auto"):
        raise ConfigError(f"save_embedding_layers must be True, False or 'auto'; got {mode!r}.")
    carried = set(carried_paths(model))
    if mode is False:
        if carried:
            warnings.warn(
                f"save_embedding_layers=False: the weights of {sorted(carried)} (resized with "
                "resize_token_embeddings, or brought in by a loaded adapter) are not saved; the adapter will not "
                "reproduce this model on the original base.", stacklevel=4,
            )
        return set()
    if mode is True:
        weights: list[torch.Tensor] = []
        for path, module in _embedding_modules(model):
            wrapper = model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSave) and all(module.weight is not w for w in weights):
                carried.add(path)
            weights.append(module.weight)
    return carried


def _carried_weights(model: nn.Module, full_state: dict | None, paths: set[str]) -> dict[str, torch.Tensor]:
    """Full base weights written with the adapter (a resized or changed vocabulary, or weights an adapter
    file brought in), under PEFT's keys: ``<path>.base_layer.weight`` for a wrapped layer, else ``<path>.weight``."""
    out = {}
    for path in sorted(paths):
        module = model.get_submodule(path)
        key = f"{path}.base_layer.weight" if isinstance(module, LoraLayer) else f"{path}.weight"
        if isinstance(module, TrainableTokens):  # the base rows; the trained ones are saved as the adapter's
            module = module.base_layer
        tensor = module.weight if full_state is None else full_state.get(key)
        if tensor is None:
            raise AdapterFileError(
                f"{key} travels with this adapter (a resized vocabulary) but is missing from the gathered state "
                "dict; gather frozen parameters too (ignore_frozen_params=False)."
            )
        out[key] = tensor
    return out


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", *,
    save_embedding_layers: bool | str = "auto", principal_as_lora: bool = True,
) -> Path:
    """Write ``adapter`` to ``directory`` as PEFT does; returns the folder.

    Only adapter tensors are written (plus ``modules_to_save`` and trained biases), never the
    base weights, except the input/output embedding weights where they must travel with the
    adapter, as PEFT's ``save_embedding_layers``: ``"auto"`` (default) when the vocabulary was
    resized after inject or a loaded adapter file brought them; ``True`` always (a vocabulary you
    changed yourself); ``False`` never (warned if they would have travelled).
    A PiSSA/OLoRA adapter (``init="pissa"``/``"olora"``) is written by default as the plain rank-2r LoRA
    that gives the trained model on the *original* base; ``principal_as_lora=False`` writes the
    residual form instead (PEFT's, for the residual base only).
    An interrupted save leaves any previous adapter in the folder intact.
    A compiled (``torch.compile``) or DDP-wrapped model saves as the model inside it. For
    sharded (FSDP2) models use :func:`lora_inject.distributed.save_adapter` on every rank.
    """
    check_not_sharded(model, "save the adapter")
    model = unwrap(model)
    _require_adapter(model, adapter)
    tensors = adapter_tensors(
        model, adapter, save_embedding_layers=save_embedding_layers, principal_as_lora=principal_as_lora
    )
    return write_adapter(model, directory, adapter, tensors, principal_as_lora=principal_as_lora)


def write_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str, tensors: dict, principal_as_lora: bool = True
) -> Path:
    """Write already collected PEFT-keyed ``tensors`` and the adapter's config, atomically."""
    from ..version import __version__

    config = adapter_configs(model)[adapter]
    if principal_as_lora and is_principal_init(config.init):
        config = principal_as_lora_config(config)
    peft_config = to_peft_dict(model, adapter, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "lora_inject_version": __version__}
    config_text = json.dumps(peft_config, indent=2, sort_keys=True)
    tmp_weights = _atomic_tmp(directory, WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
    try:
        tmp_config = _atomic_tmp(directory, CONFIG_NAME, lambda p: Path(p).write_text(config_text, encoding="utf-8"))
    except BaseException:
        os.unlink(tmp_weights)
        raise
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    return directory


def _atomic_tmp(directory: Path, final_name: str, write: Callable[[str], object]) -> str:
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


# ----- reading ------------------------------------------------------------------------------
def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter folder (ours or PEFT's)."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).exists():
        raise missing_path_error("adapter folder", directory)
    if not path.is_file():
        raise AdapterFileError(
            f"No {CONFIG_NAME} in {str(directory)!r}: expected a PEFT adapter folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}). Found: {preview(_listing(directory)) or 'nothing'}."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}). The file is damaged; re-save the adapter.") from None
    return from_peft_dict(data, str(path))


def _listing(directory: str | os.PathLike) -> list[str]:
    try:
        return [p.name for p in Path(directory).iterdir()]
    except OSError:
        return []


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, keys without the ``base_model.model.`` prefix.

    Reads safetensors; an old ``adapter_model.bin`` only through ``torch.load(weights_only=True)``.
    """
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        tensors = _read_safetensors(directory / WEIGHTS_NAME)
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        tensors = _read_legacy_bin(directory / LEGACY_WEIGHTS_NAME)
    else:
        raise AdapterFileError(
            f"No {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {str(directory)!r}. "
            f"Found: {preview(_listing(directory)) or 'nothing'}."
        )
    return {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({exc}). It is truncated or corrupt; re-save or "
            "re-download the adapter."
        ) from None


def _read_legacy_bin(path: Path) -> dict[str, torch.Tensor]:
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


# ----- loading ------------------------------------------------------------------------------
def _expected(model: nn.Module, resolved: Plan, config: LoraConfig) -> tuple[dict, dict]:
    """``{disk key: (shape, target)}`` for the tensors the file must hold, and for those it may hold.

    Optional: trained biases (``bias`` != "none") and the full base weight of a targeted
    embedding, which PEFT writes ("save_embedding_layers") in case the vocabulary was resized.
    """
    required: dict[str, tuple[tuple[int, ...], tuple]] = {}
    optional: dict[str, tuple[tuple[int, ...], tuple]] = {}
    for path, module in _embedding_modules(model):
        optional[f"{path}.weight"] = (tuple(module.weight.shape), ("carried", path, module.weight))
    for layer in resolved.layers:
        wrapper = resolved.wrappers[layer.path]
        for suffix, shape in wrapper.adapter_shapes(layer.r, config.dora, config.lora_bias).items():
            required[f"{layer.path}.{suffix}"] = (shape, ("factor", wrapper, suffix))
        if isinstance(wrapper, LoraParameter):
            continue  # the module's other parameters are not the adapter's
        base = wrapper.base_layer
        optional.pop(f"{layer.path}.weight", None)
        optional[f"{layer.path}.base_layer.weight"] = (tuple(base.weight.shape), ("carried", layer.path, base.weight))
        if config.bias != "none" and isinstance(getattr(base, "bias", None), torch.Tensor):
            optional[f"{layer.path}.base_layer.bias"] = (tuple(base.bias.shape), ("tensor", base.bias))
    for path in resolved.modules_to_save:
        module = model.get_submodule(path)
        original = getattr(module, "original_module", module)
        for key, value in original.state_dict(keep_vars=True).items():
            required[f"{path}.{key}"] = (tuple(value.shape), ("save", path, key))
            if config.bias == "all" and key.rpartition(".")[2] == "bias":
                # PEFT's bias="all" also writes every bias under its wrapper name: the copy's (the same
                # tensor as above) and the original module's (used while adapters are disabled)
                optional[f"{path}.modules_to_save.{key}"] = (tuple(value.shape), ("save", path, key))
                optional[f"{path}.original_module.{key}"] = (tuple(value.shape), ("tensor", value))
    for token in resolved.tokens:
        if token.tied_to is None:
            shape = (len(token.ids), token.weight_shape[1])
            required[f"{token.path}.{TOKEN_ROWS}"] = (shape, ("tokens", token.wrapper))
    if config.bias == "all":
        for path, module, wrapper in logical_modules(model):
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and wrapper is None and path not in resolved.wrappers:
                optional[f"{path}.bias"] = (tuple(bias.shape), ("tensor", bias))
    return required, optional


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the input and output embeddings (transformers models), seen without wrappers:
    PEFT saves their full weights with an adapter when the vocabulary was resized."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is None:
            continue
        for path, logical, wrapper in logical_modules(model):
            if (module is logical or module is wrapper) and isinstance(getattr(logical, "weight", None), torch.Tensor):
                found.append((path, logical))
    return found


TOKEN_ROWS = "token_adapter.trainable_tokens_delta"
_LORA_SUFFIXES = (
    f".{TOKEN_ROWS}",
    ".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector",
    ".base_layer.bias",
    ".base_layer.weight",
)


def _module_of(key: str) -> str:
    """The module path a disk key belongs to (``a.b.lora_A.weight`` -> ``a.b``)."""
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key.rpartition(".")[0]


def _check_tensors(
    model: nn.Module, tensors: dict, required: dict, optional: set, config: LoraConfig, strict: bool, where: str
) -> None:
    missing = sorted(required.keys() - tensors.keys())
    unexpected = sorted(k for k in tensors.keys() - required.keys() - optional.keys()
                        if not k.endswith(IGNORED_KEY_SUFFIXES))
    known = {**optional, **required}
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)}, model expects {known[k][0]}"
        for k in sorted(known.keys() & tensors.keys())
        if tuple(tensors[k].shape) != tuple(known[k][0])
    ]
    not_float = [k for k in tensors if not tensors[k].is_floating_point()]
    if not_float:
        raise AdapterFileError(f"{where}: tensors that are not floating point: {preview(not_float)}.")
    known_paths = {path for path, _, _ in logical_modules(model)}
    if unexpected and not any(_module_of(k) in known_paths for k in unexpected):
        raise AdapterFileError(
            f"{where}: the file names modules this model does not have: {preview(unexpected)}; the model's "
            f"closest: {_closest(_module_of(unexpected[0]), known_paths)}. Neither the model's names nor "
            "transformers' rules for names saved under transformers 4 account for them: the adapter was probably "
            "trained on another architecture; load it into the model it was made for."
        )
    carrying = [k for k in unexpected if ".lora_" in k or k.endswith(f".{TOKEN_ROWS}")]
    if carrying:
        raise AdapterFileError(
            f"{where}: adapter tensors that the config does not account for: {preview(carrying)}. They are part of "
            "what the adapter computes (a LoRA variant lora_inject does not implement, or factors for modules the "
            "config does not target), so the file is refused even with strict=False: dropping them would load "
            "another model."
        )
    _check_magnitudes(tensors, missing, where)
    if mismatched:
        hint = _vocabulary_hint(model, tensors, known) or _rank_hint(tensors, required, config)
        raise AdapterFileError(f"{where}: shape mismatch: {preview(mismatched, 3)}.{hint}")
    problems = []
    if missing:
        problems.append(f"missing keys (the config targets them, the file lacks them): {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the file, not targeted by the config): {preview(unexpected)}")
    if problems and strict:
        raise AdapterFileError(
            f"{where}: " + "; ".join(problems) + ". The file and its config disagree. Pass strict=False to load "
            "anyway (missing adapters start at their init, i.e. no change; unexpected tensors that are not adapter "
            "factors are ignored)."
        )
    if problems:
        warnings.warn(f"{where}: " + "; ".join(problems) + ".", stacklevel=3)


def _closest(path: str, known: set[str]) -> str:
    import difflib

    return ", ".join(difflib.get_close_matches(path, sorted(known), n=3, cutoff=0.3)) or "nothing alike"


def _check_magnitudes(tensors: dict, missing: list[str], where: str) -> None:
    """A DoRA file must carry every magnitude, finite: even with strict=False, a magnitude left at its
    init would silently compute another model."""
    lost = [k for k in missing if k.endswith(".lora_magnitude_vector")]
    if lost:
        raise AdapterFileError(
            f"{where}: the config says use_dora=true but the file lacks the DoRA magnitudes {preview(lost)}. "
            "Without them the adapter computes something else; re-save it with its magnitudes."
        )
    bad = [k for k, v in tensors.items() if k.endswith(".lora_magnitude_vector") and not torch.isfinite(v).all()]
    if bad:
        raise AdapterFileError(f"{where}: DoRA magnitudes with NaN or inf: {preview(bad)}. The file is damaged.")


def _vocabulary_hint(model: nn.Module, tensors: dict, known: dict) -> str:
    """An input/output embedding weight whose row count differs: the adapter was saved after
    resize_token_embeddings."""
    vocabulary = {path for path, _ in _embedding_modules(model)}
    for key, (shape, _) in known.items():
        if _module_of(key) in vocabulary and key in tensors and tuple(tensors[key].shape[1:]) == tuple(shape[1:]):
            rows = tensors[key].shape[0]
            if rows != shape[0]:
                return (
                    f" {key} has {rows} rows, the model {shape[0]}: the adapter was saved from a model whose "
                    f"vocabulary was resized. Call model.resize_token_embeddings({rows}) first (with the tokenizer "
                    "saved next to the adapter); lora_inject.from_pretrained does this by itself."
                )
    return ""


def _rank_hint(tensors: dict, required: dict, config: LoraConfig) -> str:
    for key, (shape, _) in required.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")) and key in tensors:
            file_rank = tensors[key].shape[0]
            if file_rank != shape[0]:
                return (
                    f" The config gives rank {shape[0]} for {key.rsplit('.', 2)[0]!r} but its tensors have rank "
                    f"{file_rank}: r/rank_pattern in {CONFIG_NAME} disagree with the weights."
                )
    return ""


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str = "default",
    *,
    strict: bool = True,
    revision: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> nn.Module:
    """Inject the adapter saved in ``directory`` (ours or PEFT's) into ``model`` and load its weights.

    ``directory`` is a folder, or a Hugging Face hub id (``org/name``, with ``revision``,
    ``subfolder`` and ``cache_dir``/``token``/``local_files_only``) read through the hub cache.
    Everything is read and checked first; on any error the model is left exactly as it was.
    The loaded adapter becomes the active one and its parameters require grad (to resume
    training); call ``model.requires_grad_(False)`` for inference.
    """
    check_adapter_name(adapter)
    check_not_distributed(model, "load an adapter")
    given, model = model, unwrap(model)
    require_new_adapter(model, adapter)
    directory = adapter_folder(directory, revision=revision, subfolder=subfolder, **hub_kwargs)
    where = str(directory)
    config = read_adapter_config(directory)
    if config.init is False:  # a tensor missing from the file (strict=False) must mean "no change"
        config = config.replace(init=True)
    tensors = read_adapter_tensors(directory)
    read = tensors
    config, tensors = _model_names(model, config, tensors, where)
    converted = tensors is not read
    try:
        resolved = resolve(model, config, adapter, every_target_must_match=False)
    except AdapterFileError:
        raise
    except LoraInjectError as exc:
        raise type(exc)(f"{where}: the adapter's config does not fit this model. {exc}") from None
    if not converted:  # factors converted from transformers-4 names are in the current layout already
        tensors = _current_expert_layout(resolved.wrappers, tensors, directory)
    required, optional = _expected(model, resolved, config)
    _check_tensors(model, tensors, required, optional, config, strict, where)
    inject_resolved(model, resolved, config, adapter)
    try:
        _copy_in(model, tensors, {**optional, **required}, adapter)
    except BaseException:
        delete_adapter(model, adapter)
        raise
    return given


def _model_names(model: nn.Module, config: LoraConfig, tensors: dict, where: str):
    """An adapter saved against transformers 4 names, in the model's names (see old_names.py)."""
    from .transformers4 import convert_old_names

    return convert_old_names(model, config, tensors, where)


def read_peft_version(directory: str | os.PathLike) -> str | None:
    """The ``peft_version`` an adapter folder's config records (None if absent)."""
    try:
        return json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8")).get("peft_version")
    except (OSError, ValueError, AttributeError):
        return None


def _current_expert_layout(wrappers: dict, tensors: dict, directory) -> dict:
    """Expert-parameter factors saved by PEFT <= 0.19.0 converted to the current layout (see moe_layout.py)."""
    parameters = {p: w for p, w in wrappers.items() if isinstance(w, LoraParameter)}
    if not parameters:
        return tensors
    from .expert_layout import current_layout

    return current_layout(parameters, tensors, read_peft_version(directory), str(directory))


def _copy_in(model: nn.Module, tensors: dict, targets: dict, adapter: str) -> None:
    with torch.no_grad():
        for key, (_, target) in targets.items():
            if key not in tensors:
                continue
            kind = target[0]
            if kind == "factor":
                param = target[1].factor(adapter, target[2])
            elif kind == "tokens":
                param = target[1].rows(adapter)
            elif kind == "save":
                param = model.get_submodule(target[1]).modules_to_save[adapter].state_dict(keep_vars=True)[target[2]]
            elif kind == "carried":  # a full base weight in the file travels on when the adapter is saved again
                carried_paths(model).add(target[1])
                param = target[2]
            else:
                param = target[1]
            param.data.copy_(tensors[key])


def load_adapter_weights(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", *, strict: bool = True
) -> nn.Module:
    """Load the weights of an adapter folder into adapter ``adapter`` already injected in ``model``.

    For resuming training: the model keeps its wrappers and optimizer references stay valid.
    Checked first (keys, shapes) exactly as :func:`load_adapter`; nothing changes on error.
    For sharded (FSDP2) models use :func:`lora_inject.distributed.load_adapter_weights`.
    """
    check_not_sharded(model, "load adapter weights", SHARDED_LOAD)
    given, model = model, unwrap(model)
    tensors, required, optional = checked_tensors_for_existing(model, directory, adapter, strict)
    _copy_in(model, tensors, {**optional, **required}, adapter)
    return given


def checked_tensors_for_existing(model: nn.Module, directory: str | os.PathLike, adapter: str, strict: bool):
    """Read an adapter folder and check it against adapter ``adapter`` as injected in ``model``.

    Returns ``(tensors, required, optional)`` as :func:`_expected` describes them.
    """
    _require_adapter(model, adapter)
    config = adapter_configs(model)[adapter]
    tensors = _principal_from_lora(model, adapter, read_adapter_tensors(directory), str(directory))
    resolved = Plan([], [], None, {})
    for path, module in lora_layers(model):
        if adapter in module.r:
            resolved.wrappers[path] = module
            resolved.layers.append(PlannedLayer(path, "", (), module.r[adapter], 0.0, 0.0, 0))
    tensors = _current_expert_layout(resolved.wrappers, tensors, directory)
    resolved.modules_to_save = [
        p for p, m in model.named_modules() if isinstance(m, ModulesToSave) and adapter in m.adapter_names
    ]
    resolved.tokens = [
        TokenTarget(p, m.ids(adapter).tolist(), m, "", tuple(m.base_layer.weight.shape))
        for p, m in model.named_modules()
        if isinstance(m, TrainableTokens) and m.tied_to is None and adapter in m.adapter_names
    ]
    required, optional = _expected(model, resolved, config)
    _check_tensors(model, tensors, required, optional, config, strict, str(directory))
    return tensors, required, optional
