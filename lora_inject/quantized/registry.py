"""Quantized base layers: what differs per backend, in one registry keyed by the weight's type.

A quantized Linear stays the layer that runs the base product (its own kernel); LoRA adds float32
factors beside it. What the rest of the library needs per backend is here: the name shown in plans,
the weight in float (for a dequantized merge), its logical size (4-bit weights are packed two per
byte), how to quantize a merged weight again, and, for bases that cannot be trained, the reason.
Recognised by the weight, not by ``isinstance(nn.Linear)``: bitsandbytes subclasses nn.Linear,
torchao keeps a plain nn.Linear whose weight is a tensor subclass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..guards import full_numel, full_shape


@dataclass(frozen=True)
class QuantizedKind:
    """One quantization backend's answers about a layer's weight."""

    name: str
    dequantize: Callable[[nn.Module], torch.Tensor] | None = None  # (out, in) float weight
    logical_shape: Callable[[torch.Tensor], tuple[int, ...]] = lambda w: tuple(w.shape)
    requantize: Callable[[nn.Module, torch.Tensor], nn.Parameter] | None = None  # a new weight holding this float
    refusal: str | None = None  # why LoRA cannot train on this base
    snapshot: Callable[[nn.Module], object] = lambda module: module.weight  # all a requantized merge replaces
    restore: Callable[[nn.Module, object], None] = lambda module, kept: setattr(module, "weight", kept)
    # called on every layer of this kind in a model that gets adapters (adapted or not): keep it trainable
    prepare: Callable[[nn.Module], None] | None = None


# ----- bitsandbytes -------------------------------------------------------------------------
def _bnb_4bit_training_layout(module: nn.Module) -> None:
    """Keep a 4-bit weight in the layout that trains.

    Since 0.48, on CPUs with AVX512-BF16 (``support_avx512bf16_for_cpu``), ``Linear4bit.forward`` repacks
    its weight into an inference layout on the first eval forward whose input needs no grad: another
    shape, absmax in bfloat16, and a kernel that passes no gradient back to the layer's input, so every
    adapter upstream of the layer would silently stop learning. A model with adapters keeps the training
    layout: the repacking is turned off, and undone where it already happened (the values stay those the
    repacked layer computed with).
    """
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def _bnb_4bit_dequantize(module: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    _bnb_4bit_training_layout(module)
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def _bnb_4bit_shape(weight: torch.Tensor) -> tuple[int, ...]:
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return tuple(state.shape)
    packed = weight.dtype == torch.uint8 and weight.dim() == 2 and weight.shape[1] == 1  # two values a byte
    return (weight.numel() * 2,) if packed else tuple(weight.shape)  # not quantized yet (meta, before .to())


def _bnb_4bit_requantize(module: nn.Module, merged: torch.Tensor) -> nn.Parameter:
    import bitsandbytes as bnb

    old = module.weight
    state = old.quant_state
    new = bnb.nn.Params4bit(
        merged.to(state.dtype).contiguous().cpu(), requires_grad=False, quant_type=state.quant_type,
        blocksize=state.blocksize, compress_statistics=state.nested, quant_storage=old.dtype,
    )
    return new.to(old.device)  # bitsandbytes quantizes on the move


def _bnb_8bit_dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    scale = getattr(weight, "SCB", None)
    if scale is None:  # after the first forward bitsandbytes keeps the row scales in the layer's state
        scale = module.state.SCB
    return weight.data.to(torch.float32) * (scale.to(torch.float32)[:, None] / 127.0)


def _bnb_8bit_requantize(module: nn.Module, merged: torch.Tensor) -> nn.Parameter:
    import bitsandbytes as bnb

    old = module.weight
    new = bnb.nn.Int8Params(merged.to(torch.float16).contiguous().cpu(), requires_grad=False, has_fp16_weights=False)
    return new.to(old.device)


def _bnb_8bit_snapshot(module: nn.Module) -> object:
    return module.weight, module.state.CB, module.state.SCB  # the int8 rows and scales move into state


def _bnb_8bit_restore(module: nn.Module, kept: object) -> None:
    module.weight, module.state.CB, module.state.SCB = kept


_BNB_KINDS = {
    "Params4bit": QuantizedKind("bitsandbytes 4-bit", _bnb_4bit_dequantize, _bnb_4bit_shape, _bnb_4bit_requantize,
                                prepare=_bnb_4bit_training_layout),
    "Int8Params": QuantizedKind("bitsandbytes 8-bit", _bnb_8bit_dequantize, requantize=_bnb_8bit_requantize,
                                snapshot=_bnb_8bit_snapshot, restore=_bnb_8bit_restore),
}


def _bitsandbytes(weight: torch.Tensor) -> QuantizedKind | None:
    return _BNB_KINDS.get(type(weight).__name__)


# ----- torchao ------------------------------------------------------------------------------
_TORCHAO_WEIGHT_ONLY = QuantizedKind("torchao", lambda module: module.weight.dequantize())
_TORCHAO_DYNAMIC = QuantizedKind(
    "torchao dynamic activation",
    refusal="torchao dynamic-activation quantization quantizes the layer's input too, so no gradient reaches "
    "it and the adapters before this layer would never train. Quantize weights only (Int8WeightOnlyConfig, "
    "IntxWeightOnlyConfig) to train LoRA on it.",
)


def _torchao(weight: torch.Tensor) -> QuantizedKind | None:
    if not callable(getattr(weight, "dequantize", None)):
        return None
    if getattr(weight, "act_quant_kwargs", None) is not None or "Activation" in type(weight).__name__:
        return _TORCHAO_DYNAMIC
    return _TORCHAO_WEIGHT_ONLY


# ----- what cannot be trained --------------------------------------------------------------
_QUANTO = QuantizedKind(
    "optimum-quanto",
    refusal="optimum-quanto layers have no way here to read their weight back in float for a merge (merging "
    "would silently drop the update). Load the base with bitsandbytes (BitsAndBytesConfig) or torchao "
    "weight-only quantization instead.",
)

# the top-level package of the weight's class -> how to read it
_BY_PACKAGE: dict[str, Callable[[torch.Tensor], QuantizedKind | None]] = {
    "bitsandbytes": _bitsandbytes,
    "torchao": _torchao,
    "optimum": lambda weight: _QUANTO if ".quanto" in type(weight).__module__ else None,
}


def register_quantized(package: str, kind_of: Callable[[torch.Tensor], QuantizedKind | None]) -> None:
    """Teach lora_inject another quantization backend: ``kind_of(weight)`` for weights whose class lives in
    ``package`` (top-level module name) returns its :class:`QuantizedKind`, or None for a plain weight."""
    _BY_PACKAGE[package] = kind_of


def quantized_kind(module: nn.Module) -> QuantizedKind | None:
    """The backend of ``module``'s weight, or None for a plain floating-point (or absent) weight."""
    weight = module._parameters.get("weight") if "weight" in module._parameters else getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    reader = _BY_PACKAGE.get(type(weight).__module__.partition(".")[0])
    if reader is None and isinstance(weight, nn.Parameter) and type(weight.data) is not torch.Tensor:
        reader = _BY_PACKAGE.get(type(weight.data).__module__.partition(".")[0])
        weight = weight.data
    return reader(weight) if reader is not None else None


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``module``'s weight (out, in) in float ``dtype``, read through its backend (a plain weight as it is)."""
    kind = quantized_kind(module)
    with torch.no_grad():
        if kind is None:
            return module.weight.detach().to(dtype)
        if kind.dequantize is None:
            raise UnsupportedModuleError(f"{kind.name} weights cannot be read back in float here.")
        return kind.dequantize(module).detach().to(dtype)


def dequantized_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` computing what the quantized ``module`` computes (its weight
    dequantized once, its bias cast)."""
    weight = dequantized_weight(module, dtype)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach().to(dtype))
    linear.requires_grad_(False)
    return linear.train(module.training)


def forget_quantization(model: nn.Module) -> None:
    """After every quantized layer became a float one: the transformers model no longer says it is quantized,
    so ``save_pretrained`` writes a plain float checkpoint (as transformers' own ``dequantize`` leaves it)."""
    for attr, value in (("is_quantized", False), ("quantization_method", None), ("hf_quantizer", None),
                        ("is_loaded_in_4bit", False), ("is_loaded_in_8bit", False)):
        if attr in model.__dict__:
            model.__dict__[attr] = value
    config = getattr(model, "config", None)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if config is not None and attr in config.__dict__:
            delattr(config, attr)


def logical_numel(param: torch.Tensor) -> int:
    """Elements ``param`` stands for: a packed 4-bit weight counts its unpacked size (as PEFT counts it)."""
    reader = _BY_PACKAGE.get(type(param).__module__.partition(".")[0])
    kind = reader(param) if reader is not None else None
    return math.prod(kind.logical_shape(param)) if kind is not None else full_numel(param)


def logical_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape as the layer computes with it: (out, in) for a quantized Linear, however stored."""
    kind = quantized_kind(module)
    if kind is None:
        return full_shape(module.weight)
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.out_features, module.in_features
    return kind.logical_shape(module.weight)


def prepare_quantized_layers(model: nn.Module) -> None:
    """Run each quantized layer's ``prepare`` (see :class:`QuantizedKind`) over ``model``."""
    packages = {type(p).__module__.partition(".")[0] for p in model.parameters()}  # not p.data: a new tensor
    if not packages & _BY_PACKAGE.keys():  # no quantized parameter type at all: nothing to walk
        return
    for module in model.modules():
        if "weight" not in module._parameters:
            continue  # a wrapper answers its base layer's weight: the base is prepared itself
        kind = quantized_kind(module)
        if kind is not None and kind.prepare is not None:
            kind.prepare(module)
