"""LoRA wrappers, one small class per base layer type, and the registry that picks them."""

from .base import LoraLayer, default_adapter_dtype
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear
from .modules_to_save import ModulesToSave
from .registry import register, supported_type_names, wrap, wrapper_for

__all__ = [
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSave",
    "default_adapter_dtype",
    "register",
    "supported_type_names",
    "wrap",
    "wrapper_for",
]
