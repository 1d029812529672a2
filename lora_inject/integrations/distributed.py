"""torch.distributed helpers: same init on every rank, FSDP1 wrapping, FSDP2 and DeepSpeed ZeRO-3 save and load.

Order that trains right: build the model, ``inject`` (before any wrapping: adapters added
after DDP/FSDP wrapping are not synchronised and ranks drift apart; ``inject`` refuses a
wrapped or sharded model), make the init identical on every rank (same seed, or
:func:`broadcast_adapters`), then wrap with DDP or ``fully_shard``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError
from ..formats.load import checked_tensors_for_existing
from ..formats.peft_config import disk_key
from ..formats.save import adapter_tensors, write_adapter
from ..guards import _wrapper_kind, has_optimizer_copies, is_zero3
from ..inject import _require_adapter, adapter_state
from ..layers import LoraLayer, ModulesToSave
from ..layers.linear import Factor
from ..threads import changes_adapters


@changes_adapters
def broadcast_adapters(model: nn.Module, src: int = 0) -> None:
    """Copy every adapter parameter from rank ``src`` to all ranks (call on the unwrapped model).

    An alternative to seeding every rank identically before ``inject``; either way the
    adapters must start equal, or DDP/FSDP silently average different models.
    """
    with torch.no_grad():
        for _, module in model.named_modules():
            if isinstance(module, (LoraLayer, ModulesToSave)):
                for name in module.adapter_names:
                    for param in module.adapter_parameters(name):
                        dist.broadcast(param.data, src=src)


def fsdp1_auto_wrap_policy(model: nn.Module, transformer_layer_cls: Iterable[type] = ()):
    """An FSDP1 ``auto_wrap_policy`` that puts each adapter's weights in their own FSDP unit.

    FSDP1 flattens each unit's parameters into one tensor that must be all trainable or all
    frozen (``use_orig_params=False``); with adapter weights in their own units the frozen
    base flattens separately, and gradient memory matches the trainable size. Pass the
    decoder layer class (e.g. ``{LlamaDecoderLayer}``) to also wrap layer by layer.
    Covered: Linear/Conv1D adapters and ``modules_to_save`` copies. Embedding and conv
    adapters, DoRA magnitudes (read outside their own module's forward, so they cannot be
    units of their own), and biases trained with ``bias="all"``/``"lora_only"``, sit in frozen
    units: use ``use_orig_params=True`` for those.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    _mark_trainable_units(model)

    def is_unit(module: nn.Module) -> bool:
        return isinstance(module, Factor) or getattr(module, "_lora_inject_trainable_unit", False)

    policies = [functools.partial(lambda_auto_wrap_policy, lambda_fn=is_unit)]
    layer_types = set(transformer_layer_cls)
    if layer_types:
        policies.append(functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_types))
    return functools.partial(_or_policy, policies=policies)


def _mark_trainable_units(model: nn.Module) -> None:
    """Flag embedding factor dicts and modules_to_save copies for :func:`fsdp1_auto_wrap_policy`."""
    for _, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            for copy in module.modules_to_save.values():
                object.__setattr__(copy, "_lora_inject_trainable_unit", True)


_FSDP1_PREFIX = "_fsdp_wrapped_module."


def _inner(model: nn.Module) -> nn.Module:
    """The model inside DDP, FSDP1 and DeepSpeed engines (each keeps it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter an adapter save takes (each adapter's tensors, trained or frozen), by name."""
    from ..inject import adapter_configs

    wanted = {key for name in adapter_configs(module) for key in adapter_state(module, name)}
    return {n: p for n, p in module.named_parameters() if n in wanted or p.requires_grad}


def _gather_zero3(module: nn.Module) -> dict[str, torch.Tensor]:
    """ZeRO-3: gather the adapter's parameters only (never the base), copy them to CPU on rank 0."""
    import deepspeed

    params = _adapter_parameters(module)
    gathered = all(p.ds_status.name == "AVAILABLE" for p in params.values() if is_zero3(p))
    # inside the caller's own GatheredParameters the tensors are whole already (and DeepSpeed refuses to nest)
    with contextlib.nullcontext() if gathered else deepspeed.zero.GatheredParameters(list(params.values())):
        if dist.get_rank() != 0:
            return {}
        return {name: p.detach().to("cpu").clone() for name, p in params.items()}


def gather_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable tensors of a DDP/FSDP1/FSDP2/DeepSpeed ZeRO-3 model, on CPU, on rank 0 (empty
    elsewhere). Under ZeRO-3 only the adapter's parameters are gathered, never the base weights.

    Keys are those of the unwrapped model. A collective: every rank must call it. A DeepSpeed engine or the
    module inside it may be given.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(is_zero3(p) for p in _inner(model).parameters()):
        return _gather_zero3(_inner(model))

    if any(isinstance(m, FSDP) for m in model.modules()):
        # FSDP1 with use_orig_params=False: the generic state-dict API trips over flat parameters
        trainable = {n.replace(_FSDP1_PREFIX, "") for n, p in model.named_parameters() if p.requires_grad}
        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            if dist.get_rank() != 0:
                return {}
            full = {n.replace(_FSDP1_PREFIX, ""): p.detach().clone() for n, p in model.named_parameters()}
        return {n: t for n, t in full.items() if n in trainable or ".lora_" in n or ".modules_to_save." in n}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> Path | None:
    """Save ``adapter`` of a sharded or replicated model: gather to rank 0 and write there.

    Every rank must call it (it gathers); only rank 0 writes and gets the folder back,
    other ranks get ``None``. No rank returns before the files are complete, so any rank
    may read them next. If rank 0 fails to write, every rank raises (the others a
    :class:`DistributedError` naming rank 0's error) instead of waiting in their next
    collective. PEFT's ``save_pretrained`` fails on FSDP2 models; this writes the same
    files as :func:`lora_inject.save_adapter`.
    """
    module = _inner(model)
    _require_adapter(module, adapter)
    state = gather_adapter_state(model)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    written, failure = None, None
    if rank == 0:
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            written = write_adapter(module, directory, adapter, adapter_tensors(module, adapter, full_state=state))
        except Exception as error:
            failure = error
    if distributed:
        _raise_on_other_ranks_if_rank0_failed(failure)
    if failure is not None:
        raise failure
    return written


def _raise_on_other_ranks_if_rank0_failed(failure: Exception | None) -> None:
    """Share rank 0's write outcome with every rank (this is also the barrier); other ranks raise if it failed."""
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(outcome, src=0)
    if failure is None and outcome[0] is not None:
        raise DistributedError(
            f"rank 0 could not write the adapter ({outcome[0]}); nothing was saved. "
            "Fix the cause on rank 0 (path, permissions, disk space) and call save_adapter again on every rank."
        )


@changes_adapters
def load_adapter_weights(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", *, strict: bool = True
) -> nn.Module:
    """Load an adapter folder's weights into adapter ``adapter`` of a sharded (FSDP2) or DeepSpeed model.

    The adapter must have been injected before sharding (same config). Keys and shapes are
    checked first, as in :func:`lora_inject.load_adapter`; then each rank takes its shards
    through ``set_model_state_dict`` (DeepSpeed: its partitions, and the optimizer's float32 copies, so the
    next step continues from the file). Every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = _inner(model)
    tensors, _, _ = checked_tensors_for_existing(module, directory, adapter, strict)
    by_disk_key = {disk_key(k, adapter): k for k in adapter_state(module, adapter)}
    state = {by_disk_key[k]: v for k, v in tensors.items() if k in by_disk_key}
    params = dict(module.named_parameters())
    if any(is_zero3(p) for p in module.parameters()):
        _load_zero3(module, state)
    elif _wrapper_kind(model) == "DeepSpeed" or has_optimizer_copies(module):  # ZeRO-1/2: whole weights everywhere
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].dtype))
    else:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return model
    _set_optimizer_copies(params, state)
    return model


def _set_optimizer_copies(params: dict, state: dict[str, torch.Tensor]) -> None:
    """DeepSpeed's optimizer keeps its own float32 copy of each trained parameter (partitioned): it must take
    the file's values too, or the next step starts from the old ones."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, tensor in state.items():
        if has_optimizer_copies(params[name]):
            safe_set_full_fp32_param(params[name], tensor.to(torch.float32))


def _load_zero3(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """ZeRO-3: gather the adapter's parameters, write the file's values (rank 0's are kept), partition again."""
    import deepspeed

    params = dict(module.named_parameters())
    targets = [params[name] for name in state]
    with deepspeed.zero.GatheredParameters(targets, modifier_rank=0), torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))


__all__ = [
    "broadcast_adapters",
    "fsdp1_auto_wrap_policy",
    "gather_adapter_state",
    "load_adapter_weights",
    "save_adapter",
]
