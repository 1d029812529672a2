"""What model a public function is really given, and refusals for models it cannot handle.

``torch.compile(model)`` and ``DistributedDataParallel(model)`` wrap the model the user
injected; every public function works on the module inside, so keys never carry an
``_orig_mod.`` or ``module.`` prefix. Sharded models (FSDP, DTensor parameters) hold only a
slice of each weight per rank: functions that read or change whole weights refuse them
with the call that works instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .errors import DistributedError, UnsupportedModuleError

SHARDED_SAVE = (
    "On a sharded model (FSDP, DeepSpeed ZeRO-3) call lora_inject.distributed.save_adapter(model, folder) on every "
    "rank (it gathers the adapter to rank 0 and writes there), or lora_inject.distributed.gather_adapter_state(model) "
    "for the full tensors."
)
SHARDED_LOAD = (
    "On a sharded or DeepSpeed model call lora_inject.distributed.load_adapter_weights(model, folder) on every rank "
    "(each rank takes its shards; DeepSpeed's optimizer copies are written too)."
)


def unwrap(model: nn.Module) -> nn.Module:
    """The injected model inside ``torch.compile`` (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif _wrapper_kind(model) == "DistributedDataParallel":
            model = model.module
        else:
            return model


def _wrapper_kind(module: nn.Module) -> str | None:
    for klass in type(module).__mro__:
        name = f"{klass.__module__}.{klass.__qualname__}"
        if name.startswith("torch.nn.parallel.distributed.DistributedDataParallel"):
            return "DistributedDataParallel"
        if name.startswith("torch.distributed.fsdp") and ("FullyShardedDataParallel" in name or "FSDPModule" in name):
            return "FSDP"
        if name.startswith("deepspeed"):
            return "DeepSpeed"
    return None


def _is_sharded(param: nn.Parameter) -> bool:
    return type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor"


ZERO3_LOAD = (
    "Inject the adapter before deepspeed.initialize (the same config), then call "
    "lora_inject.distributed.load_adapter_weights(engine, folder) on every rank."
)
ZERO3_EXPORT = (
    "Save the adapter with lora_inject.distributed.save_adapter(engine, folder) on every rank (it gathers only the "
    "adapter) and merge on disk (`lora-inject merge BASE folder OUT`) or into a plain copy of the model."
)


def full_shape(tensor) -> tuple[int, ...]:
    """A parameter's shape, also under DeepSpeed ZeRO-3, where each rank holds a ``(0,)`` placeholder and the
    real shape is ``ds_shape``."""
    shape = getattr(tensor, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(tensor.shape)


def full_numel(tensor) -> int:
    numel = getattr(tensor, "ds_numel", None)
    return int(numel) if numel is not None else tensor.numel()


def is_zero3(param) -> bool:
    """Managed by DeepSpeed ZeRO-3 (built under ``zero.Init`` or converted by ``deepspeed.initialize``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def is_partitioned(param) -> bool:
    """A ZeRO-3 parameter not gathered right now: this rank holds a slice, the tensor itself is empty."""
    return is_zero3(param) and param.ds_status.name != "AVAILABLE"


def has_optimizer_copies(model_or_param) -> bool:
    """DeepSpeed's ZeRO optimizer keeps its own float32 copy of these parameters (stage 1/2: ``_hp_mapping``,
    stage 3: ``_z3_optimizer``): writing only the parameter would be undone by the next step."""
    params = model_or_param.parameters() if isinstance(model_or_param, nn.Module) else (model_or_param,)
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "_z3_optimizer") for p in params)


def deepspeed_engine_attached(model: nn.Module) -> bool:
    """``deepspeed.initialize`` has taken this model over with ZeRO-3: it numbers every module it hooks
    (``ds_id`` on modules; ``zero.Init`` marks parameters only)."""
    return any(hasattr(m, "ds_id") or hasattr(m, "ds_grads_remaining") for m in model.modules())


@contextlib.contextmanager
def zero3_injection(model: nn.Module, reads_base: bool, copies_modules: bool = False) -> Iterator[None]:
    """Create adapters on a model built under ``deepspeed.zero.Init``: with the Init context's patches off, so
    the factors are ordinary tensors initialised as anywhere else (``deepspeed.initialize`` partitions them from
    rank 0's values), and, where the init reads or rewrites base weights (DoRA, PiSSA/OLoRA), with those
    gathered (rank 0's result kept)."""
    params = [p for p in model.parameters() if is_zero3(p)]
    if not params:
        yield
        return
    if copies_modules:
        raise DistributedError(
            "Cannot inject modules_to_save or trainable tokens into a model partitioned by DeepSpeed ZeRO-3: their "
            "trained copies would be made from empty placeholders. Target those modules with LoRA instead, or "
            "build the model outside deepspeed.zero.Init."
        )
    import deepspeed
    from deepspeed.runtime.zero import partition_parameters

    partition_parameters.shutdown_init_context()
    try:
        if reads_base:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                yield
        else:
            yield
    finally:
        partition_parameters.restore_init_context()


def check_not_distributed(model: nn.Module, action: str, offloaded_ok: bool = False, zero3_ok: bool = False,
                          zero3_alternative: str = ZERO3_EXPORT) -> None:
    """Raise if ``model`` is already wrapped by DDP/FSDP or holds sharded (DTensor) parameters.

    Injecting after wrapping raises no error in torch but the new parameters are not
    synchronised: ranks drift apart. Inject first, then wrap. Offloaded models are refused too (see
    :func:`check_not_offloaded`) unless ``offloaded_ok`` (taking adapters out reads no weight). DeepSpeed ZeRO-3
    models are refused unless ``zero3_ok`` (inject, before ``deepspeed.initialize``), saying ``zero3_alternative``.
    """
    if not offloaded_ok:
        check_not_offloaded(model, action)
    zero3 = next((n for n, p in model.named_parameters() if is_zero3(p)), None)
    if zero3 is not None and not zero3_ok:
        raise DistributedError(
            f"Cannot {action}: parameter {zero3!r} is partitioned by DeepSpeed ZeRO-3; a change made to gathered "
            f"weights is lost when DeepSpeed partitions them again. {zero3_alternative}"
        )
    if deepspeed_engine_attached(model):
        raise DistributedError(
            f"Cannot {action}: deepspeed.initialize has already taken this model over; its optimizer holds the "
            f"parameters it was given and would never train (or save) what is added now. {action.capitalize()} "
            "before deepspeed.initialize (under deepspeed.zero.Init too), then initialize."
        )
    for path, module in model.named_modules():
        kind = _wrapper_kind(module)
        if kind:
            where = f" at {path!r}" if path else ""
            raise DistributedError(
                f"Cannot {action}: the model is wrapped by {kind}{where}. Parameters added after wrapping are "
                f"not synchronised across ranks and training silently diverges. {action.capitalize()} into the "
                "plain model first, then wrap it (DDP(model) / fully_shard(...))."
            )
    for name, param in model.named_parameters():
        if _is_sharded(param):
            raise DistributedError(
                f"Cannot {action}: parameter {name!r} is sharded (DTensor). Gather the full weights first "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True)) "
                "into an unsharded model, or inject before sharding."
            )


def offloaded_modules(model: nn.Module) -> list[str]:
    """Paths of the modules whose weights accelerate offloads (``device_map`` with ``"cpu"``/``"disk"`` entries,
    ``cpu_offload``, ``disk_offload``): they sit on the meta device between calls, fetched by a hook."""
    found = []
    for path, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        hooks = getattr(hook, "hooks", (hook,)) if hook is not None else ()
        if any(getattr(h, "offload", False) for h in hooks):
            found.append(path)
    return found


def check_not_offloaded(model: nn.Module, action: str) -> None:
    """Refuse a model whose weights accelerate offloads: adapters made there would be created on meta and a
    merge would read meta weights; both used to go wrong without a word."""
    offloaded = offloaded_modules(model)
    if offloaded:
        shown = ", ".join(repr(p or "<model>") for p in offloaded[:3])
        raise UnsupportedModuleError(
            f"Cannot {action}: {len(offloaded)} module(s) of this model are offloaded by accelerate ({shown}): their "
            "weights live on the meta device between calls, so adapters would be created on meta and merges would "
            "read nothing. Load the model without offloading (no 'cpu'/'disk' entries in device_map, no "
            "cpu_offload), inject or load the adapter, then dispatch it; or merge on disk with `lora-inject merge`."
        )


def check_not_sharded(model: nn.Module, action: str, alternative: str = SHARDED_SAVE) -> None:
    """Raise if ``model`` is FSDP/DeepSpeed-wrapped or holds DTensor parameters: each rank has only a shard,
    so reading whole adapter tensors from it would fail or write slices. DDP replicas are whole: allowed."""
    for path, module in model.named_modules():
        kind = _wrapper_kind(module)
        where = f" at {path!r}" if path else ""
        if kind == "DeepSpeed":
            raise DistributedError(
                f"Cannot {action}: this is a DeepSpeed engine{where}, not the model. With ZeRO-1/2 the weights are "
                f"whole on every rank: pass engine.module. With ZeRO-3 (partitioned weights): {alternative}"
            )
        if kind == "FSDP":
            raise DistributedError(f"Cannot {action}: the model is sharded by {kind}{where}. {alternative}")
    for name, param in model.named_parameters():
        if _is_sharded(param):
            raise DistributedError(
                f"Cannot {action}: parameter {name!r} is sharded (DTensor), so this rank holds only a slice of it. "
                + alternative
            )
        if is_partitioned(param):
            raise DistributedError(
                f"Cannot {action}: parameter {name!r} is partitioned by DeepSpeed ZeRO-3 (this rank holds an empty "
                f"placeholder; the full shape is {full_shape(param)}). " + alternative
            )
