"""LoRA for nn.Linear and for transformers' Conv1D (GPT-2: weight stored (in, out))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


class LoraLinear(LoraLayer):
    """``y = W x + b + scale * B A dropout(x)``.

    Shapes: x (..., in); A ``lora_A[name].weight`` (r, in); B ``lora_B[name].weight`` (out, r).
    The adapter weights are cast to x's dtype (cheap: r * (in + out) elements) rather than
    casting x, so a bf16 model with float32 adapters saves bf16 activations, not float32 copies.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.in_features, self.out_features = self._io_features()

    def _io_features(self) -> tuple[int, int]:
        return self.base_layer.in_features, self.base_layer.out_features

    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_A.weight": (r, self.in_features), "lora_B.weight": (self.out_features, r)}

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)

    def _init_factors(self, name: str, init: bool | str) -> None:
        init_a_zero_b(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def _lora_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name].weight.to(x.dtype)
        b = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype)
        return F.linear(F.linear(self.lora_dropout[name](x), a), b)  # (..., r) -> (..., out)

    def _delta_from_factors(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]  # (out, in)


class LoraConv1D(LoraLinear):
    """transformers' Conv1D: ``y = x @ W + b`` with W (in, out); the merged delta is transposed."""

    def _io_features(self) -> tuple[int, int]:
        in_features, out_features = self.base_layer.weight.shape
        return in_features, out_features

    def _delta_from_factors(self, name: str) -> torch.Tensor:
        return super()._delta_from_factors(name).T.contiguous()  # (in, out)


def init_a_zero_b(a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str) -> None:
    """The original LoRA init: A random, B zero, so the adapted layer starts equal to the base.

    ``True``/"kaiming": A Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)) as
    nn.Linear does; "gaussian": A ~ N(0, 1/r); ``False``: B random too (the model changes).
    """
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.normal_(b, std=0.02)
        else:
            nn.init.zeros_(b)
