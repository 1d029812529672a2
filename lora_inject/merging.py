"""Folding adapters into the base weights, and taking the wrappers out again."""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Iterable

from torch import nn

from .errors import MergeError
from .guards import check_not_distributed, unwrap
from .inject import _STATE_ATTR, _adapter_modules, _require_adapter, _set_submodule


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
    modules = list(_adapter_modules(model))

    def requested(module) -> list[str]:
        wanted = names if names is not None else module.active_adapters
        return [n for n in wanted if n in module.adapter_names]

    def to_merge(module) -> list[str]:
        return [n for n in requested(module) if n not in module.merged_adapters]

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
    for _, module in _adapter_modules(unwrap(model)):
        module.unmerge()


def _unwrap(model: nn.Module, keep_merged: bool) -> nn.Module:
    check_not_distributed(model, "take the adapters out")
    model = unwrap(model)
    for path, module in list(_adapter_modules(model)):
        replacement = module.unwrapped(keep_merged)
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
