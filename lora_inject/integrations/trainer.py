"""``AdapterTrainer``: a transformers Trainer whose checkpoints are adapter folders."""

from __future__ import annotations

import os

import torch
import transformers
from torch import nn

from ..errors import ConfigError
from ..formats.load import load_adapter_weights
from ..formats.peft import CONFIG_NAME
from ..formats.save import save_adapter
from ..guards import is_zero3
from ..inject import _STATE_ATTR, active_adapters
from ..threads import suspended
from .distributed import load_adapter_weights as load_adapter_weights_distributed
from .distributed import save_adapter as save_adapter_distributed


class AdapterTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the adapter folder, not the full model.

    Each ``checkpoint-N/`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's
    format) instead of a full ``model.safetensors``; ``train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` read them back into the injected adapter.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        inner = _zero3_adapter_model(self)
        if inner is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        return _save_zero3_adapters(self, output_dir, {self._adapter_name(): output_dir})

    def _adapter_name(self) -> str:
        with suspended():  # the model's own active adapter, not a block's
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
        _load_weights(self, model, resume_from_checkpoint, self._adapter_name())

    def _load_best_model(self) -> None:
        _load_weights(self, self.model, self.state.best_model_checkpoint, self._adapter_name())


def _load_weights(trainer: transformers.Trainer, model: nn.Module, folder: str, adapter: str) -> None:
    """An adapter checkpoint back into ``model``; under DeepSpeed through the engine (every rank takes part)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        load_adapter_weights_distributed(trainer.model_wrapped, folder, adapter=adapter)
    else:
        load_adapter_weights(model, folder, adapter=adapter)


def _checkpoint_adapters(model: nn.Module, folder: str) -> list[tuple[str, str]]:
    """``(adapter, folder)`` for every adapter of ``model`` saved in the checkpoint ``folder`` the way the
    injected model's ``save_pretrained`` writes them (``default`` at the top, the others in subfolders)."""
    found = []
    for name in getattr(model, _STATE_ATTR, {}):
        path = folder if name == "default" else os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            found.append((name, path))
    return found


def _adapter_checkpoint(trainer: transformers.Trainer, model: nn.Module | None, folder: str | None):
    """The unwrapped model and its saved adapters when ``folder`` is an adapter-only checkpoint of a model
    carrying lora_inject adapters; None for everything else (the Trainer's own loading applies)."""
    if folder is None or os.path.isfile(os.path.join(folder, transformers.trainer.SAFE_WEIGHTS_NAME)):
        return None
    inner = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
    saved = _checkpoint_adapters(inner, folder) if getattr(inner, _STATE_ATTR, None) else []
    return (inner, saved) if saved else None


def _zero3_adapter_model(trainer: transformers.Trainer) -> nn.Module | None:
    """The injected model when the Trainer runs it under DeepSpeed ZeRO-3 (its weights partitioned), else None."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    inner = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(inner, _STATE_ATTR, None) and any(is_zero3(p) for p in inner.parameters()):
        return inner
    return None


def _save_zero3_adapters(trainer: transformers.Trainer, output_dir: str, folders: dict[str, str]) -> None:
    """``{adapter: folder}`` saved gathering only the adapters' parameters (every rank takes part, rank 0
    writes): whatever ``stage3_gather_16bit_weights_on_model_save`` says, and without the base on rank 0."""
    for name, folder in folders.items():
        save_adapter_distributed(trainer.model_wrapped, folder, adapter=name)
    if trainer.args.should_save:
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        torch.save(trainer.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))


def adapter_checkpoints_for_plain_trainer() -> None:
    """Teach ``transformers.Trainer`` itself to resume from (``train(resume_from_checkpoint=...)``) and load the
    best (``load_best_model_at_end``) adapter-only checkpoints, which an injected model's ``save_pretrained``
    writes: without this it looks for full weights and fails, the second time after the whole run. Both methods
    are wrapped once; any model or checkpoint that is not ours goes to the Trainer's own code."""
    trainer_class = transformers.Trainer
    if getattr(trainer_class._load_from_checkpoint, "reads_lora_inject", False):
        return
    load_checkpoint, load_best = trainer_class._load_from_checkpoint, trainer_class._load_best_model
    save_model = trainer_class.save_model

    def _save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        inner = _zero3_adapter_model(self)
        if inner is None:
            return save_model(self, output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        layout = {n: output_dir if n == "default" else os.path.join(output_dir, n) for n in getattr(inner, _STATE_ATTR)}
        return _save_zero3_adapters(self, output_dir, layout)  # as the injected model's save_pretrained lays out

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        found = _adapter_checkpoint(self, model, resume_from_checkpoint)
        if found is None:
            return load_checkpoint(self, resume_from_checkpoint, model)
        inner, saved = found
        for name, path in saved:
            _load_weights(self, inner, path, name)
        return None

    def _load_best_model(self) -> None:
        found = _adapter_checkpoint(self, None, self.state.best_model_checkpoint)
        if found is None:
            return load_best(self)
        inner, saved = found
        for name, path in saved:
            _load_weights(self, inner, path, name)
        return None

    _load_from_checkpoint.reads_lora_inject = True
    trainer_class._load_from_checkpoint = _load_from_checkpoint
    trainer_class.save_model = _save_model
    trainer_class._load_best_model = _load_best_model
