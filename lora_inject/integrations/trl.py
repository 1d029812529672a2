"""TRL's trainers for injected models: adapter-only checkpoints, exact resume, the right reference policy.

``from lora_inject.trl import SFTTrainer, DPOTrainer, GRPOTrainer`` are TRL's classes with
:class:`lora_inject.hf.AdapterTrainer`'s checkpoints (adapter folders in PEFT's files, resumed
exactly). The preference trainers get as reference the policy *as it starts*: a frozen copy of
the active adapter (:func:`lora_inject.copy_adapter`), switched in for the reference pass on the
policy's own weights, instead of a second full model loaded from disk, and instead of the bare
base (which is wrong when training continues from an SFT adapter).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import trl
from torch import nn

from ..guards import unwrap
from ..inject import active_adapters, adapter_configs, copy_adapter, using_adapter
from ..threads import changing
from .trainer import AdapterTrainer

REFERENCE_ADAPTER = "reference"


class _ReferenceView:
    """Mixin of a reference view: calling it runs the policy's modules with the reference adapter."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        policy, adapter = self.__dict__["_lora_reference"]
        with torch.no_grad(), using_adapter(policy, adapter):
            return nn.Module.__call__(self, *args, **kwargs)


_VIEW_CLASSES: dict[type, type] = {}


def reference_model(model: nn.Module, adapter: str = REFERENCE_ADAPTER) -> nn.Module:
    """A reference policy for ``model`` that holds no weights of its own.

    Adds ``adapter``, a frozen copy of the active adapter (only if the model does not have it yet),
    and returns a view of ``model``: an object of a subclass of its class that shares every
    submodule, parameter and buffer with it, and runs with ``adapter`` in place of the active one
    (under ``torch.no_grad``). Its extra memory is one adapter; TRL may patch its ``forward`` (the
    fused LM head) without touching the policy's.
    """
    inner = unwrap(model)
    with changing(inner):  # the model's own active adapter, not a block's; no change lands in between
        if adapter not in adapter_configs(inner):
            active = active_adapters(inner)
            if len(active) != 1:
                raise ValueError(f"A reference policy copies the one active adapter; active: {active}.")
            copy_adapter(inner, active[0], adapter)
    cls = type(inner)
    view_cls = _VIEW_CLASSES.setdefault(cls, type(f"Reference{cls.__name__}", (_ReferenceView, cls), {}))
    view = object.__new__(view_cls)
    view.__dict__.update(inner.__dict__)  # the same _modules/_parameters/_buffers dicts: nothing is copied
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        view.__dict__[hooks] = OrderedDict()  # hooks added to the view stay off the policy
    view.__dict__.pop("forward", None)  # a patched forward of the policy (TRL's fused head) is its own
    view.__dict__["_lora_reference"] = (inner, adapter)
    return view


def _with_reference(model: Any, ref_model: Any) -> Any:
    """The reference to give TRL: the user's if any, else a view of the injected policy."""
    if ref_model is None and isinstance(model, nn.Module) and adapter_configs(unwrap(model)):
        return reference_model(model)
    return ref_model


class SFTTrainer(AdapterTrainer, trl.SFTTrainer):
    """TRL's ``SFTTrainer`` whose checkpoints and ``save_model`` are adapter folders (resumed exactly)."""


class DPOTrainer(AdapterTrainer, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` with adapter checkpoints and, without ``ref_model``, the starting policy
    (a frozen copy of the adapter on the same weights) as the reference: rewards start at exactly 0."""

    def __init__(self, model: Any, ref_model: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, _with_reference(model, ref_model), *args, **kwargs)


class GRPOTrainer(AdapterTrainer, trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with adapter checkpoints and, with ``beta > 0``, the starting policy as the
    reference for the KL term, without a second copy of the base."""

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        # TRL's GRPOTrainer takes no ref_model: with beta > 0 it loads the base again by name. Give it the view.
        injected = isinstance(model, nn.Module) and bool(adapter_configs(unwrap(model)))
        module = grpo_trainer_module()
        loader = module.create_model_from_path
        if injected:
            module.create_model_from_path = lambda *_, **__: reference_model(model)
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            module.create_model_from_path = loader


def grpo_trainer_module():
    import trl.trainer.grpo_trainer as module

    if not hasattr(module, "create_model_from_path"):
        raise ImportError(
            "This TRL version builds GRPO's reference model another way; lora_inject.trl.GRPOTrainer supports "
            "the TRL versions whose grpo_trainer uses create_model_from_path (1.x). Use beta=0.0 or another TRL."
        )
    return module
