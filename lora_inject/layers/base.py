"""`LoraLayer`: the wrapper every adapted module is. Merge, unmerge and forward live here, once.

A wrapper holds the frozen original as ``base_layer`` and, per adapter name, two
low-rank factors. Subclasses say only how to build the factors, how to run them on
an input, and how their product maps onto the base weight.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from ..errors import AdapterExistsError, AdapterNotFoundError, MergeError, UnsupportedModuleError
from ..guards import full_shape
from ..quantized.registry import quantized_kind
from ..threads import LOCAL, per_thread, view_of
from .dora import DoraEntry, Magnitude, norm_dtype, row_norms, squared_row_norms


class StandsIn(nn.Module):
    """A module standing in for ``base_layer``: attributes it lacks are the base layer's.

    Code written for the plain module reads its attributes (``conv1d.kernel_size``, ``embed.padding_idx``,
    ``num_embeddings``, ``in_features``); found here, they would otherwise raise on the wrapper. Only names
    nn.Module cannot find reach this (parameters, buffers and submodules come first), private ones never.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_layer", "original_module", "token_adapter"):
                raise
            return getattr(self.base_layer, name)

    # What runs, as each thread sees it (lora_inject/threads.py); a DataParallel replica keeps its maker's view.
    _per_thread_fields: tuple[str, ...] = ("active_adapters", "adapters_disabled", "_routing")
    adapters_disabled = per_thread("adapters_disabled", "disabled")
    _routing = per_thread("_routing", "routing")  # a per-row routing while lora_inject.batch_adapters is active

    def prepare_active(self, names: Sequence[str]) -> None:
        """Before a block makes ``names`` run here: raise if they cannot run together, and precompute what the
        forward needs (outside it, so a compiled graph's guards see no change made by an eager call)."""

    _state_defaults: dict = {"_routing": None, "adapters_disabled": False}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for field, value in self._state_defaults.items():  # models pickled by older versions lack them
            self.__dict__.setdefault(field, copy.copy(value))

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        if view_of(self) is not None:  # DataParallel runs the replicas in threads of its own
            for field in self._per_thread_fields:
                replica.__dict__[field] = getattr(self, field)
        return replica


class LoraLayer(StandsIn):
    """Base class of all LoRA wrappers.

    ``forward(x) = base_layer(x) + sum over active, unmerged adapters of scale * B(A(dropout(x)))``.

    Subclasses implement :meth:`_create_factors`, :meth:`_init_factors`,
    :meth:`_add_lora` and :meth:`_delta_factors`, and list the names of their
    per-adapter containers in ``adapter_param_names``. DoRA adapters (see ``dora.py``) also
    need :meth:`_dora_rows` and :meth:`_dora_factors`; the rest of DoRA lives here, once.
    """

    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B")
    _per_thread_fields = (*StandsIn._per_thread_fields, "_running")
    _state_defaults = {**StandsIn._state_defaults, "_running_kept": {}}
    supports_dora = False
    supports_lora_bias = False
    supports_principal_init = False
    merges_into_base = True  # merge writes into base_layer's weight (shared weights are untied first)
    delta_transposed = False  # whether the update, shaped like the weight, is (B @ A).T (Conv1D, Embedding)
    tied_to = None

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
            use_dora={},  # adapter -> True for DoRA adapters (they also hold lora_magnitude_vector[name])
            use_lora_bias={},  # adapter -> True where B has a bias (lora_B[name].bias)
            principal={},  # adapter -> (A0, B0) of a PiSSA/OLoRA init, whose principal part left the base weight
            _dora_merged={},  # adapter -> the row scale m / ||W + s*dW|| applied at merge, to undo it exactly
            # what forward needs per running adapter (active, not merged), precomputed on each
            # state change so the hot path does no dictionary lookups: (factor containers, scale, p)
            _running=(),
            _running_kept={},  # the same for the adapter lists of threads' using_adapter blocks
            _routing=None,
        )

    # ----- what subclasses provide -----------------------------------------------------------
    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _init_factors(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def _add_lora(self, entry: tuple, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scale * B(A(dropout(x)))`` for one running adapter (``entry`` from :meth:`_entry`)."""
        raise NotImplementedError

    def _entry(self, name: str, dropout: float | None = None) -> tuple:
        """The precomputed per-adapter tuple that :meth:`_add_lora` receives (``dropout`` overrides the
        adapter's probability: DoRA applies dropout itself)."""
        p = self.lora_dropout[name] if dropout is None else dropout
        return (*(getattr(self, c)[name] for c in self.adapter_param_names), self.scaling[name], p)

    def merge_refusal(self, name: str | None = None) -> str | None:
        """Why this layer's adapters (or adapter ``name``) cannot be merged into its weight, or None."""
        kind = quantized_kind(self.base_layer)
        if kind is not None:
            return (
                f"the base layer is quantized ({kind.name}): adding the update to it means quantizing again, which "
                "rounds most of a small update away. Merge into float weights instead: "
                "lora_inject.merge_and_unload(model, dequantize=torch.bfloat16) gives a float model, and "
                "`lora-inject merge BASE ADAPTER OUT` merges the saved adapter into the full-precision checkpoint. "
                "merge(..., requantize=True) re-quantizes anyway and reports the error."
            )
        if name is not None and self.use_lora_bias.get(name) and self.bias is None:
            return (
                f"adapter {name!r} has a bias on B (lora_bias), but the base layer has no bias to merge it into; "
                "merging would have to change the layer's architecture. Keep it unmerged."
            )
        return None

    def _lora_bias(self, name: str) -> torch.Tensor | None:
        """B's bias (out,) of adapter ``name`` (lora_bias), or None."""
        return None

    def restore_principal_base(self, name: str) -> None:
        """Undo a PiSSA/OLoRA init's change to the base weight (layers that support those inits)."""

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor seen in DoRA's rows layout (R, C): one row per magnitude entry (a view)."""
        raise NotImplementedError

    def _dora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left (R, r), right (r, C))`` with ``scale * left @ right`` the update in the rows layout."""
        raise NotImplementedError

    def _dora_output_shape(self, scale: torch.Tensor) -> torch.Tensor:
        """The (R,) row scale shaped to multiply this layer's output (R features on the last dim)."""
        return scale

    def _dora_magnitude_shape(self, rows: int) -> tuple[int, ...]:
        """The magnitude's shape as PEFT stores it: (R,); convs override it."""
        return (rows,)

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
        if isinstance(item, Magnitude):  # PEFT writes it as "<path>.lora_magnitude_vector", no ".weight"
            return item.weight
        return getattr(item, rest) if rest else item

    def containers(self, name: str) -> tuple[str, ...]:
        """The per-adapter containers that hold ``name``'s parameters."""
        if self.use_dora.get(name):
            return (*self.adapter_param_names, "lora_magnitude_vector")
        return self.adapter_param_names

    def adapter_shapes(self, r: int, dora: bool = False, lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        """:meth:`factor_shapes`, plus the magnitude vector (R,) of a DoRA adapter and B's bias (out,)."""
        shapes = self.factor_shapes(r)
        if dora:
            shapes["lora_magnitude_vector"] = self._dora_magnitude_shape(self._dora_row_count())
        if lora_bias:
            shapes["lora_B.bias"] = (shapes["lora_B.weight"][0],)
        return shapes

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _dora_row_count(self) -> int:
        """Rows of DoRA's layout of the base weight, from its full shape (a partitioned ZeRO-3 weight is empty)."""
        return self._dora_rows(torch.empty(full_shape(self.base_weight), device="meta")).shape[0]

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
        dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Create adapter ``name`` on the base weight's device; B (or A for embeddings) is zero (``init=None``:
        left as allocated, for a loader that writes every factor next).

        With ``dora`` the adapter also gets a magnitude vector, initialised to the row norms of
        ``W + s * B @ A`` so that the layer starts exactly as the base.
        """
        if name in self.r:
            raise AdapterExistsError(f"Adapter {name!r} already exists on this layer.")
        weight = self.base_weight
        dtype = dtype or default_adapter_dtype(weight.dtype)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scale
        self.lora_dropout[name] = float(dropout)
        if lora_bias:
            self.use_lora_bias[name] = True
        self._create_factors(name, r, dtype, weight.device)
        if dora:
            if "lora_magnitude_vector" not in self._modules:
                self.lora_magnitude_vector = nn.ModuleDict()
            shape = self._dora_magnitude_shape(self._dora_row_count())
            self.lora_magnitude_vector[name] = Magnitude(shape, norm_dtype(dtype), weight.device)
            self.use_dora[name] = True
        if weight.device.type != "meta" and init is not None:  # None: the caller fills every factor at once
            self.reset_adapter(name, init)

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """Re-draw the factors of ``name`` (e.g. after ``to_empty`` on a meta-built model); a DoRA
        magnitude is set to the row norms of the new ``W + s * B @ A``."""
        self._require(name)
        with torch.no_grad():
            self._init_factors(name, init)
            if self.use_dora.get(name):
                magnitude = self.lora_magnitude_vector[name].weight
                magnitude.copy_(self._dora_norm(name, cached=False).view(magnitude.shape))

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into the weights; unmerge it before deleting it.")
        self.restore_principal_base(name)
        for container in self.containers(name):
            del getattr(self, container)[name]
        del self.lora_dropout[name], self.r[name], self.lora_alpha[name], self.scaling[name]
        self.use_dora.pop(name, None)
        self.use_lora_bias.pop(name, None)
        for cache in ("_dora_kept", "_dora_nonzero"):
            self.__dict__.get(cache, {}).pop(name, None)
        self.__dict__.pop("_dora_fast", None)
        self.set_active([a for a in self.__dict__["active_adapters"] if a != name])

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        for container in self.containers(name):
            yield from _params_of(getattr(self, container)[name])

    def set_active(self, names: Iterable[str], trainable: bool = True) -> None:
        """Run ``names``; with ``trainable`` their parameters (only) require grad, else grads stay as they are."""
        names = tuple(n for n in names if n in self.r)
        self.active_adapters = names
        if trainable:
            for name in self.r:
                for p in self.adapter_parameters(name):
                    p.requires_grad_(name in names)
        self._refresh_running()

    def _refresh_running(self) -> None:
        own = self.__dict__
        names = () if own["adapters_disabled"] else [n for n in own["active_adapters"] if n not in self.merged_adapters]
        own["_running"] = tuple(self._running_entry(n) for n in names)
        own["_running_kept"] = {}

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """The active adapters (of this layer's), as this thread sees them: its block's, else the model's."""
        view = view_of(self)
        if view is not None and view.active is not None:
            return tuple(n for n in view.active if n in self.r)
        return self.__dict__["active_adapters"]

    @active_adapters.setter
    def active_adapters(self, names: tuple[str, ...]) -> None:
        self.__dict__["active_adapters"] = names

    @property
    def _running(self) -> tuple:
        """What forward runs (see :meth:`_running_entry`), as this thread sees it: its view, else the model's."""
        view = view_of(self)
        if view is None or (view.active is None and not view.disabled):
            return self.__dict__["_running"]
        if view.disabled or self.__dict__["adapters_disabled"]:
            return ()
        entries = self.__dict__["_running_kept"].get(view.active)
        return self._running_of(view.active) if entries is None else entries

    def _running_of(self, names: Sequence[str]) -> tuple:
        merged = self.merged_adapters
        return tuple(self._running_entry(n) for n in names if n in self.r and n not in merged)

    def prepare_active(self, names: Sequence[str]) -> None:
        kept = self.__dict__["_running_kept"]
        key = tuple(names)
        if key not in kept and len(kept) < 64:
            kept[key] = self._running_of(key)

    def _running_entry(self, name: str) -> tuple:
        """What forward needs to run adapter ``name``: a :class:`DoraEntry` for DoRA, else :meth:`_entry`."""
        if self.use_dora.get(name):
            return DoraEntry(name, self.scaling[name], self.lora_dropout[name], self._entry(name, dropout=0.0))
        return self._entry(name)

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = disabled
        self._refresh_running()

    def _require(self, name: str) -> None:
        if name not in self.r:
            raise AdapterNotFoundError(f"No adapter {name!r} on this layer; it has {self.adapter_names}.")

    def set_base_layer(self, module: nn.Module) -> None:
        self.base_layer = module

    def unwrapped(self, keep_merged: bool) -> nn.Module:
        """The base module to put back: merged adapters stay in its weight if ``keep_merged``, else are
        subtracted; a PiSSA/OLoRA principal part goes back into the weight unless its adapter stays merged."""
        if not keep_merged:
            self.unmerge()
        for name in list(self.principal):
            if not (keep_merged and name in self.merged_adapters):
                self.restore_principal_base(name)
        return self.base_layer

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.bfloat16()``, ``.cuda()``... move float32 adapter weights (and their
        gradients) but never narrow them to float16/bfloat16: with half-precision adapters most small
        optimizer updates round away (measured: 75% of A's entries never moved in 5 AdamW steps at
        lr=1e-4). The base layer converts as asked. Adapters created in half precision on purpose
        (``adapter_dtype=torch.bfloat16``) stay as they are.
        """
        for cache in ("_dora_squared", "_dora_kept", "_dora_fast", "_dora_nonzero", "_stack", "_routed"):
            self.__dict__.pop(cache, None)  # they hold the old tensors
        params = [p for name in self.r for p in self.adapter_parameters(name) if p.dtype == torch.float32]
        return apply_keeping_float32(self, params, fn, recurse)

    # ----- forward ----------------------------------------------------------------------------
    def running_and_routing(self) -> tuple[tuple, object]:
        """``(_running, _routing)`` as this thread sees them, read once per forward (no block open: no view)."""
        if LOCAL.views is None:
            own = self.__dict__
            return own["_running"], own["_routing"]
        return self._running, self._routing

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running, routing = self.running_and_routing()
        if routing is not None:
            return self._routed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if running and not isinstance(result, torch.Tensor):
            raise UnsupportedModuleError(_not_a_tensor(self.base_layer, result))
        for entry in running:
            if type(entry) is DoraEntry:
                result = self._add_dora(entry, x, result)
            else:
                result = self._add_lora(entry, x, result)
        return result

    # ----- one adapter per row (lora_inject.batch_adapters) -------------------------------------
    def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of ``x`` (dim 0) with its own adapter: the base once, then each adapter on its rows.

        The general path, for every layer type and for training; wrappers with a faster way (grouped
        matmuls over stacked factors) override it and fall back here where that way does not apply.
        """
        result = self.base_layer(x, *args, **kwargs)
        routing = self._routing
        group = routing.rows(x.shape[0], x.device)
        for g, name in enumerate(routing.distinct):
            if name not in self.r:
                continue  # this adapter does not adapt this layer: its rows keep the base output
            rows = (group == g).nonzero().flatten()
            if rows.numel() == 0:
                continue
            entry = self._running_entry(name)
            x_rows, res_rows = x.index_select(0, rows), result.index_select(0, rows)
            add = self._add_dora if type(entry) is DoraEntry else self._add_lora
            result = result.index_copy(0, rows, add(entry, x_rows, res_rows))
        return result

    # ----- DoRA -------------------------------------------------------------------------------
    def _add_dora(self, entry: DoraEntry, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """One DoRA adapter on top of ``result`` (the base output plus the adapters before this one),
        with PEFT's formula and so PEFT's composition of several adapters, g = m / ||W + s dW||:

        * no dropout in effect: ``result + (g - 1) * (result - bias) + g * s * B A x``
          (for one adapter: ``g * (W x + s * B A x) + bias``);
        * dropout in training: ``result + (g - 1) * W dropout(x) + g * s * B A dropout(x)``.
        """
        g = self._dora_output_shape(self._dora_scale(entry.name, result.dtype))
        if entry.p > 0.0 and self.training:
            x = F.dropout(x, entry.p, True)
            base = self._base_product(x)
        else:
            bias = self.bias
            base = result if bias is None else result - self._dora_output_shape(bias.to(result.dtype))
        lora = self._add_lora(entry.lora, x, torch.zeros_like(result))  # s * B A x
        return result + (g - 1) * base + g * lora

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's product without its bias (``W x``), for DoRA with dropout."""
        raise NotImplementedError

    def _dora_norm(self, name: str, cached: bool = True) -> torch.Tensor:
        """``||W + s * B @ A||`` per row (R,), float32 (float64 for float64 weights or adapters), detached.

        No (R, C) temporary (:func:`lora_inject.layers.dora.row_norms`); ``||W_i||^2`` is kept between
        calls, checked against W's identity, storage and version.
        """
        weight = self.base_weight
        left, right = self._dora_factors(name)
        with torch.no_grad():
            w_rows = self._dora_rows(weight.detach())
            dtype = norm_dtype(weight.dtype, left.dtype, right.dtype)
            squared = self._squared_norms(weight, w_rows, dtype) if cached and not is_compiling() else None
            return row_norms(w_rows, left.detach(), right.detach(), self.scaling[name], squared)

    def _squared_norms(self, weight: torch.Tensor, w_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        state = (weight.data_ptr(), weight._version, dtype)
        kept = self.__dict__.get("_dora_squared")
        if kept is not None and kept[0] is weight and kept[1] == state:
            return kept[2]
        squared = squared_row_norms(w_rows, dtype)
        self.__dict__["_dora_squared"] = (weight, state, squared)
        return squared

    def _dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``g = m / ||W + s * B @ A||`` (R,) in ``dtype``: differentiable in m, the norm detached.

        Where no gradient is wanted (``no_grad``, ``inference_mode``; not while compiling) g is kept
        between calls, valid while W, A, B and m are the same tensors at the same storage and version.
        """
        magnitude = self.lora_magnitude_vector[name].weight.reshape(-1)
        if torch.is_grad_enabled() or is_compiling():
            return (magnitude / self._dora_norm(name)).to(dtype)
        params = (self.base_weight, *self.adapter_parameters(name))
        state = (dtype, *((p.data_ptr(), p._version) for p in params))
        kept = self.__dict__.setdefault("_dora_kept", {}).get(name)
        if kept is not None and kept[1] == state and all(a is b for a, b in zip(kept[0], params)):
            return kept[2]
        scale = (magnitude / self._dora_norm(name)).to(dtype)
        self.__dict__["_dora_kept"][name] = (params, state, scale)
        return scale

    def _dora_fold(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """``target = g * (target + s * dW)`` in place (target weight-shaped, contiguous, in the merge
        dtype), g = m / ||target + s * dW|| per row; returns g (R,). The arithmetic the streaming merge
        repeats, so both write the same bits."""
        left, right = self._delta_factors(name, target.dtype)
        target.view(left.shape[0], -1).addmm_(left, right, alpha=self.scaling[name])
        rows = self._dora_rows(target)
        magnitude = self.lora_magnitude_vector[name].weight.detach().reshape(-1).to(target.dtype)
        g = magnitude / torch.linalg.vector_norm(rows, dim=1)
        rows.mul_(g[:, None])
        return g

    # ----- merge ------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in float32 (float64 for float64 weights or adapters), shaped like the base weight."""
        self._require(name)
        return self._delta_from_factors(name)

    def check_merge(self, name: str) -> None:
        """Raise :class:`MergeError` if merging ``name`` would write NaN or inf; writes nothing.

        Cheap in the usual case: finite factors whose largest possible contribution
        ``scale * max_row(sum |B|) * max |A|`` cannot overflow the weight's dtype are safe
        without computing the merge. Otherwise (and for DoRA, whose row scale can be anything) the
        merged weight is computed and checked.
        """
        weight = self.base_weight
        if self.use_dora.get(name):
            target = weight.detach().to(self._delta_dtype(name), copy=True).contiguous()
            self._dora_fold(name, target)
            if not torch.isfinite(target.to(weight.dtype)).all():
                raise MergeError(
                    f"Merging DoRA adapter {name!r} would write NaN or inf into a {weight.dtype} weight of shape "
                    f"{tuple(weight.shape)}: its magnitude or factors are not finite, or a row of W + s*B@A has "
                    "norm zero. Inspect the adapter's weights."
                )
            return
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
        for name in names:
            if self.merge_refusal(name):
                raise MergeError(self.merge_refusal(name))
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

    def merge_requantized(self, names: Iterable[str]) -> tuple[float, float]:
        """Merge adapters into a quantized base: dequantize, add ``s * B @ A`` in float32, quantize again.

        The quantized weight before is kept, so :meth:`unmerge` restores it exactly. Returns the
        Frobenius norms ``(||Q(W + dW) - (W + dW)||, ||dW||)``: what re-quantizing lost, against the update.
        """
        names = [n for n in names if n not in self.merged_adapters]
        kind = quantized_kind(self.base_layer)
        if kind is None or kind.requantize is None:
            raise MergeError(f"{kind.name if kind else 'A float'} base: no quantized format to re-quantize into.")
        if not names:
            return 0.0, 0.0
        with torch.no_grad():
            merged = kind.dequantize(self.base_layer).float()
            delta = sum(self.delta_weight(n).float() for n in names)
            merged += delta
            self.__dict__.setdefault("_quantized_before_merge", kind.snapshot(self.base_layer))
            self.base_layer.weight = kind.requantize(self.base_layer, merged)
            lost = torch.linalg.vector_norm(kind.dequantize(self.base_layer).float() - merged).item()
        self.merged_adapters.extend(names)
        self._refresh_running()
        return lost, torch.linalg.vector_norm(delta).item()

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first, in float32 (float64 where W or the adapter is).
        A quantized base merged with re-quantization gets its quantized weight from before back, exactly."""
        if "_quantized_before_merge" in self.__dict__:
            quantized_kind(self.base_layer).restore(self.base_layer, self.__dict__.pop("_quantized_before_merge"))
            self.merged_adapters.clear()
            self._refresh_running()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self._add_delta(name, -1.0)
        self._refresh_running()

    def _add_delta(self, name: str, sign: float) -> None:
        if self.use_dora.get(name):
            self._dora_merge(name) if sign > 0 else self._dora_unmerge(name)
            return
        self._add_lora_delta(name, sign)
        lora_bias = self._lora_bias(name)
        if lora_bias is not None:  # bias += sign * s * b_B, in the merge dtype, rounded once
            bias = self.bias
            target = bias if bias.dtype == self._delta_dtype(name) else bias.to(self._delta_dtype(name))
            target.add_(lora_bias.detach().to(target.dtype), alpha=sign * self.scaling[name])
            if target is not bias:
                bias.copy_(target)

    def _dora_merge(self, name: str) -> None:
        """``W = g * (W + s * dW)``, in float32 (float64 where W or the adapter is), cast to W's dtype once."""
        with self._weight_in_merge_dtype(name) as target:
            self._dora_merged[name] = self._dora_fold(name, target)

    def _dora_unmerge(self, name: str) -> None:
        """``W = W / g - s * dW`` with the g of the merge (PEFT's unmerge), in the merge dtype."""
        with self._weight_in_merge_dtype(name) as target:
            self._dora_rows(target).div_(self._dora_merged.pop(name)[:, None])
            left, right = self._delta_factors(name, target.dtype)
            target.view(left.shape[0], -1).addmm_(left, right, alpha=-self.scaling[name])

    @contextlib.contextmanager
    def _weight_in_merge_dtype(self, name: str):
        """The base weight to edit in place in :meth:`_delta_dtype`: itself where it already is a contiguous
        plain tensor of that dtype, else a widened copy written back (rounded once) when the block ends."""
        weight = self.base_weight
        dtype = self._delta_dtype(name)
        plain = weight.dtype == dtype and weight.is_contiguous() and type(weight) in (nn.Parameter, torch.Tensor)
        target = weight if plain else weight.detach().to(dtype, copy=True).contiguous()
        yield target
        if target is not weight:
            weight.copy_(target)

    def _add_lora_delta(self, name: str, sign: float) -> None:
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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for cache in ("_frozen", "_dora_squared", "_dora_kept", "_dora_fast", "_dora_nonzero", "_stack", "_routed"):
            state.pop(cache, None)  # derived caches
        state["_routing"] = None
        return state

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"adapters=({ranks}), active={list(self.active_adapters)}, merged={self.merged_adapters}"


_GEMM_MERGE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _not_a_tensor(module: nn.Module, result: object) -> str:
    kind = type(module)
    return (
        f"{kind.__module__}.{kind.__qualname__} returns a {type(result).__name__}, not a tensor, so a LoRA cannot be "
        "added to its output (it subclasses a layer type but computes more, like a router returning logits and "
        "indices). Adapt its weight instead: target_parameters=['<name>.weight'], and leave it out of targets."
    )


def merge_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Where a merge computes ``W + scale * B @ A``: float32, or float64 if any of ``dtypes`` is
    (never narrower than the weight or the adapter; PEFT merges float64 in float64 too)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def apply_keeping_float32(module: nn.Module, params: list[torch.Tensor], fn, recurse: bool = True):
    """``nn.Module._apply`` that moves ``params`` (and their gradients) as ``fn`` asks but never narrows them
    to float16/bfloat16: float32 master weights of adapters survive ``.half()``/``.bfloat16()``/``.to(dtype)``."""
    keep = {id(t) for p in params for t in (p, p.grad) if t is not None}
    if not keep:
        return nn.Module._apply(module, fn, recurse)

    def keep_float32(t: torch.Tensor) -> torch.Tensor:
        if id(t) in keep:
            target = fn(t.new_empty(0))  # where and in which dtype fn would put t, without rounding it
            if target.dtype in (torch.float16, torch.bfloat16):
                return t.to(device=target.device)
        return fn(t)

    return nn.Module._apply(module, keep_float32, recurse)


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
