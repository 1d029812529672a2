"""LoRA for nn.Conv1d / Conv2d / Conv3d.

A is a conv with the base's kernel, stride, padding, dilation and padding mode (so it
sees the same receptive field as the base); B is a 1x1 conv. Their product is
therefore a kernel of the base's shape and merges exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from .base import LoraLayer
from .linear import init_a_zero_b


class LoraConv(LoraLayer):
    """Shapes: x (N, in, *spatial); A (r, in, *kernel); B (out, r, 1, ..., 1)."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise UnsupportedModuleError(
                f"{type(base_layer).__name__} with groups={base_layer.groups} is not supported: a low-rank "
                "update over all input channels cannot be folded into a grouped kernel, so it could never be "
                "merged (PEFT cannot merge it either). Leave grouped/depthwise convs out with "
                "exclude=[...] or target only the pointwise (groups=1) convs."
            )
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        kernel = tuple(self.base_layer.weight.shape[2:])
        ones = (1,) * len(kernel)
        return {"lora_A.weight": (r, self.in_features, *kernel), "lora_B.weight": (self.out_features, r, *ones)}

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        conv_type = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _plain_conv(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv_type(
            self.in_features, r, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, padding_mode=base.padding_mode, bias=False, dtype=dtype, device=device,
        )
        self.lora_B[name] = conv_type(r, self.out_features, ones, bias=False, dtype=dtype, device=device)

    def _init_factors(self, name: str, init: bool | str) -> None:
        init_a_zero_b(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def _add_lora(self, entry: tuple, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        conv_a, conv_b, scale, p = entry
        a = conv_a.weight.to(x.dtype)
        b = (conv_b.weight * scale).to(result.dtype)
        dropped = F.dropout(x, p, self.training) if p > 0.0 else x
        hidden = conv_a._conv_forward(dropped, a, None)  # (N, r, *spatial_out)
        return result + conv_b._conv_forward(hidden.to(result.dtype), b, None)  # (N, out, *spatial_out)

    def _delta_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # (out, r), (r, in * prod(kernel)): W seen as (out, in * prod(kernel))
        return self.lora_B[name].weight.float().flatten(1), self.lora_A[name].weight.float().flatten(1)

    def _delta_from_factors(self, name: str) -> torch.Tensor:
        kernel_shape = self.lora_A[name].weight.shape[1:]  # (in, *kernel)
        return super()._delta_from_factors(name).view(-1, *kernel_shape)  # (out, in, *kernel)


def _plain_conv(base: nn.Module) -> type:
    dims = base.weight.dim() - 2
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
