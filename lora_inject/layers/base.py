"""`LoraLayer`: the wrapper every adapted module is. Merge, unmerge and forward live here, once.

A wrapper holds the frozen original as ``base_layer`` and, per adapter name, two
low-rank factors. Subclasses say only how to build the factors, how to run them on
an input, and how their product maps onto the base weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import AdapterExistsError, AdapterNotFoundError, MergeError


class LoraLayer(nn.Module):
    """Base class of all LoRA wrappers.

    ``forward(x) = base_layer(x) + sum over active, unmerged adapters of scale * B(A(dropout(x)))``.

    Subclasses implement :meth:`_create_factors`, :meth:`_init_factors`,
    :meth:`_add_lora` and :meth:`_delta_factors`, and list the names of their
    per-adapter containers in ``adapter_param_names``.
    """

    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # plain attributes through __dict__: nn.Module.__setattr__ is slow, and injection into a
        # 7B model creates hundreds of wrappers
        self.__dict__.update(
            lora_dropout={},  # dropout probability per adapter
            r={},
            lora_alpha={},
            scaling={},
            active_adapters=(),
            merged_adapters=[],
            adapters_disabled=False,
            # what forward needs per running adapter (active, not merged), precomputed on each
            # state change so the hot path does no dictionary lookups: (factor containers, scale, p)
            _running=(),
        )

    # ----- what subclasses provide -----------------------------------------------------------
    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _init_factors(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def _add_lora(self, entry: tuple, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scale * B(A(dropout(x)))`` for one running adapter (``entry`` from :meth:`_entry`)."""
        raise NotImplementedError

    def _entry(self, name: str) -> tuple:
        """The precomputed per-adapter tuple that :meth:`_add_lora` receives."""
        return (
            *(getattr(self, c)[name] for c in self.adapter_param_names), self.scaling[name], self.lora_dropout[name]
        )

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in ``dtype`` with ``left @ right == delta / scale``, the base weight seen
        as ``(left.shape[0], -1)``. Merge accumulates this product into the weight (one GEMM)."""
        raise NotImplementedError

    def _delta_dtype(self, name: str) -> torch.dtype:
        """:func:`merge_dtype` of the base weight and the adapter's factors."""
        return merge_dtype(self.base_weight.dtype, *(p.dtype for p in self.adapter_parameters(name)))

    def _delta_from_factors(self, name: str) -> torch.Tensor:
        """``scale * delta`` in :meth:`_delta_dtype`, shaped like the base weight (a conv reshapes it further)."""
        left, right = self._delta_factors(name, self._delta_dtype(name))
        return (left @ right) * self.scaling[name]

    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """``{key suffix as stored on disk: shape}`` of one adapter's factors at rank ``r``."""
        raise NotImplementedError

    def follow_base_resize(self) -> None:
        """The base layer changed size in place (``resize_token_embeddings``): resize every adapter's
        factors to match, keeping the existing entries and zeroing new ones (so new rows start as the base)."""
        raise NotImplementedError(f"{type(self).__name__} cannot follow a resized base layer.")

    # ----- adapters ---------------------------------------------------------------------------
    def factor(self, name: str, suffix: str) -> torch.Tensor:
        """The parameter stored on disk under ``<path>.<suffix>`` (e.g. ``lora_A.weight``) for adapter ``name``."""
        container, _, rest = suffix.partition(".")
        item = getattr(self, container)[name]
        return getattr(item, rest) if rest else item

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # Code written for the plain module (transformers' tie_weights, resize_token_embeddings,
    # get_input_embeddings().weight) reads these; they are the base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        scale: float,
        dropout: float = 0.0,
        init: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create adapter ``name`` on the base weight's device; B (or A for embeddings) is zero."""
        if name in self.r:
            raise AdapterExistsError(f"Adapter {name!r} already exists on this layer.")
        weight = self.base_weight
        dtype = dtype or default_adapter_dtype(weight.dtype)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scale
        self.lora_dropout[name] = float(dropout)
        self._create_factors(name, r, dtype, weight.device)
        if weight.device.type != "meta":
            self._init_factors(name, init)

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """Re-draw the factors of ``name`` (e.g. after ``to_empty`` on a meta-built model)."""
        self._require(name)
        with torch.no_grad():
            self._init_factors(name, init)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into the weights; unmerge it before deleting it.")
        for container in self.adapter_param_names:
            del getattr(self, container)[name]
        del self.lora_dropout[name], self.r[name], self.lora_alpha[name], self.scaling[name]
        self.set_active([a for a in self.active_adapters if a != name])

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        for container in self.adapter_param_names:
            yield from _params_of(getattr(self, container)[name])

    def set_active(self, names: Iterable[str]) -> None:
        names = tuple(n for n in names if n in self.r)
        self.active_adapters = names
        for name in self.r:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in names)
        self._refresh_running()

    def _refresh_running(self) -> None:
        names = () if self.adapters_disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        self._running = tuple(self._entry(n) for n in names)

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = disabled
        self._refresh_running()

    def _require(self, name: str) -> None:
        if name not in self.r:
            raise AdapterNotFoundError(f"No adapter {name!r} on this layer; it has {self.adapter_names}.")

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.bfloat16()``, ``.cuda()``... move float32 adapter weights (and their
        gradients) but never narrow them to float16/bfloat16: with half-precision adapters most small
        optimizer updates round away (measured: 75% of A's entries never moved in 5 AdamW steps at
        lr=1e-4). The base layer converts as asked. Adapters created in half precision on purpose
        (``adapter_dtype=torch.bfloat16``) stay as they are.
        """
        keep = {
            id(t) for name in self.r for p in self.adapter_parameters(name) if p.dtype == torch.float32
            for t in (p, p.grad) if t is not None
        }
        if not keep:
            return super()._apply(fn, recurse)

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            if id(t) in keep:
                target = fn(t.new_empty(0))  # where and in which dtype fn would put t, without rounding it
                if target.dtype in (torch.float16, torch.bfloat16):
                    return t.to(device=target.device)
            return fn(t)

        return super()._apply(keep_float32, recurse)

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for entry in self._running:
            result = self._add_lora(entry, x, result)
        return result

    # ----- merge ------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in float32 (float64 for float64 weights or adapters), shaped like the base weight."""
        self._require(name)
        return self._delta_from_factors(name)

    def check_merge(self, name: str) -> None:
        """Raise :class:`MergeError` if merging ``name`` would write NaN or inf; writes nothing.

        Cheap in the usual case: finite factors whose largest possible contribution
        ``scale * max_row(sum |B|) * max |A|`` cannot overflow the weight's dtype are safe
        without computing the merge. Otherwise the merged weight is computed and checked.
        """
        weight = self.base_weight
        factor_a, factor_b = list(self.adapter_parameters(name))[:2]
        limit = torch.finfo(weight.dtype).max if weight.is_floating_point() else float("inf")
        if torch.isfinite(factor_a).all() and torch.isfinite(factor_b).all():
            bound = abs(self.scaling[name]) * factor_b.detach().flatten(1).abs().sum(1).max() * factor_a.abs().max()
            if weight.dtype in (torch.float32, torch.float64):
                room = 1e30  # an fp32 weight anywhere near 3e38 is not a trained model
            else:
                room = limit - torch.linalg.vector_norm(weight.detach().float().flatten(), float("inf"))
            if bound < room:
                return
        merged = self.delta_weight(name).add_(weight.detach())
        if not torch.isfinite(merged.to(weight.dtype)).all():
            raise MergeError(
                f"Merging adapter {name!r} would write NaN or inf into a {weight.dtype} weight of shape "
                f"{tuple(weight.shape)}: the adapter is broken or the sum overflows {weight.dtype}. "
                "Inspect the adapter's weights, or merge in a wider dtype."
            )

    def merge(self, names: Iterable[str] | None = None, check_finite: bool = False) -> list[str]:
        """Fold adapters (default: the active ones) into the base weight. Already merged: skipped.

        ``W += delta`` in place: the addition runs in delta's dtype (:func:`merge_dtype`) and rounds
        to W's dtype once, exactly ``(W.to(delta.dtype) + delta).to(W.dtype)`` without the temporaries.
        """
        names = list(self.active_adapters if names is None else names)
        done = []
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"Adapter {name!r} is already merged; merging it again is a no-op.", stacklevel=3)
                continue
            if check_finite:
                self.check_merge(name)
            with torch.no_grad():
                self._add_delta(name, 1.0)
            self.merged_adapters.append(name)
            done.append(name)
        self._refresh_running()
        return done

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first, in float32 (float64 where W or the adapter is)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self._add_delta(name, -1.0)
        self._refresh_running()

    def _add_delta(self, name: str, sign: float) -> None:
        """``W += sign * scale * delta`` in place, the sum in :meth:`_delta_dtype` (float32, or float64
        where W or the adapter is) and rounded to W's dtype once.

        One GEMM accumulates :meth:`_delta_factors`' product into W (beta=1): no weight-sized
        delta tensor, no separate scale and add passes. A narrower W is widened once, updated
        and rounded back once; quantized and non-contiguous weights add a materialised delta.
        """
        weight = self.base_weight
        if (type(weight) not in (nn.Parameter, torch.Tensor) or weight.dtype not in _GEMM_MERGE_DTYPES
                or not weight.is_contiguous()):
            weight.add_(self.delta_weight(name), alpha=sign)
            return
        dtype = self._delta_dtype(name)
        left, right = self._delta_factors(name, dtype)
        target = weight if weight.dtype == dtype else weight.to(dtype)
        target.view(left.shape[0], -1).addmm_(left, right, alpha=sign * self.scaling[name])
        if target is not weight:
            weight.copy_(target)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"adapters=({ranks}), active={list(self.active_adapters)}, merged={self.merged_adapters}"


_GEMM_MERGE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def merge_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Where a merge computes ``W + scale * B @ A``: float32, or float64 if any of ``dtypes`` is
    (never narrower than the weight or the adapter; PEFT merges float64 in float64 too)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """float32 master weights for half-precision (and quantized) bases, else the base dtype."""
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


def resize_parameter(param: nn.Parameter, shape: tuple[int, ...]) -> None:
    """Give ``param`` (in place: optimizer and module references stay valid) a new ``shape``, keeping the
    overlapping block and zero elsewhere."""
    if tuple(param.shape) == tuple(shape):
        return
    new = param.detach().new_zeros(shape)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(param.shape, shape))
    new[overlap] = param.detach()[overlap]
    param.data = new


def _params_of(item: nn.Module | nn.Parameter) -> Iterable[nn.Parameter]:
    if isinstance(item, nn.Parameter):
        return [item]
    return item.parameters()
