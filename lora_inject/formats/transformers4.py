"""Adapters saved against transformers 4 names, loaded into transformers 5 models exactly.

The rules are transformers' own (:mod:`lora_inject.conversion`). For each adapted module of the file:

* renamed (ViT ``attention.attention.query`` -> ``attention.q_proj``, LLaVA prefixes): its keys move to
  the new path; a module that became a non-Linear owner of a ``weight`` (MoE routers) becomes a LoRA on
  that parameter, with the same keys;
* converted (per-expert Linears stacked and concatenated into ``experts.gate_up_proj``): the experts'
  LoRAs become one expert-parameter LoRA. Concatenated projections share the rank dimension: A stacks
  ``[A_gate; A_up]``, B is block-diagonal, so ``B' A' = [B_gate A_gate; B_up A_up]`` exactly. Scales
  that differ are folded into B; ranks that differ between experts are padded with zeros (both leave
  the product unchanged). Alpha is set so the scale is the old one, under rsLoRA too.

Dense MLPs and shared experts stay Linear LoRAs (their names match no converter). The converted
config names exactly what the file holds, so saving writes the transformers-5 form.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig, exact_pattern_keys
from ..errors import AdapterFileError
from ..layers import wrapper_for
from ..quantized.registry import quantized_kind
from ..targeting.matching import NameTarget, select
from ..targeting.parameters import matches
from ..targeting.plan import logical_modules
from .adapter import Adapter
from .conversion_rules import Landing, rules_for
from .registry import Dialect, register_dialect

_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector",
                    ".lora_embedding_A", ".lora_embedding_B")


@dataclass
class _Fused:
    """The experts' LoRAs that land in one stacked parameter: ``{(expert, part): (A, B, scale)}``."""

    key: str
    parts: int
    axis: int  # 0: the parts concatenate along each expert's rows (out), 1: along its columns (in)
    blocks: dict = field(default_factory=dict)


def convert_old_names(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                      where: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """``(config, tensors)`` in the model's names; unchanged when the file already uses them."""
    known = {path: module for path, module, _ in logical_modules(model)}
    paths = sorted({_module_path(k) for k in tensors if k.endswith(_FACTOR_SUFFIXES)})
    params = dict(model.named_parameters())
    owners = _parameter_owners(known, config)
    if all(_fits_as_is(p, known, owners) for p in paths):
        return config, tensors
    rules = rules_for(model)
    if rules is None or rules.empty:
        return config, tensors
    modules, parameters, fused, out, stacked = {}, {}, {}, {}, {}
    for path in paths:
        local = {k.removeprefix(path): v for k, v in tensors.items() if _module_path(k) == path}
        if _strip_nesting(path) != path or path in owners:  # already a parameter adapter in the new form
            out.update({path + k: v for k, v in local.items()})
            continue
        landing = rules.land(f"{path}.weight") if path not in known else None
        if landing is not None and landing.converted:
            _collect(fused, landing, path, local, config, params, where)
            continue
        new_path = landing.key.removesuffix(".weight") if landing is not None else path
        if new_path not in known:  # no rule for it: left for the loader's "modules this model does not have"
            out.update({path + k: v for k, v in local.items()})
            continue
        out.update({new_path + k: v for k, v in local.items()})
        if _renamed_kind(known[new_path], new_path, params, renamed=landing is not None) == "module":
            modules[new_path] = _rank_alpha(config, path, local)
        else:
            parameters[f"{new_path}.weight"] = _rank_alpha(config, path, local)
            stacked[f"{new_path}.weight"] = (local[".lora_A.weight"], local[".lora_B.weight"])
    if not fused and not parameters and out.keys() == tensors.keys():
        return config, tensors  # no rule applies: the loader reports what the model lacks
    for key, value in tensors.items():  # modules_to_save, carried weights: renamed by the same rules
        if not key.endswith(_FACTOR_SUFFIXES):
            landing = rules.land(key)
            out[landing.key if landing and not landing.converted else key] = value
    for entry in fused.values():
        a, b, rank, alpha = _fuse(entry, model, params, config)
        stacked[entry.key], parameters[entry.key] = (a, b), (rank, alpha)
    _write_parameters(model, stacked, out)
    new_config = _config(model, config, modules, parameters)
    warnings.warn(
        f"{where}: saved against transformers 4 names (or layer kinds this model no longer has); converted with "
        f"transformers' rules ({len(paths)} adapted modules -> {len(modules)} module and {len(parameters)} parameter "
        "targets). The outputs are the old adapter's exactly; saving writes the transformers-5 form.", stacklevel=3,
    )
    return new_config, out


def _parameter_owners(known: dict, config: LoraConfig) -> set[str]:
    """Paths of the modules that own a parameter the config's ``target_parameters`` name."""
    names = list(config.target_parameters or ())
    if not names:
        return set()
    return {path for path, module in known.items()
            if any(matches(f"{path}.{p}", names) for p, _ in module.named_parameters(recurse=False))}


def _fits_as_is(path: str, known: dict, owners: set[str]) -> bool:
    """A file path the model has as it is: a wrappable module, or a parameter adapter in the new form."""
    if _strip_nesting(path) != path:
        return _strip_nesting(path) in owners
    return path in owners or (path in known and wrapper_for(known[path]) is not None)


def _wraps_as_module(module: nn.Module) -> bool:
    """Whether a module LoRA fits: a layer type LoRA wraps whose forward is that layer's own. A Linear
    subclass with another forward (PhiMoE's router returns a tuple) takes LoRA on its weight instead."""
    if wrapper_for(module) is None:
        return False
    if isinstance(module, nn.Linear) and quantized_kind(module) is None:
        return type(module).forward is nn.Linear.forward
    return True


def _write_parameters(model: nn.Module, stacked: dict, out: dict) -> None:
    """Each parameter adapter's (A, B) under its wrapper's path: nested in the owner's registration order
    among the adapted parameters (PEFT's rule, see layers/parameter.py)."""
    owners: dict[str, list[str]] = {}
    for key in stacked:
        owner, _, name = key.rpartition(".")
        owners.setdefault(owner, []).append(name)
    for owner, names in owners.items():
        order = [n for n, _ in model.get_submodule(owner).named_parameters(recurse=False) if n in names]
        for depth, name in enumerate(reversed(order)):
            a, b = stacked[f"{owner}.{name}"]
            wrapper = owner + ".base_layer" * depth
            out[f"{wrapper}.lora_A.weight"], out[f"{wrapper}.lora_B.weight"] = a, b


def _module_path(key: str) -> str:
    for suffix in _FACTOR_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key.rpartition(".")[0]


def _strip_nesting(path: str) -> str:
    while path.endswith(".base_layer"):
        path = path.removesuffix(".base_layer")
    return path


def _rank_alpha(config: LoraConfig, path: str, local: dict) -> tuple[int, float]:
    a = local.get(".lora_A.weight", local.get(".lora_embedding_A"))
    r = int(a.shape[0]) if a is not None else config.rank_for(path)
    return r, config.alpha_for(path)


def _renamed_kind(module: nn.Module, path: str, params: dict, renamed: bool) -> str:
    """"module" where the path is a module LoRA can wrap, "parameter" where it became a module that only
    owns a 2-D ``weight`` (a router: a Linear in transformers 4). A module the rules renamed must also keep
    nn.Linear's own forward to stay a module target (PhiMoE's router subclasses Linear but returns a tuple);
    a path the model has under the same name keeps the kind PEFT gives it."""
    if (_wraps_as_module(module) if renamed else wrapper_for(module) is not None):
        return "module"
    if params.get(f"{path}.weight") is not None and params[f"{path}.weight"].dim() == 2:
        return "parameter"
    raise AdapterFileError(f"{path!r} ({type(module).__name__}) is neither a layer LoRA wraps nor a 2-D weight.")


def _collect(fused: dict, landing: Landing, path: str, local: dict, config: LoraConfig, params: dict,
             where: str) -> None:
    extra = sorted(k for k in local if k not in (".lora_A.weight", ".lora_B.weight"))
    if extra or config.dora:
        raise AdapterFileError(
            f"{where}: {path} becomes part of the stacked parameter {landing.key} in transformers 5, and its "
            f"adapter has {'DoRA magnitudes' if config.dora else extra}: a LoRA on an expert parameter is plain "
            "(A, B) only (as in PEFT). Merge it into the checkpoint on disk instead, where the experts still have "
            "these names (transformers 5 saves them so): `lora-inject merge BASE ADAPTER OUT`, then load OUT."
        )
    param = params.get(landing.key)
    if param is None:
        import difflib

        close = ", ".join(difflib.get_close_matches(landing.key, sorted(params), n=3, cutoff=0.3)) or "nothing alike"
        raise AdapterFileError(
            f"{where}: transformers' rules put {path} into {landing.key}, which this model does not have; the "
            f"model's closest: {close}. The adapter was probably trained on another architecture."
        )
    stacked = landing.expert is not None
    axis = (landing.concat_dim or (1 if stacked else 0)) - (1 if stacked else 0)
    entry = fused.setdefault(landing.key, _Fused(landing.key, landing.parts, axis))
    entry.blocks[(landing.expert or 0, landing.part)] = (local[".lora_A.weight"], local[".lora_B.weight"],
                                                           config.scale_for(path))


def _fuse(entry: _Fused, model: nn.Module, params: dict, config: LoraConfig):
    """The stacked parameter's ``(A (r E, in) expert-major, B (out, r E) rank-major, r, alpha)``."""
    param = params[entry.key]
    owner = model.get_submodule(entry.key.rpartition(".")[0])
    if param.dim() != 3 or getattr(owner, "is_transposed", False):
        raise AdapterFileError(f"{entry.key}: expected experts stored (E, out, in); found {tuple(param.shape)}.")
    experts, rows, cols = param.shape
    sizes = _part_sizes(entry, rows if entry.axis == 0 else cols)
    scales = {s for _, _, s in entry.blocks.values()}
    common = scales.pop() if len(scales) == 1 else 1.0
    rank = max(sum(entry.blocks[(e, p)][0].shape[0] for p in range(entry.parts) if (e, p) in entry.blocks)
               for e in range(experts))
    dtype = next(iter(entry.blocks.values()))[0].dtype
    a_all = torch.zeros(experts, rank, cols, dtype=dtype)
    b_all = torch.zeros(experts, rows, rank, dtype=dtype)
    for e in range(experts):
        r0 = 0
        for p in range(entry.parts):
            if (e, p) not in entry.blocks:
                continue
            a, b, scale = entry.blocks[(e, p)]
            r, start = a.shape[0], sum(sizes[:p])
            b = b * (scale / common) if scale != common else b
            if entry.axis == 0:  # rows: A stacks along the rank, B block-diagonal
                a_all[e, r0:r0 + r] = a
                b_all[e, start:start + b.shape[0], r0:r0 + r] = b
            else:  # columns: B side by side along the rank, A block-diagonal
                a_all[e, r0:r0 + r, start:start + a.shape[1]] = a
                b_all[e, :, r0:r0 + r] = b
            r0 += r
    alpha = common * (math.sqrt(rank) if config.rslora else rank)
    a = a_all.reshape(experts * rank, cols)  # expert-major
    b = b_all.permute(1, 2, 0).reshape(rows, rank * experts)  # rank-major
    return a, b, rank, alpha


def _part_sizes(entry: _Fused, total: int) -> list[int]:
    known = {}
    for (_, p), (a, b, _) in entry.blocks.items():
        known[p] = b.shape[0] if entry.axis == 0 else a.shape[1]
    missing = [p for p in range(entry.parts) if p not in known]
    rest = total - sum(known.values())
    if missing and rest % len(missing):
        raise AdapterFileError(f"{entry.key}: cannot tell the sizes of the parts the adapter does not adapt.")
    return [known.get(p, rest // max(1, len(missing))) for p in range(entry.parts)]


def _config(model: nn.Module, config: LoraConfig, modules: dict, parameters: dict) -> LoraConfig:
    everything = {**modules, **parameters}
    ranks = Counter(r for r, _ in everything.values())
    r = config.r if config.r in ranks else ranks.most_common(1)[0][0]
    alphas = Counter(a for _, a in everything.values())
    alpha = config.alpha if config.alpha in alphas else alphas.most_common(1)[0][0]
    key = exact_pattern_keys(everything)
    return config.replace(
        targets=_module_targets(model, sorted(modules)) or None,
        target_parameters=_parameter_targets(model, sorted(parameters)) or None,
        layers=None, layers_pattern=None, exclude=None, r=r, alpha=alpha,
        rank_pattern={key[k]: v for k, (v, _) in everything.items() if v != r},
        alpha_pattern={key[k]: a for k, (_, a) in everything.items() if a != alpha},
    )


def _module_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names where they select exactly ``paths``, else the paths themselves."""
    if not paths:
        return []
    named = [(p, m) for p, m, _ in logical_modules(model)]
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    chosen, _, _ = select(named, [NameTarget(n) for n in names], [], None, None)
    return names if sorted(p for p, _ in chosen) == paths else paths


def _parameter_targets(model: nn.Module, keys: list[str]) -> list[str]:
    """Two-part suffixes (``experts.gate_up_proj``) where they select exactly ``keys``, else the keys."""
    if not keys:
        return []
    names = sorted({".".join(k.split(".")[-2:]) for k in keys})
    selected = sorted(k for k, _ in model.named_parameters() if matches(k, names))
    return names if selected == keys else keys


def _to_model_names(adapter: Adapter, model: nn.Module) -> Adapter:
    config, tensors = convert_old_names(model, adapter.config, adapter.tensors, adapter.source)
    if tensors is adapter.tensors and config is adapter.config:
        return adapter
    return adapter.with_(config=config, tensors=tensors, notes={**adapter.notes, "renamed": "transformers4"})


register_dialect(Dialect("transformers4", "names", _to_model_names))
