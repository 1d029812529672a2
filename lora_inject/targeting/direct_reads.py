"""Modules whose weight is read without calling them, or recomputed on every read: LoRA cannot sit there.

A wrapper adds its update when the module is *called*. Some neighbours read ``.weight`` themselves (torch's
``nn.MultiheadAttention`` and its ``out_proj``, the eval fast path of ``nn.TransformerEncoderLayer``, transformers'
Mamba mixer), so an unmerged adapter there would be ignored (and only a merge would apply it); a parametrized
weight (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``) is recomputed from other tensors, so a
merge into it would be lost. Such modules are refused by name when targeted, and left out of ``all-linear``.
"""

from __future__ import annotations

from torch import nn

_FAST_PATH = ("in eval without grad, its fast path (torch._transformer_encoder_layer_fwd) reads linear1.weight and "
              "linear2.weight directly")
_MAMBA_DT = "transformers' Mamba mixer computes dt_proj.weight @ x itself instead of calling dt_proj"
_MAMBA_CONV = "transformers' Mamba mixer passes conv1d.weight to its convolution kernel instead of calling conv1d"

# (class name in the parent's MRO, attribute name) -> what reads the weight
READ_BY_PARENT: dict[tuple[str, str], str] = {
    ("MultiheadAttention", "out_proj"): "nn.MultiheadAttention passes out_proj.weight to "
                                        "F.multi_head_attention_forward and never calls out_proj (target the "
                                        "attention module itself: its LoRA adapts the in- and out-projections)",
    ("TransformerEncoderLayer", "linear1"): _FAST_PATH,
    ("TransformerEncoderLayer", "linear2"): _FAST_PATH,
    ("TransformerDecoderLayer", "linear1"): _FAST_PATH.replace("encoder", "decoder"),
    ("TransformerDecoderLayer", "linear2"): _FAST_PATH.replace("encoder", "decoder"),
    ("MambaMixer", "dt_proj"): _MAMBA_DT,
    ("FalconMambaMixer", "dt_proj"): _MAMBA_DT,
    ("MambaMixer", "conv1d"): _MAMBA_CONV,
    ("FalconMambaMixer", "conv1d"): _MAMBA_CONV,
    ("Mamba2Mixer", "conv1d"): _MAMBA_CONV,
}


def direct_read_reason(modules: dict[str, nn.Module], path: str, module: nn.Module) -> str | None:
    """Why LoRA on ``module`` (at ``path``; ``modules`` maps the model's paths to modules) would be ignored or
    lost; None where it works."""
    if _parametrized(module):
        return ("its weight is parametrized (weight_norm, spectral_norm or torch.nn.utils.parametrize): .weight is "
                "recomputed from other tensors on every read, so a merge into it would be lost")
    parent_path, _, name = path.rpartition(".")
    parent = modules.get(parent_path)
    for cls in type(parent).__mro__:
        reason = READ_BY_PARENT.get((cls.__name__, name))
        if reason:
            return reason
    return None


def _parametrized(module: nn.Module) -> bool:
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and "weight" in parametrizations:
        return True
    return hasattr(module, "weight_g") and hasattr(module, "weight_v")  # the old hook-based weight_norm
