"""Hooks lora_inject installs on a model, tracked so that unload removes every one."""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..inject import on_model_event

_HOOKS_ATTR = "_lora_inject_hooks"


def track(model: nn.Module, handle: RemovableHandle) -> None:
    if not hasattr(model, _HOOKS_ATTR):
        object.__setattr__(model, _HOOKS_ATTR, [])
    getattr(model, _HOOKS_ATTR).append(handle)


def remove_hooks(model: nn.Module) -> None:
    for handle in getattr(model, _HOOKS_ATTR, []):
        handle.remove()
    if hasattr(model, _HOOKS_ATTR):
        object.__delattr__(model, _HOOKS_ATTR)


on_model_event("detached", remove_hooks)
