"""PiSSA and OLoRA: adapters that start as the principal part of the weight, the base as the rest.

``init="pissa"`` (exact SVD), ``"pissa_niter_<k>"`` (randomised SVD, k subspace iterations) or
``"olora"`` (QR) sets A and B so that ``s * B @ A`` is the weight's principal rank-r part and
replaces the base weight by the residual ``W - s * B @ A``: the layer's output is unchanged, and
training moves the principal directions. The initial factors are kept so that the adapter can be
saved in plain LoRA form for the *original* weight: ``s * (B @ A - B0 @ A0)`` as a rank-2r LoRA
``[B, -B0] @ [A; A0]`` (what PEFT calls converting PiSSA/OLoRA to LoRA).
"""

from __future__ import annotations

import torch

PRINCIPAL_INITS = ("pissa", "olora")


def is_principal_init(init: object) -> bool:
    """``"pissa"``, ``"pissa_niter_<k>"`` (k a non-negative integer) or ``"olora"``."""
    if init in PRINCIPAL_INITS:
        return True
    return isinstance(init, str) and init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdigit()


def principal_factors(
    weight: torch.Tensor, r: int, scale: float, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` in float32 with ``scale * B @ A`` the principal rank-r part of ``weight``
    (out, in), computed as PEFT computes it (SVD split as sqrt(S / scale) on both sides; OLoRA: Q and R)."""
    w = weight.detach().to(torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=int(init.removeprefix("pissa_niter_")))
        vh = v.t()
    root = torch.sqrt(s / scale)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()
