"""Where the modules named in diffusion LoRA files live in a model, built from the model's own modules.

Files from kohya sd-scripts / A1111, ComfyUI, OneTrainer, ai-toolkit and diffusers name a module in one of four
ways, after a prefix that says which component it belongs to (``lora_unet_``, ``lora_te1_``, ``text_encoder.``):
the diffusers/transformers path with dots (``down_blocks.0.attentions.0.proj_in``) or with underscores
(``down_blocks_0_attentions_0_proj_in``), the original SGM block names of SDXL (``input_blocks_4_1_...``), or
BFL's names for Flux (``double_blocks_0_img_attn_qkv``). Underscore names are ambiguous as strings, so instead of
parsing them this module lists, for the model at hand, every name each of its modules can go by (the four forms,
the SGM and BFL tables computed from the model's config and blocks), each normalised to underscores: a file's
name is then placed by one dictionary lookup, exactly, or not at all.

A BFL name can stand for several modules: Flux's fused ``qkv`` and ``linear1`` are split by rows of the up
factor (the down factor is shared), in the order and sizes of the model's own projections, and the final
layer's modulation holds (shift, scale) where diffusers holds (scale, shift).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..layers import LoraLayer

# component -> prefixes its names carry in the files (longest first where one is the start of another)
ROLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "denoiser": ("model.diffusion_model.", "diffusion_model.", "lora_transformer_", "lora_unet_", "transformer.",
                 "unet."),
    "text_encoder": ("lora_te1_", "lora_te_", "text_encoder."),
    "text_encoder_2": ("lora_te2_", "text_encoder_2."),
    "text_encoder_t5": ("lora_te3_",),  # Flux's and SD3's T5 in kohya/ComfyUI files
}
_ALL_PREFIXES = sorted(((p, role) for role, ps in ROLE_PREFIXES.items() for p in ps), key=lambda x: -len(x[0]))


@dataclass(frozen=True)
class Placement:
    """One module a file's (down, up) pair updates: all of it, or the rows ``rows`` of the up factor."""

    path: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False  # the up factor's two halves are (shift, scale): diffusers wants (scale, shift)


AMBIGUOUS = ()  # a name two different modules go by: placed nowhere, refused by name


def flat(name: str) -> str:
    return name.replace(".", "_")


def split_role(lora_name: str) -> tuple[str, str]:
    """``(component, name without its prefix)``; names without a known prefix (raw BFL/diffusers keys) belong
    to the denoiser."""
    for prefix, role in _ALL_PREFIXES:
        if lora_name.startswith(prefix):
            return role, lora_name[len(prefix):]
    return "denoiser", lora_name


def role_of(model: nn.Module) -> str:
    """Which component of a pipeline ``model`` is, by class, as diffusers pipelines use them: CLIP-L the first
    text encoder (SD, SDXL, Flux), CLIP-G with projection SDXL's second, T5 Flux's/SD3's (kohya's ``lora_te3_``)."""
    name = type(model).__name__
    if name == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if name.startswith("T5EncoderModel"):
        return "text_encoder_t5"
    if name.startswith("CLIPTextModel"):
        return "text_encoder"
    return "denoiser"


def is_clip_text(model: nn.Module) -> bool:
    """A transformers CLIP text encoder: kohya names keep the ``text_model.`` level that transformers 5's
    ``CLIPTextModel`` lost."""
    return getattr(getattr(model, "config", None), "model_type", None) == "clip_text_model"


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules with a weight: what a LoRA pair can update. A module wrapped already (another adapter is
    loaded) counts as its base layer, under its own path."""
    found, wrapped = {}, []
    for path, module in model.named_modules():
        if not path or any(path.startswith(w) for w in wrapped):
            continue
        if isinstance(module, LoraLayer):
            found[path] = module.base_layer
            wrapped.append(path + ".")
        elif getattr(module, "weight", None) is not None and next(module.children(), None) is None:
            found[path] = module
    return found


def name_table(model: nn.Module) -> dict[str, tuple[Placement, ...]]:
    """``{underscore name: placements}`` for every name the model's modules go by in diffusion LoRA files."""
    modules = adaptable_modules(model)
    table: dict[str, tuple[Placement, ...]] = {}

    def add(name: str, placements: tuple[Placement, ...]) -> None:
        key = flat(name)
        if table.get(key, placements) != placements:
            placements = AMBIGUOUS
        table[key] = placements

    text_model = is_clip_text(model)
    for path in modules:
        add(path, (Placement(path),))
        if text_model and not path.startswith("text_model."):  # transformers 5's CLIPTextModel lost this level
            add("text_model." + path, (Placement(path),))
    for name, path in _sgm_names(model, modules).items():
        add(name, (Placement(path),))
    for name, placements in bfl_names(model).items():
        add(name, placements)
    return table


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}


def _sgm_names(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """``{SGM name: diffusers path}`` for a UNet2DConditionModel (SDXL's original block layout: input_blocks,
    middle_block, output_blocks), from its ``layers_per_block``."""
    config = getattr(model, "config", None)
    per_block = getattr(config, "layers_per_block", None)
    if not isinstance(per_block, int) or not hasattr(model, "down_blocks") or not hasattr(model, "up_blocks"):
        return {}
    with_attention = {i for i, block in enumerate(model.up_blocks) if getattr(block, "attentions", None)}
    names = {}
    for path in modules:
        sgm = _TOP_SGM.get(path) or _mid_block_path(path) or _sgm_block_path(path.split("."), per_block,
                                                                             with_attention)
        if sgm:
            names[sgm] = path
    return names


def _sgm_block_path(parts: list[str], per_block: int, up_with_attention: set[int]) -> str | None:
    if len(parts) < 4 or not parts[1].isdigit():
        return None
    block, kind, rest = int(parts[1]), parts[2], parts[3:]
    layer = int(rest[0]) if rest[0].isdigit() else 0
    inner = rest[1:]
    if kind == "resnets" and inner:
        inner = [_RESNET_SGM.get(inner[0], inner[0]), *inner[1:]]
    inner_text = ".".join(inner)
    if parts[0] == "down_blocks":
        if kind == "downsamplers" and inner == ["conv"]:
            return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op"
        if kind in ("resnets", "attentions"):
            index = 1 + block * (per_block + 1) + layer
            return f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{inner_text}"
    if parts[0] == "up_blocks":
        if kind == "upsamplers" and inner == ["conv"]:
            index = block * (per_block + 1) + per_block
            return f"output_blocks.{index}.{2 if block in up_with_attention else 1}.conv"
        if kind in ("resnets", "attentions"):
            index = block * (per_block + 1) + layer
            return f"output_blocks.{index}.{0 if kind == 'resnets' else 1}.{inner_text}"
    return None


def _mid_block_path(path: str) -> str | None:
    mid = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
    parts = path.split(".")
    if parts[0] != "mid_block" or len(parts) < 4:
        return None
    inner = parts[3:]
    if parts[1] == "resnets":
        inner = [_RESNET_SGM.get(inner[0], inner[0]), *inner[1:]]
    head = mid.get(f"{parts[1]}.{parts[2]}")
    return f"{head}.{'.'.join(inner)}" if head else None


_DOUBLE = {  # BFL name inside double_blocks.{i} -> modules of transformer_blocks.{i} (several: fused, split by rows)
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",), "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation.lin": ("norm.linear",)}
_FLUX_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def bfl_names(model: nn.Module) -> dict[str, tuple[Placement, ...]]:
    """``{BFL name: placements}`` for a Flux transformer (``transformer_blocks``, ``single_transformer_blocks``);
    empty for other models."""
    if not (hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks")):
        return {}
    modules = adaptable_modules(model)
    names: dict[str, tuple[Placement, ...]] = {}

    def fused(bfl: str, paths: list[str]) -> None:
        if not all(p in modules for p in paths):
            return
        if len(paths) == 1:
            names[bfl] = (Placement(paths[0]),)
            return
        start, placements = 0, []
        for path in paths:
            rows = modules[path].weight.shape[0]
            placements.append(Placement(path, (start, start + rows)))
            start += rows
        names[bfl] = tuple(placements)

    for i in range(len(model.transformer_blocks)):
        for bfl, inner in _DOUBLE.items():
            fused(f"double_blocks.{i}.{bfl}", [f"transformer_blocks.{i}.{m}" for m in inner])
    for i in range(len(model.single_transformer_blocks)):
        for bfl, inner in _SINGLE.items():
            fused(f"single_blocks.{i}.{bfl}", [f"single_transformer_blocks.{i}.{m}" for m in inner])
    for bfl, path in _FLUX_TOP.items():
        fused(bfl, [path])
    if "norm_out.linear" in modules:
        names["final_layer.adaLN_modulation.1"] = (Placement("norm_out.linear", swap_halves=True),)
    return names
