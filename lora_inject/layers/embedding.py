"""LoRA for nn.Embedding: A zero and B normal, the reverse of Linear, as in the original code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from .base import LoraLayer, resize_parameter


class LoraEmbedding(LoraLayer):
    """``y = E[x] + scale * (A.T[x] @ B.T)``.

    Shapes: x (...) token ids; A ``lora_embedding_A[name]`` (r, num_embeddings);
    B ``lora_embedding_B[name]`` (embedding_dim, r). The lookup into A.T honours the
    base's ``padding_idx`` (that row gets no gradient, so it stays zero and the padding
    embedding never moves) and ``scale_grad_by_freq``.
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")
    supports_dora = True

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.max_norm is not None:
            raise UnsupportedModuleError(
                f"Embedding with max_norm={base_layer.max_norm} is not supported: it renormalises rows in place "
                "on every lookup, so adapted and merged outputs would differ. Exclude this embedding."
            )
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_embedding_A": (r, self.in_features), "lora_embedding_B": (self.out_features, r)}

    def follow_base_resize(self) -> None:
        self.in_features, self.out_features = self.base_layer.num_embeddings, self.base_layer.embedding_dim
        for name, r in self.r.items():
            resize_parameter(self.lora_embedding_A[name], (r, self.in_features))  # new tokens' columns: zero
            resize_parameter(self.lora_embedding_B[name], (self.out_features, r))

    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        kw = {"dtype": dtype, "device": device}
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, self.in_features, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **kw))

    def _init_factors(self, name: str, init: bool | str) -> None:
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_embedding_A[name])
            else:
                nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def _dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # (embedding_dim, num_embeddings): DoRA's norm runs over the vocabulary

    def _dora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_B[name], self.lora_embedding_A[name]  # (dim, r), (r, num_embeddings)

    def _add_dora(self, entry, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA for embeddings: ``g * result + g * s * A.T[x] @ B.T``, g (dim,) = m / ||E + s dE||
        with the norm over the vocabulary; no dropout (PEFT applies none to token ids)."""
        g = self._dora_scale(entry.name, result.dtype)
        lora = self._add_lora(entry.lora, x, torch.zeros_like(result))
        return g * result + g * lora

    def _entry(self, name: str, dropout: float | None = None) -> tuple:
        # the containers and the name, not the Parameters: FSDP and load_state_dict(assign=True) replace those
        return self.lora_embedding_A, self.lora_embedding_B, name, self.scaling[name]

    def _add_lora(self, entry: tuple, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a_dict, b_dict, name, scale = entry  # no dropout: dropping token ids is meaningless; PEFT ignores it too
        a, b = a_dict[name], b_dict[name]
        base = self.base_layer
        after_a = F.embedding(
            x, a.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq
        )  # (..., r)
        b = (b * scale).to(result.dtype)
        update = after_a.to(result.dtype) @ b.T  # (..., embedding_dim)
        embed_scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma 3) scale the lookup
        if embed_scale is not None:
            update = update * (embed_scale.to(update.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return result + update

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_embedding_A[name].to(dtype), self.lora_embedding_B[name].to(dtype)
        return a.t(), b.t()  # (num_embeddings, r), (r, embedding_dim)
