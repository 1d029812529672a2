"""Many adapters in one batch: each row of the batch runs its own adapter (or the base model).

``with batch_adapters(model, ["a", "b", None, "a"]):`` routes row i through adapter ``names[i]``.
The routing is a state of the model for the length of the block: rows are grouped once per batch
shape (here, shared by every layer, and by every decoding step of ``generate``), and each layer
runs all adapters at once with a grouped matmul over its stacked factors (see ``layers/base.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterNotFoundError, ConfigError, MergeError
from ..guards import unwrap
from ..inject import _STATE_ATTR, locked_for_block, needs_model_wide_block, using_adapter
from ..threads import keep_recent, opened


class Routing:
    """Which adapter each row runs: ``distinct`` names (their order is the group order) and, per batch
    shape, the group of every row and token, computed once and shared by every layer."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self.distinct = tuple(dict.fromkeys(n for n in self.names if n is not None))
        group = {name: i for i, name in enumerate(self.distinct)}
        base = len(self.distinct)  # rows without an adapter: the last group, whose factors are zero
        self._slots = torch.tensor([base if n is None else group[n] for n in self.names], dtype=torch.long)
        self._rows: dict = {}
        self._tokens: dict = {}

    def rows(self, count: int, device: torch.device) -> torch.Tensor:
        """The group of each of ``count`` rows (long, (count,)). A batch of k times as many rows as names is
        the names' rows each repeated k times in place (``generate`` with beams or several sequences)."""
        key = (count, device)
        if key not in self._rows:
            if count % len(self.names):
                raise ConfigError(
                    f"batch_adapters got {len(self.names)} adapter names, but a layer sees a batch of {count} rows, "
                    f"which is not a multiple of it. Give one name per row of the input (generate's beams and "
                    "num_return_sequences are expanded by themselves)."
                )
            self._rows[key] = self._slots.repeat_interleave(count // len(self.names)).to(device)
        return self._rows[key]

    def tokens(self, rows: int, per_row: int, device: torch.device) -> TokenGroups:
        """How the ``rows * per_row`` tokens (row-major) split among the adapters; computed once per shape."""
        key = (rows, per_row, device)
        if key not in self._tokens:
            self._tokens[key] = TokenGroups(self.rows(rows, device).repeat_interleave(per_row), len(self.distinct) + 1)
        return self._tokens[key]


class TokenGroups:
    """Tokens grouped by adapter, in the two layouts the layers compute with.

    ``group`` (M,): each token's group. Padded layout, used when it wastes little: token i sits at row
    ``pos[i]`` of a (G, per_group, features) buffer, so one batched matmul per factor serves every adapter.
    Sorted layout otherwise: ``order`` sorts tokens by group and ``ends`` (G,) int32 are the groups' end
    offsets, as ``grouped_mm`` takes them.
    """

    def __init__(self, group: torch.Tensor, groups: int) -> None:
        self.group, self.groups = group, groups
        counts = torch.bincount(group, minlength=groups)
        self.order = torch.argsort(group, stable=True)
        self.ends = torch.cumsum(counts, 0).to(torch.int32)
        self.per_group = int(counts.max())
        self.pos = None
        if groups * self.per_group <= 2 * group.numel():
            starts = self.ends.long() - counts
            pos = torch.empty_like(group)
            sorted_group = group[self.order]
            pos[self.order] = sorted_group * self.per_group + torch.arange(group.numel(), device=group.device) - starts[
                sorted_group]
            self.pos = pos


def _check_names(model: nn.Module, names: Sequence[str | None]) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(f"batch_adapters takes one adapter name (or None) per row, as a list; got {names!r}.")
    known = getattr(model, _STATE_ATTR, {})
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise AdapterNotFoundError(
            f"batch_adapters: no adapter named {unknown} in this model; it has {sorted(known) or 'none'}."
        )


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch runs adapter ``names[i]`` (``None``: the base model).

    Works for ``forward`` and ``generate`` (beams and ``num_return_sequences`` expand rows; each row
    keeps its name). A row whose adapter does not adapt a layer uses the base there. Adapters must not
    be merged, nor disabled. For the thread that entered the block only (other threads' forwards keep
    their own adapters); on exit the thread sees the model's adapters again, also when the block raises.
    """
    inner = unwrap(model)
    _check_names(inner, names)
    with locked_for_block(inner, lambda modules: needs_model_wide_block(inner)) as (modules, model_wide):
        _check_names(inner, names)
        merged = sorted({n for m in modules for n in m.merged_adapters})
        if merged:
            raise MergeError(f"batch_adapters: adapters {merged} are merged into the weights; unmerge them first.")
        if any(m.adapters_disabled for m in modules):
            raise ConfigError("batch_adapters inside disabled_adapters: the adapters are off, so the names would be "
                              "ignored. Use None for the rows that should run the base model.")
        if any(m._routing is not None for m in modules):
            raise ConfigError("batch_adapters blocks do not nest; leave the outer one first.")
        if len(set(names)) == 1:  # one adapter (or the base) for every row: the ordinary path is the fastest
            with using_adapter(model, names[0]):
                yield model
            return
        routing = _routing_for(inner, names)
        if model_wide:
            with _routed_model_wide(modules, routing):
                yield model
        else:
            with opened(inner, modules, routing=routing):
                yield model


@contextlib.contextmanager
def _routed_model_wide(modules: list[nn.Module], routing: Routing) -> Iterator[None]:
    try:
        for module in modules:
            module.__dict__["_routing"] = routing
        yield
    finally:
        for module in modules:
            module.__dict__["_routing"] = None


_ROUTINGS = "_lora_inject_routings"
_KEPT_ROUTINGS = 8


def _routing_for(model: nn.Module, names: Sequence[str | None]) -> Routing:
    """The :class:`Routing` of ``names``, the same object for a batch composition seen recently: a server
    that sends the same mix again (or drives decoding step by step) re-uses its grouping, and each layer its
    factors gathered for it, instead of gathering them again."""
    kept = model.__dict__.setdefault(_ROUTINGS, {})
    key = tuple(names)
    routing = kept.pop(key, None) or Routing(names)
    kept[key] = routing  # most recent last
    keep_recent(kept, _KEPT_ROUTINGS)
    return routing

