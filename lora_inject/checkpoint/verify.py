"""``--verify`` for the streaming merge: spot-check rows against an independent float64 computation."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import MergeError

ROWS_PER_TENSOR = 3


def _expected_rows(edit, base_rows: torch.Tensor, rows: torch.Tensor, column_norms=None) -> torch.Tensor:
    a, b = edit.a.double(), edit.b.double()
    if edit.kind == "experts":  # rows are experts
        left, right = edit.expert_factors(0, edit.experts, torch.float64)
        return base_rows.double() + edit.scale * (left[rows] @ right[rows])
    if edit.kind == "transposed":  # delta.T[rows] = A.T[rows] @ B.T
        delta = torch.einsum("rk,or->ko", a[:, rows], b)
    elif edit.kind == "conv":
        delta = torch.einsum("or,ri...->oi...", b.flatten(1)[rows], a)
    else:
        delta = torch.einsum("or,ri->oi", b[rows], a)
    expected = base_rows.double() + edit.scale * delta
    if edit.magnitude is None:
        return expected
    magnitude = edit.magnitude.double().reshape(-1)
    if edit.kind == "transposed":  # DoRA normalises columns here: norms of the whole merged tensor
        return expected * (magnitude / column_norms)[None, :]
    norms = torch.linalg.vector_norm(expected.flatten(1), dim=1)
    return expected * (magnitude[rows] / norms).view(-1, *(1,) * (expected.dim() - 1))


def _column_norms(edit, base_file, key: str, dtype: torch.dtype) -> torch.Tensor | None:
    """DoRA on a transposed layout: ``||W + s dW||`` per column (output feature), in float64."""
    if edit.magnitude is None or edit.kind != "transposed":
        return None
    whole = base_file.get_tensor(key).to(dtype).double()
    whole += edit.scale * (edit.a.double().t() @ edit.b.double().t())
    return torch.linalg.vector_norm(whole, dim=0)


def verify_merge(base: Path, out: Path, matched: dict, out_dtype: torch.dtype | None) -> None:
    """Raise MergeError if any spot-checked merged row is off by more than one rounding of its dtype."""
    generator = torch.Generator().manual_seed(0)
    files = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            files.update({k: path.name for k in handle.keys()})
    for key, edit in matched.items():
        if edit.row_ids is not None:
            _verify_token_rows(out / files[key], key, edit)
        if edit.kind is None:
            continue
        merged_path, base_path = str(out / files[key]), str(base / files[key])
        with safe_open(merged_path, "pt") as merged_file, safe_open(base_path, "pt") as base_file:
            merged = merged_file.get_slice(key)
            rows_total = merged.get_shape()[0]
            rows = torch.randint(0, rows_total, (min(ROWS_PER_TENSOR, rows_total),), generator=generator)
            got = torch.stack([merged[int(i):int(i) + 1][0] for i in rows])
            base_slice = base_file.get_slice(key)
            base_rows = torch.stack([base_slice[int(i):int(i) + 1][0] for i in rows]).to(got.dtype)
            column_norms = _column_norms(edit, base_file, key, got.dtype)
        expected = _expected_rows(edit, base_rows, rows, column_norms)
        eps = torch.finfo(got.dtype).eps
        tolerance = expected.abs() * eps + 1e-6
        error = (got.double() - expected).abs()
        if not (error <= tolerance).all():
            raise MergeError(
                f"--verify: {key} differs from an independent float64 computation by up to "
                f"{error.max().item():.3g} (allowed {tolerance.max().item():.3g}); the output was not written."
            )


def _verify_token_rows(path: Path, key: str, edit) -> None:
    """Trainable tokens: each trained row must be in the output as its value rounded to the output dtype."""
    with safe_open(str(path), "pt") as handle:
        tensor = handle.get_slice(key)
        got = torch.stack([tensor[int(i):int(i) + 1][0] for i in edit.row_ids[:ROWS_PER_TENSOR]])
    expected = edit.row_values[:ROWS_PER_TENSOR].to(got.dtype)
    if not torch.equal(got, expected):
        raise MergeError(f"--verify: {key}: the trained token rows are not in the output; it was not written.")
