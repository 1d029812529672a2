"""Diffusion LoRA files (formats/diffusion.py, diffusion_names.py, lora_inject.diffusers): files written by the
tests in each family's names, loaded into tiny diffusers/transformers models built from configs, against the
merge computed by hand (``W + (alpha/r) * up @ down``); refusals leave the model unchanged."""

from __future__ import annotations

import copy
import re
import types
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora_inject as li

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def sd_unet(**overrides):
    torch.manual_seed(0)
    options = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                   norm_num_groups=8)
    options.update(overrides)
    return diffusers.UNet2DConditionModel(**options).eval()


def sdxl_unet():
    """SDXL's block layout (two layers per block, attention in the lower blocks, linear projections), tiny."""
    return sd_unet(layers_per_block=2, block_out_channels=(16, 32, 32),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   use_linear_projection=True)


def flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def clip(with_projection=False):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


def unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([3]), c).sample


def flux_out(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 4, 4, generator=g), torch.randn(1, 3, 16, generator=g),
                     torch.randn(1, 8, generator=g), torch.tensor([0.5]), torch.zeros(4, 3), torch.zeros(3, 3),
                     torch.tensor([3.5])).sample


def clip_out(model):
    with torch.no_grad():
        return model(torch.tensor([[0, 5, 7, 9, 1]]))[0]


def factors(weight, rank, g, rows=None):
    """(down, up) for a weight of this shape: convolutions get a kernel-sized down and a 1x1 up (LoCon)."""
    out_rows = rows or weight.shape[0]
    down = torch.randn(rank, *weight.shape[1:], generator=g) * 0.1
    up = torch.randn(out_rows, rank, *([1, 1] if weight.dim() == 4 else []), generator=g) * 0.1
    return down, up


def delta(down, up):
    if down.dim() == 4:
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    return up @ down


class File:
    """A file being written by a test and the merge it stands for, computed by hand on a copy of the model."""

    def __init__(self, model):
        self.model, self.tensors, self.g = model, {}, torch.Generator().manual_seed(1)
        self.merged = copy.deepcopy(model)
        self.modules = dict(self.merged.named_modules())

    def add(self, name, paths, alpha=None, rank=3, swap=False, suffixes=(".lora_down.weight", ".lora_up.weight")):
        """``name`` updates the modules ``paths`` (several: a fused entry, split by rows of up)."""
        weights = [self.modules[p].weight for p in paths]
        down, up = factors(weights[0], rank, self.g, sum(w.shape[0] for w in weights))
        self.tensors[name + suffixes[0]], self.tensors[name + suffixes[1]] = down, up
        if alpha is not None:
            self.tensors[name + ".alpha"] = torch.tensor(float(alpha))
        scale = (alpha if alpha is not None else rank) / rank
        full = delta(down, up)
        if swap:
            full = torch.cat(full.chunk(2)[::-1])
        start = 0
        for path, weight in zip(paths, weights):
            self.modules[path].weight.data += scale * full[start:start + weight.shape[0]]
            start += weight.shape[0]

    def save(self, path, metadata=None):
        save_file(self.tensors, str(path), metadata=metadata)
        return path


def leaves(model, kinds=(nn.Linear, nn.Conv2d)):
    return [p for p, m in model.named_modules() if isinstance(m, kinds)]


def assert_same(a, b, tol=2e-5):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_kohya_sd1_per_module_alphas_and_locon_convs(tmp_path):
    unet = sd_unet()
    file, paths = File(unet), leaves(unet)
    for i, path in enumerate(paths):
        file.add("lora_unet_" + path.replace(".", "_"), [path], alpha=[1, 2.5, None, 8][i % 4], rank=2 + i % 3)
    li.load_adapter(unet, file.save(tmp_path / "sd1.safetensors"))
    assert_same(unet_out(unet), unet_out(file.merged))
    assert len(li.adapter_configs(unet)["default"].targets) == len(paths)


KNOWN_SGM = {  # SDXL's kohya names -> diffusers paths, as sd-scripts and diffusers both lay them out
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_8_1_proj_out": "down_blocks.2.attentions.1.proj_out",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "time_embed_0": "time_embedding.linear_1",
    "out_2": "conv_out",
}


def test_kohya_sdxl_block_names_are_placed_from_the_config(tmp_path):
    from lora_inject.formats.diffusion_names import flat, name_table

    unet = sdxl_unet()
    table = name_table(unet)
    for sgm, path in KNOWN_SGM.items():
        assert [p.path for p in table[sgm]] == [path], sgm
    inverse = {p[0].path: name for name, p in table.items() if name.startswith(("input_", "middle_", "output_"))
               and name != "input_blocks_0_0"}  # (diffusers' mapper leaves conv_in to a later step)
    # diffusers' own SGM mapper agrees on every block name
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    sgm_keys = {f"lora_unet_{inverse[p]}.lora_down.weight": 0 for p in leaves(unet) if p in inverse}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sgm_keys), unet.config)
    def diffusers_path(key):  # its attention keys come out in the old attention-processor spelling
        key = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.down\.weight$", r".\1", _convert_unet_lora_key(key))
        return key + ".0" if key.endswith(".to_out") else key.removesuffix(".lora.down.weight")

    theirs = sorted(diffusers_path(k) for k in mapped)
    assert theirs == sorted(p for p in leaves(unet) if p in inverse)
    file = File(unet)
    for i, path in enumerate(leaves(unet)):
        file.add("lora_unet_" + (inverse.get(path) or flat(path)), [path], alpha=1 + i % 4, rank=2)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in file.tensors
    li.load_adapter(unet, file.save(tmp_path / "sdxl.safetensors"))
    assert_same(unet_out(unet), unet_out(file.merged))


BFL = {  # BFL name -> diffusers modules (fused: split by rows in this order)
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.txt_attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_mlp.2": ["transformer_blocks.0.ff_context.net.2"],
    "double_blocks.0.img_mod.lin": ["transformer_blocks.0.norm1.linear"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_flux_bfl_names_fused_projections_and_the_final_layer(tmp_path, style):
    model = flux()
    file = File(model)
    kohya = style == "kohya"
    suffixes = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
    entries = [*BFL.items(), ("final_layer.adaLN_modulation.1", ["norm_out.linear"])]
    for i, (bfl, paths) in enumerate(entries):
        name = "lora_unet_" + bfl.replace(".", "_") if kohya else "diffusion_model." + bfl
        file.add(name, paths, alpha=1 + i % 3, suffixes=suffixes, swap=bfl.startswith("final_layer.ada"))
    li.load_adapter(model, file.save(tmp_path / "flux.safetensors"))
    assert_same(flux_out(model), flux_out(file.merged))


def test_onetrainer_and_diffusers_files_with_metadata_alphas(tmp_path):
    import json

    model = flux()
    one = File(model)
    for path in leaves(model)[:6]:
        one.add("lora_transformer_" + path.replace(".", "_"), [path], alpha=4)
    li.load_adapter(model, one.save(tmp_path / "onetrainer.safetensors"), adapter="one")
    assert_same(flux_out(model), flux_out(one.merged))

    unet = sd_unet()
    dif = File(unet)
    paths = [p for p in leaves(unet) if p.endswith(("to_q", "to_v", "proj_in"))]
    metadata = {"unet.r": 3, "unet.lora_alpha": 6, "unet.alpha_pattern": {"proj_in": 1.5}}
    for path in paths:  # scale from the metadata: 6/3, proj_in 1.5/3
        dif.add("unet." + path, [path], rank=3, suffixes=(".lora_A.weight", ".lora_B.weight"))
        dif.modules[path].weight.data += ((1.5 if path.endswith("proj_in") else 6) / 3 - 1) * delta(
            dif.tensors[f"unet.{path}.lora_A.weight"], dif.tensors[f"unet.{path}.lora_B.weight"])
    li.load_adapter(unet, dif.save(tmp_path / "d.safetensors", {"lora_adapter_metadata": json.dumps(metadata)}))
    assert_same(unet_out(unet), unet_out(dif.merged))


@pytest.mark.parametrize("with_projection,prefix", [(False, "lora_te_"), (False, "lora_te1_"), (True, "lora_te2_")])
def test_text_encoder_names_keep_their_text_model_level(tmp_path, with_projection, prefix):
    """transformers 5's CLIPTextModel has no ``text_model.`` level; kohya files (transformers 4 names) do."""
    model = clip(with_projection)
    file = File(model)
    for path in leaves(model, nn.Linear):
        if "text_projection" not in path:
            name = path if path.startswith("text_model.") else "text_model." + path
            file.add(prefix + name.replace(".", "_"), [path], alpha=2)
    li.load_adapter(model, file.save(tmp_path / "te.safetensors"))
    assert_same(clip_out(model), clip_out(file.merged))


REFUSALS = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "belongs to the text encoder",
    "lora_unet_down_blocks_9_attentions_0_proj_in": "no module of this model goes by",
    "lora_unet_conv_in.diff": "full weight delta",
    "lora_unet_conv_in.hada_w1_a": "LyCORIS",
    "lora_unet_conv_in.dora_scale": "DoRA",
    "lora_unet_conv_in.lora_mid.weight": "Tucker",
    "double_blocks.0.processor.proj_lora1.down.weight": "not a LoRA factor name",
    "base_model.model.conv_in.lora_A.weight": "without their adapter_config.json",
}


@pytest.mark.parametrize("key", REFUSALS)
def test_every_key_is_placed_or_refused_by_name(tmp_path, key):
    unet = sd_unet()
    file = File(unet)
    file.add("lora_unet_down_blocks_0_attentions_0_proj_in", ["down_blocks.0.attentions.0.proj_in"], alpha=2)
    file.tensors[key] = torch.zeros(2, 2) if not key.startswith("lora_te") else torch.zeros(2, 32)
    if key.startswith(("lora_te", "lora_unet_down_blocks_9")):
        file.tensors[key + ".lora_down.weight"] = file.tensors.pop(key)
        file.tensors[key + ".lora_up.weight"] = torch.zeros(32, 2)
    path = file.save(tmp_path / "bad.safetensors")
    before = state(unet)
    with pytest.raises(li.AdapterFileError, match=REFUSALS[key]):
        li.load_adapter(unet, path)
    assert li.adapter_configs(unet) == {}
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with pytest.warns(UserWarning, match="left out 1 key|left out 2 key"):
        li.load_adapter(unet, path, strict=False)
    assert_same(unet_out(unet), unet_out(file.merged))


def test_shapes_and_lone_factors_are_refused(tmp_path):
    unet = sd_unet()
    file = File(unet)
    file.add("lora_unet_conv_in", ["conv_in"], alpha=2)
    file.tensors["lora_unet_conv_out.lora_down.weight"] = torch.zeros(2, 32, 3, 3)
    file.tensors["lora_unet_time_embedding_linear_1.lora_down.weight"] = torch.zeros(2, 7)  # wrong in-features
    file.tensors["lora_unet_time_embedding_linear_1.lora_up.weight"] = torch.zeros(128, 2)
    with pytest.raises(li.AdapterFileError, match="no lora_up partner") as info:
        li.load_adapter(unet, file.save(tmp_path / "bad.safetensors"))
    assert "do not fit the module's weight" in str(info.value)
    assert li.adapter_configs(unet) == {}


def pipeline(flux_model=False):
    return types.SimpleNamespace(unet=None if flux_model else sd_unet(), transformer=flux() if flux_model else None,
                                 text_encoder=clip(), text_encoder_2=None)


def test_pipeline_loads_one_file_into_each_component_and_stacks_adapters(tmp_path):
    pipe = pipeline()
    merged = copy.deepcopy(pipe)
    first_unet, first_te = File(pipe.unet), File(pipe.text_encoder)
    second = File(pipe.unet)
    for path in leaves(pipe.unet)[::3]:
        first_unet.add("lora_unet_" + path.replace(".", "_"), [path], alpha=2)
    for path in leaves(pipe.unet)[1::4]:
        second.add("lora_unet_" + path.replace(".", "_"), [path], alpha=6)
    for path in leaves(pipe.text_encoder, nn.Linear)[::2]:
        first_te.add("lora_te_text_model_" + path.replace(".", "_"), [path], alpha=1)
    save_file({**first_unet.tensors, **first_te.tensors}, str(tmp_path / "a.safetensors"))
    save_file(second.tensors, str(tmp_path / "b.safetensors"))
    li.diffusers.load_lora(pipe, tmp_path / "a.safetensors", adapter="a", weight=0.7)
    li.diffusers.load_lora(pipe, tmp_path / "b.safetensors", adapter="b", weight=0.5)
    assert li.active_adapters(pipe.unet) == ["a", "b"] and li.active_adapters(pipe.text_encoder) == ["a"]
    # by hand: each file's update at its weight
    for model, files in ((merged.unet, [(first_unet, 0.7), (second, 0.5)]), (merged.text_encoder, [(first_te, 0.7)])):
        modules = dict(model.named_modules())
        for file, weight in files:
            for path, module in file.modules.items():
                if hasattr(module, "weight") and isinstance(module, (nn.Linear, nn.Conv2d)):
                    original = dict(file.model.named_modules())[path].weight
                    modules[path].weight.data += weight * (module.weight - original).detach()
    assert_same(clip_out(pipe.text_encoder), clip_out(merged.text_encoder))
    assert_same(unet_out(pipe.unet), unet_out(merged.unet))
    expected = unet_out(pipe.unet)
    li.diffusers.merge(pipe)
    assert_same(unet_out(pipe.unet), expected)
    li.diffusers.unmerge(pipe)
    li.diffusers.unload(pipe)
    assert not any(isinstance(m, li.LoraLayer) for m in pipe.unet.modules())


def test_pipeline_refuses_keys_for_missing_components_and_changes_nothing(tmp_path):
    pipe = pipeline()
    file = File(pipe.unet)
    file.add("lora_unet_conv_in", ["conv_in"], alpha=2)
    file.tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    file.tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 2)
    file.tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    file.tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 3)  # wrong rank
    path = file.save(tmp_path / "x.safetensors")
    with pytest.raises(li.AdapterFileError, match="which this pipeline does not have"):
        li.diffusers.load_lora(pipe, path)
    assert li.adapter_configs(pipe.unet) == {} and li.adapter_configs(pipe.text_encoder) == {}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        li.diffusers.load_lora(pipe, path, strict=False)
    assert li.adapter_configs(pipe.text_encoder) == {}
    assert_same(unet_out(pipe.unet), unet_out(file.merged))


def test_kohya_export_round_trips_with_per_module_alphas_and_diffusers_reads_it(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = sd_unet()
    plain = copy.deepcopy(unet)
    li.inject(unet, targets=["to_q", "to_v", "proj_in", "conv1", "time_emb_proj"], r=4, alpha=8, init=False,
              rank_pattern={"conv1": 2}, alpha_pattern={"proj_in": 3.0})
    expected = unet_out(unet)
    out = li.save_adapter(unet, tmp_path / "k", format="kohya")
    assert out.name == "pytorch_lora_weights.safetensors"
    again = copy.deepcopy(plain)
    li.load_adapter(again, out)
    assert_same(unet_out(again), expected, 1e-6)
    half = li.save_adapter(unet, tmp_path / "h.safetensors", format="kohya")
    assert half.name == "h.safetensors"

    class Pipe(StableDiffusionLoraLoaderMixin):  # diffusers' loader, on the two parts it needs
        hf_device_map, components = None, {}

    theirs = Pipe()
    theirs.unet, theirs.text_encoder = copy.deepcopy(plain), clip()
    li.inject(unet, targets=["to_k"], r=2, adapter="uniform", init=False)  # diffusers: uniform alphas only
    uniform = copy.deepcopy(plain)
    li.inject(uniform, targets=["to_q", "to_v", "proj_in", "conv1"], r=4, alpha=8, init=False)
    li.save_adapter(uniform, tmp_path / "u.safetensors", format="kohya")
    theirs.load_lora_weights(str(tmp_path / "u.safetensors"))
    assert_same(unet_out(theirs.unet), unet_out(uniform), 1e-6)


def test_pipeline_export_is_one_file_read_back_exactly(tmp_path):
    pipe = pipeline()
    li.inject(pipe.unet, targets=["to_q", "conv2"], r=2, alpha=3, init=False)
    li.inject(pipe.text_encoder, targets=["q_proj"], r=2, alpha=1, init=False)
    out = li.diffusers.save_lora(pipe, tmp_path / "p.safetensors", dtype=torch.float16)
    fresh = pipeline()
    li.diffusers.load_lora(fresh, out)
    rounded = copy.deepcopy(pipe)
    for part in (rounded.unet, rounded.text_encoder):
        for name, p in part.named_parameters():
            if "lora_" in name:
                p.data = p.data.half().float()
    assert_same(unet_out(fresh.unet), unet_out(rounded.unet), 1e-6)
    assert_same(clip_out(fresh.text_encoder), clip_out(rounded.text_encoder), 1e-6)


def test_exact_configs_keep_a_path_that_ends_another_to_its_own_module():
    """PEFT's pattern rule matches tails: "proj_out" would also set "single.0.proj_out" (Flux has both)."""
    from lora_inject.config import exact_config

    config = exact_config(li.LoraConfig(), {"proj_out": 2, "single.0.proj_out": 2, "x": 2},
                          {"proj_out": 5.0, "single.0.proj_out": 1.0, "x": 1.0})
    assert [config.scale_for(p) for p in ("proj_out", "single.0.proj_out", "x")] == [5.0, 1.0, 1.0]
    from peft.utils.other import get_pattern_key  # PEFT reads the anchored key the same way

    assert get_pattern_key(list(config.alpha_pattern), "single.0.proj_out") == "single.0.proj_out"


def test_flux_kohya_export_fuses_bfl_pairs_exactly_and_diffusers_reads_it(tmp_path):
    from diffusers.loaders import FluxLoraLoaderMixin
    from safetensors import safe_open

    model = flux()
    plain = copy.deepcopy(model)
    li.inject(model, targets=["to_q", "to_k", "to_v", "proj_out", "x_embedder", "norm_out.linear", "proj_mlp",
                              "ff.net.2"], r=4, alpha=8, init=False, rank_pattern={"to_v": 2},
              alpha_pattern={"proj_out": 3.0})
    out = li.save_adapter(model, tmp_path / "flux.safetensors", format="kohya")
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.lora_down.weight").shape == (4 + 4 + 2 + 4, 16)
    assert {"lora_unet_double_blocks_0_img_attn_qkv.alpha", "lora_unet_final_layer_adaLN_modulation_1.alpha",
            "lora_unet_img_in.alpha", "lora_unet_single_blocks_0_linear2.alpha"} <= keys
    again = copy.deepcopy(plain)
    li.load_adapter(again, out)
    assert_same(flux_out(again), flux_out(model), 1e-6)

    class Pipe(FluxLoraLoaderMixin):
        hf_device_map, components = None, {}

    # diffusers 0.42.1 reads kohya Flux blocks (it assumes Flux-dev sizes for single blocks' linear1 and drops
    # img_in / final-layer pairs): the double-block part, exactly
    blocks = copy.deepcopy(plain)
    li.inject(blocks, targets=["re:transformer_blocks.*(to_q|to_v|add_k_proj|to_out.0|ff.net.2|norm1.linear)"], r=4,
              alpha=8, init=False, rank_pattern={"to_v": 2})
    li.save_adapter(blocks, tmp_path / "blocks.safetensors", format="kohya")
    theirs = Pipe()
    theirs.transformer, theirs.text_encoder = copy.deepcopy(plain), clip()
    theirs.load_lora_weights(str(tmp_path / "blocks.safetensors"))
    assert_same(flux_out(theirs.transformer), flux_out(blocks), 1e-6)


def test_weights_are_a_runtime_scale_zero_and_negative_included_and_never_saved(tmp_path):
    pipe = pipeline()
    plain = copy.deepcopy(pipe.unet)
    file = File(pipe.unet)
    for path in leaves(pipe.unet)[::3]:
        file.add("lora_unet_" + path.replace(".", "_"), [path], alpha=2)
    path = file.save(tmp_path / "a.safetensors")
    base, full = unet_out(plain), unet_out(file.merged)
    inverted = copy.deepcopy(plain)
    with torch.no_grad():
        for mine, original, merged in zip(inverted.parameters(), plain.parameters(), file.merged.parameters()):
            mine.copy_(2 * original - merged)  # W - delta
    li.diffusers.load_lora(pipe, path, adapter="a", weight=-1.0)
    assert_same(unet_out(pipe.unet), unet_out(inverted))
    li.diffusers.set_weights(pipe, {"a": 0.0})
    assert_same(unet_out(pipe.unet), base)
    li.diffusers.set_weights(pipe, {"a": 0.5})
    out = li.diffusers.save_lora(pipe, tmp_path / "saved.safetensors", adapter="a")
    again = pipeline()
    li.diffusers.load_lora(again, out)  # the file's own alphas: weight 1
    assert_same(unet_out(again.unet), full)
    li.diffusers.merge(pipe)
    with pytest.raises(li.ConfigError, match="unmerge before"):
        li.diffusers.set_weights(pipe, {"a": 1.0})
    with pytest.raises(li.ConfigError, match="finite"):
        li.diffusers.load_lora(pipeline(), path, weight=float("nan"))


def test_alphas_that_are_not_positive_are_refused_by_key(tmp_path):
    unet = sd_unet()
    file = File(unet)
    file.add("lora_unet_conv_in", ["conv_in"], alpha=2)
    file.add("lora_unet_conv_out", ["conv_out"], alpha=0)
    with pytest.raises(li.AdapterFileError, match="lora_unet_conv_out.alpha"):
        li.load_adapter(unet, file.save(tmp_path / "a.safetensors"))
    assert li.adapter_configs(unet) == {}


def test_diffusers_metadata_patterns_under_transformers4_text_encoder_paths(tmp_path):
    import json

    model = clip()
    file = File(model)
    for path in leaves(model, nn.Linear)[:4]:
        file.add("text_encoder." + "text_model." + path, [path], rank=2, suffixes=(".lora_A.weight", ".lora_B.weight"))
    q = leaves(model, nn.Linear)[2]  # its pattern names it under text_model.: alpha 8, the rest 4
    for path in leaves(model, nn.Linear)[:4]:
        down = file.tensors[f"text_encoder.text_model.{path}.lora_A.weight"]
        up = file.tensors[f"text_encoder.text_model.{path}.lora_B.weight"]
        file.modules[path].weight.data += ((8 if path == q else 4) / 2 - 1) * (up @ down)
    metadata = {"text_encoder.r": 2, "text_encoder.lora_alpha": 4, "text_encoder.alpha_pattern": {f"text_model.{q}": 8}}
    li.load_adapter(model, file.save(tmp_path / "te.safetensors", {"lora_adapter_metadata": json.dumps(metadata)}))
    assert_same(clip_out(model), clip_out(file.merged))


def test_t5_text_encoders_use_kohyas_te3_names_both_ways(tmp_path):
    config = transformers.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(config).eval()
    pipe = types.SimpleNamespace(transformer=flux(), text_encoder=clip(), text_encoder_2=t5)
    li.inject(pipe.text_encoder_2, targets=["q", "v"], r=2, init=False)
    li.inject(pipe.text_encoder, targets=["q_proj"], r=2, init=False)
    out = li.diffusers.save_lora(pipe, tmp_path / "flux.safetensors")
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        prefixes = {k.split("_text_model_")[0].split("_encoder_")[0] for k in f.keys()}
    assert prefixes == {"lora_te1", "lora_te3"}
    torch.manual_seed(0)
    t5_again = transformers.T5EncoderModel(config).eval()
    fresh = types.SimpleNamespace(transformer=flux(), text_encoder=clip(), text_encoder_2=t5_again)
    li.diffusers.load_lora(fresh, out)
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        assert_same(fresh.text_encoder_2(ids).last_hidden_state, pipe.text_encoder_2(ids).last_hidden_state, 1e-6)
    alone = transformers.T5EncoderModel(config).eval()
    with pytest.warns(UserWarning, match="left out"):
        li.load_adapter(alone, out, strict=False)  # its own keys load; CLIP's are left out by name
    assert len(li.adapter_configs(alone)["default"].targets) == 2


def test_an_up_factor_of_the_wrong_kind_is_left_out_by_name(tmp_path):
    unet = sd_unet()
    file = File(unet)
    file.add("lora_unet_conv_in", ["conv_in"], alpha=2)
    name = "lora_unet_time_embedding_linear_1"
    file.tensors[f"{name}.lora_down.weight"] = torch.zeros(2, 32)
    file.tensors[f"{name}.lora_up.weight"] = torch.zeros(128, 2, 3, 3)  # a Linear given a 3x3 up
    path = file.save(tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="do not fit the module's weight"):
        li.load_adapter(unet, path, strict=False)
    assert_same(unet_out(unet), unet_out(file.merged))


def test_fp16_merge_is_the_float32_merge_cast_once(tmp_path):
    """Merging into a float16 UNet: each weight within 1 ulp of W + (alpha/r) up@down computed in float32
    and cast once (diffusers' fuse in float16 rounds twice)."""
    unet = sd_unet()
    file = File(unet)
    paths = [p for p in leaves(unet, nn.Linear) if ".attn" in p]
    for i, path in enumerate(paths):
        file.add("lora_unet_" + path.replace(".", "_"), [path], alpha=1 + i % 3)
    half = unet.half()
    before = {p: dict(half.named_modules())[p].weight.detach().clone() for p in paths}
    li.load_adapter(half, file.save(tmp_path / "a.safetensors"))
    li.merge(half)
    modules = dict(half.named_modules())
    for path in paths:
        down = file.tensors["lora_unet_" + path.replace(".", "_") + ".lora_down.weight"]
        up = file.tensors["lora_unet_" + path.replace(".", "_") + ".lora_up.weight"]
        alpha = float(file.tensors["lora_unet_" + path.replace(".", "_") + ".alpha"])
        expected = (before[path].float() + alpha / down.shape[0] * (up @ down)).half()
        merged = modules[path].base_layer.weight.detach()
        ulps = (merged.view(torch.int16).int() - expected.view(torch.int16).int()).abs().max()
        assert ulps <= 1, path


def test_a_text_encoder_file_with_only_some_projections_loads_them(tmp_path):
    """diffusers 0.42.1 drops q_proj from a text-encoder file that has no out_proj; every key counts here."""
    model = clip()
    file = File(model)
    q = [p for p in leaves(model, nn.Linear) if p.endswith("q_proj")]
    for path in q:
        file.add("lora_te_text_model_" + path.replace(".", "_"), [path], alpha=3)
    li.load_adapter(model, file.save(tmp_path / "te.safetensors"))
    assert sorted(li.adapter_configs(model)["default"].targets) == sorted(f"re:{re.escape(p)}" for p in q)
    assert_same(clip_out(model), clip_out(file.merged))


def test_one_model_saves_a_float16_kohya_file(tmp_path):
    unet = sd_unet()
    li.inject(unet, targets=["to_q", "conv1"], r=2, alpha=3, init=False)
    out = li.diffusers.save_lora(unet, tmp_path / "u.safetensors", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert all(k.startswith("lora_unet_") for k in f.keys())
    again = sd_unet()
    li.load_adapter(again, out)
    rounded = copy.deepcopy(unet)
    for name, p in rounded.named_parameters():
        if "lora_" in name:
            p.data = p.data.half().float()
    assert_same(unet_out(again), unet_out(rounded), 1e-6)


def test_single_file_loras_by_hub_id_and_weight_name_offline(tmp_path, monkeypatch):
    import huggingface_hub
    from test_habits import _hub_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    unet = sd_unet()
    file = File(unet)
    file.add("lora_unet_conv_in", ["conv_in"], alpha=2)
    file.save(tmp_path / "style.safetensors")
    save_file({"lora_unet_conv_out.lora_down.weight": torch.zeros(2, 32, 3, 3)}, str(tmp_path / "other.safetensors"))
    cache = tmp_path / "cache"
    _hub_cache(cache, "me/loras", [tmp_path / "style.safetensors", tmp_path / "other.safetensors"])
    options = dict(weight_name="style.safetensors", cache_dir=str(cache), local_files_only=True)
    li.load_adapter(unet, "me/loras", **options)
    assert_same(unet_out(unet), unet_out(file.merged))
    pipe = pipeline()
    li.diffusers.load_lora(pipe, "me/loras", adapter="style", **options)
    assert_same(unet_out(pipe.unet), unet_out(file.merged))
    with pytest.raises(li.AdapterFileError, match="could not be read as a Hugging Face hub repo id"):
        li.load_adapter(sd_unet(), "me/absent", **options)


def test_embedding_entries_are_refused_by_name_not_loaded_as_linear(tmp_path):
    model = clip()
    name = "lora_te_text_model_embeddings_token_embedding"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 32), f"{name}.lora_up.weight": torch.randn(100, 2)},
              str(tmp_path / "e.safetensors"))
    with pytest.raises(li.AdapterFileError, match="an embedding"):
        li.load_adapter(model, tmp_path / "e.safetensors")
    assert li.adapter_configs(model) == {}
