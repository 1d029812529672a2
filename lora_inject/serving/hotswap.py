"""Hot swap: replace an adapter's weights in place, so a compiled model serves another adapter without
recompiling.

``prepare_hotswap(model, max_rank=64)`` pads the adapter's factors to ``max_rank`` (zero rows and columns
add nothing) and fixes each layer's scale ``s0``. ``hotswap_adapter(model, folder)`` then writes a new
adapter's factors into those same tensors: A zero-padded, ``B * s / s0`` so that ``s0 * B' @ A`` is the
new update exactly. No module, shape or Python attribute the compiled graph depends on changes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import exact_config
from ..errors import AdapterFileError, ConfigError
from ..formats.hub import adapter_folder
from ..formats.registry import read_adapter
from ..formats.validate import checked_values, unpaired
from ..guards import unwrap
from ..inject import _STATE_ATTR, _require_adapter, lora_layers
from ..layers import LoraLayer
from ..layers.parameter import LoraParameter
from ..threads import changes_adapters, changing

_PREPARED = "_lora_inject_hotswap"  # adapter -> max_rank, on the model


@changes_adapters
def prepare_hotswap(model: nn.Module, max_rank: int, adapter: str = "default") -> nn.Module:
    """Make adapter ``adapter`` swappable for any adapter of rank <= ``max_rank`` on the same layers.

    Call before ``torch.compile``. The adapter computes the same as before; its config becomes the
    equivalent rank-``max_rank`` one (what saving it writes).
    """
    inner = unwrap(model)
    _require_adapter(inner, adapter)
    if not (isinstance(max_rank, int) and max_rank > 0):
        raise ConfigError(f"max_rank must be a positive int; got {max_rank!r}.")
    layers = [(p, m) for p, m in lora_layers(inner) if adapter in m.r]
    too_big = {p: m.r[adapter] for p, m in layers if m.r[adapter] > max_rank}
    if too_big:
        raise ConfigError(f"max_rank={max_rank} is below this adapter's own ranks: {too_big}.")
    odd = [p for p, m in layers if m.use_dora.get(adapter) or m.use_lora_bias.get(adapter) or m.principal.get(adapter)]
    experts = [p for p, m in layers if isinstance(m, LoraParameter)]
    if experts:
        raise ConfigError(f"Hot swap pads module LoRA factors; {adapter!r} adapts parameters (MoE experts) at "
                          f"{experts[:3]}, whose stacked factors it does not pad. Use load_adapter for such adapters.")
    if odd:
        raise ConfigError(f"Hot swap handles plain LoRA factors; {adapter!r} has DoRA/lora_bias/PiSSA at {odd}.")
    for _, layer in layers:
        _pad(layer, adapter, max_rank)
    config = getattr(inner, _STATE_ATTR)[adapter]
    ranks = {p: max_rank for p, _ in layers}
    scales = {p: m.scaling[adapter] for p, m in layers}
    getattr(inner, _STATE_ATTR)[adapter] = exact_config(config, ranks, scales)
    inner.__dict__.setdefault(_PREPARED, {})[adapter] = max_rank
    return model


def _pad(layer: LoraLayer, adapter: str, rank: int) -> None:
    """Grow A (r, in, ...) and B (out, r, ...) to ``rank`` in place (same Parameters), zero-filled."""
    a, b = _params(layer, adapter)
    r = layer.r[adapter]
    with torch.no_grad():
        new_a = a.new_zeros(rank, *a.shape[1:])
        new_a[:r] = a
        new_b = b.new_zeros(b.shape[0], rank, *b.shape[2:])
        new_b[:, :r] = b
        a.data, b.data = new_a, new_b
    for container, features in zip(layer.adapter_param_names[:2], ("out_features", "in_features")):
        module = getattr(layer, container)[adapter]
        if isinstance(module, nn.Module) and features in module.__dict__:
            module.__dict__[features] = rank
    layer.r[adapter] = rank
    layer.lora_alpha[adapter] = layer.scaling[adapter] * rank
    layer.__dict__.pop("_frozen", None)
    layer._refresh_running()


def _params(layer: LoraLayer, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    a, b = (getattr(layer, c)[adapter] for c in layer.adapter_param_names[:2])
    return (a.weight if isinstance(a, nn.Module) else a), (b.weight if isinstance(b, nn.Module) else b)


def hotswap_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", **hub_kwargs: Any
) -> nn.Module:
    """Write the adapter saved in ``directory`` (ours or PEFT's; a hub id works too) into ``adapter``,
    prepared with :func:`prepare_hotswap`, in place: same tensors, same shapes, same scales.

    Layers the new adapter does not target get a zero update. Everything is checked before anything
    is written: a larger rank than prepared, a target outside the prepared layers, a variant (DoRA,
    lora_bias, trained modules) or a shape mismatch raise and change nothing.
    """
    inner = unwrap(model)
    max_rank = inner.__dict__.get(_PREPARED, {}).get(adapter)
    if max_rank is None:
        raise ConfigError(f"Adapter {adapter!r} was not prepared: call lora_inject.prepare_hotswap(model, max_rank) "
                          "before torch.compile, then swap.")
    folder = adapter_folder(directory, **hub_kwargs)
    found = read_adapter(folder, values=False)  # a tensor's values are read once its shape fits its layer
    config, tensors = found.config, found.tensors
    if (config.dora or config.lora_bias or config.modules_to_save or config.trainable_tokens or config.bias != "none"
            or config.target_parameters):
        raise AdapterFileError(f"{folder}: hot swap writes plain LoRA factors; this adapter also has DoRA, biases, "
                               "trained modules, token rows or parameter (MoE expert) targets. Load it with "
                               "load_adapter instead.")
    with changing(inner), torch.no_grad():  # waits for the forwards and blocks in flight; new ones wait
        layers = {p: m for p, m in lora_layers(inner) if adapter in m.r}
        writes = _planned_writes(layers, adapter, config, tensors, max_rank, str(folder))
        checked_values(tensors, str(folder))
        for (a, b), (new_a, new_b) in writes:
            a.copy_(new_a)
            b.copy_(new_b)
    return model


def _planned_writes(layers: dict, adapter: str, config, tensors: dict, max_rank: int, where: str) -> list:
    """Every (target params, new values) pair, computed and checked before any write."""
    alone = unpaired(tensors)
    if alone:
        raise AdapterFileError(f"{where}: LoRA factors without their partner ({alone[:3]}); hot swap writes both "
                               "factors of every layer. The file is incomplete; re-save the adapter.")
    others = sorted(k for k in tensors if ".lora_" not in k)
    if others:  # full weights (a resized vocabulary), biases: what a swap of factors would silently drop
        raise AdapterFileError(f"{where}: tensors that are not LoRA factors ({others[:3]}); hot swap writes factors "
                               "only. Load this adapter with load_adapter instead.")
    paths = {key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key}
    outside = sorted(paths - set(layers))
    if outside:
        raise AdapterFileError(f"{where}: targets {outside[:4]} that the prepared adapter does not have; hot swap "
                               "cannot add layers (that would change the model). Prepare with those targets.")
    writes = []
    for path, layer in layers.items():
        a, b = _params(layer, adapter)
        new_a, new_b = torch.zeros_like(a), torch.zeros_like(b)
        if path in paths:
            names = layer.adapter_param_names[:2]
            key_a, key_b = (f"{path}.{n}" + ("" if n.startswith("lora_embedding") else ".weight") for n in names)
            file_a, file_b = tensors[key_a], tensors[key_b]
            r = file_a.shape[0]
            if r > max_rank:
                raise AdapterFileError(f"{where}: {path} has rank {r}, above the prepared max_rank={max_rank}. "
                                       "Prepare with a larger max_rank.")
            if file_a.shape[1:] != a.shape[1:] or file_b.shape[0] != b.shape[0] or file_b.shape[2:] != b.shape[2:]:
                raise AdapterFileError(f"{where}: {path}'s factors {tuple(file_a.shape)}, {tuple(file_b.shape)} do "
                                       f"not fit the layer ({tuple(a.shape)}, {tuple(b.shape)} prepared).")
            new_a[:r] = file_a.to(a.dtype)
            new_b[:, :r] = (file_b.float() * (config.scale_for(path) / layer.scaling[adapter])).to(b.dtype)
        writes.append(((a, b), (new_a, new_b)))
    return writes
