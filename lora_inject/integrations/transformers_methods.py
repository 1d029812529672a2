"""What an injected transformers model's own methods do.

* ``model.save_pretrained(folder)`` (and so ``push_to_hub``, ``Trainer.save_model`` and TRL's
  trainers) writes the adapters in PEFT's files, as ``PeftModel.save_pretrained`` does: the
  full model with ``base_layer.``/``lora_`` keys would reload through ``from_pretrained`` with
  randomly initialised adapted layers.
* ``model.resize_token_embeddings(n)`` resizes the adapters on the input and output embeddings
  with the vocabulary, atomically; the resized embedding weights then travel with every saved
  adapter (PEFT's ``save_embedding_layers``), so the new rows reload exactly.

Both are set on the instance by :func:`install` (the class stays the same) and removed when
the last adapter goes: model surgery calls them through the events this module registers
(``lora_inject/__init__.py`` imports it). Nothing here imports transformers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..formats.save import adapter_tensors, write_adapter
from ..guards import check_not_sharded
from ..inject import (
    _STATE_ATTR,
    CARRIED_ATTR,
    _adapter_modules,
    _require_adapter,
    _set_submodule,
    adapter_configs,
    carried_paths,
    on_model_event,
)
from ..layers import ADAPTER_MODULES, LoraLayer, ModulesToSave
from ..threads import changes_adapters, reads_adapters


def is_transformers_model(model: nn.Module) -> bool:
    return any(
        k.__name__ == "PreTrainedModel" and k.__module__.startswith("transformers") for k in type(model).__mro__
    )


class InstanceMethod:
    """A function bound to one model, set in its ``__dict__``. Unlike a bound method it survives
    ``torch.save(model)``/``pickle`` (a bound method unpickles as the class's own method, which would
    silently write the full model again) and ``copy.deepcopy`` (it follows the copy)."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model
        self.__doc__ = _METHODS[name].__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _METHODS[self.name](self.model, *args, **kwargs)


def install(model: nn.Module) -> None:
    """Give a transformers model the adapter-aware ``save_pretrained`` and ``resize_token_embeddings``."""
    if is_transformers_model(model):
        for name in _METHODS:
            model.__dict__[name] = InstanceMethod(name, model)


def uninstall(model: nn.Module) -> None:
    """Back to the class's methods (after unload / merge_and_unload / deleting the last adapter)."""
    for name in (*_METHODS, CARRIED_ATTR):
        model.__dict__.pop(name, None)


def untie_note(model: nn.Module) -> None:
    """Record in a transformers config that input and output embeddings are no longer tied."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def teach_trainer(model: nn.Module) -> None:
    """Once ``transformers.trainer`` is imported (it takes 1.5 s, so never by us), its Trainer learns to read the
    adapter-only checkpoints this model's ``save_pretrained`` writes (see integrations/trainer.py). Called when
    an adapter is attached and again when a checkpoint is saved, which a Trainer always does before it
    loads the best one."""
    if is_transformers_model(model) and "transformers.trainer" in sys.modules:
        from .trainer import adapter_checkpoints_for_plain_trainer

        adapter_checkpoints_for_plain_trainer()


def accept_quantized_training(model: nn.Module) -> None:
    """Let transformers' ``Trainer`` (and every trainer built on it: ``AdapterTrainer``, TRL's) train a quantized
    model that carries our adapters. Its check refuses "purely quantized models" unless PEFT's own marker is set;
    the check is wrapped, once, to accept a model with trainable lora_inject adapters and to ask the original
    about every other model. Only quantized models reach this (transformers is imported by then)."""
    if not getattr(model, "is_quantized", False):
        return
    import transformers.trainer as trainer_module

    original = getattr(trainer_module, "validate_quantization_for_training", None)
    if original is None or getattr(original, "accepts_lora_inject", False):
        return  # transformers versions without the check, or wrapped already

    def validate_quantization_for_training(candidate: nn.Module) -> None:
        inner = getattr(candidate, "_orig_mod", candidate)
        has_adapters = bool(getattr(inner, _STATE_ATTR, None)) and any(p.requires_grad for p in inner.parameters())
        if not has_adapters:
            original(candidate)

    validate_quantization_for_training.accepts_lora_inject = True
    trainer_module.validate_quantization_for_training = validate_quantization_for_training


on_model_event("attached", install)
on_model_event("attached", accept_quantized_training)
on_model_event("attached", teach_trainer)
on_model_event("detached", uninstall)
on_model_event("untied", untie_note)


@reads_adapters
def save_pretrained(
    self: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    *,
    selected_adapters: list[str] | None = None,
    **kwargs: Any,
) -> None:
    """Write the model's adapters as PEFT does: ``default`` in ``save_directory``, any other adapter in a
    subfolder named after it. Never the base weights (for a full model: ``merge_and_unload`` first).

    ``state_dict`` (given by Trainer under DeepSpeed/FSDP) supplies gathered values; ``is_main_process``
    False writes nothing; ``save_embedding_layers`` as in :func:`lora_inject.save_adapter`. Other
    ``save_pretrained`` arguments (``safe_serialization``, ``max_shard_size``, ...) do not apply: adapter
    files are always one safetensors file. Reload with
    ``lora_inject.from_pretrained(folder)``, ``PeftModel.from_pretrained`` or ``AutoPeftModelFor...``.
    """
    names = list(selected_adapters) if selected_adapters else list(adapter_configs(self))
    for name in names:
        _require_adapter(self, name)
    if state_dict is None:
        check_not_sharded(self, "save the adapter")
    embedding_layers = kwargs.pop("save_embedding_layers", "auto")
    as_lora = kwargs.pop("principal_as_lora", True)
    teach_trainer(self)
    if is_main_process:
        for name in names:
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            tensors = adapter_tensors(self, name, full_state=state_dict, save_embedding_layers=embedding_layers,
                                      principal_as_lora=as_lora)
            write_adapter(self, folder, name, tensors, principal_as_lora=as_lora)
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
        keep = ("token", "commit_message", "private", "revision", "create_pr")
        return self.push_to_hub(repo_id, **{k: v for k, v in kwargs.items() if k in keep})
    return None


def _embedding_wrappers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(path, wrapper, base)`` for the input/output embeddings that carry an adapter or a trained copy."""
    wanted = {id(m) for m in (_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")) if m}
    return [
        (path, module, module.base_layer)
        for path, module in _adapter_modules(model)
        if id(module) in wanted
    ]


def _call(model: nn.Module, method: str) -> nn.Module | None:
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


@changes_adapters
def resize_token_embeddings(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """transformers' ``resize_token_embeddings``, for a model with adapters on its embeddings or head.

    The base embedding and head are resized by transformers as usual (new rows initialised as it
    does, frozen like the old ones); LoRA factors along the vocabulary get zero entries for the new
    tokens (the model's output on old tokens is unchanged); ``modules_to_save`` copies get the new
    rows from the resized base and train them. On any error everything is restored. The resized
    input/output embedding weights are saved with every adapter from now on.
    """
    wrapped = _embedding_wrappers(self)
    for path, wrapper, _ in wrapped:
        if isinstance(wrapper, LoraLayer) and (wrapper.use_dora or wrapper.principal):
            raise ConfigError(
                f"resize_token_embeddings: {path!r} carries a DoRA or PiSSA/OLoRA adapter, whose norms or initial "
                "factors span the whole vocabulary, so new rows would change the old tokens' outputs. Resize before "
                "injecting, or use plain LoRA / modules_to_save on the embedding and head. Nothing was changed."
            )
    snapshot = _snapshot(self, wrapped)
    for path, _, base in wrapped:
        _set_submodule(self, path, base)
    try:
        type(self).resize_token_embeddings(self, *args, **kwargs)
        for path, wrapper, base in wrapped:
            resized = self.get_submodule(path)
            if resized is not base:  # a new module rather than the old one resized in place
                wrapper.set_base_layer(resized)
            wrapper.follow_base_resize()
    except BaseException:
        _restore(self, snapshot)
        raise
    finally:
        for path, wrapper, _ in wrapped:
            _set_submodule(self, path, wrapper)
    _carry_embeddings(self)
    return self.get_input_embeddings()


def _carry_embeddings(model: nn.Module) -> None:
    """Save the input embedding, and an untied output embedding, with every adapter from now on.
    A ``modules_to_save`` embedding needs nothing: its trained copies are saved whole."""
    wanted = [m for m in (_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")) if m]
    weights: list[torch.Tensor] = []
    for path, module in model.named_modules():
        if any(module is m for m in wanted) and not isinstance(module, ModulesToSave):
            weight = module.base_layer.weight if isinstance(module, ADAPTER_MODULES) else module.weight
            if all(weight is not w for w in weights):  # a tied head shares the input embedding's rows
                carried_paths(model).add(path)
            weights.append(weight)


def _snapshot(model: nn.Module, wrapped: list) -> dict:
    """Every tensor and size attribute a resize may replace, by reference (resizing replaces, never edits)."""
    modules = [m for _, wrapper, base in wrapped for m in (wrapper, base)]
    modules += [m for m in (_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")) if m]
    params = {id(p): (p, p.data) for module in modules for p in module.parameters()}
    attrs = [(m, a, getattr(m, a)) for module in modules for m in module.modules()
             for a in ("num_embeddings", "out_features", "in_features", "padding_idx") if a in m.__dict__]
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "params": list(params.values()), "attrs": attrs, "submodules": [(p, w) for p, w, _ in wrapped],
        "bases": [(w, b) for _, w, b in wrapped], "vocab": (text, getattr(text, "vocab_size", None)),
        "model_vocab": model.__dict__.get("vocab_size"),
    }


def _restore(model: nn.Module, snapshot: dict) -> None:
    for param, data in snapshot["params"]:
        param.data = data
    for module, attr, value in snapshot["attrs"]:
        module.__dict__[attr] = value
    for wrapper, base in snapshot["bases"]:
        wrapper.set_base_layer(base)
    text, vocab = snapshot["vocab"]
    if vocab is not None:
        text.vocab_size = vocab
    if snapshot["model_vocab"] is not None:
        model.__dict__["vocab_size"] = snapshot["model_vocab"]
    else:
        model.__dict__.pop("vocab_size", None)


_METHODS = {"save_pretrained": save_pretrained, "resize_token_embeddings": resize_token_embeddings}
