"""Resolve ``target_parameters`` (PEFT's rule) into chains of :class:`LoraParameter` wrappers.

A name matches the parameter at ``<module path>.<parameter>`` when it equals that key or is a dotted
suffix of it (``"experts.gate_up_proj"``, ``"gate_up_proj"``, ``"mlp.gate.weight"``). The parameters
of one module that match are wrapped in the module's registration order, the first innermost, so
the wrapper of the i-th (counting from the last) lives at ``<path>`` + ``.base_layer`` * i: the keys
PEFT writes. As in PEFT, ``layers``/``exclude`` filter modules, not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from ..layers.parameter import LoraParameter


@dataclass(frozen=True)
class ParameterTarget:
    """One parameter to adapt: where its wrapper sits, the parameter's own dotted key, the wrapper."""

    path: str  # where the wrapper is attached (module path, plus ".base_layer" per outer wrapper)
    key: str  # "<module path>.<parameter name>", what rank_pattern/alpha_pattern and plan tables see
    wrapper: LoraParameter


def matches(key: str, names: list[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def resolve_parameters(walked, config: LoraConfig, adapter: str, module_targets: set[str]) -> list[ParameterTarget]:
    """The parameter targets of ``config`` in model order, outer wrappers first (the order to attach them)."""
    names = list(config.target_parameters or ())
    if not names:
        return []
    found: list[ParameterTarget] = []
    hit: set[str] = set()
    for path, module, wrapper in walked:
        keys = [f"{path}.{p}" for p, _ in module.named_parameters(recurse=False)]
        wanted = [k.rsplit(".", 1)[1] for k in keys if matches(k, names)]
        if not wanted:
            continue
        hit.update(n for n in names for k in keys if k == n or k.endswith("." + n))
        _check_owner(path, module, wrapper, module_targets)
        chain = _chain(path, module, wrapper, wanted)
        for depth, link in enumerate(chain):  # outermost first
            if link.parameter_name not in wanted:
                continue
            if adapter in link.r:
                raise ConfigError(f"Adapter {adapter!r} already adapts {path}.{link.parameter_name}.")
            found.append(ParameterTarget(path + ".base_layer" * depth, f"{path}.{link.parameter_name}", link))
    missed = [n for n in names if n not in hit]
    if missed:
        raise TargetNotFoundError(
            f"target_parameters {missed} matched no parameter. A name matches '<module path>.<parameter>' when it "
            f"equals it or ends with '.<name>'; parameters near it: {_near(walked, missed)}."
        )
    return found


def _check_owner(path: str, module: nn.Module, wrapper, module_targets: set[str]) -> None:
    if path in module_targets or (wrapper is not None and not isinstance(wrapper, LoraParameter)):
        raise UnsupportedModuleError(
            f"{path!r} is targeted as a module (or trained another way) and its parameters are targeted too. One "
            "module takes one kind: drop it from targets (its parameters are adapted) or from target_parameters."
        )


def _chain(path: str, module: nn.Module, outer: LoraParameter | None, wanted: list[str]) -> list[LoraParameter]:
    """The wrappers for ``module``'s parameters, outermost first: the existing chain (which must already
    hold every wanted parameter: PEFT's files identify a parameter by its nesting depth), or a new one."""
    if outer is not None:
        chain = [outer]
        while isinstance(chain[-1].base_layer, LoraParameter):
            chain.append(chain[-1].base_layer)
        have = {link.parameter_name for link in chain}
        if not set(wanted) <= have:
            raise ConfigError(
                f"{path!r} already has LoRA on {sorted(have)}; a new adapter cannot add {sorted(set(wanted) - have)}: "
                "the saved keys name a parameter by how deep its wrapper is nested, so every adapter on a module "
                "must target a subset of the same parameters (as in PEFT). Target those, or use a fresh model."
            )
        return chain
    chain_inner_first, base = [], module
    for name in wanted:  # registration order: the first wanted parameter innermost
        base = LoraParameter(base, name)
        chain_inner_first.append(base)
    return chain_inner_first[::-1]


def _near(walked, missed: list[str]) -> str:
    import difflib

    keys = sorted({f"{path}.{p}" for path, module, _ in walked for p, _ in module.named_parameters(recurse=False)})
    tails = sorted({k.split(".", k.count(".") - 1)[-1] if k.count(".") > 1 else k for k in keys})
    close = {c for n in missed for c in difflib.get_close_matches(n, tails, n=3, cutoff=0.4)}
    return ", ".join(sorted(close)) or ", ".join(tails[:5])

