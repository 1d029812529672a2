"""``dropout(x) @ A.T`` that saves x and a bit-packed mask instead of the dropped copy of x.

The plain formula keeps ``dropout(x)`` (a full copy of x) plus a byte mask per adapted
module for backward. x itself is usually saved anyway and shared by several modules (q, k
and v read the same x), so keeping x and one bit per element costs 1/32 of an fp32 copy.
The mask is drawn once, in forward; backward rebuilds ``dropout(x)`` from x and the mask.

Drawing the mask dominates dropout's cost on CPUs (``bernoulli_`` makes one generator call
per element, about as slow as a 512x512 matmul over the same tokens). :func:`keep_mask`
takes 16 random bits per element from 64-bit draws, four elements per call: about 5x
faster. p is then quantised to 1/65536, and the exact keep probability is used for scaling,
so the expectation stays unbiased.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Eight 0/1 bytes read as one little-endian int64 word are folded into its low byte with
# three shift-or steps, and spread back the same way: a few integer ops per 8 elements, where
# shifting and summing every element costs several passes over the whole mask. No step
# overflows (the top set bit is 56), so compiled kernels see no signed wrap-around.


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(any shape) bool -> (ceil(n / 8),) uint8, bit i of byte j = element 8j + i.

    ``mask`` must start on an 8-byte boundary of its storage (any freshly made mask does).
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)  # byte i of a word (0 or 1) at bit 8i
    words = words | (words >> 7)  # bits 0-1 hold bytes 0-1, bits 16-17 bytes 2-3, ...
    words = words | (words >> 14)  # bits 0-3 hold bytes 0-3, bits 32-35 bytes 4-7
    words = words | (words >> 28)  # bits 0-7 hold bytes 0-7
    return (words & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (ceil(n / 8),) uint8 -> 0/1 of ``shape`` as bool or uint8 (free views).

    Backward passes use uint8: inductor cannot vectorise bool-to-float conversions.
    """
    words = packed.to(torch.int64)
    words = (words & 0x0F) | ((words & 0xF0) << 28)  # bits 0-3 -> 0-3, bits 4-7 -> 32-35
    words = (words & 0x0000000300000003) | ((words & 0x0000000C0000000C) << 14)  # pairs 16 bits apart
    words = (words & 0x0001000100010001) | ((words & 0x0002000200020002) << 7)  # one bit per byte
    return words.view(torch.uint8).view(dtype)[: shape.numel()].view(shape)


_LEVELS = 1 << 16


def keep_probability(p: float) -> float:
    """The keep probability :func:`keep_mask` really uses for drop probability ``p``."""
    return 1.0 - round(p * _LEVELS) / _LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask of ``shape``, True with probability ``keep_probability(p)``; one RNG call per 4 elements."""
    n = shape.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    threshold = round(p * _LEVELS) - (1 << 15)  # int16 values are uniform over [-32768, 32767]
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


class DroppedProjection(torch.autograd.Function):
    """``h = (x * mask / keep) @ a.T`` for x (N, in), a (r, in), a bool mask like x; h is (N, r).

    ctx-first style: with ``setup_context`` every ``apply`` pays for ``inspect.signature``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_probability(p)
        ctx.save_for_backward(x, a, pack_bits(mask))
        ctx.keep = keep
        return F.linear(x * mask, a / keep)  # 1/keep folded into the (r, in) matrix, not the (N, in) input

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> tuple:
        x, a, packed = ctx.saved_tensors
        mask = unpack_bits(packed, x.shape, torch.uint8)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ (a / ctx.keep).to(grad_h.dtype)) * mask
        if ctx.needs_input_grad[1]:
            grad_a = ((grad_h.T @ (x * mask)) / ctx.keep).to(a.dtype)
        return grad_x, grad_a, None, None


def dropped_projection(x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(x, p) @ a.T`` in training, saving x and a bit mask for backward."""
    return DroppedProjection.apply(x, a, keep_mask(x.shape, p, x.device), p)
