"""LoRA for nn.Linear and for transformers' Conv1D (GPT-2: weight stored (in, out))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from ..guards import full_shape
from ..threads import keep_recent
from .base import LoraLayer, resize_parameter
from .dora import DoraEntry
from .dropout import dropped_projection
from .fused import (
    DIRECT_TYPES,
    allow_direct,
    autocast_enabled,
    dora_scale,
    frozen_lora_linear,
    hooks_on,
    lora_linear,
)
from .principal import is_principal_init, principal_factors

ROUTED_KEPT = 4  # per layer: the factors gathered for the most recent batch compositions


class LoraLinear(LoraLayer):
    """``y = W x + b + scale * B A dropout(x)``.

    Shapes: x (..., in); A ``lora_A[name].weight`` (r, in); B ``lora_B[name].weight`` (out, r).
    The adapter weights are cast to x's dtype (cheap: r * (in + out) elements) rather than
    casting x, so a bf16 model with float32 adapters saves bf16 activations, not float32 copies.
    DoRA: the magnitude is (out,), one entry per output feature.
    """

    supports_dora = True
    supports_lora_bias = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        in_features, out_features = self._io_features()
        self.__dict__.update(in_features=in_features, out_features=out_features)

    def _io_features(self) -> tuple[int, int]:
        return self.base_layer.in_features, self.base_layer.out_features

    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_A.weight": (r, self.in_features), "lora_B.weight": (self.out_features, r)}

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[name] = Factor(self.in_features, r, dtype, device)
        self.lora_B[name] = Factor(r, self.out_features, dtype, device, bias=self.use_lora_bias.get(name, False))

    def _lora_bias(self, name: str) -> torch.Tensor | None:
        return self.lora_B[name].bias

    def follow_base_resize(self) -> None:
        in_features, out_features = self._io_features()
        for name, r in self.r.items():
            resize_parameter(self.lora_A[name].weight, (r, in_features))  # (r, in)
            resize_parameter(self.lora_B[name].weight, (out_features, r))  # (out, r)
            if self.lora_B[name].bias is not None:
                resize_parameter(self.lora_B[name].bias, (out_features,))  # lora_bias: new rows at zero
            self.lora_A[name].__dict__["in_features"] = in_features
            self.lora_B[name].__dict__["out_features"] = out_features
        self.__dict__.update(in_features=in_features, out_features=out_features)
        self.__dict__.pop("_frozen", None)

    supports_principal_init = True

    def _init_factors(self, name: str, init: bool | str) -> None:
        if is_principal_init(init):
            self._init_principal(name, init)
            return
        init_a_zero_b(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init, self.lora_B[name].bias)

    def _init_principal(self, name: str, init: str) -> None:
        """PiSSA/OLoRA: A, B the principal part of W, the base weight the residual ``W - s * B @ A`` (rounded
        once to W's dtype); the initial factors are kept for saving in plain LoRA form. Re-initialising first
        gives the base its principal part back."""
        self.restore_principal_base(name)
        weight, scale = self.base_layer.weight, self.scaling[name]
        rows = self._dora_rows(weight.data)  # (out, in) view
        a, b = principal_factors(rows, self.r[name], scale, init)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a)
            self.lora_B[name].weight.copy_(b)
            if self.lora_B[name].bias is not None:
                self.lora_B[name].bias.zero_()
            rows.copy_((rows.to(torch.float32) - scale * (b @ a)).to(rows.dtype))
        self.principal[name] = (self.lora_A[name].weight.detach().clone(), self.lora_B[name].weight.detach().clone())

    def restore_principal_base(self, name: str) -> None:
        """Give the base weight back the principal part a PiSSA/OLoRA init took out (``W_res + s * B0 @ A0``),
        and forget the initial factors. No-op for other adapters."""
        initial = self.principal.pop(name, None)
        if initial is None:
            return
        a0, b0 = initial
        rows = self._dora_rows(self.base_layer.weight.data)
        with torch.no_grad():
            principal = b0.float().to(rows.device) @ a0.float().to(rows.device)
            rows.copy_((rows.to(torch.float32) + self.scaling[name] * principal).to(rows.dtype))

    def _entry(self, name: str, dropout: float | None = None) -> tuple:
        return name, self.scaling[name], self.lora_dropout[name] if dropout is None else dropout

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # (out, in)

    def _dora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B[name].weight, self.lora_A[name].weight  # (out, r), (r, in)

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base_layer.weight.to(x.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running, routing = self.running_and_routing()
        if routing is not None:
            return self._routed_forward(x, *args, **kwargs)
        if len(running) == 1 and not (args or kwargs):
            if type(running[0]) is DoraEntry:
                result = self._dora_direct(running[0], x)
                return result if result is not None else super().forward(x)
            name, scale, p = running[0]
            operands = _fused_operands(self._modules, name, x)
            if operands is not None:
                weight, transposed, bias, a, b = operands
                if not (torch.is_grad_enabled() or (p and self.training) or is_compiling()):
                    wt, at, bt = self._frozen_operands(weight, transposed, a, b, x.dtype)
                    return frozen_lora_linear(x, wt, at, bt, bias, scale)
                return lora_linear(x, weight.t() if transposed else weight, bias, a, b, scale,
                                   p if self.training else 0.0)
        return super().forward(x, *args, **kwargs)

    def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Every row's adapter at once, without autograd: tokens sorted by adapter, then two grouped matmuls
        over the stacked factors (zero for the base rows and for adapters that skip this layer), added back
        in place. DoRA rows rescale by their adapter's g. Training (autograd, dropout) takes the general path."""
        training_dropout = self.training and any(self.lora_dropout.get(n) for n in self._routing.distinct)
        if args or kwargs or torch.is_grad_enabled() or training_dropout or not x.is_floating_point():
            return super()._routed_forward(x, *args, **kwargs)
        result = self.base_layer(x)
        rows = x.shape[0]
        per_row = x.numel() // (rows * x.shape[-1])
        a_t, b_t, g = self._stacked(self._routing.distinct, x.dtype, x.device)
        if 2 * per_row >= a_t.shape[-1]:  # long rows (prefill): gathering r-wide factors per row beats moving tokens
            group = self._routing.rows(rows, x.device)
            h = torch.bmm(x.reshape(rows, per_row, -1), a_t.index_select(0, group))  # (rows, tokens, r)
            b_rows = b_t.index_select(0, group)  # (rows, r, out)
            out = result.reshape(rows, per_row, -1)
            if g is None:
                return out.baddbmm_(h, b_rows).view(result.shape)
            lora, scale = torch.bmm(h, b_rows), g.index_select(0, group)[:, None, :]
        else:
            x2 = x.reshape(-1, x.shape[-1])  # (M, in), M = rows * tokens per row
            tokens = self._routing.tokens(rows, per_row, x.device)
            lora = routed_product(x2, tokens, a_t, b_t)  # (M, out), each token through its adapter
            out = result.reshape(-1, result.shape[-1])
            if g is None:
                return out.add_(lora).view(result.shape)
            scale = g.index_select(0, tokens.group)  # (M, out): m / ||W + s dW|| of each token's adapter, 1 elsewhere
        bias = self.base_layer.bias
        base_part = out if bias is None else out - bias.to(out.dtype)
        return out.add_(base_part * (scale - 1) + scale * lora).view(result.shape)

    def _stacked(self, names: tuple, dtype: torch.dtype, device: torch.device):
        """``A.T`` (G+1, in, r_max), ``(s * B).T`` (G+1, r_max, out) of ``names`` in order, zero for names this
        layer lacks and for the last (base) slot, and the DoRA row scales (G+1, out) or None.

        Gathered from a stack of every adapter of the layer (built once, rebuilt when an adapter is added,
        deleted or changes), once per routing: a whole ``generate`` call pays one gather per layer.
        """
        present = [n for n in names if n in self.r]
        state = (dtype, device, self.base_weight._version,
                 *((p.data_ptr(), p._version) for n in present for p in self.adapter_parameters(n)))
        kept = self.__dict__.setdefault("_routed", {})  # routing -> (state, gathered), the few most recent
        hit = kept.get(self._routing)
        if hit is not None and hit[0] == state:
            return hit[1]
        slot_of, a_all, b_all, g_all = self._stack_all(dtype, device)
        zero = len(slot_of)
        slots = torch.tensor([slot_of.get(n, zero) for n in names] + [zero], device=device)
        dora = g_all is not None and any(self.use_dora.get(n) for n in present)
        selected = (a_all.index_select(0, slots), b_all.index_select(0, slots),
                    g_all.index_select(0, slots) if dora else None)
        kept.pop(self._routing, None)
        kept[self._routing] = (state, selected)
        keep_recent(kept, ROUTED_KEPT)
        return selected

    def _stack_all(self, dtype: torch.dtype, device: torch.device):
        """Every adapter's factors stacked, with a zero slot last: ``({name: slot}, A.T (n+1, in, r_max),
        (s B).T (n+1, r_max, out), DoRA scales (n+1, out) or None)``; kept until an adapter changes."""
        names = tuple(self.r)
        params = [self.base_weight, *(p for n in names for p in self.adapter_parameters(n))]
        key = (names, dtype, device, tuple((p.data_ptr(), p._version) for p in params),
               tuple(self.scaling[n] for n in names))
        kept = self.__dict__.get("_stack")
        if kept is not None and kept[0] == key:
            return kept[1]
        r_max = max(self.r.values())
        a_t = torch.zeros(len(names) + 1, self.in_features, r_max, dtype=dtype, device=device)
        b_t = torch.zeros(len(names) + 1, r_max, self.out_features, dtype=dtype, device=device)
        dora = any(self.use_dora.values())
        g = torch.ones(len(names) + 1, self.out_features, dtype=dtype, device=device) if dora else None
        with torch.no_grad():
            for i, name in enumerate(names):
                r = self.r[name]
                a_t[i, :, :r] = self.lora_A[name].weight.t().to(dtype)
                b_t[i, :r, :] = (self.lora_B[name].weight * self.scaling[name]).t().to(dtype)
                if dora and self.use_dora.get(name):
                    g[i] = self._dora_scale(name, dtype).reshape(-1)
        stacked = ({n: i for i, n in enumerate(names)}, a_t, b_t, g)
        self.__dict__["_stack"] = (key, stacked)
        return stacked

    def _dora_direct(self, entry: DoraEntry, x: torch.Tensor) -> torch.Tensor | None:
        """One DoRA adapter as ``g * (x @ W.T + s * (x @ A.T) @ B.T) + bias`` through the fused LoRA
        function (no dropout in effect), or None where the general path must run.

        With autograd this saves, beyond what LoRA saves, the (N, out) product before the row scale:
        the magnitude's gradient is ``sum over tokens of grad_y * product / norm``. Without autograd,
        g and the transposed operands are kept between calls: seven ops per call.
        """
        operands = _fused_operands(self._modules, entry.name, x)
        if operands is None or (entry.p > 0.0 and self.training):
            return None
        weight, transposed, bias, a, b = operands
        if not (torch.is_grad_enabled() or is_compiling()):
            wt, at, bt = self._frozen_operands(weight, transposed, a, b, x.dtype)
            y = frozen_lora_linear(x, wt, at, bt, None, entry.scale).mul_(self._kept_dora_scale(entry, weight, a, b, x))
            return y if bias is None else y.add_(bias)
        z = lora_linear(x, weight.t() if transposed else weight, None, a, b, entry.scale)
        g = self._dora_scale(entry.name, x.dtype)
        if not is_compiling() and self._magnitude_has_no_zero(entry.name):
            return dora_scale(z, g, bias)
        return z * g if bias is None else z * g + bias

    def _magnitude_has_no_zero(self, name: str) -> bool:
        """Whether m has no zero entry (then :func:`dora_scale` may recover z from the output); checked
        once per change of m (one small reduction per optimizer step)."""
        m = self.lora_magnitude_vector._modules[name]._parameters["weight"]
        state = (m.data_ptr(), m._version)
        kept = self.__dict__.setdefault("_dora_nonzero", {}).get(name)
        if kept is None or kept[0] is not m or kept[1] != state:
            kept = (m, state, bool((m != 0).all()))
            self.__dict__["_dora_nonzero"][name] = kept
        return kept[2]

    def _kept_dora_scale(self, entry: DoraEntry, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         x: torch.Tensor) -> torch.Tensor:
        """:meth:`_dora_scale` for the no-grad fast path, its validity checked in as few operations as
        possible (same tensors, storage and version of W, A, B and m; x's dtype): decode pays it per token."""
        m = self.lora_magnitude_vector._modules[entry.name]._parameters["weight"]
        state = (weight._version, a._version, b._version, m._version, weight.data_ptr(), a.data_ptr(),
                 b.data_ptr(), m.data_ptr(), x.dtype)
        kept = self.__dict__.get("_dora_fast")
        if kept is not None and kept[4] == state and kept[0] is weight and kept[1] is a and kept[2] is b:
            if kept[3] is m:
                return kept[5]
        g = (m.reshape(-1) / self._dora_norm(entry.name)).to(x.dtype)
        self.__dict__["_dora_fast"] = (weight, a, b, m, state, g)
        return g

    def _frozen_operands(
        self, weight: torch.Tensor, transposed: bool, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W.T (in, out), A.T (in, r), B.T (r, out)) in ``dtype`` for :func:`frozen_lora_linear`.

        Kept between no-grad calls: three ops fewer per call, an eighth of the adapter's cost at
        1 x 32 tokens (measured: 1.115x -> 1.101x the base). W.T is a view (no memory); A.T and
        B.T are views, or copies of r * (in + out) elements where the adapter's dtype differs
        from the activations'. Valid while the same tensors hold the same storage at the same
        version: a replaced parameter, a ``.data`` swap, an optimizer step or a load rebuilds
        them. ``.to()`` & co drop them (``_apply``), and copies/pickles of the module leave them
        out (``__getstate__``).
        """
        state = (weight.data_ptr(), a.data_ptr(), b.data_ptr(), a._version, b._version)
        cached = self.__dict__.get("_frozen")  # (weight, a, b, dtype, state, views)
        if (cached is not None and cached[0] is weight and cached[1] is a and cached[2] is b
                and cached[3] is dtype and cached[4] == state):
            return cached[5]
        views = (
            weight if transposed else weight.t(),
            a.t() if a.dtype == dtype else a.t().to(dtype),
            b.t() if b.dtype == dtype else b.t().to(dtype),
        )
        self.__dict__["_frozen"] = (weight, a, b, dtype, state, views)
        return views

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_frozen", None)  # views of the old storage would keep it alive
        return super()._apply(fn, recurse)

    def _add_lora(self, entry: tuple, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        name, scale, p = entry
        factor_a, factor_b = self.lora_A._modules[name], self.lora_B._modules[name]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): 2-D kernels skip matmul's folding overhead
        residual = result.reshape(-1, result.shape[-1])  # (N, out)
        if _plain(factor_a) and _plain(factor_b):  # skip nn.Module.__call__: it shows at small batch sizes
            fused = factor_b.accumulate(factor_a.project(x2, p), residual, scale)
        else:  # FSDP units, user hooks: go through __call__ so they run (FSDP1 even replaces the module)
            fused = factor_b(factor_a(x2, dropout=p), residual=residual, alpha=scale)
        return fused.view(result.shape)

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B[name].weight.to(dtype), self.lora_A[name].weight.to(dtype)  # (out, r), (r, in)


class LoraConv1D(LoraLinear):
    """transformers' Conv1D: ``y = x @ W + b`` with W (in, out); the merged delta is transposed."""

    delta_transposed = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        kind = type(base_layer)
        if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers."):
            allow_direct(kind, transposed=True)  # its forward is x @ W + b, nothing else

    def _io_features(self) -> tuple[int, int]:
        in_features, out_features = full_shape(self.base_layer.weight)
        return in_features, out_features

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # stored (in, out): one row per output feature

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.base_layer.weight.to(x.dtype))

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight.to(dtype).t(), self.lora_B[name].weight.to(dtype).t()  # (in, r), (r, out)


class Factor(nn.Linear):
    """A bias-free nn.Linear created without the default init (the wrapper initialises it).

    Skipping ``reset_parameters`` makes injection into large models several times faster,
    and it is a plain nn.Linear otherwise (``lora_A[name](x)`` works, keys are ``.weight``).
    """

    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device, bias: bool = False
    ) -> None:
        nn.Module.__init__(self)
        self.__dict__.update(in_features=in_features, out_features=out_features)
        self._parameters["weight"] = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self._parameters["bias"] = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )  # B's bias with lora_bias (PEFT's "lora_B.bias")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, alpha: float = 1.0, dropout: float = 0.0
    ) -> torch.Tensor:
        """``x @ W.T`` for x (N, in); with ``residual`` (N, out): ``residual + alpha * x @ W.T`` in one
        addmm (no separate scale or add pass); with ``dropout``: ``dropout(x) @ W.T`` in training.

        W is cast to the activations' dtype (r * features elements), never the activations to W's.
        """
        if residual is not None:
            return self.accumulate(x, residual, alpha)
        if x.dim() != 2:
            bias = self._parameters["bias"]
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return self.project(x, dropout)

    def project(self, x: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """``dropout(x) @ W.T`` for x (N, in) -> (N, out_features)."""
        weight = self.weight
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if dropout > 0.0 and self.training:
            out = dropped_projection(x, weight, dropout)
        else:
            out = torch.mm(x, weight.t())
        bias = self._parameters["bias"]  # not self.bias: nn.Module.__getattr__ costs ~1 us on this path
        return out if bias is None else out + bias.to(out.dtype)

    def accumulate(self, x: torch.Tensor, residual: torch.Tensor, alpha: float) -> torch.Tensor:
        """``residual + alpha * (x @ W.T + bias)`` in one addmm (plus the bias where B has one), computed in
        the residual's dtype."""
        weight = self.weight
        if weight.dtype != residual.dtype:
            weight, x = weight.to(residual.dtype), x.to(residual.dtype)
        out = torch.addmm(residual, x, weight.t(), alpha=alpha)
        bias = self._parameters["bias"]
        return out if bias is None else out + alpha * bias.to(out.dtype)


def routed_product(x: torch.Tensor, tokens, *weights: torch.Tensor) -> torch.Tensor:
    """``x[i] @ w1[g] @ w2[g] ...`` with g token i's group: x (M, d0), each w (G, d_k, d_k+1) -> (M, d_last).

    Batched matmuls over a padded (G, per_group, .) buffer where the groups are even enough (no
    per-adapter loop: the cost hardly grows with the number of adapters), else grouped matmuls over the
    tokens sorted by group.
    """
    if tokens.pos is not None:
        h = x.new_zeros(tokens.groups * tokens.per_group, x.shape[-1]).index_copy_(0, tokens.pos, x)
        h = h.view(tokens.groups, tokens.per_group, -1)
        for weight in weights:
            h = torch.bmm(h, weight)
        return h.view(-1, h.shape[-1]).index_select(0, tokens.pos)
    h = x.index_select(0, tokens.order)
    for weight in weights:
        h = grouped_matmul(h, weight, tokens.ends)
    return torch.empty_like(h).index_copy_(0, tokens.order, h)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x[rows of group i] @ weights[i]`` for every group, rows sorted by group, ``ends`` their int32 end
    offsets: x (M, K), weights (G, K, N) -> (M, N). One ``grouped_mm`` where torch has it for these
    operands, else one matmul per non-empty group."""
    grouped = getattr(F, "grouped_mm", None)
    if grouped is not None and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        try:
            return grouped(x.contiguous(), weights, offs=ends)
        except RuntimeError:
            pass
    out = x.new_empty(x.shape[0], weights.shape[-1])
    start = 0
    for i, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(x[start:end], weights[i], out=out[start:end])
        start = end
    return out


def _plain(module: nn.Module) -> bool:
    """A Factor as created here: not wrapped or re-classed by FSDP, no hooks that calling it would run."""
    return type(module) is Factor and not hooks_on(module)


def _fused_operands(modules: dict[str, nn.Module], name: str, x: torch.Tensor) -> tuple | None:
    """(W, whether W is stored (in, out), bias, A, B) from a wrapper's ``_modules``, or None where
    skipping the modules' own ``__call__`` would change what runs: hooks, FSDP (re-classed factors,
    DTensor weights), quantized or other non-``nn.Parameter`` weights, autocast, a dtype mismatch.

    Runs on every call, so it reads ``_modules``/``_parameters`` directly (``module.weight`` goes
    through ``nn.Module.__getattr__``, about 1 us) and calls as few functions as it can.
    """
    base = modules["base_layer"]
    factor_a, factor_b = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
    transposed = DIRECT_TYPES.get(type(base))
    if transposed is None or type(factor_a) is not Factor or type(factor_b) is not Factor:
        return None
    if factor_b._parameters["bias"] is not None:  # lora_bias: the general path adds s * b_B
        return None
    if hooks_on(base, factor_a, factor_b) or autocast_enabled(x):
        return None
    weight = base._parameters.get("weight")
    if type(weight) is not nn.Parameter or weight.dtype != x.dtype:
        return None
    bias = base._parameters.get("bias")
    return weight, transposed, bias, factor_a._parameters["weight"], factor_b._parameters["weight"]


def init_a_zero_b(
    a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str, b_bias: torch.Tensor | None = None
) -> None:
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
        if b_bias is not None:  # lora_bias starts at zero too, as in PEFT
            nn.init.zeros_(b_bias)
