"""`ModulesToSave`: a module trained in full, one copy per adapter (PEFT's layout and key names)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterExistsError, AdapterNotFoundError
from ..threads import view_of
from .base import StandsIn


class ModulesToSave(StandsIn):
    """Holds the untouched ``original_module`` and a trainable copy per adapter in ``modules_to_save``.

    Forward runs the active adapter's copy, or the original when none is active.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.__dict__.update(active_adapter=None, adapters_disabled=False, _routing=None)

    _per_thread_fields = ("active_adapter", "adapters_disabled", "_routing")

    @property
    def active_adapter(self) -> str | None:
        """The adapter whose copy runs, as this thread sees it (a block's first adapter this module has)."""
        view = view_of(self)
        if view is not None and view.active is not None:
            return next((n for n in view.active if n in self.modules_to_save), None)
        return self.__dict__["active_adapter"]

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self.__dict__["active_adapter"] = name

    @property
    def base_layer(self) -> nn.Module:
        """The module this wrapper stands in for (every adapter-holding module has one)."""
        return self.original_module

    def set_base_layer(self, module: nn.Module) -> None:
        self.original_module = module

    def unwrapped(self, keep_merged: bool) -> nn.Module:
        """The module to put back: the active trained copy when merging, else the untouched original."""
        use_copy = keep_merged and self.active_adapter is not None and not self.adapters_disabled
        return self.modules_to_save[self.active_adapter] if use_copy else self.original_module

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are the running module's (the active trained copy, else the original),
        as PEFT's wrapper answers them: ``model.score.bias`` is the bias that runs."""
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save"):
                raise
            running = self.active_adapter is not None and not self.adapters_disabled
            return getattr(self.modules_to_save[self.active_adapter] if running else self.original_module, name)

    @property
    def weight(self) -> torch.Tensor:
        """The running module's weight (the active copy, else the original), for code written for the plain
        module (``get_input_embeddings().weight``), as PEFT's wrapper gives it."""
        running = self.active_adapter is not None and not self.adapters_disabled
        return (self.modules_to_save[self.active_adapter] if running else self.original_module).weight

    merged_adapters: tuple[str, ...] = ()  # a trained copy replaces the module; nothing is ever merged
    merges_into_base = False
    tied_to = None

    def merge_refusal(self, name: str | None = None) -> None:
        return None

    def check_merge(self, name: str) -> None:
        """The copy is used as it is; nothing is computed at merge."""

    def merge(self, names) -> None:
        """Nothing to fold in: the trained copy runs as it is (and replaces the original at unload)."""

    def unmerge(self) -> None:
        """Nothing was merged."""

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return () if self.active_adapter is None else (self.active_adapter,)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise AdapterExistsError(f"Adapter {name!r} already has a trainable copy of this module.")
        self.original_module.requires_grad_(False)
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name not in self.modules_to_save:
            raise AdapterNotFoundError(f"No adapter {name!r} on this module.")
        del self.modules_to_save[name]
        if self.__dict__["active_adapter"] == name:
            self.active_adapter = None

    def containers(self, name: str) -> tuple[str, ...]:
        """Where adapter ``name``'s tensors live in the state dict: ``modules_to_save.<name>.*``."""
        return ("modules_to_save",)

    def adapter_parameters(self, name: str):
        return self.modules_to_save[name].parameters()

    def set_active(self, names, trainable: bool = True) -> None:
        names = [n for n in names if n in self.modules_to_save]
        active = self.active_adapter = names[0] if names else None
        if trainable:
            for name, module in self.modules_to_save.items():
                module.requires_grad_(name == active)

    def follow_base_resize(self) -> None:
        """``original_module`` was resized in place (``resize_token_embeddings``): each trained copy keeps its
        own rows and takes the new rows from the resized original (as transformers initialised them)."""
        original = self.original_module
        for module in self.modules_to_save.values():
            for name, source in original.named_parameters(recurse=False):
                mine = getattr(module, name)
                if mine.shape == source.shape:
                    continue
                new = source.detach().clone()
                overlap = tuple(slice(0, min(a, b)) for a, b in zip(mine.shape, source.shape))
                new[overlap] = mine.detach()[overlap]
                mine.data = new.to(mine.dtype)
            for attr in ("num_embeddings", "out_features", "padding_idx"):
                if hasattr(original, attr):
                    setattr(module, attr, getattr(original, attr))

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = disabled

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self._routing is not None:
            return self._routed_forward(*args, **kwargs)
        if self.active_adapter is None or self.adapters_disabled:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row (dim 0) through its adapter's trained copy; rows of other adapters through the original."""
        out = self.original_module(x, *args, **kwargs)
        group = self._routing.rows(x.shape[0], x.device)
        for g, name in enumerate(self._routing.distinct):
            rows = (group == g).nonzero().flatten()
            if name in self.modules_to_save and rows.numel():
                out = out.index_copy(0, rows, self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs))
        return out
