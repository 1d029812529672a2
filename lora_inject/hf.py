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
from .inject import active_adapters, adapter_configs
from .io import CONFIG_NAME, load_adapter, load_adapter_weights, read_adapter_config, save_adapter

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


class AdapterTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the adapter folder, not the full model.

    Each ``checkpoint-N/`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's
    format) instead of a full ``model.safetensors``; ``train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` read them back into the injected adapter.
    """

    def _adapter_name(self) -> str:
        active = active_adapters(self.model)
        if len(active) != 1:
            raise ConfigError(f"AdapterTrainer trains exactly one active adapter; active: {active}.")
        return active[0]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_adapter(model, output_dir, adapter=self._adapter_name())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_adapter_weights(model, resume_from_checkpoint, adapter=self._adapter_name())

    def _load_best_model(self) -> None:
        load_adapter_weights(self.model, self.state.best_model_checkpoint, adapter=self._adapter_name())


def untie_note(model: nn.Module) -> None:
    """Record in a transformers config that input and output embeddings are no longer tied."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


__all__ = ["AdapterTrainer", "adapter_configs", "enable_gradient_checkpointing", "from_pretrained", "untie_note"]
