"""The streaming merge's view of parameter adapters (``target_parameters``): which checkpoint tensor each
nested wrapper's factors belong to, and how they add to it.

A module's adapted parameters are nested wrappers in the module's registration order (the first
innermost), so the key ``<module>.base_layer.lora_A.weight`` names the second-to-last adapted
parameter. A checkpoint lists its keys sorted, not in registration order: the factors' shapes
decide which parameter each depth is (they almost always can); where they cannot, the model is
built on the meta device from the checkpoint's config.json and its registration order is read.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import MergeError
from ..targeting.parameters import matches
from .meta import build_on_meta

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@functools.lru_cache(maxsize=1)
def model_on_meta(base: str):
    """The checkpoint's model built on the meta device (no weights read), once per merge (the merge clears it)."""
    return build_on_meta(base)


def parameter_edits(base: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple],
                    edit_type, legacy: bool) -> tuple[dict, set[str]]:
    """``({checkpoint key: Edit}, adapter keys consumed)`` for the parameter adapters in ``tensors``.

    ``shapes`` holds every checkpoint key's shape; ``legacy``: the file may use PEFT <= 0.19.0's layout
    (see formats/expert_layout.py), which decides square experts. Module LoRA keys are left for the module path.
    """
    names = list(config.target_parameters or ())
    if not names:
        return {}, set()
    by_module: dict[str, dict[int, str]] = {}  # module path -> {depth: wrapper path}
    for key in tensors:
        if key.endswith(A_SUFFIX):
            path = key.removesuffix(A_SUFFIX)
            module, depth = path, 0
            while module.endswith(".base_layer"):
                module, depth = module.removesuffix(".base_layer"), depth + 1
            by_module.setdefault(module, {})[depth] = path
    edits, consumed = {}, set()
    for module, depths in by_module.items():
        candidates = _candidates(module, names, shapes)
        if not candidates:
            continue  # a module target
        order = _registration_order(base, module, candidates, depths, tensors, shapes)
        for depth, path in depths.items():
            key = order[len(order) - 1 - depth]
            a, b = tensors[path + A_SUFFIX], tensors[path + B_SUFFIX]
            edits[key] = _edit(edit_type, key, shapes[key], a, b, config.scale_for(_logical(key, module)),
                               _transposed(base, module, shapes[key], a, legacy))
            consumed.update({path + A_SUFFIX, path + B_SUFFIX})
    return edits, consumed


def _logical(key: str, module: str) -> str:
    """The parameter's path as the model names it (the adapter's spelling of the module, not the file's)."""
    return f"{module}.{key.rpartition('.')[2]}"


def _candidates(module: str, names: list[str], shapes: dict) -> list[str]:
    """Checkpoint keys of the parameters of ``module`` that the targets name (any base-model prefix)."""
    for prefix in _prefix_variants(module, shapes):
        found = [k for k in shapes if k.rpartition(".")[0] == prefix and matches(_logical(k, module), names)]
        if found:
            return found
    return []


def _prefix_variants(module: str, shapes: dict) -> list[str]:
    tops = {k.split(".", 1)[0] for k in shapes}
    return [module, module.split(".", 1)[-1], *(f"{t}.{module}" for t in sorted(tops))]


def _fits(shape: tuple, a: torch.Tensor, b: torch.Tensor) -> bool:
    if len(shape) == 2:
        return (b.shape[0], a.shape[1]) == tuple(shape) and a.shape[0] == b.shape[1]
    if len(shape) != 3 or a.shape[0] != b.shape[1] or a.shape[0] % shape[0]:
        return False
    return (b.shape[0], a.shape[1]) in {(shape[1], shape[2]), (shape[2], shape[1])}


def _registration_order(base: Path, module: str, candidates: list[str], depths: dict, tensors, shapes) -> list[str]:
    """``candidates`` in the module's registration order (the innermost wrapper's parameter first)."""
    if len(depths) != len(candidates) or set(depths) != set(range(len(candidates))):
        raise MergeError(
            f"{module}: the adapter has wrappers at depths {sorted(depths)} but the targets name "
            f"{len(candidates)} parameter(s) there ({[c.rpartition('.')[2] for c in candidates]}); the file does "
            "not fit this checkpoint."
        )
    fitting = {}
    for depth, path in depths.items():
        a, b = tensors[path + A_SUFFIX], tensors[path + B_SUFFIX]
        fitting[depth] = [c for c in candidates if _fits(shapes[c], a, b)]
    if all(len(f) == 1 for f in fitting.values()) and len({f[0] for f in fitting.values()}) == len(fitting):
        return [fitting[len(candidates) - 1 - i][0] for i in range(len(candidates))]
    model_order = _model_parameter_order(base, module)
    ordered = sorted(candidates, key=lambda k: model_order.index(k.rpartition(".")[2]))
    for depth, fits in fitting.items():
        if ordered[len(ordered) - 1 - depth] not in fits:
            raise MergeError(f"{module}: the adapter's factors do not fit the checkpoint's parameters.")
    return ordered


def _model_parameter_order(base: Path, module: str) -> list[str]:
    model = model_on_meta(str(base))
    for prefix in (module, module.split(".", 1)[-1]):
        try:
            return [n for n, _ in model.get_submodule(prefix).named_parameters(recurse=False)]
        except AttributeError:
            continue
    raise MergeError(f"{module}: not a module of the model in {base}; the adapter is for another model.")


def _transposed(base: Path, module: str, shape: tuple, a: torch.Tensor, legacy: bool) -> bool:
    """Whether A acts on the parameter's dim 1 (update ``A_e.T @ B_e.T``): experts stored (E, in, out), or any
    experts in PEFT <= 0.19.0's layout. The factors' shapes tell, else the file's version and the model class."""
    if len(shape) != 3 or shape[1] != shape[2]:
        return len(shape) == 3 and a.shape[1] == shape[1]
    if legacy:
        return True
    model = model_on_meta(str(base))
    for prefix in (module, module.split(".", 1)[-1]):
        try:
            return bool(getattr(model.get_submodule(prefix), "is_transposed", False))
        except AttributeError:
            continue
    return False


def _edit(edit_type, key: str, shape: tuple, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool):
    if not _fits(shape, a, b):
        raise MergeError(
            f"{key}: the checkpoint stores {tuple(shape)}, the adapter's factors are A {tuple(a.shape)}, "
            f"B {tuple(b.shape)}. The adapter was trained on another model."
        )
    if len(shape) == 2:
        return edit_type(kind="linear", a=a, b=b, scale=scale)
    return edit_type(kind="experts", a=a, b=b, scale=scale, experts=shape[0], transposed=transposed)


def onto_saved_names(base: Path, edits: dict, shapes: dict[str, tuple], edit_type) -> dict:
    """``edits`` (keyed by the model's names) moved onto a checkpoint saved under transformers 4 names, by
    transformers' rules for the model in ``base`` (:mod:`lora_inject.conversion`). A stacked expert
    parameter's update lands in the per-expert tensors it was fused from: expert e's slice of it, rows or
    columns of its part. Edits that land nowhere are left under their own key (the caller reports them)."""
    from ..errors import LoraInjectError
    from ..formats.conversion_rules import rules_for

    try:
        rules = rules_for(model_on_meta(str(base)))
    except (LoraInjectError, ImportError, OSError, ValueError):
        return edits  # not a transformers checkpoint: the caller reports the keys it lacks
    if rules is None or rules.empty:
        return edits
    landings = {k: rules.land(k) for k in shapes}
    landings = {k: v for k, v in landings.items() if v is not None and v.key in edits}
    moved, used = {}, set()
    for key, landing in landings.items():
        edit = edits[landing.key]
        used.add(landing.key)
        if not landing.converted:
            moved[key] = edit
            continue
        if edit.kind != "experts":
            raise MergeError(f"{key}: transformers fuses it into {landing.key}, whose adapter is not an expert LoRA.")
        moved[key] = _expert_part(key, landing, edit, landings, shapes, edit_type)
    rest = {k: v for k, v in edits.items() if k not in used}
    return {**rest, **moved}


def _expert_part(key: str, landing, edit, landings: dict, shapes: dict, edit_type):
    """The Edit of one saved per-expert tensor: expert e's ``L @ R`` restricted to its part's rows or columns."""
    siblings = sorted((v.part, k) for k, v in landings.items() if v.key == landing.key and v.expert == landing.expert)
    axis = (landing.concat_dim or 1) - 1 if landing.expert is not None else (landing.concat_dim or 0)
    offset = sum(shapes[k][axis] for part, k in siblings if part < landing.part)
    size = shapes[key][axis]
    e = landing.expert or 0
    left, right = edit.expert_factors(e, e + 1, edit.a.dtype)  # (1, d1, r), (1, r, d2)
    left, right = left[0], right[0]
    if axis == 0:
        left = left[offset:offset + size]
    else:
        right = right[:, offset:offset + size]
    return edit_type(kind="linear", a=right.contiguous(), b=left.contiguous(), scale=edit.scale)
