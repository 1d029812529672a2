"""Weighted combinations of adapters into a new one (PEFT's ``add_weighted_adapter``, every method).

``cat`` is exact: the new adapter's update is ``sum_i w_i * dW_i`` (factors stacked along the rank,
each ``A_i`` carrying ``w_i * s_i``; the new scale is 1, whatever rsLoRA or the patterns said). The
others follow PEFT's math: ``linear``, ``ties``, ``dare_*`` and ``magnitude_prune`` combine A's and
B's separately (an approximation: the product of sums is not the sum of products), the ``*_svd``
methods combine the full updates and keep their top ``svd_rank`` singular directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..config import LoraConfig, exact_config
from ..errors import AdapterExistsError, ConfigError
from ..guards import check_not_distributed, unwrap
from ..inject import _STATE_ATTR, _require_adapter, check_adapter_name, inject_resolved, lora_layers
from ..layers import LoraLayer
from ..layers.principal import is_principal_init
from ..targeting.plan import resolve
from ..threads import changes_adapters

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)


@changes_adapters
def combine_adapters(
    model: nn.Module, weights: Mapping[str, float], name: str, method: str = "cat", *,
    density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
    svd_clamp: float | None = None, seed: int | None = None,
) -> nn.Module:
    """Add adapter ``name`` combining ``weights`` (``{adapter: weight}``, negative weights subtract).

    ``density`` (kept fraction) for ties/dare/magnitude_prune; ``majority_sign_method`` ("total" or
    "frequency") for ties; ``svd_rank`` (default: the largest rank) and ``svd_clamp`` (a quantile) for the
    SVD methods; ``seed`` makes dare's random pruning reproducible (the same draws as PEFT after
    ``torch.manual_seed(seed)``). Adapters may target different modules; a module takes what the
    adapters on it give. The new adapter is inactive; it saves and loads like any other.
    """
    check_not_distributed(model, "combine adapters")
    inner = unwrap(model)
    names = _check(inner, weights, name, method, density)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in lora_layers(inner):
        present = [n for n in names if n in layer.r]
        if present:
            factors[path] = _combine_layer(layer, present, weights, method, density, majority_sign_method,
                                           svd_rank, svd_clamp, generator)
    _add(inner, names[0], name, factors)
    return model


def _check(model: nn.Module, weights: Mapping[str, float], name: str, method: str, density) -> list[str]:
    check_adapter_name(name)
    if name in getattr(model, _STATE_ATTR, {}):
        raise AdapterExistsError(f"An adapter named {name!r} exists already; pick another name or delete it first.")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}; got {method!r}.")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"weights must be a non-empty {{adapter: weight}} dict; got {weights!r}.")
    for adapter in weights:
        _require_adapter(model, adapter)
    needs_density = any(key in method for key in ("ties", "dare", "magnitude_prune"))
    if needs_density and not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
        raise ConfigError(f"method {method!r} needs density (the fraction kept) in [0, 1]; got {density!r}.")
    configs = getattr(model, _STATE_ATTR)
    odd = [a for a in weights if configs[a].dora or configs[a].lora_bias or configs[a].modules_to_save
           or configs[a].trainable_tokens or configs[a].bias != "none" or is_principal_init(configs[a].init)]
    experts = [a for a in weights if configs[a].target_parameters]
    if experts:
        raise ConfigError(
            f"combine_adapters combines module LoRA factors; {experts} also adapt parameters (target_parameters: "
            "MoE experts), whose stacked per-expert factors it does not combine. Merge them one by one instead."
        )
    if odd:
        raise ConfigError(
            f"combine_adapters combines LoRA factors; {odd} also carry DoRA magnitudes, B biases, trained biases, "
            "trained modules, token rows or a PiSSA/OLoRA base change, which have no weighted combination here."
        )
    return list(weights)


def _weighted_factors(layer: LoraLayer, names: list[str], weights: Mapping[str, float]):
    """PEFT's split of ``w * s`` between the factors: ``A`` gets sign * sqrt(|w s|), ``B`` sqrt(|w s|)."""
    a_list, b_list, wa, wb = [], [], [], []
    for n in names:
        a, b = _factors(layer, n)
        ws = weights[n] * layer.scaling[n]
        a_list.append(a)
        b_list.append(b)
        wa.append(math.copysign(math.sqrt(abs(ws)), ws))
        wb.append(math.sqrt(abs(ws)))
    return a_list, b_list, torch.tensor(wa), torch.tensor(wb)


def _combine_layer(layer, names, weights, method, density, sign_method, svd_rank, clamp, generator):
    """The new (A, B) of one layer, float32, shaped as the layer stores its factors."""
    if method == "cat":
        a = torch.cat([_factors(layer, n)[0] * (weights[n] * layer.scaling[n]) for n in names], dim=0)
        b = torch.cat([_factors(layer, n)[1] for n in names], dim=1)
        return a, b
    if method in FACTOR_METHODS:
        ranks = {layer.r[n] for n in names}
        if len(ranks) > 1:
            raise ConfigError(
                f"method {method!r} adds factors entry by entry, so the adapters need one rank per module; they have "
                f"{sorted(ranks)} here. Use 'cat' (exact) or an SVD method."
            )
        a_list, b_list, wa, wb = _weighted_factors(layer, names, weights)
        return (_merge_tensors(method, a_list, wa, density, sign_method, generator),
                _merge_tensors(method, b_list, wb, density, sign_method, generator))
    deltas = [layer.delta_weight(n).float() for n in names]  # weight layout, scaled, as PEFT combines them
    arithmetic = "linear" if method == "svd" else method.removesuffix("_svd")
    combined = _merge_tensors(arithmetic, deltas, torch.tensor([float(weights[n]) for n in names]), density,
                              sign_method, generator)
    return _svd_factors(layer, combined, svd_rank or max(layer.r[n] for n in names), clamp, names[0])


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as stored: (r, in, ...) and (out, r, ...) for Linear/Conv1D/conv, (r, V) and (D, r) for
    embeddings; float32 copies."""
    containers = [getattr(layer, c)[name] for c in layer.adapter_param_names[:2]]
    a, b = (c.weight if isinstance(c, nn.Module) else c for c in containers)
    return a.detach().float(), b.detach().float()


def _svd_factors(layer: LoraLayer, delta: torch.Tensor, rank: int, clamp: float | None, like: str):
    """Top-``rank`` SVD of the update, as (A, B) in the layer's factor layout (the scale is 1)."""
    a0, b0 = _factors(layer, like)
    matrix = delta.t() if layer.delta_transposed else delta.reshape(delta.shape[0], -1)  # (out, in*k) = B @ A
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.numel())
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh.reshape(rank, *a0.shape[1:]), u.reshape(b0.shape[0], rank, *b0.shape[2:])


def _merge_tensors(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, sign_method, generator):
    """PEFT's merge_utils: task arithmetic, TIES, DARE and magnitude pruning over ``tensors`` (same shape)."""
    if "dare" in method:
        tensors = [_random_prune(t, density, generator) for t in tensors]
    elif "ties" in method or "magnitude_prune" in method:
        tensors = [_magnitude_prune(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.to(stacked).view(-1, *(1,) * (stacked.dim() - 1))
    if "ties" not in method:
        return weighted.sum(dim=0)
    signs = stacked.sign()
    magnitude = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    if sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency'; got {sign_method!r}.")
    agree = signs == torch.where(magnitude >= 0, 1.0, -1.0)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _add(model: nn.Module, template: str, name: str, factors: dict) -> None:
    """Inject adapter ``name`` on exactly the combined paths with their ranks and scale 1, and fill it."""
    ranks = {path: a.shape[0] for path, (a, _) in factors.items()}
    template = getattr(model, _STATE_ATTR)[template]
    config = exact_config(LoraConfig(dropout=template.dropout, base_model_name_or_path=template.base_model_name_or_path,
                                     task_type=template.task_type), ranks, dict.fromkeys(ranks, 1.0))
    active = [n for n in getattr(model, _STATE_ATTR) if any(n in m.active_adapters for _, m in lora_layers(model))]
    inject_resolved(model, resolve(model, config, name), config, name)
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer = model.get_submodule(path)
            stored_a, stored_b = (getattr(layer, c)[name] for c in layer.adapter_param_names[:2])
            (stored_a.weight if isinstance(stored_a, nn.Module) else stored_a).copy_(a)
            (stored_b.weight if isinstance(stored_b, nn.Module) else stored_b).copy_(b)
    from ..inject import set_adapter

    if active:
        set_adapter(model, active)
