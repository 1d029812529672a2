"""Resolve ``trainable_tokens`` against a model: which modules' rows train, and which heads are tied to them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from ..layers import TrainableTokens
from ..layers.trainable_tokens import row_kind
from .matching import NameTarget, explain_misses

DEFAULT_EMBEDDING_NAME = "embed_tokens"  # PEFT's fallback for a model without get_input_embeddings


@dataclass
class TokenTarget:
    """One module whose rows ``ids`` train; ``tied_to`` is the embedding path whose rows a tied head shares."""

    path: str
    ids: list[int]
    wrapper: TrainableTokens  # existing (another adapter's) or new and not yet attached
    module_type: str
    weight_shape: tuple[int, ...]
    tied_to: str | None = None

    @property
    def added_params(self) -> int:
        return 0 if self.tied_to else len(self.ids) * self.weight_shape[1]

    def describe(self) -> str:
        if self.tied_to:
            return f"{self.path} ({self.module_type}) shares the rows of {self.tied_to} (tied weights)"
        return f"{self.path} ({self.module_type}) {len(self.ids)} ids, {self.added_params:,} params"


def resolve_tokens(
    model: nn.Module, config: LoraConfig, adapter: str, walked: list, lora_paths: set[str], saves: list[str]
) -> list[TokenTarget]:
    """The :class:`TokenTarget` list for ``config.trainable_tokens`` (unattached wrappers; nothing changes).

    A list of ids means the input embedding; ``{name: ids}`` names modules as ``targets`` do. A module
    sharing its weight with a chosen embedding (a tied ``lm_head``) shares its trained rows.
    """
    spec = config.trainable_tokens
    if not spec:
        return []
    named = [(path, module) for path, module, _ in walked]
    by_path = {path: (module, wrapper) for path, module, wrapper in walked}
    wanted = spec.items() if isinstance(spec, Mapping) else [(_input_embedding_name(model, walked), spec)]
    chosen: dict[str, list[int]] = {}
    for name, ids in wanted:
        target = NameTarget(name)
        hits = [path for path, module in named if target.matches(path, module)]
        if not hits:
            raise TargetNotFoundError(
                f"trainable_tokens names {name!r}, but no module matches it.\n" + explain_misses([target], named)
            )
        for path in hits:
            if chosen.get(path, ids) != list(ids):
                raise ConfigError(f"trainable_tokens gives {path!r} two different id lists; give it one.")
            chosen[path] = list(ids)
    for path, ids in chosen.items():
        _check_target(path, *by_path[path], ids, adapter, lora_paths, saves)
    return _with_ties(chosen, walked, by_path, adapter, lora_paths)


def _input_embedding_name(model: nn.Module, walked: list) -> str:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        embedding = None
    found = [path for path, module, wrapper in walked if embedding is not None and embedding in (module, wrapper)]
    return found[0] if found else DEFAULT_EMBEDDING_NAME


def _check_target(path, module, wrapper, ids, adapter, lora_paths, saves) -> None:
    weight = getattr(module, "weight", None)
    if row_kind(module) is None or not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        raise UnsupportedModuleError(
            f"trainable_tokens cannot train rows of {path!r} ({type(module).__name__}): they replace rows of an "
            "nn.Embedding, or of a Linear head whose weight rows are tokens, with a floating-point weight."
        )
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        raise UnsupportedModuleError(
            f"trainable_tokens on {path!r}: an embedding with max_norm or scale_grad_by_freq is not supported."
        )
    if max(ids) >= weight.shape[0]:
        raise ConfigError(
            f"trainable_tokens for {path!r} go up to id {max(ids)}, but it has {weight.shape[0]} rows. Add the "
            f"tokens first: model.resize_token_embeddings({max(ids) + 1}) (or your tokenizer's length), then inject."
        )
    if path in lora_paths or path in saves or (wrapper is not None and not isinstance(wrapper, TrainableTokens)):
        raise ConfigError(
            f"{path!r} is both targeted by LoRA or modules_to_save and given trainable_tokens; one module trains "
            "one way (PEFT refuses it too). Drop it from targets/modules_to_save, or from trainable_tokens."
        )
    if isinstance(wrapper, TrainableTokens) and wrapper.tied_to is not None:
        raise ConfigError(
            f"{path!r} shares its weight with an embedding whose tokens another adapter trains; give "
            "trainable_tokens to that embedding instead."
        )


def _with_ties(chosen: dict, walked: list, by_path: dict, adapter: str, lora_paths: set[str]) -> list[TokenTarget]:
    """One target per chosen module; modules sharing a chosen embedding's weight follow it as tied heads."""
    sharing: dict[int, list[str]] = {}
    for path, module, _ in walked:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            sharing.setdefault(id(weight), []).append(path)
    targets, tied = [], set()
    for path, ids in chosen.items():
        if path in tied:
            continue
        module, wrapper = by_path[path]
        primary = wrapper or TrainableTokens(module)
        targets.append(_target(path, ids, primary, module))
        if not isinstance(module, nn.Embedding):
            continue  # a chosen head on a tied model stands alone; merging it unties it
        for other in sharing[id(module.weight)]:
            if other == path:
                continue
            _check_tied(path, ids, other, chosen, by_path, lora_paths)
            other_module, other_wrapper = by_path[other]
            follower = other_wrapper or TrainableTokens(other_module, tied_to=primary)
            targets.append(_target(other, ids, follower, other_module, tied_to=path))
            tied.add(other)
    return targets


def _check_tied(path: str, ids: list[int], other: str, chosen: dict, by_path: dict, lora_paths: set[str]) -> None:
    other_module, other_wrapper = by_path[other]
    if other in chosen and chosen[other] != ids:
        raise ConfigError(
            f"trainable_tokens gives {path!r} and {other!r} different ids, but they share one weight (tied "
            "embeddings): their rows cannot differ. Give both the same ids, or name only the embedding."
        )
    if row_kind(other_module) is None or other in lora_paths or (
        other_wrapper is not None and not isinstance(other_wrapper, TrainableTokens)
    ):
        raise ConfigError(
            f"{other!r} shares its weight with {path!r} (tied embeddings) and is adapted another way (LoRA or "
            "modules_to_save), so the trained token rows cannot be kept the same in both. Untie the weights "
            "first, or leave one of them out."
        )


def _target(path, ids, wrapper, module, tied_to=None) -> TokenTarget:
    return TokenTarget(path, list(ids), wrapper, type(module).__name__, tuple(module.weight.shape), tied_to)
