"""Which wrapper class adapts which base module type.

Lookup walks the module's MRO, so subclasses of a registered type (a quantized
Linear that subclasses nn.Linear, say) get the same wrapper. Types from optional
libraries are registered by import path, so transformers is never imported here.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError, UnsupportedModuleError
from .attention import LoraMultiheadAttention
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear

_REGISTRY: dict[type, type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Conv3d: LoraConv,
    nn.Embedding: LoraEmbedding,
    nn.MultiheadAttention: LoraMultiheadAttention,
}
# (module, qualname) of types we must not import eagerly
_BY_IMPORT_PATH: dict[tuple[str, str], type[LoraLayer]] = {
    ("transformers.pytorch_utils", "Conv1D"): LoraConv1D,
    ("transformers.modeling_utils", "Conv1D"): LoraConv1D,
}


def register(base_type: type, wrapper_type: type[LoraLayer]) -> None:
    """Adapt modules of ``base_type`` (and its subclasses) with ``wrapper_type``.

    ``wrapper_type`` subclasses :class:`LoraLayer` (often :class:`LoraLinear`, overriding what
    differs) and is constructed as ``wrapper_type(base_module)``.
    """
    if not (isinstance(base_type, type) and issubclass(base_type, nn.Module)):
        raise ConfigError(f"register() needs an nn.Module subclass as base type; got {base_type!r}.")
    if not (isinstance(wrapper_type, type) and issubclass(wrapper_type, LoraLayer)):
        raise ConfigError(f"register() needs a LoraLayer subclass as wrapper; got {wrapper_type!r}.")
    _REGISTRY[base_type] = wrapper_type


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The wrapper class for this module, or None if no type in its MRO is registered."""
    for klass in type(module).__mro__:
        wrapper = _REGISTRY.get(klass) or _BY_IMPORT_PATH.get((klass.__module__, klass.__qualname__))
        if wrapper is not None:
            return wrapper
    return None


def supported_type_names() -> list[str]:
    names = [t.__name__ for t in _REGISTRY] + [f"{m}.{q}" for m, q in _BY_IMPORT_PATH]
    return sorted(set(names))


def wrap(path: str, module: nn.Module) -> LoraLayer:
    """A fresh wrapper around ``module``; raises a helpful error for unsupported types."""
    wrapper = wrapper_for(module)
    if wrapper is None:
        kind = type(module)
        raise UnsupportedModuleError(
            f"Module {path!r} is a {kind.__module__}.{kind.__qualname__}, which LoRA cannot wrap. "
            f"Supported types: {', '.join(supported_type_names())}. Narrow the targets so they name "
            f"only such layers (e.g. 'q_proj' rather than 'self_attn'), or register a wrapper: "
            f"lora_inject.register({kind.__name__}, MyLoraWrapper)."
        )
    return wrapper(module)
