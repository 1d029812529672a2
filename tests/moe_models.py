"""Tiny transformers-5 models with fused experts or renamed modules, and transformers-4 adapters for them.

A transformers-4 adapter is made the way one was: LoRA factors for Linear layers under the names a
checkpoint saved by transformers 4 has (``save_pretrained`` still writes those names). The expected
result is computed without lora_inject: each such weight gets ``W + s * B @ A`` in the saved checkpoint,
and transformers loads that checkpoint into the transformers-5 model with its own conversion rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def tiny(name: str):
    import transformers as t

    if name == "mixtral":
        config = t.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                 num_experts_per_tok=2)
        return t.MixtralForCausalLM(config).eval()
    if name == "qwen3_moe":
        config = t.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                                  num_experts_per_tok=2, head_dim=8)
        return t.Qwen3MoeForCausalLM(config).eval()
    if name == "deepseek_v3":  # dense first layer, then routed experts plus a shared expert
        config = t.DeepseekV3Config(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                                    num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                                    n_shared_experts=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
                                    qk_nope_head_dim=4, v_head_dim=4, n_group=1, topk_group=1)
        return t.DeepseekV3ForCausalLM(config).eval()
    if name == "gpt_oss":  # experts stored transposed, (E, in, out)
        config = t.GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2)
        return t.GptOssForCausalLM(config).eval()
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    if name == "qwen2_moe":  # routed experts plus a shared expert with its own gate
        config = t.Qwen2MoeConfig(**small, intermediate_size=32, moe_intermediate_size=8,
                                  shared_expert_intermediate_size=12, num_experts=4, num_experts_per_tok=2)
        return t.Qwen2MoeForCausalLM(config).eval()
    if name == "phimoe":  # the router subclasses nn.Linear but returns a tuple
        config = t.PhimoeConfig(**small, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
        return t.PhimoeForCausalLM(config).eval()
    if name == "gpt_neox":  # transformers 4 called the head embed_out
        config = t.GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, eos_token_id=0, bos_token_id=0)
        return t.GPTNeoXForCausalLM(config).eval()
    if name == "vit":
        config = t.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             image_size=8, patch_size=4, num_labels=3)
        return t.ViTForImageClassification(config).eval()
    if name == "dinov2":
        config = t.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                                patch_size=4, mlp_ratio=2)
        return t.Dinov2Model(config).eval()
    if name == "llava":
        vision = t.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=8, patch_size=4, projection_dim=16)
        text = t.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return t.LlavaForConditionalGeneration(t.LlavaConfig(vision_config=vision, text_config=text,
                                                             image_token_index=63)).eval()
    raise ValueError(name)


def inputs(name: str, generator: torch.Generator | None = None) -> dict:
    if name in ("vit", "dinov2"):
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(0, 60, (2, 7), generator=generator)}


def output(model, batch: dict) -> torch.Tensor:
    result = model(**batch)
    return result.logits if hasattr(result, "logits") and result.logits is not None else result.last_hidden_state


def v4_adapter(model, folder: Path, leaves: list[str], r: int = 2, alpha: float = 6.0, rslora: bool = False,
               rank_pattern: dict | None = None, dropout: float = 0.0, seed: int = 0, dora: bool = False):
    """Save ``model`` (transformers writes its 4-era names), write a transformers-4 LoRA adapter on the saved
    2-D weights whose module name is in ``leaves``, and return ``(base dir, adapter dir, expected model)``:
    the expected model is the merged checkpoint as transformers loads it."""
    base, adapter, merged = folder / "base", folder / "adapter", folder / "merged"
    model.save_pretrained(base)
    (shard,) = sorted(base.glob("*.safetensors"))
    weights = load_file(shard)
    generator = torch.Generator().manual_seed(seed)
    rank_pattern = rank_pattern or {}
    tensors = {}
    for key in sorted(weights):
        path, _, leaf = key.rpartition(".")
        if leaf != "weight" or weights[key].dim() != 2 or path.rsplit(".", 1)[-1] not in leaves:
            continue
        rank = next((v for k, v in rank_pattern.items() if path.endswith(k)), r)
        out_features, in_features = weights[key].shape
        a = torch.randn(rank, in_features, generator=generator) * 0.3
        b = torch.randn(out_features, rank, generator=generator) * 0.3
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        updated = weights[key].float() + scale * (b @ a)
        if dora:  # W' = m * (W + s B A) / ||W + s B A||, the norm per output row
            magnitude = torch.rand(out_features, generator=generator) + 0.5
            updated = updated * (magnitude / torch.linalg.vector_norm(updated, dim=1))[:, None]
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = magnitude
        weights[key] = updated.to(weights[key].dtype)
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": leaves,
        "rank_pattern": rank_pattern, "lora_dropout": dropout, "peft_version": "0.15.2", "use_dora": dora,
    }))
    merged.mkdir()
    for item in base.iterdir():
        if item.suffix != ".safetensors":
            (merged / item.name).write_bytes(item.read_bytes())
    save_file(weights, merged / shard.name, metadata={"format": "pt"})
    expected = type(model).from_pretrained(merged).eval()
    return base, adapter, expected
