"""Which module paths a target spec selects, and why a target missed.

Pure logic over dotted paths (``model.layers.3.self_attn.q_proj``) and module
types; no model surgery happens here.

Semantics (the same as PEFT's list form, so adapter configs mean the same thing):

* a plain name matches a path equal to it or ending with ``.name``;
  ``"q_proj"`` matches ``layers.0.self_attn.q_proj`` but ``"q"`` does not;
* ``"re:<pattern>"`` or a compiled pattern is full-matched against the whole path,
  with the ``regex`` package and a timeout, since patterns may come from files;
* a module type matches instances of it (subclasses too);
* ``"all-linear"`` matches every Linear and transformers ``Conv1D`` except the output head.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import regex
from torch import nn

from ..errors import ConfigError, PatternTimeoutError

REGEX_PREFIX = "re:"
ALL_LINEAR = "all-linear"
REGEX_TIMEOUT_S = 0.5

TargetSpec = Union[str, type, "re.Pattern[str]", "regex.Pattern"]


PATTERN_BUDGET_S = 2.0  # all the patterns of one call (inject, load) together: many slow ones add up
_budget = threading.local()


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str, flags: int = 0) -> regex.Pattern:
    try:
        return regex.compile(pattern, flags)
    except (regex.error, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"Invalid regular expression {str(pattern)[:200]!r}: {exc}.") from None


_compile = compile_pattern


@contextlib.contextmanager
def pattern_budget(seconds: float = PATTERN_BUDGET_S) -> Iterator[None]:
    """Bound the time every pattern match inside the block takes together (nested blocks share the outer one)."""
    if getattr(_budget, "deadline", None) is not None:
        yield
        return
    _budget.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _budget.deadline = None


def _timed(call, pattern: str, path: str):
    deadline = getattr(_budget, "deadline", None)
    timeout = REGEX_TIMEOUT_S if deadline is None else min(REGEX_TIMEOUT_S, deadline - time.monotonic())
    if timeout <= 0:
        raise PatternTimeoutError(
            f"The patterns of this config took over {PATTERN_BUDGET_S}s in all (the last: {str(pattern)[:80]!r}): "
            "slow patterns add up. List module names instead of patterns, or simplify them."
        )
    try:
        return call(path, timeout=timeout)
    except TimeoutError as exc:
        raise PatternTimeoutError(
            f"The pattern {str(pattern)[:200]!r} took over {timeout:.2f}s to match {path!r}: it backtracks "
            "catastrophically (nested quantifiers such as '(a+)+'), or the patterns of this call ran out of their "
            f"{PATTERN_BUDGET_S}s together. Rewrite it without nested repetition, or list the module names instead."
        ) from exc


@dataclass(frozen=True)
class NameTarget:
    """Exact path or dotted-suffix match."""

    name: str

    def matches(self, path: str, module: nn.Module) -> bool:
        return path == self.name or path.endswith("." + self.name)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class RegexTarget:
    """Full match of a regular expression against the whole dotted path."""

    compiled: regex.Pattern

    @classmethod
    def from_string(cls, pattern: str, flags: int = 0) -> RegexTarget:
        return cls(_compile(pattern, flags))

    @property
    def pattern(self) -> str:
        return self.compiled.pattern

    def matches(self, path: str, module: nn.Module) -> bool:
        return _timed(self.compiled.fullmatch, self.pattern, path) is not None

    def __str__(self) -> str:
        return REGEX_PREFIX + self.pattern


@dataclass(frozen=True)
class TypeTarget:
    """Every instance of a module type."""

    module_type: type

    def matches(self, path: str, module: nn.Module) -> bool:
        return isinstance(module, self.module_type)

    def __str__(self) -> str:
        return self.module_type.__name__


@dataclass(frozen=True)
class AllLinearTarget:
    """Every Linear-like layer except the output head (whose paths are given)."""

    head_paths: frozenset[str] = frozenset()

    def matches(self, path: str, module: nn.Module) -> bool:
        return is_linear_like(module) and path not in self.head_paths

    def __str__(self) -> str:
        return ALL_LINEAR


Target = Union[NameTarget, RegexTarget, TypeTarget, AllLinearTarget]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2's Linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def parse_target(spec: TargetSpec) -> Target:
    """Turn one user-facing spec into a matcher."""
    if isinstance(spec, (NameTarget, RegexTarget, TypeTarget, AllLinearTarget)):
        return spec
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return TypeTarget(spec)
    if isinstance(spec, (re.Pattern, regex.Pattern)):
        return RegexTarget.from_string(spec.pattern, spec.flags & ~re.UNICODE)
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return AllLinearTarget()
        if spec.startswith(REGEX_PREFIX):
            return RegexTarget.from_string(spec[len(REGEX_PREFIX):])
        if not spec or spec.strip() != spec:
            raise ConfigError(f"A target name must be a non-empty string without spaces; got {spec!r}.")
        return NameTarget(spec)
    raise ConfigError(
        f"A target must be a module name, 're:<regex>', a compiled pattern, an nn.Module type or "
        f"'all-linear'; got {spec!r} ({type(spec).__name__})."
    )


def parse_targets(specs: TargetSpec | Sequence[TargetSpec] | None) -> list[Target]:
    """A list of matchers from a single spec, a list of specs, or None (empty)."""
    if specs is None:
        return []
    if isinstance(specs, (str, type, re.Pattern, regex.Pattern)):
        specs = [specs]
    targets = [parse_target(s) for s in specs]
    if not targets:
        raise ConfigError("targets is empty: name at least one module, type or pattern.")
    return targets


def with_head(targets: list[Target], head_paths: Iterable[str]) -> list[Target]:
    """Tell any ``all-linear`` target which paths are the output head."""
    heads = frozenset(head_paths)
    return [AllLinearTarget(heads) if isinstance(t, AllLinearTarget) else t for t in targets]


_FIRST_LAYER_INDEX = regex.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def layer_index(path: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index of a path: the first numbered segment (after ``layers_pattern`` if given).

    ``model.layers.3.mlp.experts.0.up`` is in layer 3, not 0.
    """
    if not layers_pattern:
        match = _FIRST_LAYER_INDEX.match(path)
    else:
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for name in names:
            match = _timed(compile_pattern(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.").match, name, path)
            if match:
                break
    return int(match.group("idx")) if match else None


_REGEX_SYNTAX = frozenset("\\^$|?*+()[]{}")  # "." aside: module names are full of dots


class _PatternTable:
    """The keys of a rank/alpha pattern dict, ready to match paths with PEFT's rule ``(.*\\.)?(key)$``.

    Most keys are module names (``"q_proj"``, ``"model.layers.3.mlp.down_proj"``): their only regex syntax is
    ``.``, which matches any character. Such keys are grouped by length and dot positions; a path matches one when
    its tail of that length, at a dot boundary, equals the key once the characters at the key's dots are read as
    dots: a dictionary lookup per group instead of a regex per key. The other keys run as timed regexes.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.groups: dict[tuple[int, tuple[int, ...]], dict[str, int]] = {}
        self.regexes = []
        for index, key in enumerate(keys):
            if _REGEX_SYNTAX & set(key) or not key:
                self.regexes.append((index, key, compile_pattern(rf"(.*\.)?({key})$")))
            else:
                dots = tuple(i for i, c in enumerate(key) if c == ".")
                self.groups.setdefault((len(key), dots), {}).setdefault(key, index)

    def first_match(self, path: str) -> str | None:
        found = len(self.keys)
        for (length, dots), members in self.groups.items():
            start = len(path) - length
            if start < 0 or (start and path[start - 1] != "."):
                continue
            tail = path[start:]
            if dots and any(tail[d] != "." for d in dots):
                chars = list(tail)
                for d in dots:
                    chars[d] = "."
                tail = "".join(chars)
            index = members.get(tail)
            if index is not None and index < found:
                found = index
        for index, key, compiled in self.regexes:
            if index >= found:
                break
            if _timed(compiled.match, key, path):
                return key
        return None if found == len(self.keys) else self.keys[found]


@functools.lru_cache(maxsize=64)
def _table(keys: tuple[str, ...]) -> _PatternTable:
    return _PatternTable(keys)


def first_pattern_match(patterns: Mapping[str, object], path: str) -> str | None:
    """The first key of ``patterns`` that matches ``path`` as ``(.*\\.)?(key)$`` (PEFT's rule)."""
    if not patterns:
        return None
    return _table(tuple(patterns)).first_match(path)


class _TargetIndex:
    """Targets ready to match many paths: names (path equal to, or ending with ``.name``) and escaped literal
    regexes (one exact path, as :func:`lora_inject.config.exact_config` writes them) by dictionary lookup, the
    others one by one. A loaded adapter names hundreds of exact paths; testing each against every module cost
    seconds."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.names: dict[str, list[Target]] = {}
        self.paths: dict[str, list[Target]] = {}
        self.others: list[Target] = []
        for target in targets:
            if isinstance(target, NameTarget):
                self.names.setdefault(target.name, []).append(target)
            elif isinstance(target, RegexTarget) and (literal := _literal(target)) is not None:
                self.paths.setdefault(literal, []).append(target)
            else:
                self.others.append(target)

    def matching(self, path: str, module: nn.Module) -> list[Target]:
        found = list(self.paths.get(path, ()))
        if self.names:
            found += self.names.get(path, ())
            start = path.find(".")
            while start >= 0:
                found += self.names.get(path[start + 1:], ())
                start = path.find(".", start + 1)
        return found + [t for t in self.others if t.matches(path, module)]


_ESCAPED = regex.compile(r"\\(.)", regex.DOTALL)


def _literal(target: RegexTarget) -> str | None:
    """The one string a regex full-matches when it is an escaped literal (``re.escape`` output), else None."""
    if target.compiled.flags & (regex.IGNORECASE | regex.VERBOSE):
        return None
    text = _ESCAPED.sub(r"\1", target.pattern)
    return text if re.escape(text) == target.pattern else None


def select(
    named_modules: Iterable[tuple[str, nn.Module]],
    targets: list[Target],
    exclude: list[Target] = (),
    layers: Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> tuple[list[tuple[str, nn.Module]], list[Target], list[Target]]:
    """The modules the targets pick, in model order; the targets that picked nothing; the excludes
    that matched no module at all.

    An exclude entry given by name or type that matches a container (``"mlp"``, ``LlamaMLP``)
    excludes every module under it; a regex exclude is full-matched against each path itself.
    """
    wanted = set(layers) if layers is not None else None
    chosen, hit, exclude_hit = [], set(), set()
    excluded_containers: set[str] = set()
    index = _TargetIndex(targets)
    for path, module in named_modules:
        if not path:
            continue
        excluded_by = [t for t in exclude if t.matches(path, module)]
        exclude_hit.update(excluded_by)
        if any(not isinstance(t, RegexTarget) for t in excluded_by):
            excluded_containers.add(path)
        matched = index.matching(path, module)
        if not matched:
            continue
        hit.update(matched)
        if excluded_by or _inside(path, excluded_containers):
            continue
        if wanted is not None and layer_index(path, layers_pattern) not in wanted:
            continue
        chosen.append((path, module))
    return chosen, [t for t in targets if t not in hit], [t for t in exclude if t not in exclude_hit]


def _inside(path: str, containers: set[str]) -> bool:
    """Whether some ancestor of ``path`` (``a`` and ``a.b`` for ``a.b.c``) is in ``containers``."""
    if not containers:
        return False
    parts = path.split(".")
    return any(".".join(parts[:i]) in containers for i in range(1, len(parts)))


_REGEX_SIGNS = regex.compile(r"\.\*|\.\+|[\\^$|()\[\]{}?*+]")


def _regex_hint(target: Target) -> str:
    """A plain name that looks like a regular expression: plain names match literally."""
    text = str(target)
    if not isinstance(target, NameTarget) or not _REGEX_SIGNS.search(text):
        return ""
    return (f" (it looks like a regular expression, but plain names match literally: write "
            f"{REGEX_PREFIX + text!r} to match it as one against whole paths)")


def explain_misses(missed: list[Target], named_modules: Sequence[tuple[str, nn.Module]]) -> str:
    """For each target that matched nothing, the closest module names and the types present.

    Closest: names that start with or contain the miss (``"q"`` -> ``q_proj``), then
    spelling neighbours (``"q_prj"`` -> ``q_proj``), then whole paths.
    """
    paths = [p for p, _ in named_modules if p]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    types = sorted({type(m).__name__ for _, m in named_modules})
    lines = []
    for target in missed:
        probe = str(target).removeprefix(REGEX_PREFIX)
        leaf = probe.rsplit(".", 1)[-1]
        close = [name for name in leaves if name.startswith(leaf)][:5]
        close += [name for name in leaves if leaf in name and name not in close][: max(0, 5 - len(close))]
        close += difflib.get_close_matches(leaf, leaves, n=5, cutoff=0.5)
        close += difflib.get_close_matches(probe, paths, n=3, cutoff=0.6)
        hint = ", ".join(list(dict.fromkeys(close))[:8]) or "none"
        lines.append(f"  - {str(target)!r} matched nothing; closest names: {hint}{_regex_hint(target)}")
    lines.append(f"  module types present: {', '.join(types)}")
    return "\n".join(lines)
