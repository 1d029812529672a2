"""LoRA for torch's ``nn.MultiheadAttention``, in PEFT's layout.

``nn.MultiheadAttention`` calls no submodule: it passes its packed ``in_proj_weight`` (3E, E) (q, k and v stacked)
and ``out_proj.weight`` (E, E) to ``F.multi_head_attention_forward``. So the wrapper adapts both, as PEFT does:
A ``lora_A[name].weight`` (r, E) and B ``lora_B[name].weight`` (3E, r) on the in-projection, and a LoRA Linear
nested at ``base_layer.out_proj`` for the out-projection (its keys ``<path>.base_layer.out_proj.lora_A.weight``,
as PEFT writes them). Forward calls the functional attention with ``W_in + s * B @ A`` and ``W_out + s * B_o @ A_o``:
the update is exact and differentiable, and the base weights are never touched (PEFT merges and unmerges around
every call). LoRA dropout cannot act on the input of a packed projection: training with dropout is refused here,
inference ignores it (as PEFT ignores it throughout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModuleError
from .linear import LoraLinear

OUT = "base_layer.out_proj."


class LoraMultiheadAttention(LoraLinear):
    """LoRA on ``nn.MultiheadAttention`` with one embedding size for q, k and v (``_qkv_same_embed_dim``)."""

    supports_dora = False
    supports_lora_bias = False
    supports_principal_init = False
    # the wrapper must not look like an attention module the Transformer layers' fast path may read directly
    _qkv_same_embed_dim = False

    def __init__(self, base_layer: nn.Module) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", False):
            raise UnsupportedModuleError(
                "LoRA on nn.MultiheadAttention needs one embedding size for query, key and value (kdim = vdim = "
                "embed_dim), as PEFT does: this one has separate q/k/v projection weights."
            )
        super().__init__(base_layer)

    def _io_features(self) -> tuple[int, int]:
        embed = self.base_layer.embed_dim
        return embed, 3 * embed

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    @property
    def out_adapter(self) -> LoraLinear | None:
        out = self.base_layer.out_proj
        return out if isinstance(out, LoraLinear) else None

    # ----- adapters on both projections ------------------------------------------------------------
    def adapter_shapes(self, r: int, dora: bool = False, lora_bias: bool = False) -> dict[str, tuple[int, ...]]:
        if dora or lora_bias:
            raise UnsupportedModuleError("DoRA and lora_bias are not defined on nn.MultiheadAttention (PEFT has "
                                         "neither); use plain LoRA on it.")
        embed = self.base_layer.embed_dim
        shapes = self.factor_shapes(r)
        shapes.update({OUT + "lora_A.weight": (r, embed), OUT + "lora_B.weight": (embed, r)})
        return shapes

    def factor(self, name: str, suffix: str) -> torch.Tensor:
        if suffix.startswith(OUT):
            return self.out_adapter.factor(name, suffix.removeprefix(OUT))
        return super().factor(name, suffix)

    def add_adapter(self, name: str, r: int, alpha: float, scale: float, dropout: float = 0.0, init=True,
                    dtype: torch.dtype | None = None, dora: bool = False, lora_bias: bool = False) -> None:
        if dora or lora_bias:
            self.adapter_shapes(r, dora, lora_bias)  # raises with the reason
        super().add_adapter(name, r, alpha, scale, dropout, init, dtype)
        try:
            if self.out_adapter is None:
                out = LoraLinear(self.base_layer.out_proj)
                out.train(self.base_layer.out_proj.training)
                self.base_layer.out_proj = out
            self.out_adapter.add_adapter(name, r, alpha, scale, dropout, init, dtype)
        except BaseException:
            self.delete_adapter(name)
            raise

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        out = self.out_adapter
        if out is not None:
            if name in out.r:
                out.delete_adapter(name)
            if not out.r:
                self.base_layer.out_proj = out.base_layer

    def set_active(self, names, trainable: bool = True) -> None:
        super().set_active(names, trainable)
        if self.out_adapter is not None:
            self.out_adapter.set_active(names, trainable)

    def unwrapped(self, keep_merged: bool) -> nn.Module:
        out = self.out_adapter
        if out is not None:
            self.base_layer.out_proj = out.unwrapped(keep_merged)
        return super().unwrapped(keep_merged)

    # ----- forward -----------------------------------------------------------------------------------
    def _running_delta(self, layer: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
        """``weight + sum over running adapters of s * B @ A`` (a new tensor; ``weight`` itself if none run)."""
        names = () if layer.adapters_disabled else [n for n in layer.active_adapters if n not in layer.merged_adapters]
        for name in names:
            if self.training and layer.lora_dropout.get(name):
                raise ConfigError(
                    f"LoRA dropout ({layer.lora_dropout[name]}) cannot act on nn.MultiheadAttention's packed "
                    f"projections (PEFT ignores it there). Train adapter {name!r} with dropout=0 on this module."
                )
            b, a = layer._delta_factors(name, weight.dtype)
            weight = torch.addmm(weight, b, a, alpha=layer.scaling[name])
        return weight

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``'s general path with the adapted weights. Shapes as the base's:
        query (L, N, E), or (N, L, E) with ``batch_first``, or (L, E) unbatched."""
        if self._routing is not None:
            raise ConfigError("batch_adapters is not implemented for nn.MultiheadAttention adapters; run one "
                              "adapter per call (using_adapter).")
        mha = self.base_layer
        out = self.out_adapter
        in_weight = self._running_delta(self, mha.in_proj_weight)
        out_base = out.base_layer if out is not None else mha.out_proj
        out_weight = self._running_delta(out, out_base.weight) if out is not None else out_base.weight
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if mha.batch_first and is_batched:  # as the base does, keeping the "is" relations of q, k, v
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, in_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, mha.dropout, out_weight, out_base.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if mha.batch_first and is_batched:
            output = output.transpose(1, 0)
        return output, weights
