"""Quantized bases: one registry keyed by the weight's type (``registry``), and LoftQ (``loftq``).

Only the registry is imported here: the layers depend on it, and LoftQ depends on the layers.
"""

from .registry import (
    QuantizedKind,
    dequantized_linear,
    dequantized_weight,
    forget_quantization,
    logical_numel,
    logical_weight_shape,
    quantized_kind,
    register_quantized,
)

__all__ = [
    "QuantizedKind",
    "dequantized_linear",
    "dequantized_weight",
    "forget_quantization",
    "logical_numel",
    "logical_weight_shape",
    "quantized_kind",
    "register_quantized",
]
