"""Folding adapters into the base weights, and taking the wrappers out again."""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Iterable

from torch import nn

from .errors import MergeError
from .guards import check_not_distributed, unwrap
from .inject import _STATE_ATTR, _adapter_modules, _require_adapter, _set_submodule, lora_layers
from .layers import LoraLayer


def merge(model: nn.Module, adapters: str | Iterable[str] | None = None, *, safe: bool = True) -> None:
    """Fold adapters (default: the active ones) into the base weights; the wrappers stay.

    Computed in float32 (float64 for float64 weights or adapters), cast back once. Already-merged
    adapters are skipped (with a warning), never added twice. ``safe=True`` checks every merged
    weight for NaN/inf before writing any.
    """
    check_not_distributed(model, "merge adapters")
    model = unwrap(model)
    names = None if adapters is None else ([adapters] if isinstance(adapters, str) else list(adapters))
    for name in names or ():
        _require_adapter(model, name)
    layers = [layer for _, layer in lora_layers(model)]
    for path, layer in lora_layers(model):  # before anything is written: never a half-merged model
        wanted = names if names is not None else layer.active_adapters
        for name in (n for n in wanted if n in layer.r and n not in layer.merged_adapters):
            if layer.merge_refusal(name):
                raise MergeError(f"{path}: {layer.merge_refusal(name)}")
    _untie_shared_weights(model, layers)
    if safe:
        for layer in layers:
            for name in names if names is not None else layer.active_adapters:
                if name in layer.r and name not in layer.merged_adapters:
                    layer.check_merge(name)
    for layer in layers:
        layer.merge([n for n in (names if names is not None else layer.active_adapters) if n in layer.r])


def _untie_shared_weights(model: nn.Module, layers: list[LoraLayer]) -> None:
    """Give a wrapped layer its own weight when it shares it (tied embeddings/lm_head) before merging.

    Merging into a shared tensor would silently change the other module too.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untied = []
    for layer in layers:
        weight = layer.base_layer.weight
        if uses[id(weight)] > 1 and any(n not in layer.merged_adapters for n in layer.active_adapters):
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(layer)
    if untied:
        if "transformers" in sys.modules:
            from .hf import untie_note

            untie_note(model)
        warnings.warn(
            f"{len(untied)} merged layer(s) shared their weight with another module (tied embeddings); each got "
            "its own copy so the merge changes only the adapted module. The model's config now says "
            "tie_word_embeddings=False.",
            stacklevel=3,
        )


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again."""
    check_not_distributed(model, "unmerge adapters")
    for _, layer in lora_layers(model):
        layer.unmerge()


def _unwrap(model: nn.Module, keep_merged: bool) -> nn.Module:
    check_not_distributed(model, "take the adapters out")
    model = unwrap(model)
    for path, module in list(_adapter_modules(model)):
        if isinstance(module, LoraLayer):
            if not keep_merged:
                module.unmerge()
            for name in list(module.principal):  # PiSSA/OLoRA took a part out of the base: give it back
                if not (keep_merged and name in module.merged_adapters):
                    module.restore_principal_base(name)
            replacement = module.base_layer
        else:
            use_copy = keep_merged and module.active_adapter is not None
            replacement = module.modules_to_save[module.active_adapter] if use_copy else module.original_module
        replacement.requires_grad_(False)
        _set_submodule(model, path, replacement)
    if hasattr(model, _STATE_ATTR):
        object.__delattr__(model, _STATE_ATTR)
    from .hf_methods import uninstall
    from .hooks import remove_hooks

    uninstall(model)
    remove_hooks(model)
    return model


def merge_and_unload(model: nn.Module, adapters: str | Iterable[str] | None = None, *, safe: bool = True) -> nn.Module:
    """Merge adapters (default: the active ones) and return the plain model, with the original module types.

    ``modules_to_save`` are replaced by the active adapter's trained copy. With ``safe=True``
    (the default) nothing is written if any merged weight would hold NaN/inf.
    """
    merge(model, adapters, safe=safe)
    return _unwrap(model, keep_merged=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the plain model with its original weights (merged adapters are subtracted)."""
    return _unwrap(model, keep_merged=False)
