"""Hugging Face transformers helpers. Importing this module imports transformers; nothing else does."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..formats.hub import adapter_folder, looks_like_a_path, missing_path_error
from ..formats.load import load_adapter
from ..formats.peft import CONFIG_NAME, WEIGHTS_NAME
from ..formats.peft_config import PEFT_PREFIX
from ..formats.registry import read_adapter_config
from .hooks import track

_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _is_adapter_folder(path: str | os.PathLike) -> bool:
    folder = Path(path)
    return (folder / CONFIG_NAME).is_file() and not (folder / "config.json").is_file()


def _model_class(base: str, task_type: str | None, hf_kwargs: dict) -> Any:
    if task_type in _TASK_CLASSES:
        return getattr(transformers, _TASK_CLASSES[task_type])
    hub = {k: hf_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in hf_kwargs}
    config = transformers.AutoConfig.from_pretrained(base, **hub)
    for name in getattr(config, "architectures", None) or ():
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def from_pretrained(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    model_class: Any = None,
    adapter_name: str = "default",
    adapter_revision: str | None = None,
    adapter_subfolder: str | None = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a transformers model and, optionally, an adapter into it, in one call.

    ``base`` and ``adapter`` are local folders or Hugging Face hub ids (read through the hub
    cache; ``revision`` is the base's, ``adapter_revision``/``adapter_subfolder`` the adapter's;
    ``cache_dir``, ``token`` and ``local_files_only`` serve both). If ``base`` is an adapter and
    ``adapter`` is None, the base comes from the adapter's ``base_model_name_or_path``. The class
    comes from ``model_class``, else the adapter's ``task_type``, else ``config.architectures``.
    ``hf_kwargs`` go to ``from_pretrained`` (``dtype=torch.bfloat16``, ``device_map``...).
    An adapter saved after ``resize_token_embeddings`` resizes the fresh model to its vocabulary
    first. Adapter weights are read and checked before the model is changed, and built once.
    """
    hub = {k: hf_kwargs[k] for k in ("cache_dir", "token", "local_files_only") if k in hf_kwargs}
    hub.update(revision=adapter_revision, subfolder=adapter_subfolder)
    if adapter is None:
        adapter = _as_adapter(base, hub)
        if adapter is not None:
            base = read_adapter_config(adapter).base_model_name_or_path
            if not base:
                raise AdapterFileError(
                    f"{adapter}: base_model_name_or_path is empty, so the base model is unknown. "
                    "Pass it: from_pretrained(BASE, ADAPTER)."
                )
    else:
        adapter = adapter_folder(adapter, **hub)
    if not Path(os.fspath(base)).expanduser().exists() and looks_like_a_path(base):
        raise missing_path_error("base model folder", base)
    refuse_injected_checkpoint(base)
    task_type = read_adapter_config(adapter).task_type if adapter is not None else None
    cls = model_class or _model_class(str(base), task_type, hf_kwargs)
    model = cls.from_pretrained(base, **hf_kwargs)
    if adapter is not None:
        _match_vocabulary(model, adapter)
        load_adapter(model, adapter, adapter=adapter_name)
        model.eval()
    return model


def _as_adapter(name: str | os.PathLike, hub: dict) -> Path | None:
    """``name``'s adapter folder if it is an adapter (a local one, or a hub repo holding adapter files)."""
    if Path(os.fspath(name)).expanduser().exists():
        return Path(name) if _is_adapter_folder(name) else None
    if looks_like_a_path(name):
        raise missing_path_error("model or adapter folder", name)
    try:
        folder = adapter_folder(name, **hub)
    except AdapterFileError:  # not in the cache / not reachable: let transformers say what it finds
        return None
    return folder if (folder / CONFIG_NAME).is_file() else None


def refuse_injected_checkpoint(base: str | os.PathLike) -> None:
    """Refuse a local folder holding an *injected* model's full state dict (``base_layer.``/``lora_`` keys,
    as ``accelerator.save_model`` or ``torch.save(model.state_dict())`` write): transformers would load it
    with the adapted layers randomly initialised, only listing the missing keys."""
    folder = Path(os.fspath(base)).expanduser()
    keys: list[str] = []
    if (folder / "model.safetensors.index.json").is_file():
        keys = list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
    odd = [k for k in keys if ".base_layer." in k or ".lora_A." in k or ".lora_embedding_A." in k]
    if odd:
        raise AdapterFileError(
            f"{str(base)!r} holds the full state dict of a model with LoRA wrappers ({odd[0]!r}, ...), not a base "
            "model: transformers would load it with those layers randomly initialised. Load it into a model "
            "injected the same way (accelerate.load_checkpoint_in_model(model, folder)), then save the adapter "
            "with model.save_pretrained(folder) / lora_inject.save_adapter, or export a plain model with "
            "lora_inject.merge_and_unload(model).save_pretrained(folder)."
        )


def _match_vocabulary(model: nn.Module, adapter: str | os.PathLike) -> None:
    """Resize a freshly loaded model to the vocabulary of an adapter saved after resize_token_embeddings:
    the size of the input embedding's full weight when the file carries it (only its shape is read), else,
    for trainable tokens beyond the model's vocabulary, the tokenizer saved next to the adapter (or the
    largest id + 1), warning about new rows the adapter does not hold."""
    embeddings = model.get_input_embeddings()
    path = next((p for p, m in model.named_modules() if m is embeddings), None)
    file = Path(adapter) / WEIGHTS_NAME
    if path is None or not file.is_file():
        return
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
        for suffix in (".weight", ".base_layer.weight"):
            key = next((k for k in (path + suffix, PEFT_PREFIX + path + suffix) if k in keys), None)
            if key is not None:
                rows = handle.get_slice(key).get_shape()[0]
                if rows != embeddings.weight.shape[0]:
                    model.resize_token_embeddings(rows, mean_resizing=False)
                return
    _fit_trainable_tokens(model, adapter)


def _fit_trainable_tokens(model: nn.Module, adapter: str | os.PathLike) -> None:
    tokens = read_adapter_config(adapter).trainable_tokens
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not tokens or not isinstance(weight, torch.Tensor):
        return
    ids = sorted({i for v in tokens.values() for i in v} if isinstance(tokens, dict) else set(tokens))
    before = weight.shape[0]
    if ids[-1] < before:
        return
    tokenizer = _tokenizer_length(adapter)
    # the rows the ids may ask for: the tokenizer saved beside the adapter, else at most twice the vocabulary (no
    # tokenizer grows by that much; an id of 2**20 would allocate gigabytes); checked before anything is allocated
    limit = tokenizer if tokenizer else 2 * before + len(ids)
    if ids[-1] >= limit:
        raise AdapterFileError(
            f"{adapter}: trainable_token_indices go up to {ids[-1]}, but the model has {before} tokens and "
            + (f"the tokenizer saved beside the adapter {tokenizer}" if tokenizer else
               "no tokenizer is saved beside the adapter to say the vocabulary grew that much")
            + ". The ids do not fit this model; save the tokenizer beside the adapter if its vocabulary grew, "
            "or load the adapter into the model it was trained on."
        )
    rows = max(ids[-1] + 1, tokenizer)
    model.resize_token_embeddings(rows, mean_resizing=False)
    fresh = sorted(set(range(before, rows)) - set(ids))
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight and not isinstance(tokens, dict):
        fresh = list(range(before, rows))  # the untied head's rows for every new token
    if fresh:
        warnings.warn(
            f"The adapter trains tokens up to id {ids[-1]}, so the model was resized from {before} to {rows} tokens; "
            f"{len(fresh)} new row(s) ({fresh[:5]}...) are not in the adapter and start freshly initialised, so "
            "outputs involving them differ from the trained model. Train every new token (trainable_tokens) or save "
            "with save_embedding_layers=True.", stacklevel=3,
        )


def _tokenizer_length(adapter: str | os.PathLike) -> int:
    """The vocabulary of a tokenizer saved next to the adapter (0 if there is none)."""
    if not (Path(adapter) / "tokenizer_config.json").is_file():
        return 0
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(adapter)))


def _input_requires_grad_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def enable_gradient_checkpointing(model: nn.Module, *, reentrant: bool = False) -> nn.Module:
    """Turn on activation checkpointing so that frozen embeddings still pass gradients to adapters.

    With reentrant checkpointing a checkpointed block whose inputs do not require grad
    produces no gradients at all; the hook installed here makes the input embeddings'
    output require grad. :func:`unload` and :func:`merge_and_unload` remove it again.
    """
    if not hasattr(model, "get_input_embeddings"):
        raise ConfigError(f"{type(model).__name__} is not a transformers model (no get_input_embeddings()).")
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embeddings = model.get_input_embeddings()
    track(model, embeddings.register_forward_hook(_input_requires_grad_hook))
    return model


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = True, reentrant: bool = False
) -> nn.Module:
    """Get a model with a quantized (4/8-bit) base ready for LoRA training, as PEFT's
    ``prepare_model_for_kbit_training`` does; call it before :func:`lora_inject.inject`.

    Freezes every parameter; gives every float16/bfloat16 parameter that is not quantized (norms,
    embeddings, head) float32, so the norms and the adapters' inputs are computed stably; turns on
    gradient checkpointing with gradients reaching the adapters (see :func:`enable_gradient_checkpointing`).
    """
    from ..quantized.registry import quantized_kind

    model.requires_grad_(False)
    for module in model.modules():
        quantized = quantized_kind(module) is not None
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16) and not (quantized and name == "weight"):
                param.data = param.data.to(torch.float32)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, reentrant=reentrant)
    return model


def __getattr__(name: str):
    """``AdapterTrainer`` is defined on first use: transformers' Trainer needs accelerate installed."""
    if name == "AdapterTrainer":
        from .trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module 'lora_inject.hf' has no attribute {name!r}")


__all__ = ["enable_gradient_checkpointing", "from_pretrained", "prepare_for_kbit_training"]
