"""DoRA (weight-decomposed LoRA): what every layer type shares.

A DoRA adapter adds a trainable magnitude ``m`` (one entry per output feature; for an
Embedding, per embedding dimension) to the low-rank update, and the layer computes with the
weight ``m * (W + s * B @ A) / ||W + s * B @ A||``, the norm taken per output feature and
detached from the gradient (section 4.3 of the DoRA paper; PEFT does the same).

Every layer type sees its weight and update in one "rows" layout, ``(R, C)`` with one row per
magnitude entry: Linear ``W``; Conv1D ``W.T``; ConvNd ``W.view(out, -1)``; Embedding ``E.T``.
The update is ``s * left @ right`` with ``left`` (R, r) and ``right`` (r, C).
"""

from __future__ import annotations

import torch
from torch import nn


class Magnitude(nn.Module):
    """Holds one adapter's magnitude vector as ``.weight`` (R,), so that in-memory keys are PEFT's
    (``<path>.lora_magnitude_vector.<adapter>.weight``)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


class DoraEntry:
    """What forward needs for one running DoRA adapter: its name, scale, dropout probability,
    and the layer's plain LoRA entry for the ``s * B @ A @ x`` part (built without dropout)."""

    __slots__ = ("name", "scale", "p", "lora")

    def __init__(self, name: str, scale: float, p: float, lora: tuple) -> None:
        self.name, self.scale, self.p, self.lora = name, scale, p, lora


def norm_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32, or float64 where the weight or the adapter is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def squared_row_norms(w_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||W_i||^2`` for every row, accumulated in ``dtype`` (no widened copy of W)."""
    return torch.linalg.vector_norm(w_rows, dim=1, dtype=dtype).square()


def row_norms(
    w_rows: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, squared: torch.Tensor | None = None
) -> torch.Tensor:
    """``||W_i + scale * (left @ right)_i||`` for every row i, (R,), without an (R, C) temporary.

    ``||W_i + s L_i R||^2 = ||W_i||^2 + 2 s (W R^T)_i . L_i + s^2 L_i (R R^T) L_i^T``: one GEMM of
    W with the rank-r factor (R x C x r), an r x r Gram matrix, and row dots. ``squared`` is
    ``||W_i||^2`` if the caller keeps it between calls (W is frozen). Computed in float32
    (float64 for float64 weights or adapters); a half-precision W enters the GEMM as it is.
    Call under ``torch.no_grad()``: DoRA detaches the norm.
    """
    dtype = norm_dtype(w_rows.dtype, left.dtype, right.dtype)
    left, right = left.to(dtype), right.to(dtype)
    if w_rows.dtype == dtype:
        w_right = w_rows @ right.t()  # (R, r)
    elif w_rows.dtype in (torch.float16, torch.bfloat16):
        w_right = (w_rows @ right.t().to(w_rows.dtype)).to(dtype)
    else:
        w_right = w_rows.to(dtype) @ right.t()
    if squared is None:
        squared = squared_row_norms(w_rows, dtype)
    cross = (w_right * left).sum(1)  # (R,)
    quadratic = ((left @ (right @ right.t())) * left).sum(1)  # (R,)
    return (squared + (2.0 * scale) * cross + (scale * scale) * quadratic).clamp_min(0.0).sqrt()
