"""LoftQ: start the adapters of a quantized model where they undo most of the quantization error.

For each quantized layer W (full precision) becomes Q (what the layer holds). LoftQ picks A and B so
that ``Q + s * B @ A`` is the closest a rank-r update can get to W: the best rank-r approximation of
``W - Q`` (its top r singular directions, split evenly between B and A and divided by ``sqrt(s)``, so
the scale does not matter). This is PEFT's LoftQ with one iteration on the model's own quantized
weights (its ``replace_lora_weights_loftq``); the base stays as loaded, so the adapter works with the
published quantized checkpoint. PEFT's own split ignores the scale (exact only for alpha = r).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..guards import unwrap
from ..inject import _require_adapter, lora_layers
from ..layers import LoraLinear
from ..threads import changes_adapters
from .registry import dequantized_weight, quantized_kind


@changes_adapters
def loftq(
    model: nn.Module, float_weights: str | os.PathLike | Mapping[str, torch.Tensor], adapter: str = "default"
) -> dict[str, tuple[float, float]]:
    """Re-initialise adapter ``adapter`` on every quantized Linear it wraps with LoftQ.

    ``float_weights``: the full-precision checkpoint (a folder or ``.safetensors`` file, read one tensor
    at a time) or a ``{name: tensor}`` state dict. Returns ``{path: (||W - Q||, ||W - Q - s*B@A||)}``
    (Frobenius norms): the quantization error before and after, per layer.
    """
    model = unwrap(model)
    _require_adapter(model, adapter)
    layers = [(p, m) for p, m in lora_layers(model)
              if adapter in m.r and isinstance(m, LoraLinear) and quantized_kind(m.base_layer) is not None]
    if not layers:
        raise ConfigError(f"Adapter {adapter!r} wraps no quantized Linear layer: LoftQ has nothing to correct.")
    errors = {}
    with _reader(float_weights) as read:
        for path, layer in layers:
            errors[path] = _init_layer(layer, adapter, read(f"{path}.weight"))
    return errors


@torch.no_grad()
def _init_layer(layer: LoraLinear, adapter: str, weight: torch.Tensor) -> tuple[float, float]:
    quantized = dequantized_weight(layer.base_layer)
    if weight.shape != quantized.shape:
        raise AdapterFileError(f"A float weight is {tuple(weight.shape)}, its layer {tuple(quantized.shape)}.")
    residual = weight.to(quantized.device, torch.float32) - quantized  # (out, in)
    r, scale = layer.r[adapter], layer.scaling[adapter]
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scale).sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in): s * b @ a = best rank-r part
    layer.lora_A[adapter].weight.copy_(a)
    layer.lora_B[adapter].weight.copy_(b)
    before = torch.linalg.vector_norm(residual).item()
    after = torch.linalg.vector_norm(residual - scale * (b @ a)).item()
    return before, after


class _reader:
    """``read(key)`` over a state dict or a safetensors checkpoint, allowing a prefix on either side."""

    def __init__(self, source) -> None:
        self.source, self.handles = source, []

    def __enter__(self):
        if isinstance(self.source, Mapping):
            tensors = self.source
            return lambda key: _lookup(tensors, key, tensors.keys(), lambda k: tensors[k])
        folder = Path(self.source)
        files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
        if not files:
            raise AdapterFileError(f"No .safetensors checkpoint at {str(folder)!r} to read the float weights from.")
        self.handles = [safe_open(str(f), "pt") for f in files]
        where = {k: h for h in self.handles for k in h.keys()}
        return lambda key: _lookup(where, key, where.keys(), lambda k: where[k].get_tensor(k))

    def __exit__(self, *exc) -> None:
        self.handles.clear()


def _lookup(index, key: str, keys, get) -> torch.Tensor:
    prefixes = {k.split(".", 1)[0] for k in keys}
    for candidate in (key, key.split(".", 1)[-1], *(f"{p}.{key}" for p in prefixes)):
        if candidate in index:
            return get(candidate)
    raise AdapterFileError(f"The float weights hold no {key!r}: they are not this model's checkpoint.")
