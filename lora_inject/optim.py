"""LoRA+ (https://arxiv.org/abs/2402.12354): B learns faster than A; parameter groups as PEFT builds them.

PEFT's ``create_loraplus_optimizer`` groups the trainable parameters four ways, and so does
:func:`loraplus_param_groups`, so the same model trains the same way with either library:

* A factors, ``modules_to_save`` weights and anything else 2-D or more: ``lr``;
* parameters of adapted embeddings (``lora_embedding_A/B``): ``lr_embedding`` (PEFT's default 1e-6);
* B factors and every 1-D trainable (biases, DoRA magnitudes): ``lr * ratio``, without weight decay
  where the name holds "bias" or the parameter sits in a LayerNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .guards import unwrap
from .layers import LoraEmbedding


def loraplus_param_groups(
    model: nn.Module, *, lr: float, ratio: float, lr_embedding: float = 1e-6, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: ``[A & others, embeddings, B, B without decay]``, each a dict
    with ``params``, ``lr`` and ``weight_decay``, in PEFT's order. Pass them to any torch optimizer."""
    if not (ratio > 0 and lr > 0 and lr_embedding >= 0):
        raise ConfigError(f"LoRA+ needs lr > 0, ratio > 0 and lr_embedding >= 0; got {lr}, {ratio}, {lr_embedding}.")
    model = unwrap(model)
    embeddings = {  # the factors of adapted embeddings (a DoRA magnitude there is 1-D: B's group, as in PEFT)
        id(container[name]) for m in model.modules() if isinstance(m, LoraEmbedding)
        for container in (m.lora_embedding_A, m.lora_embedding_B) for name in container
    }
    no_decay = _no_decay_ids(model)
    groups: dict[str, list[nn.Parameter]] = {"a": [], "embedding": [], "b": [], "b_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embeddings:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["b_no_decay" if id(param) in no_decay or "bias" in name else "b"].append(param)
        else:
            groups["a"].append(param)
    return [
        {"params": groups["a"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"params": groups["b"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["b_no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters inside LayerNorms, which PEFT (through transformers' helper) never decays."""
    return {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}


def loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, *, lr: float, ratio: float,
    lr_embedding: float = 1e-6, weight_decay: float = 0.0, **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups`; ``optimizer_kwargs`` (betas, eps, ...) go to it.

    With the Trainer: ``Trainer(model=model, args=args, optimizers=(li.loraplus_optimizer(model, lr=2e-4,
    ratio=16), None))``.
    """
    groups = loraplus_param_groups(model, lr=lr, ratio=ratio, lr_embedding=lr_embedding, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
