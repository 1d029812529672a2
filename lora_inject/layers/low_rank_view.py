"""`LowRankUpdated`: a parameter plus low-rank updates, seen by the module that owns it as one tensor.

transformers 5 keeps MoE experts as 3-D parameters ``(E, d1, d2)`` and every experts implementation
(eager loop, ``batched_mm``, ``grouped_mm``, custom classes) reads them in its own way:
``self.gate_up_proj[e]``, ``self.down_proj[expert_ids]``, ``grouped_mm(x, W.transpose(-2, -1), offs)``.
For the length of one forward call the parameter is replaced by this object. The operations those
implementations apply to a weight are answered in factored form, so the full ``(E, d1, d2)`` update
is never built:

* indexing the expert dimension selects the base and the factors of those experts;
* ``transpose`` of the last two dimensions swaps the factors;
* products (``F.linear``, ``matmul``/``@``, ``bmm``, ``grouped_mm``) add ``s * (x @ L) @ R`` (or its
  mirror image) to the base product, with dropout on the input of the low-rank path; a grouped product
  runs its low-rank part through the same grouped kernel.

Anything else (an op we do not know) gets the dense weight ``W + sum s * L @ R`` and runs as it
would on the parameter: exact, only slower. That cannot apply dropout to the input, so it is refused
while dropout is in effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


class Term:
    """One adapter's update ``scale * L @ R`` in the weight's own layout: L (..., d1, r), R (..., r, d2)."""

    __slots__ = ("left", "right", "scale", "p")

    def __init__(self, left: torch.Tensor, right: torch.Tensor, scale: float, p: float) -> None:
        self.left, self.right, self.scale, self.p = left, right, scale, p

    def select(self, index) -> Term:
        return Term(self.left[index], self.right[index], self.scale, self.p)

    def transposed(self) -> Term:
        return Term(self.right.transpose(-2, -1), self.left.transpose(-2, -1), self.scale, self.p)


_GROUPED = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")


class LowRankUpdated:
    """``base + sum over terms of scale * left @ right``, without building the sum (see module doc)."""

    def __init__(self, base: torch.Tensor, terms: list[Term], owner: str) -> None:
        self.base, self.terms, self.owner = base, terms, owner

    # ----- what code reads from a weight ----------------------------------------------------------
    shape = property(lambda self: self.base.shape)
    dtype = property(lambda self: self.base.dtype)
    device = property(lambda self: self.base.device)
    ndim = property(lambda self: self.base.ndim)
    requires_grad = property(lambda self: self.base.requires_grad or any(
        t.left.requires_grad or t.right.requires_grad for t in self.terms))
    is_cuda = property(lambda self: self.base.is_cuda)

    def dim(self) -> int:
        return self.base.dim()

    def size(self, dim: int | None = None):
        return self.base.size() if dim is None else self.base.size(dim)

    def data_ptr(self) -> int:
        return self.base.data_ptr()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        if self.base.ndim == 3 and _selects_experts(index):
            return LowRankUpdated(self.base[index], [t.select(index) for t in self.terms], self.owner)
        return self.dense()[index]

    def transpose(self, dim0: int, dim1: int):
        if {dim0 % self.ndim, dim1 % self.ndim} == {self.ndim - 2, self.ndim - 1}:
            return LowRankUpdated(self.base.transpose(dim0, dim1), [t.transposed() for t in self.terms], self.owner)
        return self.dense().transpose(dim0, dim1)

    def t(self):
        return self.transpose(0, 1) if self.ndim == 2 else self.dense().t()

    mT = property(lambda self: self.transpose(-2, -1))
    T = property(lambda self: self.t())

    def __matmul__(self, other):
        return torch.matmul(self, other)

    def __rmatmul__(self, other):
        return torch.matmul(other, self)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dense(), name)  # .contiguous(), .to(), .view(), ...: on the dense weight

    # ----- the dense fallback -----------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """``base + sum s * L @ R`` in base's dtype (the sum in float32): exact, and weight-sized."""
        if any(t.p > 0.0 for t in self.terms):
            raise ConfigError(
                f"{self.owner} uses its weight in an operation lora_inject cannot split into base and low-rank "
                "parts, so the adapter's dropout (which applies to the layer's input) cannot run there. Set "
                "dropout=0 for parameter targets on this module, or call model.eval()."
            )
        update = sum((t.left.float() @ t.right.float()) * t.scale for t in self.terms)
        return self.base + update.to(self.base.dtype)

    # ----- products -----------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "linear" and isinstance(_arg(args, kwargs, 1, "weight"), cls):
            return _linear(*args, **kwargs)
        if name in ("matmul", "bmm", "__matmul__") and len(args) == 2 and not kwargs:
            return _matmul(args[0], args[1], torch.bmm if name == "bmm" else torch.matmul)
        if name in _GROUPED and isinstance(_arg(args, kwargs, 1, "mat_b", "weight"), cls):
            return _grouped(func, *args, **kwargs)
        return func(*_densified(args), **_densified(kwargs))


def _arg(args, kwargs, position: int, *names: str):
    if len(args) > position:
        return args[position]
    return next((kwargs[n] for n in names if n in kwargs), None)


def _selects_experts(index) -> bool:
    """Whether ``index`` picks along the first (expert) dimension only."""
    if isinstance(index, tuple):
        return len(index) == 1 and _selects_experts(index[0])
    return isinstance(index, (int, slice, torch.Tensor)) and not isinstance(index, bool)


def _densified(value):
    if isinstance(value, LowRankUpdated):
        return value.dense()
    if isinstance(value, (list, tuple)):
        return type(value)(_densified(v) for v in value)
    if isinstance(value, dict):
        return {k: _densified(v) for k, v in value.items()}
    return value


def _dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, True) if p > 0.0 else x


def _linear(x: torch.Tensor, weight: LowRankUpdated, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (W + s L R).T + b = F.linear(x, W, b) + s * (x @ R.T) @ L.T``; W (out, in)."""
    result = F.linear(x, weight.base, bias)
    for t in weight.terms:
        h = F.linear(_dropped(x, t.p), t.right.to(x.dtype))  # (..., r)
        result = result + F.linear(h, t.left.to(x.dtype)) * t.scale
    return result


def _matmul(a, b, op) -> torch.Tensor:
    """``x @ M`` (M on the right: ``x @ W + s (x @ L) @ R``) or ``M @ y`` (``W @ y + s L @ (R @ y)``)."""
    if isinstance(a, LowRankUpdated) and isinstance(b, LowRankUpdated):
        return op(a.dense(), b.dense())
    if isinstance(b, LowRankUpdated):
        result = op(a, b.base)
        for t in b.terms:
            result = result + op(op(_dropped(a, t.p), t.left.to(a.dtype)), t.right.to(a.dtype)) * t.scale
        return result
    result = op(a.base, b)
    for t in a.terms:
        result = result + op(t.left.to(b.dtype), op(t.right.to(b.dtype), _dropped(b, t.p))) * t.scale
    return result


def _grouped(func, x: torch.Tensor, weight: LowRankUpdated, *args, offs=None, **kwargs) -> torch.Tensor:
    """Rows of ``x`` (S, d1) sorted by expert, ``offs`` the cumulative row counts: the base grouped product plus
    ``s * (x_e @ L_e) @ R_e`` on each expert's rows, through the same grouped kernel the experts code chose
    (one call for all experts; transformers' custom-op fallback where it uses that, so ``torch.compile``
    sees what it sees for the base). The rank is zero-padded to a 16-byte row stride, which the grouped
    kernels require; the padding adds nothing."""
    if offs is None and args:
        offs, args = args[0], args[1:]
    result = func(x, weight.base, *args, offs=offs, **kwargs)
    for t in weight.terms:
        left, right = _padded_rank(t.left.to(x.dtype), t.right.to(x.dtype))
        low = func(_dropped(x, t.p), left, offs=offs)  # (S, r)
        result = result + func(low, right, offs=offs) * t.scale
    return result


def _padded_rank(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L (E, d1, r) and R (E, r, d2), contiguous, with r zero-padded to a multiple of 16 bytes."""
    r = left.shape[-1]
    step = max(1, 16 // left.element_size())
    pad = -r % step
    left = F.pad(left, (0, pad)) if pad else left.contiguous()
    right = F.pad(right, (0, 0, 0, pad)) if pad else right.contiguous()
    return left, right
