"""One validation of an adapter in canonical form, run on every read whatever the format and whatever the reader
(``load_adapter``, ``load_adapter_weights``, hot swap, the streaming merge): what a file can be wrong about without
the model. What needs the model (names, shapes against layers) is checked in ``load.py`` before anything changes.

Checked here: tensor dtypes (floating point, one torch can compute and copy in), A/B pairs (their ranks
agree; :func:`unpaired` lists a factor without its partner for the readers that refuse that), DoRA magnitudes
present when the config says DoRA, finite values everywhere (a NaN factor would give NaN weights).

Everything but the values comes from the files' headers. Tensors are read lazily (mapped, not loaded), so a
reader that checks shapes against the model first (``load_adapter``, ``load_adapter_weights``) asks for the
values check after that (:func:`checked_values`): a wrong-shaped tensor is refused before a byte of it is read.
"""

from __future__ import annotations

import math

import torch

from ..errors import AdapterFileError, preview
from .adapter import Adapter

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
MAGNITUDE = ".lora_magnitude_vector"


def validate(adapter: Adapter, values: bool = True) -> Adapter:
    """``adapter`` when it is sound (its tensors realigned where ``values``); otherwise an
    :class:`AdapterFileError` naming every problem kind. ``values=False`` leaves :func:`checked_values` to the
    caller, which must run it before using any value."""
    tensors, where = adapter.tensors, adapter.source
    odd = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in tensors.items() if v.dtype not in FLOAT_DTYPES]
    if odd:
        raise AdapterFileError(
            f"{where}: tensors that are not floating point in a dtype an adapter can hold: {preview(odd)}. Expected "
            "float16, bfloat16, float32 or float64; re-save the adapter from the model that trained it."
        )
    _check_pairs(tensors, where)
    stray = [k for k in tensors if k.endswith(MAGNITUDE)] if not adapter.config.dora else []
    if stray:
        raise AdapterFileError(
            f"{where}: DoRA magnitudes ({preview(stray)}) in an adapter whose config says use_dora=false. Part of "
            "what the adapter computes or not? The file and its config disagree; fix use_dora or re-save it."
        )
    if adapter.config.dora:
        factors = {k.removesuffix(a) for k in tensors for a, _ in PAIRS[:1] if k.endswith(a)}
        lost = sorted(p for p in factors if p + MAGNITUDE not in tensors)
        if lost:
            raise AdapterFileError(
                f"{where}: the config says use_dora=true but the file lacks the DoRA magnitudes of {preview(lost)}. "
                "Without them the adapter computes something else (plain LoRA); re-save it with its magnitudes."
            )
    return adapter.with_(tensors=checked_values(tensors, where)) if values else adapter


def checked_values(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every value read and checked finite, each copied once where it starts at an odd address
    of the mapped file (after a 2-byte alpha, or a header of any length): every later pass over it (the check,
    the copy into the model) runs ~3x slower there."""
    tensors = {k: v.clone() if v.data_ptr() % 64 and v.numel() else v for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if not all_finite(v)]
    if bad:
        raise AdapterFileError(f"{where}: tensors holding NaN or inf: {preview(bad)}. The file is damaged; it would "
                               "turn every weight it touches into NaN.")
    return tensors


def unpaired(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Factors whose partner is missing (A without B, B without A). A loader reports them as missing keys
    (``strict=False`` leaves such a module at its init, no change); readers that write factors refuse them."""
    alone = []
    for a_suffix, b_suffix in PAIRS:
        for key in tensors:
            if key.endswith(a_suffix) and key.removesuffix(a_suffix) + b_suffix not in tensors:
                alone.append(key)
            elif key.endswith(b_suffix) and key.removesuffix(b_suffix) + a_suffix not in tensors:
                alone.append(key)
    return alone


def _check_pairs(tensors: dict[str, torch.Tensor], where: str) -> None:
    mismatched = []
    for a_suffix, b_suffix in PAIRS:
        for key in tensors:
            if key.endswith(a_suffix) and key.removesuffix(a_suffix) + b_suffix in tensors:
                a, b = tensors[key], tensors[key.removesuffix(a_suffix) + b_suffix]
                if a.dim() < 2 or b.dim() < 2 or not _ranks_agree(a, b, a_suffix):
                    mismatched.append(f"{key.removesuffix(a_suffix)}: A {tuple(a.shape)}, B {tuple(b.shape)}")
    if mismatched:
        raise AdapterFileError(f"{where}: A and B of one module disagree on the rank: {preview(mismatched, 3)}. "
                               "A is (r, in...), B (out, r...); the file is damaged or was edited by hand.")


def _ranks_agree(a: torch.Tensor, b: torch.Tensor, a_suffix: str) -> bool:
    if a_suffix == ".lora_embedding_A":  # A (r, vocab), B (dim, r)
        return a.shape[0] == b.shape[1]
    if a.dim() > 2:  # a conv: B (out, r / groups, 1...) for a grouped conv in PEFT's layout
        return b.shape[1] > 0 and a.shape[0] % b.shape[1] == 0
    return a.shape[0] == b.shape[1]


def all_finite(tensor: torch.Tensor) -> bool:
    """Every value finite. A sum in a wider type carries any NaN or inf through (one fast reduction: an
    elementwise ``isfinite`` over float16 files of hundreds of MB took a second); only a sum that overflows
    on finite values falls back to the elementwise check."""
    wider = torch.float64 if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    if tensor.numel() == 0 or math.isfinite(float(tensor.sum(dtype=wider))):
        return True
    return bool(torch.isfinite(tensor).all())
