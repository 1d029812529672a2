"""lora_inject: LoRA adapters for any PyTorch model, in PEFT's file format.

    import lora_inject as li
    li.inject(model, targets=["q_proj", "v_proj"], r=8, alpha=16)
    ...train...
    li.save_adapter(model, "out/adapter")
    plain = li.merge_and_unload(model)
"""

from __future__ import annotations

from .config import LoraConfig
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    ConcurrencyError,
    ConfigError,
    DistributedError,
    ExportError,
    LoraInjectError,
    MergeError,
    PatternTimeoutError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from .formats.gguf import export_gguf
from .formats.load import load_adapter, load_adapter_weights
from .formats.registry import read_adapter_config, read_adapter_tensors
from .formats.save import save_adapter
from .inject import (
    active_adapters,
    adapter_configs,
    copy_adapter,
    delete_adapter,
    disabled_adapters,
    inject,
    lora_layers,
    lora_state_dict,
    plan,
    reset_adapters,
    set_adapter,
    trainable_parameters,
    using_adapter,
)
from .integrations import transformers_methods  # noqa: F401 (registers its model-event handlers)
from .layers import (
    LoraConv,
    LoraConv1D,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    ModulesToSave,
    TrainableTokens,
    register,
)
from .merging import merge, merge_and_unload, unload, unmerge
from .optim import loraplus_optimizer, loraplus_param_groups
from .quantized.loftq import loftq
from .serving.batching import batch_adapters
from .serving.combine import combine_adapters
from .serving.hotswap import hotswap_adapter, prepare_hotswap
from .targeting.presets import preset
from .threads import carry_blocks
from .version import __version__  # noqa: F401 (public)


def __getattr__(name: str):
    """``lora_inject.hf``/``.from_pretrained``, ``.diffusers``, ``.distributed`` and ``.trl`` load on first use."""
    if name in ("hf", "from_pretrained", "diffusers", "distributed", "trl"):
        import importlib

        if name != "from_pretrained":
            return importlib.import_module(f".{name}", __name__)
        hf = importlib.import_module(".hf", __name__)
        return hf if name == "hf" else hf.from_pretrained
    raise AttributeError(f"module 'lora_inject' has no attribute {name!r}")

__all__ = [
    "carry_blocks",
    "combine_adapters",
    "batch_adapters",
    "AdapterExistsError",
    "AdapterFileError",
    "AdapterNotFoundError",
    "ConcurrencyError",
    "ConfigError",
    "DistributedError",
    "ExportError",
    "export_gguf",
    "LoraConfig",
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraInjectError",
    "LoraLayer",
    "LoraLinear",
    "MergeError",
    "ModulesToSave",
    "TrainableTokens",
    "PatternTimeoutError",
    "TargetNotFoundError",
    "UnsupportedModuleError",
    "active_adapters",
    "adapter_configs",
    "delete_adapter",
    "copy_adapter",
    "loftq",
    "hotswap_adapter",
    "prepare_hotswap",
    "disabled_adapters",
    "from_pretrained",
    "inject",
    "load_adapter",
    "load_adapter_weights",
    "lora_layers",
    "lora_state_dict",
    "loraplus_optimizer",
    "loraplus_param_groups",
    "merge",
    "merge_and_unload",
    "plan",
    "preset",
    "register",
    "read_adapter_config",
    "read_adapter_tensors",
    "reset_adapters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "using_adapter",
    "unload",
    "unmerge",
]
