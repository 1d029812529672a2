"""Saving: an adapter taken out of a model into the canonical form (:class:`Adapter`), then written by a format.

What travels with an adapter besides its factors is decided here, once for every format: trained biases and
modules, the embedding weights of a resized vocabulary (PEFT's ``save_embedding_layers``), and PiSSA/OLoRA
adapters rewritten as plain LoRA for the original base.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError
from ..guards import check_not_sharded, unwrap
from ..inject import _require_adapter, adapter_configs, adapter_state, carried_paths, lora_layers
from ..layers import LoraLayer, ModulesToSave, TrainableTokens
from ..layers.principal import is_principal_init
from ..threads import reads_adapters
from .adapter import Adapter
from .load import embedding_modules
from .peft_config import disk_key
from .registry import format_named


def adapter_tensors(
    model: nn.Module,
    adapter: str = "default",
    full_state: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: bool | str = "auto",
    principal_as_lora: bool = True,
) -> dict[str, torch.Tensor]:
    """The adapter's tensors in the canonical names (``<path>.lora_A.weight``; see :class:`Adapter`).

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
        out[disk_key(key, adapter)] = tensor.detach().to("cpu").contiguous().clone()
    for key, tensor in _carried_weights(model, full_state, _embedding_paths(model, save_embedding_layers)).items():
        out.setdefault(key, tensor.detach().to("cpu").contiguous().clone())
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
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        out[a_key] = torch.cat([out[a_key], a0.to("cpu", out[a_key].dtype)], dim=0).contiguous()
        out[b_key] = torch.cat([out[b_key], -b0.to("cpu", out[b_key].dtype)], dim=1).contiguous()


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
        for path, module in embedding_modules(model):
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


@reads_adapters
def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", *,
    save_embedding_layers: bool | str = "auto", principal_as_lora: bool = True, format: str = "peft",
) -> Path:
    """Write ``adapter`` to ``directory`` as PEFT does (``format="peft"``, the default); returns the path.

    Only adapter tensors are written (plus ``modules_to_save`` and trained biases), never the
    base weights, except the input/output embedding weights where they must travel with the
    adapter, as PEFT's ``save_embedding_layers``: ``"auto"`` (default) when the vocabulary was
    resized after inject or a loaded adapter file brought them; ``True`` always (a vocabulary you
    changed yourself); ``False`` never (warned if they would have travelled).
    A PiSSA/OLoRA adapter (``init="pissa"``/``"olora"``) is written by default as the plain rank-2r LoRA
    that gives the trained model on the *original* base; ``principal_as_lora=False`` writes the
    residual form instead (PEFT's, for the residual base only).
    ``format`` names any registered format that writes (``lora_inject.formats.registry.FORMATS``).
    An interrupted save leaves any previous adapter in the folder intact.
    A compiled (``torch.compile``) or DDP-wrapped model saves as the model inside it. For
    sharded (FSDP2) models use :func:`lora_inject.distributed.save_adapter` on every rank.
    """
    check_not_sharded(model, "save the adapter")
    model = unwrap(model)
    _require_adapter(model, adapter)
    writer = format_named(format, for_writing=True)
    tensors = adapter_tensors(
        model, adapter, save_embedding_layers=save_embedding_layers, principal_as_lora=principal_as_lora
    )
    return write_adapter(model, directory, adapter, tensors, principal_as_lora=principal_as_lora, format=writer.name)


def write_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str, tensors: dict, principal_as_lora: bool = True,
    format: str = "peft",
) -> Path:
    """Write already collected canonical ``tensors`` (:func:`adapter_tensors`) and the adapter's config."""
    config = adapter_configs(model)[adapter]
    if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):  # as PEFT: known by now
        config = config.replace(base_model_name_or_path=str(model.name_or_path))
    if principal_as_lora and is_principal_init(config.init):
        config = principal_as_lora_config(config)
    collected = Adapter(config, tensors, source=f"adapter {adapter!r}", format=format, name=adapter)
    return format_named(format, for_writing=True).write(collected, Path(directory), model)
