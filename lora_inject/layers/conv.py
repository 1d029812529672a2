"""LoRA for nn.Conv1d / Conv2d / Conv3d.

A is a conv with the base's kernel, stride, padding, dilation and padding mode (so it
sees the same receptive field as the base); B is a 1x1 conv. Their product is
therefore a kernel of the base's shape and merges exactly.

Grouped convs (``groups=G``) follow PEFT's layout, the one in its files: A spans all input
channels, B is grouped (``(out, r/G, 1, ...)``, r divisible by G). Their product is a dense
kernel, which a grouped weight cannot hold, so such adapters train, load, save and run
unmerged, and merging them is refused (PEFT cannot merge them either).

Where no gradient is wanted (inference, evaluation under ``no_grad``), the kernel
``W + scale * B @ A`` is built on the fly and one conv runs: forming it costs
``out * r * in * k`` multiply-adds, once per call, while running A and B costs
``r * (in * k + out)`` per output position. A convolution has thousands of positions per
image, so the merged kernel usually wins by far (measured: 1.35x the base's time -> 1.01x
for 3x3, 64 channels, 8 x 32 x 32); :func:`merging_is_cheaper` decides per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..guards import full_shape
from .base import LoraLayer
from .dora import DoraEntry
from .fused import autocast_enabled, hooks_on
from .linear import init_a_zero_b

_PLAIN_CONVS = frozenset((nn.Conv1d, nn.Conv2d, nn.Conv3d))
# the merged kernel is used when it costs at most this fraction of running A and B
MERGE_COST_FRACTION = 0.25


class LoraConv(LoraLayer):
    """Shapes: x (N, in, *spatial); A (r, in, *kernel); B (out, r, 1, ..., 1)."""

    supports_lora_bias = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        groups = self.base_layer.groups
        if r % groups:
            raise UnsupportedModuleError(
                f"LoRA on a {type(self.base_layer).__name__} with groups={groups} needs a rank divisible by {groups} "
                f"(B is grouped like the base, as PEFT lays it out); got r={r}. Pick r as a multiple of {groups}, "
                "e.g. with rank_pattern, or leave this conv out."
            )
        kernel = full_shape(self.base_layer.weight)[2:]
        ones = (1,) * len(kernel)
        return {
            "lora_A.weight": (r, self.in_features, *kernel), "lora_B.weight": (self.out_features, r // groups, *ones)
        }

    @property
    def supports_dora(self) -> bool:
        return self.base_layer.groups == 1

    def merge_refusal(self, name: str | None = None) -> str | None:
        groups = self.base_layer.groups
        if groups == 1:
            return super().merge_refusal(name)
        return (
            f"a LoRA on a {type(self.base_layer).__name__} with groups={groups} cannot be merged: its A spans all "
            "input channels (PEFT's layout), so the update is a dense kernel that the grouped weight cannot hold "
            "(PEFT cannot merge it either). Keep this adapter unmerged, or leave grouped convs out of the targets."
        )

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        conv_type = type(base) if type(base) in _PLAIN_CONVS else _plain_conv(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv_type(
            self.in_features, r, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, padding_mode=base.padding_mode, bias=False, dtype=dtype, device=device,
        )
        self.lora_B[name] = conv_type(
            r, self.out_features, ones, groups=base.groups, bias=self.use_lora_bias.get(name, False),
            dtype=dtype, device=device,
        )
        if self.lora_B[name].bias is not None:
            nn.init.zeros_(self.lora_B[name].bias)

    def _lora_bias(self, name: str) -> torch.Tensor | None:
        return self.lora_B[name].bias

    def _init_factors(self, name: str, init: bool | str) -> None:
        init_a_zero_b(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init, self.lora_B[name].bias)

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)  # (out, in * prod(kernel)), a view of the contiguous weight

    def _dora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B[name].weight.flatten(1), self.lora_A[name].weight.flatten(1)  # (out, r), (r, in*k)

    def _dora_magnitude_shape(self, rows: int) -> tuple[int, ...]:
        return (1, rows, *(1,) * (self.base_layer.weight.dim() - 2))  # (1, out, 1, ...), as PEFT keeps it

    def _dora_output_shape(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(1, -1, *(1,) * (self.base_layer.weight.dim() - 2))  # (1, out, 1, ...)

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running, routing = self.running_and_routing()
        if routing is not None:
            return self._routed_forward(x, *args, **kwargs)
        if len(running) == 1 and not (args or kwargs) and type(running[0]) is not DoraEntry:
            kernel = self._merged_kernel(running[0], x)
            if kernel is not None:
                base = self.base_layer
                return base._conv_forward(x, kernel, base.bias)
        return super().forward(x, *args, **kwargs)

    def _merged_kernel(self, entry: tuple, x: torch.Tensor) -> torch.Tensor | None:
        """``W + scale * B @ A`` shaped like W (out, in, *kernel), or None where one conv with it
        would not give what the base plus adapter give, or would cost more (see the module doc).

        Only without autograd (nothing would reach A and B's gradients otherwise), without
        dropout in effect, for the plain conv types without hooks or autocast, and for float32/64
        weights: a bf16 kernel would round the adapter's small update away.
        """
        conv_a, conv_b, scale, p = entry
        base = self.base_layer
        if p > 0.0 and self.training:
            return None
        weight = base._parameters.get("weight")
        if type(weight) is not nn.Parameter or weight.dtype not in (torch.float32, torch.float64):
            return None
        if weight.dtype != x.dtype or not weight.is_contiguous() or _needs_grad(x, weight, base.bias, conv_a, conv_b):
            return None
        if base.groups != 1 or conv_b.bias is not None:
            return None
        if not (type(base) in _PLAIN_CONVS and type(conv_a) is type(base) is type(conv_b)):
            return None
        if hooks_on(base, conv_a, conv_b) or autocast_enabled(x):
            return None
        fan_in = weight.numel() // weight.shape[0]  # in * prod(kernel)
        positions = x.numel() // base.in_channels // math.prod(base.stride)
        if not merging_is_cheaper(positions, fan_in, base.out_channels):
            return None
        a = conv_a._parameters["weight"].to(x.dtype).flatten(1)  # (r, in * prod(kernel))
        b = conv_b._parameters["weight"].to(x.dtype).flatten(1)  # (out, r)
        return torch.addmm(weight.flatten(1), b, a, alpha=scale).view_as(weight)

    def _add_lora(self, entry: tuple, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        conv_a, conv_b, scale, p = entry
        a = conv_a.weight.to(x.dtype)
        b = (conv_b.weight * scale).to(result.dtype)
        dropped = F.dropout(x, p, self.training) if p > 0.0 else x
        hidden = conv_a._conv_forward(dropped, a, None)  # (N, r, *spatial_out)
        bias = (conv_b.bias * scale).to(result.dtype) if conv_b.bias is not None else None  # lora_bias: s * b_B
        return result + conv_b._conv_forward(hidden.to(result.dtype), b, bias)  # (N, out, *spatial_out)

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (out, r), (r, in * prod(kernel)): W seen as (out, in * prod(kernel))
        return self.lora_B[name].weight.to(dtype).flatten(1), self.lora_A[name].weight.to(dtype).flatten(1)

    def _delta_from_factors(self, name: str) -> torch.Tensor:
        kernel_shape = self.lora_A[name].weight.shape[1:]  # (in, *kernel)
        return super()._delta_from_factors(name).view(-1, *kernel_shape)  # (out, in, *kernel)


def merging_is_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
    """Whether building ``W + scale * B @ A`` (``fan_out * r * fan_in`` multiply-adds) costs at most
    ``MERGE_COST_FRACTION`` of running A and B at ``positions`` outputs (``positions * r * (fan_in +
    fan_out)``). The fraction leaves room for writing the merged kernel and the skinny GEMM's lower
    efficiency."""
    return fan_out * fan_in <= MERGE_COST_FRACTION * positions * (fan_in + fan_out)


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *factors: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad):
        return True
    return any(f._parameters["weight"].requires_grad for f in factors)


def _plain_conv(base: nn.Module) -> type:
    dims = base.weight.dim() - 2
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
