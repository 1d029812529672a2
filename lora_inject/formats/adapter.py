"""The canonical form of an adapter: what every format reads into and writes from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import LoraConfig


@dataclass
class Adapter:
    """An adapter in the library's canonical form, whatever file it came from or goes to.

    ``tensors`` are named as the library names them in memory, less the adapter's name (given when the adapter
    is loaded): ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r), ``<module>.lora_embedding_A``
    (r, V), ``<module>.lora_embedding_B`` (D, r), ``<module>.lora_magnitude_vector`` (out,) for DoRA,
    ``<module>.base_layer.bias``, ``<module>.token_adapter.trainable_tokens_delta`` (n ids, D), and full weights
    of trained modules (``<module>.weight``). ``notes`` holds what a reader learnt beyond the config that a
    dialect needs (PEFT's ``peft_version``); ``source`` names the file (or the model) for messages.
    """

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    source: str
    format: str
    name: str = "default"  # the adapter's name in the model it was taken from (writers) or goes into
    notes: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Adapter:
        return replace(self, **changes)
