"""Trainable tokens: only chosen rows of an embedding (and of a head tied to it) train.

PEFT's ``trainable_token_indices``. Per adapter the wrapper holds the *new values* of the chosen
rows, ``trainable_tokens_delta[name]`` (n_ids, D), in the order of the ids (PEFT's name and layout;
the ids themselves live only in the config). Forward never rebuilds the (V, D) weight as PEFT
does on every call: an embedding swaps the looked-up vectors of those ids, a head (Linear, weight
rows = output features) recomputes only their n output columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterExistsError, AdapterNotFoundError, MergeError
from ..threads import per_thread
from .base import StandsIn, apply_keeping_float32, default_adapter_dtype


class TokenRows(nn.Module):
    """PEFT's ``token_adapter``: the frozen base layer plus, per adapter, the trained rows and their ids.

    A head tied to the embedding gets its own ``TokenRows`` around its own base layer that shares the
    embedding's ``trainable_tokens_delta`` and ids: the same rows, one set of parameters.
    """

    def __init__(self, base_layer: nn.Module, shared: TokenRows | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict() if shared is None else shared.trainable_tokens_delta
        self.token_ids = _IdBuffers() if shared is None else shared.token_ids


class _IdBuffers(nn.Module):
    """Token ids per adapter as non-persistent int64 buffers: they follow ``.to(device)``, never a state dict."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers


def _lookup_rows(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor):
    """Embedding: where ``x`` is one of ``ids``, the output vector is that id's trained row.

    x (...) token ids; out (..., D); ids (n,); rows (n, D). Costs one gather of (..., D), not (V, D).
    """
    sorted_ids, order = ids.sort()
    pos = torch.searchsorted(sorted_ids.to(x.dtype), x).clamp_(max=ids.numel() - 1)
    hit = sorted_ids[pos] == x
    values = rows[order[pos]]  # (..., D)
    padding = layer.padding_idx
    if padding is not None:  # as F.embedding: the padding row gets no gradient
        values = torch.where((x == padding).unsqueeze(-1), values.detach(), values)
    scale = getattr(layer, "embed_scale", None)  # scaled embeddings (Gemma) scale every looked-up row
    if scale is not None:
        values = values * (scale.to(values.dtype) if torch.is_tensor(scale) else scale)
    return torch.where(hit.unsqueeze(-1), values.to(out.dtype), out)


def _project_rows(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor):
    """Linear head (weight (V, D), rows = output features): recompute the n output columns of ``ids``.

    x (..., D); out (..., V); rows (n, D). Costs (..., n) extra products and one copy of ``out``.
    """
    bias = layer.bias[ids] if layer.bias is not None else None
    columns = F.linear(x, rows.to(x.dtype), None if bias is None else bias.to(x.dtype))  # (..., n)
    return out.index_copy(out.dim() - 1, ids, columns.to(out.dtype))


# how each base type uses a row of its weight; the first type in a module's MRO decides
ROW_KINDS = {nn.Embedding: _lookup_rows, nn.Linear: _project_rows}


def row_kind(module: nn.Module):
    """The row function for ``module``'s type, or None when its weight rows are not per token."""
    return next((ROW_KINDS[k] for k in type(module).__mro__ if k in ROW_KINDS), None)


class TrainableTokens(StandsIn):
    """Stands in for an Embedding (or a Linear head) whose rows for some token ids train.

    ``forward(x) = base_layer(x)`` with the rows of the running adapters' ids replaced by their
    trained values. ``tied_to``: the wrapper of the embedding whose weight this head shares; the
    two then share the trained rows, and only the embedding's are saved and merged.
    """

    active_adapters = per_thread("active_adapters", "active")

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokens | None = None) -> None:
        super().__init__()
        self.token_adapter = TokenRows(base_layer, None if tied_to is None else tied_to.token_adapter)
        self.__dict__.update(
            _rows_of=row_kind(base_layer),
            _tied_to=tied_to,  # in __dict__, not a submodule: no second path to the embedding
            active_adapters=(),
            adapters_disabled=False,
            _routing=None,
            _own_merged=[],
            _rows_before_merge={},  # adapter -> the base rows its merge overwrote, to unmerge exactly
        )

    # ----- the module it stands in for ------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    def set_base_layer(self, module: nn.Module) -> None:
        self.token_adapter.base_layer = module

    @property
    def weight(self) -> torch.Tensor:
        """The running weight (base with the running adapters' rows), for code that reads ``.weight``
        of the plain module; a fresh tensor, as PEFT's wrapper gives it."""
        weight = self.base_layer.weight
        for name in self._running():
            weight = weight.index_copy(0, self.ids(name), self.rows(name).to(weight.dtype))
        return weight

    @property
    def tied_to(self) -> TrainableTokens | None:
        return self._tied_to

    @property
    def merged_adapters(self) -> list[str]:
        return self._tied_to.merged_adapters if self._tied_to is not None else self._own_merged

    # ----- adapters --------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_adapter.trainable_tokens_delta)

    def ids(self, name: str) -> torch.Tensor:
        return self.token_adapter.token_ids[name]

    def rows(self, name: str) -> nn.Parameter:
        return self.token_adapter.trainable_tokens_delta[name]

    def add_adapter(self, name: str, ids: Sequence[int], dtype: torch.dtype | None = None) -> None:
        """Adapter ``name`` trains the rows ``ids``, starting from their current values (so the model
        starts unchanged). A tied head only follows its embedding: nothing to create."""
        if self._tied_to is not None:
            return
        if name in self.token_adapter.trainable_tokens_delta:
            raise AdapterExistsError(f"Adapter {name!r} already has trainable tokens on this module.")
        weight = self.base_layer.weight
        index = torch.tensor(list(ids), dtype=torch.long, device=weight.device)
        self.token_adapter.token_ids.register_buffer(name, index, persistent=False)
        rows = weight.detach()[index] if weight.device.type != "meta" else weight.new_empty(len(index), weight.shape[1])
        dtype = dtype or default_adapter_dtype(weight.dtype)
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(rows.to(dtype).clone())

    def reset_adapter(self, name: str) -> None:
        """Start ``name``'s rows again from the base weight's current rows (after building on meta)."""
        if self._tied_to is None:
            with torch.no_grad():
                self.rows(name).copy_(self.base_layer.weight[self.ids(name)])

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapter_names:
            raise AdapterNotFoundError(f"No adapter {name!r} on this module.")
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into this weight; unmerge it before deleting it.")
        if self._tied_to is None:
            del self.token_adapter.trainable_tokens_delta[name]
            del self.token_adapter.token_ids._buffers[name]
        self.active_adapters = tuple(n for n in self.__dict__["active_adapters"] if n != name)

    def containers(self, name: str) -> tuple[str, ...]:
        """Where ``name``'s tensors live in the state dict; a tied head keeps none of its own (the
        embedding's rows are saved once, as PEFT does)."""
        return () if self._tied_to is not None else ("token_adapter.trainable_tokens_delta",)

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        return [self.rows(name)] if self._tied_to is None else []

    def set_active(self, names: Iterable[str], trainable: bool = True) -> None:
        names = [n for n in names if n in self.adapter_names]
        self._check_disjoint(names)
        self.active_adapters = tuple(names)
        if trainable:
            for name, rows in self.token_adapter.trainable_tokens_delta.items():
                rows.requires_grad_(name in names)

    def prepare_active(self, names: Sequence[str]) -> None:
        self._check_disjoint([n for n in names if n in self.adapter_names])

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = disabled

    def follow_base_resize(self) -> None:
        """The vocabulary grew or shrank: the trained rows stay as they are (ids beyond it are refused)."""
        rows = self.base_layer.weight.shape[0]
        for name in self.adapter_names:
            if int(self.ids(name).max()) >= rows:
                raise MergeError(f"Adapter {name!r} trains token ids up to {int(self.ids(name).max())}, beyond the "
                                 f"new vocabulary of {rows}: resize to at least {int(self.ids(name).max()) + 1}.")

    def _check_disjoint(self, names: Sequence[str]) -> None:
        """Two adapters giving one token two values is undefined (PEFT refuses it too)."""
        seen: dict[int, str] = {}
        for name in dict.fromkeys([*self.merged_adapters, *names]):
            for token in self.ids(name).tolist():
                if token in seen and seen[token] != name:
                    raise MergeError(
                        f"Adapters {seen[token]!r} and {name!r} both train token {token} of this module; only one "
                        "value can be used. Activate or merge one of them at a time."
                    )
                seen[token] = name

    # ----- forward ---------------------------------------------------------------------------
    def _running(self) -> list[str]:
        if self.adapters_disabled:
            return []
        deltas, merged = self.token_adapter.trainable_tokens_delta, self.merged_adapters
        return [n for n in self.active_adapters if n in deltas and n not in merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._routed_rows(x, out)
        for name in self._running():
            out = self._rows_of(self.base_layer, x, out, self.ids(name), self.rows(name))
        return out

    def _routed_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each batch row with its own adapter's token rows (rows of other adapters keep the base's)."""
        group = self._routing.rows(x.shape[0], x.device)
        for g, name in enumerate(self._routing.distinct):
            rows = (group == g).nonzero().flatten()
            if name in self.token_adapter.trainable_tokens_delta and rows.numel():
                part = self._rows_of(self.base_layer, x.index_select(0, rows), out.index_select(0, rows),
                                     self.ids(name), self.rows(name))
                out = out.index_copy(0, rows, part)
        return out

    def _apply(self, fn, recurse: bool = True):
        """``.half()``/``.bfloat16()`` convert the base but keep float32 trained rows float32 (see LoraLayer)."""
        rows = [p for p in self.token_adapter.trainable_tokens_delta.values() if p.dtype == torch.float32]
        return apply_keeping_float32(self, rows, fn, recurse)

    # ----- merge -----------------------------------------------------------------------------
    merges_into_base = True

    def merge_refusal(self, name: str | None = None) -> None:
        return None

    def check_merge(self, name: str) -> None:
        if not torch.isfinite(self.rows(name)).all():
            raise MergeError(f"Adapter {name!r} has NaN or inf in its trainable token rows; nothing was merged.")

    def merge(self, names: Iterable[str]) -> None:
        """Write the rows into the base weight (shared with a tied head, which therefore follows)."""
        names = [n for n in names if n in self.adapter_names and n not in self.merged_adapters]
        if self._tied_to is not None or not names:
            return
        self._check_disjoint(names)
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in names:
                ids = self.ids(name)
                self._rows_before_merge[name] = weight[ids].clone()
                weight.index_copy_(0, ids, self.rows(name).to(weight.dtype))
                self._own_merged.append(name)

    def unmerge(self) -> None:
        if self._tied_to is not None:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            while self._own_merged:
                name = self._own_merged.pop()
                weight.index_copy_(0, self.ids(name), self._rows_before_merge.pop(name))

    def unwrapped(self, keep_merged: bool) -> nn.Module:
        """The base module to put back (merged adapters are kept or undone as asked)."""
        if not keep_merged:
            self.unmerge()
        return self.base_layer
