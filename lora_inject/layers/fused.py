"""One call for ``y = x @ W.T + bias + scale * (x @ A.T) @ B.T`` when the base is a plain Linear.

Autograd over the separate ops costs, per adapted module: a copy of y (out-of-place
addmm), a separate pass that adds the adapter's share of ``grad_x`` to the base's, and
five or six graph nodes. Here the adapter update is accumulated into y in place and,
in backward, into ``grad_x`` by the same GEMM that computes it (``addmm_``, beta=1).
Outputs and gradients equal the plain formula (tests: float64 to 1e-10, gradcheck and
gradgradcheck, so double backward works too).

Used only where it is safe to skip the base module's ``__call__``: the exact types
below, no hooks anywhere, a plain ``nn.Parameter`` weight (not FSDP/DTensor/quantized),
no autocast; everything else goes through the general path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import (  # dicts that torch updates in place: safe to bind once
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from .dropout import keep_mask, keep_probability, pack_bits, unpack_bits

# base type -> whether its weight is stored (in, out); filled by `allow_direct`
DIRECT_TYPES: dict[type, bool] = {}


def allow_direct(base_type: type, transposed: bool = False) -> None:
    """Let the fast path compute ``base_type`` as ``x @ W.T + b`` (``x @ W + b`` if ``transposed``)."""
    DIRECT_TYPES[base_type] = transposed


allow_direct(nn.Linear)


def hooks_on(*modules: nn.Module) -> bool:
    """Whether calling any of ``modules`` would run hooks, global or their own (nn.Module's fast-path test).

    Runs on every adapted call: one function, no generator (each Python call here costs about
    as much as a 32-token adapter GEMM's launch).
    """
    if _global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks or _global_backward_pre_hooks:
        return True
    for module in modules:
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return True
    return False


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on (for any device: one C call where torch has it)."""
    return _any_autocast() if _any_autocast is not None else torch.is_autocast_enabled(x.device.type)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x @ weight.T + bias + scale * (dropout(x) @ a.T) @ b.T``.

    Shapes: x (..., in), weight (out, in), a (r, in), b (out, r) -> (..., out). a and b are
    cast to x's dtype (r * (in + out) elements), never x to theirs. ``dropout`` > 0 draws a
    mask (see dropout.py); pass 0 outside training.
    """
    if a.dtype != x.dtype:
        a, b = a.to(x.dtype), b.to(x.dtype)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in): 2-D GEMMs; backward wants 2-D
    mask = keep_mask(x2.shape, dropout, x.device) if dropout > 0.0 else None
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or a.requires_grad or b.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        y2 = LoraLinearFunction.apply(x2, weight, bias, a, b, scale, mask, dropout)
    else:
        y2 = _forward(x2, weight, bias, a, b, scale, mask, dropout)[0]
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], y2.shape[1])


def frozen_lora_linear(
    x: torch.Tensor, wt: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``x @ wt + bias + scale * (x @ at) @ bt`` where nothing needs a gradient, in the fewest ops.

    Shapes: x (..., in); wt (in, out), at (in, r), bt (r, out), already transposed and in x's
    dtype (the wrapper caches them, see ``LoraLinear._frozen_operands``). At batch 1 every op is
    a dispatch that costs about as much as an adapter GEMM, so this path runs five: reshape, two
    GEMMs, one in-place addmm, view. No dropout here: the caller sends training calls elsewhere.
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in)
    h = torch.mm(x2, at)  # (N, r), first: x2 is in cache
    y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)  # what nn.Linear computes
    y.addmm_(h, bt, alpha=scale)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


def _effective_scale(scale: float, mask: torch.Tensor | None, dropout: float) -> float:
    """The adapter scale with dropout's 1/keep folded in (so no (N, in) tensor is ever divided)."""
    return scale / keep_probability(dropout) if mask is not None else scale


def _forward(x2, weight, bias, a, b, scale, mask, dropout) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) for x2 (N, in): y (N, out); h = dropout-masked x2 @ a.T (N, r)."""
    h = F.linear(x2 if mask is None else x2 * mask, a)
    y = F.linear(x2, weight, bias)  # fresh: safe to update in place (addmm_ handles any strides)
    y.addmm_(h, b.t(), alpha=scale if mask is None else _effective_scale(scale, mask, dropout))
    return y, h


class LoraLinearFunction(torch.autograd.Function):
    """Forward and backward of :func:`lora_linear`.

    Saves x2, h = dropout(x2) @ a.T (N, r), the weights, and with dropout the mask packed
    to one bit per element (never a dropped copy of x2). Written in the ctx-first style:
    ``setup_context`` makes every ``apply`` bind its arguments with ``inspect.signature``,
    which costs more than the adapter's own matmuls at small batch sizes.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, a, b, scale, mask, dropout):
        y, h = _forward(x2, weight, bias, a, b, scale, mask, dropout)
        packed = pack_bits(mask) if mask is not None else None
        # W only serves grad_x: not kept where x needs no grad (the first layer of a frozen model)
        ctx.save_for_backward(x2, weight if ctx.needs_input_grad[0] else None, a, b, h, packed)
        ctx.scale = _effective_scale(scale, mask, dropout)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        x2, weight, a, b, h, packed = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        mask = unpack_bits(packed, x2.shape, torch.uint8) if packed is not None else None
        create_graph = torch.is_grad_enabled()
        dropped = (x2 if mask is None else x2 * mask) if (need_a or create_graph) else None  # A's input
        if create_graph:  # h must be rebuilt inside the graph to be differentiated again
            h = torch.mm(dropped, a.t())
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        grad_y = grad_y.contiguous()
        # the small GEMMs first, while grad_y is still in cache; the base's big GEMM after them
        if need_b:
            grad_b = torch.mm(grad_y.t(), h).mul_(scale)
        grad_h = torch.mm(grad_y, b) if (need_x or need_a) else None  # (N, r), without the scale
        if need_a:
            grad_a = torch.mm(grad_h.t(), dropped).mul_(scale)
        if need_x:
            grad_x = torch.mm(grad_y, weight)
            if mask is None:
                grad_x.addmm_(grad_h, a, alpha=scale)  # the adapter's share added by the GEMM itself
            else:
                grad_x.addcmul_(torch.mm(grad_h, a), mask, value=scale)
        if need_w:
            grad_w = torch.mm(grad_y.t(), x2)
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def dora_scale(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``z * g + bias`` for DoRA's row scale g (out,) on z (..., out), saving the *output* for backward.

    The magnitude's gradient needs z; z is recovered in backward as ``(y - bias) / g``. The
    output is what the next layer keeps anyway where it saves its input (SiLU, the gated
    product, attention's values), so those layers' DoRA costs no extra saved memory. Only
    for g without zeros (a zero magnitude entry loses z): the caller checks.
    """
    if torch.is_grad_enabled() and (z.requires_grad or g.requires_grad):
        return DoraScaleFunction.apply(z, g, bias)
    y = z * g
    return y if bias is None else y + bias


class DoraScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, g, bias):
        y = z * g if bias is None else torch.addcmul(bias, z, g)
        ctx.save_for_backward(y, g, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        y, g, bias = ctx.saved_tensors
        grad_z = grad_y * g if ctx.needs_input_grad[0] else None
        grad_g = grad_bias = None
        if ctx.needs_input_grad[1]:
            unscaled = y if bias is None else y - bias  # g * z
            grad_g = (grad_y * unscaled).reshape(-1, y.shape[-1]).sum(0) / g
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, y.shape[-1]).sum(0)
        return grad_z, grad_g, grad_bias
