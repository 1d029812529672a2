"""Every error lora_inject raises, in one place.

Each message says what was expected, what was found, and what to do about it.
All of them derive from :class:`LoraInjectError`, so ``except LoraInjectError``
catches anything this library refuses to do.
"""

from __future__ import annotations

from collections.abc import Iterable


class LoraInjectError(Exception):
    """Base class of every error raised by lora_inject."""


class ConfigError(LoraInjectError, ValueError):
    """A configuration value is out of range or inconsistent."""


class TargetNotFoundError(LoraInjectError, ValueError):
    """A target spec matched no module of the model."""


class UnsupportedModuleError(LoraInjectError, TypeError):
    """A matched module has a type that no LoRA wrapper is registered for."""


class AdapterExistsError(LoraInjectError, ValueError):
    """An adapter of this name is already injected."""


class AdapterNotFoundError(LoraInjectError, KeyError):
    """No adapter of this name is injected."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class PatternTimeoutError(LoraInjectError, ValueError):
    """A regular expression took too long to match (likely catastrophic backtracking)."""


class MergeError(LoraInjectError, RuntimeError):
    """A merge would produce non-finite weights or cannot be done for this layer."""


class AdapterFileError(LoraInjectError, ValueError):
    """An adapter folder or file is unreadable, corrupt, or does not fit the model."""


class ExportError(LoraInjectError, ValueError):
    """An adapter holds something the export format cannot express (or the base is not one the format knows)."""


class ConcurrencyError(LoraInjectError, RuntimeError):
    """Two threads asked for changes of one model that would wait for each other forever."""


class DistributedError(LoraInjectError, RuntimeError):
    """The model is wrapped or sharded in a way that makes the operation unsafe, or a
    collective step (such as saving from rank 0) failed on another rank."""


def preview(items: Iterable[object], limit: int = 5) -> str:
    """Show the first ``limit`` items and how many there are in all, for error messages."""
    items = sorted(str(i) for i in items)
    shown = ", ".join(items[:limit])
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return shown + more
