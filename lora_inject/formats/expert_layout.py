"""Expert-parameter adapters saved by PEFT 0.19.0 and earlier: another A/B layout, converted exactly.

Up to 0.19.0 PEFT read a 3-D parameter ``(E, d1, d2)`` as ``(E, in, out)`` whatever the experts'
orientation: A ``(r E, d1)`` acted on d1 and each expert's update was ``A_e.T @ B_e.T``. Since
0.19.1 A acts on the experts' real input (d2 for transformers' usual ``(E, out, in)``, d1 for experts
marked ``is_transposed``) and the update is ``B_e @ A_e``. For transposed experts both agree; for
the others the roles of the factors swap: ``A'_e = B_e.T``, ``B'_e = A_e.T``, which is exact (a
permutation of the same numbers). The shapes tell the layouts apart unless d1 == d2; there the
file's ``peft_version`` decides (none at all: PEFT 0.17, before the field existed, so the old layout).
"""

from __future__ import annotations

import re
import warnings

import torch

from ..layers.parameter import LoraParameter
from .adapter import Adapter
from .registry import Dialect, register_dialect

FIXED_IN = (0, 19, 1)


def is_legacy_layout(peft_version: str | None) -> bool:
    """Whether a file written by PEFT ``peft_version`` uses the layout from before 0.19.1."""
    if not peft_version:
        return True
    numbers = re.findall(r"\d+", peft_version.split("@")[0])[:3]
    version = tuple(int(n) for n in numbers) + (0,) * (3 - len(numbers))
    return version < FIXED_IN


def to_current_layout(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Old-layout A (r E, d1), B (d2, r E) of experts stored (E, out=d1, in=d2) as the current A (r E, d2),
    B (d1, r E): ``A'_e = B_e.T``, ``B'_e = A_e.T``."""
    r = a.shape[0] // experts
    d1, d2 = a.shape[1], b.shape[0]
    new_a = b.reshape(d2, r, experts).permute(2, 1, 0).reshape(experts * r, d2)  # row e*r + k: B[:, k*E + e]
    new_b = a.reshape(experts, r, d1).permute(2, 1, 0).reshape(d1, r * experts)  # column k*E + e: A[e*r + k, :]
    return new_a.contiguous(), new_b.contiguous()


def current_layout(wrappers: dict, tensors: dict[str, torch.Tensor], peft_version: str | None,
                   where: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every old-layout expert factor pair of ``wrappers`` ({path: LoraParameter})
    converted; the others untouched."""
    legacy_version = is_legacy_layout(peft_version)
    converted = dict(tensors)
    count = 0
    for path, wrapper in wrappers.items():
        if not getattr(wrapper, "stacked", False) or wrapper.transposed:
            continue
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        if a_key not in tensors or b_key not in tensors:
            continue
        a, b = tensors[a_key], tensors[b_key]
        out_features, in_features = wrapper.out_features, wrapper.in_features
        if out_features == in_features:
            old = legacy_version
        else:
            old = a.shape[-1] == out_features and b.shape[0] == in_features
        if old:
            converted[a_key], converted[b_key] = to_current_layout(a, b, wrapper.num_experts)
            count += 1
    if count:
        warnings.warn(
            f"{where}: {count} expert-parameter adapter(s) in the layout of PEFT <= 0.19.0 (peft_version "
            f"{peft_version or 'not recorded'}), converted exactly to the current one; saving writes the current "
            "layout.", stacklevel=4,
        )
    return converted


def _to_current_layout(adapter: Adapter, wrappers: dict) -> Adapter:
    """Factors converted from transformers-4 names are in the current layout already."""
    parameters = {p: w for p, w in wrappers.items() if isinstance(w, LoraParameter)}
    if not parameters or adapter.notes.get("renamed"):
        return adapter
    tensors = current_layout(parameters, adapter.tensors, adapter.notes.get("peft_version"), adapter.source)
    return adapter.with_(tensors=tensors)


register_dialect(Dialect("peft-0.19-experts", "layout", _to_current_layout))
