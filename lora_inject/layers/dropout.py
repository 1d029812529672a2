"""``dropout(x) @ A.T`` that saves x and a bit-packed mask instead of the dropped copy of x.

The plain formula keeps ``dropout(x)`` (a full copy of x) plus a byte mask per adapted
module for backward. x itself is usually saved anyway and shared by several modules (q, k
and v read the same x), so keeping x and one bit per element costs 1/32 of an fp32 copy.
The mask is drawn once, in forward; backward rebuilds ``dropout(x)`` from x and the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(any shape) bool -> (ceil(n / 8),) uint8, little-endian bits."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (ceil(n / 8),) uint8 -> 0/1 of ``shape`` in ``dtype``."""
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[: shape.numel()].view(shape).to(dtype)


class DroppedProjection(torch.autograd.Function):
    """``h = dropout(x, p) @ a.T`` for x (..., in) and a (r, in); h is (..., r)."""

    @staticmethod
    def forward(x: torch.Tensor, a: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        dropped, mask = torch.native_dropout(x, p, True)
        return F.linear(dropped, a), pack_bits(mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, a, p = inputs
        _, packed = output
        ctx.save_for_backward(x, a, packed)
        ctx.p = p
        ctx.mark_non_differentiable(packed)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, _grad_packed) -> tuple:
        x, a, packed = ctx.saved_tensors
        keep_scale = 1.0 / (1.0 - ctx.p)
        mask = unpack_bits(packed, x.shape, x.dtype)  # 0/1 in x's dtype: no bool kernels to compile
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ a.to(grad_h.dtype)) * mask * keep_scale
        if ctx.needs_input_grad[1]:
            dropped = x * mask * keep_scale
            grad_a = (grad_h.reshape(-1, grad_h.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(a.dtype)
        return grad_x, grad_a, None


def dropped_projection(x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(x, p) @ a.T`` in training, saving x and a bit mask for backward."""
    return DroppedProjection.apply(x, a, p)[0]
