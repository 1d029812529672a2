"""Refuse operations that silently train wrong under torch.distributed wrappers."""

from __future__ import annotations

from torch import nn

from .errors import DistributedError


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


def check_not_distributed(model: nn.Module, action: str) -> None:
    """Raise if ``model`` is already wrapped by DDP/FSDP or holds sharded (DTensor) parameters.

    Injecting after wrapping raises no error in torch but the new parameters are not
    synchronised: ranks drift apart. Inject first, then wrap.
    """
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
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            raise DistributedError(
                f"Cannot {action}: parameter {name!r} is sharded (DTensor). Gather the full weights first "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True)) "
                "into an unsharded model, or inject before sharding."
            )
