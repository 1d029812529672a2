"""Hugging Face transformers helpers. Importing this module imports transformers; nothing else does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .errors import AdapterFileError, ConfigError
from .hooks import track
from .io import CONFIG_NAME, load_adapter, read_adapter_config

_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _is_adapter_folder(path: str | os.PathLike) -> bool:
    folder = Path(path)
    return (folder / CONFIG_NAME).is_file() and not (folder / "config.json").is_file()


def _model_class(base: str, task_type: str | None) -> Any:
    if task_type in _TASK_CLASSES:
        return getattr(transformers, _TASK_CLASSES[task_type])
    config = transformers.AutoConfig.from_pretrained(base)
    for name in getattr(config, "architectures", None) or ():
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def from_pretrained(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    model_class: Any = None,
    adapter_name: str = "default",
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a transformers model and, optionally, an adapter folder into it, in one call.

    ``base`` is a model folder or hub id; if it is an adapter folder and ``adapter`` is None,
    the base comes from the adapter's ``base_model_name_or_path``. The class comes from
    ``model_class``, else the adapter's ``task_type``, else ``config.architectures``.
    ``hf_kwargs`` go to ``from_pretrained`` (``dtype=torch.bfloat16``, ``device_map``...).
    Adapter weights are read and checked before the model is changed, and built once.
    """
    if adapter is None and _is_adapter_folder(base):
        adapter = base
        base = read_adapter_config(adapter).base_model_name_or_path
        if not base:
            raise AdapterFileError(
                f"{adapter}: base_model_name_or_path is empty, so the base model is unknown. "
                "Pass it: from_pretrained(BASE, ADAPTER)."
            )
    task_type = read_adapter_config(adapter).task_type if adapter is not None else None
    cls = model_class or _model_class(str(base), task_type)
    model = cls.from_pretrained(base, **hf_kwargs)
    if adapter is not None:
        load_adapter(model, adapter, adapter=adapter_name)
        model.eval()
    return model


def _input_requires_grad_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def enable_gradient_checkpointing(model: nn.Module, *, reentrant: bool = False) -> nn.Module:
    """Turn on activation checkpointing so that frozen embeddings still pass gradients to adapters.

    With reentrant checkpointing a checkpointed block whose inputs do not require grad
    produces no gradients at all; the hook installed here makes the input embeddings'
    output require grad. :func:`unload` and :func:`merge_and_unload` remove it again.
    """
    if not hasattr(model, "get_input_embeddings"):
        raise ConfigError(f"{type(model).__name__} is not a transformers model (no get_input_embeddings()).")
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embeddings = model.get_input_embeddings()
    track(model, embeddings.register_forward_hook(_input_requires_grad_hook))
    return model


def untie_note(model: nn.Module) -> None:
    """Record in a transformers config that input and output embeddings are no longer tied."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def __getattr__(name: str):
    """``AdapterTrainer`` is defined on first use: transformers' Trainer needs accelerate installed."""
    if name == "AdapterTrainer":
        from .hf_trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module 'lora_inject.hf' has no attribute {name!r}")


__all__ = ["enable_gradient_checkpointing", "from_pretrained", "untie_note"]
