"""Resolve a config against a model: which modules get which rank, before anything changes."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterExistsError, ConfigError, TargetNotFoundError, UnsupportedModuleError
from ..guards import full_shape
from ..layers import ADAPTER_MODULES, LoraLayer, wrap
from ..layers.parameter import LoraParameter
from ..layers.principal import is_principal_init
from ..quantized.registry import logical_numel, logical_weight_shape, quantized_kind
from .direct_reads import direct_read_reason
from .matching import AllLinearTarget, NameTarget, explain_misses, parse_targets, pattern_budget, select, with_head
from .parameters import resolve_parameters
from .tokens import TokenTarget, resolve_tokens


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """``(path, module, wrapper)`` in model order, seen as if no adapter were injected.

    A module holding adapters (LoRA wrapper, ModulesToSave, TrainableTokens) appears as the module
    it stands in for, with the wrapper alongside, and is not descended into. Shared modules appear once, at their
    first path, as in ``named_modules``.
    """
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, ADAPTER_MODULES):
                base = child.base_layer
                while isinstance(base, ADAPTER_MODULES):  # nested parameter wrappers: the module is innermost
                    base = base.base_layer
                yield path, base, child
            else:
                yield path, child, None
                yield from walk(child, path)

    yield from walk(model, "")


_LAYER_INDEX = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class PlannedLayer:
    """One module that would get adapter weights."""

    path: str
    module_type: str
    weight_shape: tuple[int, ...]
    r: int
    alpha: float
    scale: float
    added_params: int
    quantized: str | None = None  # the base's quantization backend, e.g. "bitsandbytes 4-bit"
    key: str | None = None  # for a parameter target: "<module path>.<parameter>" (path is where its wrapper sits)

    @property
    def name(self) -> str:
        return self.key or self.path


@dataclass
class Plan:
    """The result of resolving a config: layers to wrap and modules to train in full."""

    layers: list[PlannedLayer]
    modules_to_save: list[str]
    model: nn.Module | None
    wrappers: dict[str, LoraLayer]  # path -> wrapper (existing, or new and not yet attached)
    near_misses: str = ""  # for targets that matched nothing (lenient resolution only)
    tokens: list[TokenTarget] = field(default_factory=list)  # trainable token rows, see targeting/tokens.py

    @property
    def model_params(self) -> int:
        """Parameters of the model without any adapter weights (counted when asked: big models)."""
        return 0 if self.model is None else _base_param_count(self.model)

    @property
    def added_params(self) -> int:
        return sum(layer.added_params for layer in self.layers) + sum(t.added_params for t in self.tokens)

    def __str__(self) -> str:
        return self.table(grouped=False)

    def table(self, grouped: bool = True) -> str:
        """A text table of the wrapped modules; ``grouped`` folds layer indices into ``*`` with a count."""
        groups: dict[tuple, list[PlannedLayer]] = {}
        for p in self.layers:
            name = _LAYER_INDEX.sub(".*.", p.name) if grouped else p.name
            kind = f"{p.module_type} ({p.quantized})" if p.quantized else p.module_type
            groups.setdefault((name, kind, p.weight_shape, p.r, p.scale), []).append(p)
        rows = [("module", "count", "type", "weight shape", "r", "scale", "added params")]
        rows += [
            (name, str(len(members)), kind, "x".join(map(str, shape)), str(r), f"{scale:g}",
             f"{sum(m.added_params for m in members):,}")
            for (name, kind, shape, r, scale), members in groups.items()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        share = 100.0 * self.added_params / max(1, self.model_params + self.added_params)
        lines.append(
            f"{len(self.layers)} layers wrapped; adapter parameters {self.added_params:,} "
            f"of {self.model_params + self.added_params:,} total ({share:.4f}%)"
        )
        if self.modules_to_save:
            lines.append(f"trained in full: {', '.join(self.modules_to_save)}")
        for token in self.tokens:
            lines.append(f"trainable tokens: {token.describe()}")
        if self.near_misses:
            lines.append("targets that matched nothing:\n" + self.near_misses)
        return "\n".join(lines)


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head, which 'all-linear' leaves alone (as PEFT does)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    found = {path for path, module, _ in logical_modules(model) if head is not None and module is head}
    return found or {path for path, _, _ in logical_modules(model) if path.rsplit(".", 1)[-1] == "lm_head"}


def resolve(model: nn.Module, config: LoraConfig, adapter: str, every_target_must_match: bool = True) -> Plan:
    """Match the config against the model and build (unattached) wrappers; the model is not changed.

    With ``every_target_must_match`` a target that selects nothing is an error (a typo must not
    pass silently); adapter files and presets are read leniently, as PEFT does.
    """
    with pattern_budget():  # every pattern of the config (targets, layers, rank/alpha patterns) in one bound
        return _resolve(model, config, adapter, every_target_must_match)


def _resolve(model: nn.Module, config: LoraConfig, adapter: str, every_target_must_match: bool) -> Plan:
    walked = list(logical_modules(model))
    named = [(path, module) for path, module, _ in walked]
    existing = {path: wrapper for path, _, wrapper in walked if wrapper is not None}
    targets = parse_targets(config.targets)
    if any(isinstance(t, AllLinearTarget) for t in targets):
        targets = with_head(targets, output_head_paths(model))
    if not targets and config.target_parameters:
        return _with_parameters(Plan([], [], model, {}), walked, config, adapter)
    if not targets:
        raise ConfigError(
            "No targets given and no preset applies: pass targets=[...] (module names such as 'q_proj', "
            "'re:<regex>', an nn.Module type, or 'all-linear')."
        )
    user_exclude = parse_targets(config.exclude)
    exclude = user_exclude + [NameTarget(m) for m in config.modules_to_save or ()]
    layers = [config.layers] if isinstance(config.layers, int) else config.layers
    chosen, missed, unused_exclude = select(named, targets, exclude, layers, config.layers_pattern)
    unused_exclude = [t for t in unused_exclude if t in user_exclude]
    if unused_exclude and every_target_must_match:
        raise TargetNotFoundError(
            "Some exclude entries matched no module (a typo would exclude nothing; fix or drop these):\n"
            + explain_misses(unused_exclude, named)
        )
    if missed and chosen and every_target_must_match:
        raise TargetNotFoundError(
            "Some targets matched no module (the others did; fix or drop these):\n" + explain_misses(missed, named)
        )
    if not chosen and not missed:
        raise TargetNotFoundError(
            f"The targets {[str(t) for t in targets]} matched modules, but exclude={config.exclude!r}, "
            f"layers={config.layers!r} or modules_to_save removed every one. Loosen those filters."
        )
    if not chosen:
        raise TargetNotFoundError("The targets matched no module.\n" + explain_misses(missed, named))
    chosen = _without_direct_reads({"": model, **dict(named)}, chosen, targets)
    planned, wrappers = [], {}
    for path, module in chosen:
        wrapper = existing.get(path) or wrap(path, module)
        if isinstance(wrapper, LoraParameter):
            raise UnsupportedModuleError(
                f"{path!r} has LoRA on its parameters ({wrapper.parameter_name}, ...); it cannot also be a module "
                "target. Leave it out of the targets."
            )
        if not isinstance(wrapper, LoraLayer):
            raise UnsupportedModuleError(
                f"{path!r} is already trained another way ({type(wrapper).__name__}: modules_to_save or trainable "
                "tokens of another adapter), so LoRA cannot wrap it too. Leave it out of the targets."
            )
        if adapter in wrapper.r:
            raise AdapterExistsError(
                f"Adapter {adapter!r} already exists on {path!r}. Pick another name (adapter='...'), or "
                "remove it first with lora_inject.delete_adapter(model, name)."
            )
        _check_quantized(path, module, config)
        if config.dora:
            _check_dora(path, module, wrapper)
        if config.lora_bias:
            _check_lora_bias(path, module, wrapper)
        if is_principal_init(config.init) and not wrapper.supports_principal_init:
            raise UnsupportedModuleError(
                f"init={config.init!r} (PiSSA/OLoRA) cannot adapt {path!r} ({type(module).__name__}): it factors a "
                "Linear or Conv1D weight. Target only those, or use another init for this adapter."
            )
        wrappers[path] = wrapper
        planned.append(_planned(path, module, wrapper, config))
    saves = _modules_to_save(named, config.modules_to_save or (), every_target_must_match)
    tokens = resolve_tokens(model, config, adapter, walked, set(wrappers), saves)
    misses = explain_misses(missed, named) if missed else ""
    return _with_parameters(Plan(planned, saves, model, wrappers, misses, tokens), walked, config, adapter)


def _without_direct_reads(modules: dict[str, nn.Module], chosen: list, targets: list) -> list:
    """``chosen`` less the modules whose weight is read without calling them (see direct_reads.py): refused when
    a target names them, left out when only ``all-linear`` picked them."""
    kept, left_out = [], []
    for path, module in chosen:
        reason = direct_read_reason(modules, path, module)
        if reason is None:
            kept.append((path, module))
        elif any(not isinstance(t, AllLinearTarget) and t.matches(path, module) for t in targets):
            raise UnsupportedModuleError(
                f"{path!r} cannot take LoRA: {reason}. An adapter there would be ignored until merged, or its merge "
                "lost. Leave it out of the targets (all-linear leaves it out)."
            )
        else:
            left_out.append(path)
    if left_out and kept:
        warnings.warn(f"all-linear left out {len(left_out)} Linear layer(s) whose weight is read without calling "
                      f"them ({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}); see docs/targets.md.",
                      stacklevel=4)
    if chosen and not kept:
        raise TargetNotFoundError(
            f"Every module the targets matched ({', '.join(p for p, _ in chosen[:5])}) has its weight read without "
            "being called, so LoRA cannot sit there; see docs/targets.md."
        )
    return kept


def _with_parameters(plan: Plan, walked, config: LoraConfig, adapter: str) -> Plan:
    """``plan`` plus the wrappers of ``config.target_parameters`` (outer wrappers first: the attach order)."""
    if not config.target_parameters:
        return plan
    if config.dora or config.lora_bias or is_principal_init(config.init):
        what = "dora" if config.dora else "lora_bias" if config.lora_bias else f"init={config.init!r}"
        raise UnsupportedModuleError(
            f"{what} is not implemented for target_parameters (PEFT refuses it too): it needs a module's single "
            "weight. Use plain LoRA for parameter targets, or put them in another adapter."
        )
    if config.layers is not None or config.exclude:
        warnings.warn(
            "layers/exclude filter modules, not target_parameters: as in PEFT, every parameter the names match is "
            "adapted, in every layer. Give a longer name (e.g. 'layers.0.mlp.experts.gate_up_proj') to narrow them.",
            stacklevel=4,
        )
    for target in resolve_parameters(walked, config, adapter, set(plan.wrappers)):
        wrapper = target.wrapper
        r = config.rank_for(target.key)
        added = sum(math.prod(s) for s in wrapper.adapter_shapes(r).values())
        plan.layers.append(PlannedLayer(
            target.path, f"{type(wrapper.owner).__name__}.{wrapper.parameter_name}", full_shape(wrapper.base_weight),
            r, config.alpha_for(target.key), config.scale_for(target.key), added, key=target.key,
        ))
        plan.wrappers[target.path] = wrapper
    return plan


def _planned(path: str, module: nn.Module, wrapper: LoraLayer, config: LoraConfig) -> PlannedLayer:
    r = config.rank_for(path)
    shape = logical_weight_shape(module) if quantized_kind(module) else full_shape(wrapper.base_weight)
    added = sum(math.prod(s) for s in wrapper.adapter_shapes(r, config.dora, config.lora_bias).values())
    kind = quantized_kind(module)
    return PlannedLayer(
        path, type(module).__name__, shape, r, config.alpha_for(path), config.scale_for(path), added,
        kind.name if kind else None,
    )


def _check_quantized(path: str, module: nn.Module, config: LoraConfig) -> None:
    """A quantized base trains plain LoRA; a backend that cannot train, or DoRA/PiSSA/OLoRA (which read or
    rewrite the weight in float), are refused here rather than failing later."""
    kind = quantized_kind(module)
    if kind is None:
        return
    if kind.refusal:
        raise UnsupportedModuleError(f"Cannot adapt {path!r} ({type(module).__name__}, {kind.name}): {kind.refusal}")
    if config.dora or is_principal_init(config.init):
        what = "DoRA" if config.dora else f"init={config.init!r}"
        raise UnsupportedModuleError(
            f"{what} on {path!r} is not implemented for a quantized base ({kind.name}); use plain LoRA on it, or "
            "train on the float model."
        )


def _check_dora(path: str, module: nn.Module, wrapper: LoraLayer) -> None:
    """DoRA needs the layer's weight in floating point (its row norms) and a wrapper that implements it."""
    weight = getattr(module, "weight", None)
    if not wrapper.supports_dora or not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        kind = type(module)
        raise UnsupportedModuleError(
            f"DoRA cannot adapt {path!r} ({kind.__module__}.{kind.__qualname__}): it needs a Linear, transformers "
            "Conv1D, Conv1d/2d/3d or Embedding with a floating-point weight. Leave it out of the targets, or "
            "use plain LoRA (dora=False) for this adapter."
        )


def _check_lora_bias(path: str, module: nn.Module, wrapper: LoraLayer) -> None:
    """lora_bias exists for Linear, Conv1D and convs (PEFT: not for embeddings); a base without a bias can
    run it but never merge it, which the user hears now rather than at merge time."""
    if not wrapper.supports_lora_bias:
        raise UnsupportedModuleError(
            f"lora_bias cannot adapt {path!r} ({type(module).__name__}): B has a bias only on Linear, Conv1D and "
            "conv layers (PEFT refuses it for embeddings too). Leave it out of the targets, or drop lora_bias."
        )
    if getattr(module, "bias", None) is None:
        warnings.warn(
            f"lora_bias on {path!r}, whose base layer has no bias: the adapter trains and runs, but it cannot be "
            "merged into the weights (there is no bias to add B's bias to).", stacklevel=4,
        )


def _modules_to_save(named, names, must_match: bool = True) -> list[str]:
    """Paths of the modules to train in full. Lenient mode skips names that match nothing:
    PEFT writes ``["classifier", "score"]`` for every sequence-classification adapter."""
    found = []
    for name in names:
        target = NameTarget(name)
        hits = [p for p, m in named if target.matches(p, m)]
        if not hits and must_match:
            raise TargetNotFoundError(
                f"modules_to_save names {name!r}, but no module matches it.\n"
                + explain_misses([target], named)
            )
        found += hits
    return found


def _base_param_count(model: nn.Module) -> int:
    """Parameters of the model without any adapter weights."""
    total = sum(logical_numel(p) for p in model.parameters(recurse=False))
    for _, module, _ in logical_modules(model):
        total += sum(logical_numel(p) for p in module.parameters(recurse=False))
    return total
