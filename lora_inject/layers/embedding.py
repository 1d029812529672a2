"""LoRA for nn.Embedding: A zero and B normal, the reverse of Linear, as in the original code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from .base import LoraLayer, resize_parameter
from .linear import routed_product


class LoraEmbedding(LoraLayer):
    """``y = E[x] + scale * (A.T[x] @ B.T)``.

    Shapes: x (...) token ids; A ``lora_embedding_A[name]`` (r, num_embeddings);
    B ``lora_embedding_B[name]`` (embedding_dim, r). The lookup into A.T honours the
    base's ``padding_idx`` (that row gets no gradient, so it stays zero and the padding
    embedding never moves) and ``scale_grad_by_freq``.
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")
    supports_dora = True
    delta_transposed = True  # the update (num_embeddings, dim) is (B @ A).T

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

    def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Every row's adapter at once, without autograd: one gather from the stacked ``A.T`` rows, one grouped
        matmul with the stacked ``(s * B).T``. DoRA and training take the general path."""
        names = self._routing.distinct
        if args or kwargs or torch.is_grad_enabled() or any(self.use_dora.get(n) for n in names):
            return super()._routed_forward(x, *args, **kwargs)
        result = self.base_layer(x)
        rows = x.shape[0]
        ids = x.reshape(-1)  # (M,)
        tokens = self._routing.tokens(rows, ids.numel() // rows, x.device)
        a_rows, b_t = self._stacked(names, result.dtype, x.device)  # (G+1, V, r), (G+1, r, D)
        after_a = a_rows[tokens.group, ids]  # (M, r): each token's row of its adapter's A.T
        delta = routed_product(after_a, tokens, b_t)  # (M, D)
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is not None:
            delta = delta * (embed_scale.to(delta.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        out = result.reshape(-1, result.shape[-1])
        return out.add_(delta).view(result.shape)

    def _stacked(self, names: tuple, dtype: torch.dtype, device: torch.device):
        """``A.T`` (G+1, V, r_max) and ``(s * B).T`` (G+1, r_max, D) of ``names``, zero-padded, zero for
        absent names and the base slot; kept until a factor changes."""
        present = [n for n in names if n in self.r]
        params = [p for n in present for p in self.adapter_parameters(n)]
        key = (names, dtype, device, tuple((p.data_ptr(), p._version) for p in params),
               tuple(self.scaling[n] for n in present))
        kept = self.__dict__.get("_stack")
        if kept is not None and kept[0] == key:
            return kept[1]
        r_max = max([self.r[n] for n in present] or [1])
        a_rows = torch.zeros(len(names) + 1, self.in_features, r_max, dtype=dtype, device=device)
        b_t = torch.zeros(len(names) + 1, r_max, self.out_features, dtype=dtype, device=device)
        with torch.no_grad():
            for i, name in enumerate(names):
                if name in self.r:
                    r = self.r[name]
                    a_rows[i, :, :r] = self.lora_embedding_A[name].t().to(dtype)
                    b_t[i, :r, :] = (self.lora_embedding_B[name] * self.scaling[name]).t().to(dtype)
        self.__dict__["_stack"] = (key, (a_rows, b_t))
        return a_rows, b_t

    def _delta_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_embedding_A[name].to(dtype), self.lora_embedding_B[name].to(dtype)
        return a.t(), b.t()  # (num_embeddings, r), (r, embedding_dim)
