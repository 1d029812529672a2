"""LoRA wrappers, one small class per base layer type, and the registry that picks them."""

from .base import LoraLayer, default_adapter_dtype
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear
from .modules_to_save import ModulesToSave
from .registry import register, supported_type_names, wrap, wrapper_for
from .trainable_tokens import TrainableTokens

# every module type that holds adapters and stands in for a base module (its ``base_layer``)
ADAPTER_MODULES = (LoraLayer, ModulesToSave, TrainableTokens)

__all__ = [
    "ADAPTER_MODULES",
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSave",
    "TrainableTokens",
    "default_adapter_dtype",
    "register",
    "supported_type_names",
    "wrap",
    "wrapper_for",
]
