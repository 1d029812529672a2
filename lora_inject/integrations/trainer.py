"""``AdapterTrainer``: a transformers Trainer whose checkpoints are adapter folders."""

from __future__ import annotations

import os

import torch
import transformers
from torch import nn

from ..errors import ConfigError
from ..formats.adapter_io import load_adapter_weights, save_adapter
from ..inject import active_adapters


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
