"""Target presets per Hugging Face ``model_type``, read from the TOML files in ``configs/``."""

from __future__ import annotations

import functools
import sys
from importlib import resources

from torch import nn

from ..errors import ConfigError
from .matching import is_linear_like

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@functools.cache
def presets() -> dict[str, dict]:
    """``{preset name: {"model_types": [...], "targets": [...]}}`` from every file in configs/."""
    found = {}
    for entry in resources.files("lora_inject.configs").iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name.removesuffix(".toml")] = tomllib.loads(entry.read_text(encoding="utf-8"))
    return found


def preset_for_model_type(model_type: str) -> tuple[str, list[str]] | None:
    for name, preset in presets().items():
        if model_type in preset["model_types"]:
            return name, list(preset["targets"])
    return None


def preset(name: str) -> list[str]:
    """The targets of the preset called ``name`` (a file name in configs/, e.g. "llama")."""
    if name not in presets():
        raise ConfigError(f"No preset named {name!r}; available: {', '.join(sorted(presets()))}.")
    return list(presets()[name]["targets"])


def preset_targets(model: nn.Module) -> list[str]:
    """Targets for a model given without any: the preset for ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = preset_for_model_type(model_type) if model_type else None
    if found:
        return found[1]
    linear = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and is_linear_like(m)})
    what = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} (no model.config.model_type)"
    raise ConfigError(
        f"No targets given, and there is no preset for {what}. Pass targets=[...]; Linear module names in "
        f"this model: {', '.join(linear) or 'none'}. Or targets='all-linear'. Presets exist for: "
        + ", ".join(sorted(t for p in presets().values() for t in p["model_types"]))
        + "."
    )
