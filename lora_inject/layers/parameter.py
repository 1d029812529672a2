"""LoRA on a parameter rather than a module (PEFT's ``target_parameters``): fused MoE experts, routers.

A 3-D parameter holds E experts. Per expert e the update is ``s * B_e @ A_e`` with A_e (r, in) and
B_e (out, r), laid out like the parameter: ``(E, out, in)`` for transformers' usual experts,
``(E, in, out)`` for those marked ``is_transposed`` (gpt-oss). A 2-D parameter (a router's (E, H)
weight) gets plain LoRA, ``(out, in)``.

On disk (PEFT 0.19.1 and later) A is ``(r * E, in)`` expert-major (rows e*r .. e*r + r - 1 are A_e)
and B is ``(out, r * E)`` rank-major (column k*E + e is column k of B_e). Several parameters of one
module are nested wrappers in the module's registration order, the first innermost: for experts
with gate_up_proj and down_proj, ``experts.base_layer.lora_A`` is gate_up_proj's and
``experts.lora_A`` is down_proj's. That nesting is how a file says which parameter a key belongs to.

During forward the parameter is replaced by a :class:`LowRankUpdated` view for the call, so the
module computes its own way and the update runs in factored form (see ``low_rank_view.py``).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.compiler import is_compiling

from ..errors import ConfigError
from .base import LoraLayer
from .linear import Factor, init_a_zero_b
from .low_rank_view import LowRankUpdated, Term


class LoraParameter(LoraLayer):
    """LoRA on ``parameter_name`` of the wrapped module (or of the module inside nested wrappers)."""

    merges_into_base = True

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.__dict__["parameter_name"] = parameter_name
        shape = tuple(self.base_weight.shape)
        if len(shape) == 3:
            transposed = bool(getattr(self.owner, "is_transposed", False))
            experts, d1, d2 = shape
            in_features, out_features = (d1, d2) if transposed else (d2, d1)
        elif len(shape) == 2:
            transposed, experts = False, 1
            out_features, in_features = shape
        else:
            raise ConfigError(
                f"LoRA on a parameter needs a 2-D (out, in) or 3-D (experts, ., .) tensor; {parameter_name!r} of "
                f"{type(self.owner).__name__} has shape {shape}."
            )
        self.__dict__.update(in_features=in_features, out_features=out_features, num_experts=experts,
                             transposed=transposed, stacked=len(shape) == 3)

    # ----- where the parameter lives --------------------------------------------------------
    @property
    def owner(self) -> nn.Module:
        """The module that registers the parameter (below any nested parameter wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    @property
    def base_weight(self) -> torch.Tensor:
        return self.owner._parameters[self.parameter_name]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_weight

    @property
    def bias(self) -> None:
        return None

    def unwrapped(self, keep_merged: bool) -> nn.Module:
        if not keep_merged:
            self.unmerge()
        return self.base_layer

    # ----- factors --------------------------------------------------------------------------
    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        rank = r * self.num_experts
        return {"lora_A.weight": (rank, self.in_features), "lora_B.weight": (self.out_features, rank)}

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        rank = r * self.num_experts
        self.lora_A[name] = Factor(self.in_features, rank, dtype, device)
        self.lora_B[name] = Factor(rank, self.out_features, dtype, device)

    def _init_factors(self, name: str, init: bool | str) -> None:
        init_a_zero_b(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def expert_factors(self, name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` with ``scale * L @ R`` adapter ``name``'s update in the parameter's layout:
        stacked (E, d1, r), (E, r, d2) for 3-D parameters, (out, r), (r, in) for 2-D ones. Views of A and B."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r E, in), (out, r E)
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        if not self.stacked:
            return b, a
        return expert_factors(a, b, self.num_experts, self.transposed)

    def _delta_dtype(self, name: str) -> torch.dtype:
        return torch.float64 if torch.float64 in (self.base_weight.dtype, self.lora_A[name].weight.dtype) \
            else torch.float32

    def _delta_from_factors(self, name: str) -> torch.Tensor:
        left, right = self.expert_factors(name, self._delta_dtype(name))
        return (left @ right) * self.scaling[name]

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stacked:
            raise NotImplementedError("a stacked parameter's update is one product per expert")
        return self.expert_factors(name, dtype)

    def _add_lora_delta(self, name: str, sign: float) -> None:
        """``P += sign * s * L @ R`` per expert (one batched GEMM), in float32 (float64 where P or the adapter
        is), rounded to P's dtype once."""
        data = self.base_weight.data
        dtype = self._delta_dtype(name)
        left, right = self.expert_factors(name, dtype)
        target = data if data.dtype == dtype and data.is_contiguous() else data.to(dtype, copy=True).contiguous()
        if self.stacked:
            target.baddbmm_(left, right, alpha=sign * self.scaling[name])
        else:
            target.addmm_(left, right, alpha=sign * self.scaling[name])
        if target is not data:
            data.copy_(target)

    def merge_refusal(self, name: str | None = None) -> str | None:
        if not self.base_weight.is_floating_point():
            return f"{self.parameter_name} is not a float tensor ({self.base_weight.dtype}); nothing to add to."
        return None

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        running, routing = self.running_and_routing()
        if routing is not None:
            raise ConfigError(
                "batch_adapters does not route rows through LoRA on parameters (MoE experts): every row would get "
                "the same experts' update. Serve such adapters one per batch, or merge them."
            )
        owner = self.owner
        with contextlib.nullcontext() if is_compiling() else _SWAPPING:  # inside it the owner holds its own
            if not running:  # even then: another thread's view must not be in the owner meanwhile
                return self.base_layer(*args, **kwargs)
            base = owner._parameters[self.parameter_name]
            terms = []
            for name, scale, p in running:
                left, right = self.expert_factors(name)
                terms.append(Term(left, right, scale, p if self.training else 0.0))
            view = LowRankUpdated(base, terms, f"{type(owner).__name__}.{self.parameter_name}")
            owner._parameters[self.parameter_name] = view
            try:
                return self.base_layer(*args, **kwargs)
            finally:
                owner._parameters[self.parameter_name] = base

    def _entry(self, name: str, dropout: float | None = None) -> tuple:
        return name, self.scaling[name], self.lora_dropout[name] if dropout is None else dropout

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, " + super().extra_repr()



# The owner's parameter is swapped for the view for the length of a call: threads running the same experts take
# turns (re-entrant: wrappers of two parameters of one owner nest), or one would run, or keep, the other's view.
_SWAPPING = threading.RLock()


def expert_factors(
    a: torch.Tensor, b: torch.Tensor, experts: int, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stacked factors, A (r E, in) expert-major and B (out, r E) rank-major, as per-expert
    ``(L (E, d1, r), R (E, r, d2))`` with ``L @ R`` each expert's update in the parameter's layout:
    ``B_e @ A_e`` (out, in), or ``A_e.T @ B_e.T`` (in, out) for transposed experts. Views, no copies."""
    r = a.shape[0] // experts
    a_e = a.view(experts, r, a.shape[1])  # A_e (r, in)
    b_e = b.view(b.shape[0], r, experts).permute(2, 0, 1)  # B_e (out, r)
    if transposed:
        return a_e.transpose(1, 2), b_e.transpose(1, 2)
    return b_e, a_e
