"""A checkpoint's model built on the meta device from its config alone: no weights read or allocated.

Used by ``lora-inject inspect`` (to plan targets on a checkpoint) and by the streaming merge (to read the
registration order of a model's parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraInjectError


def load_config(model: str):
    import transformers

    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        data = json.loads(path.read_text())
        model_type = data.pop("model_type", None)
        if not model_type:
            raise LoraInjectError(f"{path} has no model_type; is it a transformers config.json?")
        return transformers.AutoConfig.for_model(model_type, **data)
    return transformers.AutoConfig.from_pretrained(model)


def build_on_meta(model: str, bits: int | None = None):
    """The model of ``model`` (folder, config.json or hub id) on the meta device: no weights read or allocated.

    ``bits`` (4 or 8), or a bitsandbytes ``quantization_config`` in the config, gives its Linear layers
    bitsandbytes' types, as ``from_pretrained(..., quantization_config=...)`` would (head kept float).
    """
    import torch
    import transformers

    config = load_config(model)
    cls = transformers.AutoModel
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, cls)
    with torch.device("meta"):
        built = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    quantization = _bnb_config(config, bits)
    if quantization is not None:
        from transformers.integrations import replace_with_bnb_linear

        with torch.device("meta"):
            built = replace_with_bnb_linear(built, modules_to_not_convert=["lm_head"], quantization_config=quantization)
    return built


def _bnb_config(config, bits: int | None):
    import transformers

    if bits is not None:
        return transformers.BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    saved = getattr(config, "quantization_config", None)
    saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
    if isinstance(saved, dict) and saved.get("quant_method") == "bitsandbytes":
        return transformers.BitsAndBytesConfig.from_dict(saved)
    return None
