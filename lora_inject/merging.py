"""Folding adapters into the base weights, and taking the wrappers out again."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .guards import check_not_distributed, unwrap
from .inject import _STATE_ATTR, _adapter_modules, _require_adapter, _set_submodule, innermost_first, model_event
from .layers import LoraLayer
from .quantized.registry import dequantized_linear, forget_quantization, quantized_kind
from .threads import changes_adapters


@changes_adapters
def merge(
    model: nn.Module, adapters: str | Iterable[str] | None = None, *, safe: bool = True, requantize: bool = False
) -> None:
    """Fold adapters (default: the active ones) into the base weights; the wrappers stay.

    Computed in float32 (float64 for float64 weights or adapters), cast back once. Already-merged
    adapters are skipped (with a warning), never added twice. ``safe=True`` checks every merged
    weight for NaN/inf before writing any. A quantized base is refused (merging re-quantizes the
    update away) unless ``requantize=True``: then it is dequantized, merged and quantized again, and a
    warning reports how much of the update that lost; ``unmerge`` restores the quantized weights exactly.
    """
    check_not_distributed(model, "merge adapters")
    model = unwrap(model)
    names = None if adapters is None else ([adapters] if isinstance(adapters, str) else list(adapters))
    for name in names or ():
        _require_adapter(model, name)
    modules = list(_adapter_modules(model))

    def requested(module) -> list[str]:
        wanted = names if names is not None else module.active_adapters
        return [n for n in wanted if n in module.adapter_names]

    def to_merge(module) -> list[str]:
        return [n for n in requested(module) if n not in module.merged_adapters]

    requantized = [(p, m) for p, m in modules if requantize and m.merges_into_base and quantized_kind(m.base_layer)]
    for path, module in requantized:
        kind = quantized_kind(module.base_layer)
        if kind.requantize is None:
            raise MergeError(f"{path}: {kind.name} weights cannot be re-quantized here; "
                             "merge_and_unload(model, dequantize=torch.bfloat16) gives a float model instead.")
        if any(module.use_lora_bias.get(n) for n in to_merge(module)):
            raise MergeError(f"{path}: a lora_bias adapter adds to the bias as well, which re-quantizing does not "
                             "cover; merge_and_unload(model, dequantize=torch.bfloat16) merges it exactly.")
    modules = [(p, m) for p, m in modules if all(m is not q for _, q in requantized)]
    for path, module in modules:  # before anything is written: never a half-merged model
        for name in to_merge(module):
            if module.merge_refusal(name):
                raise MergeError(f"{path}: {module.merge_refusal(name)}")
    if safe:
        for _, module in modules:
            for name in to_merge(module):
                module.check_merge(name)
    _untie_shared_weights(model, [(m, to_merge(m)) for _, m in modules])
    for _, module in modules:
        module.merge(requested(module))  # an already merged adapter is skipped with a warning
    _report_requantized([(path, m.merge_requantized(to_merge(m))) for path, m in requantized])


def _report_requantized(results: list[tuple[str, tuple[float, float]]]) -> None:
    """Say how much of the update re-quantizing lost: ||Q(W + dW) - (W + dW)|| / ||dW|| per layer."""
    shares = [(lost / update, path) for path, (lost, update) in results if update > 0]
    if shares:
        worst, where = max(shares)
        mean = sum(share for share, _ in shares) / len(shares)
        warnings.warn(
            f"Merged into {len(shares)} quantized layer(s) by re-quantizing: the stored weights differ from W + dW by "
            f"{100 * mean:.1f}% of the update on average (relative Frobenius norm), {100 * worst:.1f}% at {where!r}. "
            "For an exact export merge into float weights (merge_and_unload(model, dequantize=...)).", stacklevel=3,
        )


def _untie_shared_weights(model: nn.Module, merging: list[tuple[nn.Module, list[str]]]) -> None:
    """Give a module about to merge its own weight when it shares it with another (tied embeddings/lm_head).

    Merging into a shared tensor would silently change the other module too; a head whose weight
    follows an embedding's trainable tokens (tied on purpose) is the one sharing that stays.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    followers = Counter(id(m.tied_to) for m, _ in merging if m.tied_to is not None)
    untied = []
    for module, names in merging:
        base = module.base_layer
        weight = getattr(base, "weight", None)
        if not (names and module.merges_into_base and module.tied_to is None and isinstance(weight, nn.Parameter)):
            continue
        if uses[id(weight)] > 1 + followers[id(module)]:
            base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(module)
    if untied:
        model_event("untied", model)
        warnings.warn(
            f"{len(untied)} merged layer(s) shared their weight with another module (tied embeddings); each got "
            "its own copy so the merge changes only the adapted module. The model's config now says "
            "tie_word_embeddings=False.",
            stacklevel=3,
        )


@changes_adapters
def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again."""
    check_not_distributed(model, "unmerge adapters")
    for _, module in _adapter_modules(unwrap(model)):
        module.unmerge()


def _unwrap(model: nn.Module, keep_merged: bool) -> nn.Module:
    check_not_distributed(model, "take the adapters out", offloaded_ok=not keep_merged)
    model = unwrap(model)
    shared_before = _shared_parameters(model)
    for path, module in innermost_first(_adapter_modules(model)):
        replacement = module.unwrapped(keep_merged)
        replacement.requires_grad_(False)
        _set_submodule(model, path, replacement)
    if hasattr(model, _STATE_ATTR):
        object.__delattr__(model, _STATE_ATTR)
    split = shared_before - _shared_parameters(model)
    if split:  # a trained copy (modules_to_save) replaced one side of a tied pair
        model_event("untied", model)
        warnings.warn(
            f"{len(split)} weight(s) shared by two modules (tied embeddings) are no longer shared: a trained copy "
            "(modules_to_save) replaced one side. The model's config now says tie_word_embeddings=False, so "
            "saving and reloading keeps them apart.", stacklevel=3,
        )
    model_event("detached", model)
    return model


def _shared_parameters(model: nn.Module) -> set[int]:
    """The ids of parameters that more than one module uses."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in uses.items() if count > 1}


@changes_adapters
def merge_and_unload(
    model: nn.Module, adapters: str | Iterable[str] | None = None, *, safe: bool = True,
    dequantize: torch.dtype | None = None, requantize: bool = False,
) -> nn.Module:
    """Merge adapters (default: the active ones) and return the plain model, with the original module types.

    ``modules_to_save`` are replaced by the active adapter's trained copy. With ``safe=True``
    (the default) nothing is written if any merged weight would hold NaN/inf. A model with quantized
    layers is refused unless ``dequantize=torch.bfloat16`` (or another float dtype): every quantized
    Linear becomes a float ``nn.Linear`` first, so the update is kept exactly and the result is a plain
    float model; ``requantize=True`` keeps the quantized format instead, and reports what it lost.
    """
    if dequantize is not None:
        if requantize:
            raise ConfigError("Pass dequantize=<dtype> (a float model) or requantize=True (stay quantized), not both.")
        with _dequantized(unwrap(model), dequantize):
            merge(model, adapters, safe=safe)
    else:
        merge(model, adapters, safe=safe, requantize=requantize)
    return _unwrap(model, keep_merged=True)


@contextlib.contextmanager
def _dequantized(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Every quantized Linear (wrapped or not) becomes a float ``nn.Linear`` in ``dtype``; undone if the block
    raises, so a refused merge leaves the quantized model as it was."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dequantize must be a floating torch.dtype such as torch.bfloat16; got {dtype!r}.")
    swaps = []  # (put back, old module)
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraLayer)}
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and quantized_kind(module.base_layer) is not None:
            swaps.append((module.set_base_layer, module.base_layer))
            module.set_base_layer(dequantized_linear(module.base_layer, dtype))
        elif path and id(module) not in wrapped and quantized_kind(module) is not None:
            swaps.append((functools.partial(_set_submodule, model, path), module))
            _set_submodule(model, path, dequantized_linear(module, dtype))
    try:
        yield
    except BaseException:
        for put_back, old in reversed(swaps):
            put_back(old)
        raise
    if swaps:
        forget_quantization(model)


@changes_adapters
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the plain model with its original weights (merged adapters are subtracted)."""
    return _unwrap(model, keep_merged=False)
