"""Injection into whole models: tiny Llama, GPT-2, BERT and a conv net, plus every refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ConvNet, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lora_inject as li


def llama_input():
    return {"input_ids": torch.randint(0, 100, (2, 7))}


def image_input():
    return torch.randn(2, 3, 16, 16)


def run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


# name -> (model factory, input factory, targets, expected wrapped count, wrapper type)
MODELS = {
    "llama": (tiny_llama, llama_input, ["q_proj", "v_proj"], 4, li.LoraLinear),
    "llama_all_linear": (tiny_llama, llama_input, "all-linear", 14, li.LoraLinear),
    "gpt2": (tiny_gpt2, llama_input, ["c_attn", "c_proj"], 6, li.LoraConv1D),
    "bert": (tiny_bert, llama_input, ["query", "value"], 4, li.LoraLinear),
    "bert_embeddings": (tiny_bert, llama_input, ["word_embeddings"], 1, li.LoraEmbedding),
    "convnet": (ConvNet, image_input, ["stem", "body", "point"], 3, li.LoraConv),
}


@pytest.mark.parametrize("name", MODELS)
def test_identity_at_init_then_all_merge_paths_agree(name):
    make, make_x, targets, count, wrapper_type = MODELS[name]
    model, x = make(), make_x()
    expected = run(model, x)
    li.inject(model, targets=targets, r=4, alpha=8)
    layers = list(li.lora_layers(model))
    assert len(layers) == count and all(isinstance(w, wrapper_type) for _, w in layers)
    assert torch.equal(run(model, x), expected)

    randomize_adapters(model)
    unmerged = run(model, x)
    assert not torch.allclose(unmerged, expected, atol=1e-4)
    manual = copy.deepcopy(model)
    li.merge(model)
    torch.testing.assert_close(run(model, x), unmerged, atol=2e-5, rtol=1e-4)
    li.unmerge(model)
    torch.testing.assert_close(run(model, x), unmerged, atol=2e-5, rtol=1e-4)
    # merge_and_unload == unload + manual W += delta
    deltas = {p: w.delta_weight("default") for p, w in li.lora_layers(manual)}
    plain_manual = li.unload(manual)
    with torch.no_grad():
        for path, delta in deltas.items():
            plain_manual.get_submodule(path).weight += delta
    plain = li.merge_and_unload(model)
    assert not list(li.lora_layers(plain))
    assert not any(isinstance(m, (li.LoraLayer, li.ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(run(plain, x), unmerged, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(run(plain_manual, x), unmerged, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_only_adapter_parameters_train(name):
    make, make_x, targets, _, _ = MODELS[name]
    model, x = make(), make_x()
    li.inject(model, targets=targets, r=4)
    randomize_adapters(model)
    model.train()
    run(model, x).float().pow(2).mean().backward()
    for pname, param in model.named_parameters():
        is_adapter = ".lora_" in pname
        assert param.requires_grad == is_adapter, pname
        assert (param.grad is not None) == is_adapter, pname
    count = li.trainable_parameters(model)
    assert count.trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert "trainable%" in str(count)


def test_unload_restores_original_state_dict_and_types():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    li.inject(model, targets="all-linear")
    randomize_adapters(model)
    li.merge(model)
    plain = li.unload(model)
    after = plain.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not hasattr(plain, "_lora_inject_configs")


def test_state_dict_and_lora_state_dict_keys():
    model = tiny_llama()
    li.inject(model, targets=["q_proj"], r=2)
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_B.default.weight" in keys
    sd = li.lora_state_dict(model)
    assert sorted(sd) == sorted(
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in range(2) for ab in "AB"
    )
    fresh = tiny_llama()
    li.inject(fresh, targets=["q_proj"], r=2)
    result = fresh.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys


def test_all_linear_leaves_output_head_alone():
    model = tiny_llama()
    li.inject(model, targets="all-linear")
    assert type(model.lm_head) is nn.Linear
    gpt2 = tiny_gpt2()
    li.inject(gpt2, targets="all-linear")
    assert type(gpt2.lm_head) is nn.Linear
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, li.LoraConv1D)


def test_type_targets_exclude_layers_and_patterns_on_a_real_model():
    model = tiny_llama(num_hidden_layers=3)
    li.inject(
        model, targets=[nn.Linear], exclude=["lm_head", "re:.*mlp\\..*"], layers=[0, 2],
        r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.2.self_attn.o_proj": 32},
        rslora=True,
    )
    paths = [p for p, _ in li.lora_layers(model)]
    assert paths == [f"model.layers.{i}.self_attn.{n}_proj" for i in (0, 2) for n in "qkvo"]
    layers = dict(li.lora_layers(model))
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(8 / 2**0.5)
    assert layers["model.layers.2.self_attn.o_proj"].scaling["default"] == pytest.approx(32 / 2)
    assert layers["model.layers.0.self_attn.o_proj"].scaling["default"] == pytest.approx(8 / 2)


def test_plan_is_a_dry_run():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    result = li.plan(model, targets=["q_proj", "down_proj"], r=4)
    assert [p.path for p in result.layers] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]
    q = result.layers[0]
    assert (q.module_type, q.weight_shape, q.r, q.added_params) == ("Linear", (32, 32), 4, 4 * (32 + 32))
    assert result.added_params == 2 * (4 * 64 + 4 * (64 + 32))
    assert "model.layers.0.mlp.down_proj" in str(result) and "4 layers wrapped" in str(result)
    assert not list(li.lora_layers(model))
    assert model.state_dict().keys() == before.keys()


def test_missing_target_error_lists_close_names_and_types():
    model = tiny_llama()
    with pytest.raises(li.TargetNotFoundError) as info:
        li.inject(model, targets=["q_prj", "v_proj"])
    message = str(info.value)
    assert "'q_prj' matched nothing" in message and "q_proj" in message
    assert "LlamaDecoderLayer" in message and "Linear" in message
    assert not list(li.lora_layers(model))


def test_everything_excluded_is_an_error():
    model = tiny_llama()
    with pytest.raises(li.TargetNotFoundError, match="exclude"):
        li.inject(model, targets=["q_proj"], exclude=["q_proj"])


def test_unsupported_type_error_names_type_supported_types_and_register():
    model = tiny_llama()
    with pytest.raises(li.UnsupportedModuleError) as info:
        li.inject(model, targets=["self_attn"])
    message = str(info.value)
    assert "LlamaAttention" in message and "Linear" in message and "register" in message
    assert not list(li.lora_layers(model))  # nothing half-done


def test_failed_injection_leaves_model_unchanged():
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(li.UnsupportedModuleError):
        li.inject(model, targets=["stem", "depthwise"], r=4)  # the second has 8 groups: r must be a multiple of 8
    assert type(model.stem) is nn.Conv2d
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_register_a_custom_type():
    class MyLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.in_features, self.out_features = 4, 3

        def forward(self, x):
            return x @ self.weight.T

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mine = MyLinear()

        def forward(self, x):
            return self.mine(x)

    with pytest.raises(li.UnsupportedModuleError):
        li.inject(Net(), targets=["mine"])
    li.register(MyLinear, li.LoraLinear)
    net = Net()
    x = torch.randn(2, 4)
    expected = net(x)
    li.inject(net, targets=["mine"])
    assert isinstance(net.mine, li.LoraLinear) and torch.equal(net(x), expected)
    with pytest.raises(li.ConfigError):
        li.register(MyLinear, nn.Linear)


def test_named_adapters_switching_and_duplicate_name():
    model = tiny_llama()
    x = llama_input()
    base_out = run(model, x)
    li.inject(model, targets=["q_proj"], adapter="one")
    randomize_adapters(model, "one")
    out_one = run(model, x)
    with pytest.raises(li.AdapterExistsError, match="one"):
        li.inject(model, targets=["q_proj"], adapter="one")
    li.inject(model, targets=["q_proj", "v_proj"], adapter="two")
    randomize_adapters(model, "two")
    assert li.active_adapters(model) == ["two"]
    out_two = run(model, x)
    assert not torch.allclose(out_two, out_one)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".two." in n for n in trainable)
    li.set_adapter(model, "one")
    torch.testing.assert_close(run(model, x), out_one)
    with li.disabled_adapters(model):
        torch.testing.assert_close(run(model, x), base_out)
    li.merge(model)
    with li.disabled_adapters(model):
        torch.testing.assert_close(run(model, x), base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, x), out_one, atol=1e-5, rtol=1e-5)
    li.unmerge(model)
    li.delete_adapter(model, "two")
    assert all(set(w.r) == {"one"} for _, w in li.lora_layers(model))
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear  # no adapter left there
    with pytest.raises(li.AdapterNotFoundError, match="two"):
        li.set_adapter(model, "two")


@pytest.mark.parametrize("bad", ["", "a.b", 3])
def test_bad_adapter_names(bad):
    with pytest.raises(li.ConfigError):
        li.inject(tiny_llama(), targets=["q_proj"], adapter=bad)


def test_modules_to_save_trains_a_copy_and_belongs_to_adapter():
    model = tiny_bert()
    x = llama_input()
    li.inject(model, targets=["query", "value"], modules_to_save=["classifier"])
    assert isinstance(model.classifier, li.ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    trained = run(model, x)
    sd = li.lora_state_dict(model)
    assert "classifier.modules_to_save.default.weight" in sd
    original_w = model.classifier.original_module.weight.clone()
    plain = li.merge_and_unload(copy.deepcopy(model))
    assert type(plain.classifier) is nn.Linear
    torch.testing.assert_close(run(plain, x), trained, atol=1e-5, rtol=1e-5)
    unloaded = li.unload(model)
    torch.testing.assert_close(unloaded.classifier.weight, original_w)


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {f"model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in range(2)}),
])
def test_bias_modes(bias, expected):
    model = tiny_llama(attention_bias=True)
    li.inject(model, targets=["q_proj"], bias=bias)
    trainable_bias = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_bias == expected
    assert set(k for k in li.lora_state_dict(model) if k.endswith("bias")) == expected


def test_bias_all_trains_every_bias():
    model = tiny_bert()
    li.inject(model, targets=["query"], bias="all")
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert biases and all(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_inject_refuses_ddp_wrapped_and_sharded_models(single_process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(tiny_llama())
    with pytest.raises(li.DistributedError, match="DistributedDataParallel.*plain model first"):
        li.inject(ddp, targets=["q_proj"])
    sharded = tiny_llama()
    fully_shard(sharded)
    with pytest.raises(li.DistributedError, match="FSDP"):
        li.inject(sharded, targets=["q_proj"])
    assert not list(li.lora_layers(sharded))


def test_preset_is_used_without_targets_and_unknown_type_errors():
    model = tiny_llama()
    li.inject(model)
    assert len(list(li.lora_layers(model))) == 14
    with pytest.raises(li.ConfigError, match="no preset.*names in this model: head"):
        li.inject(ConvNet())
    with pytest.raises(li.ConfigError, match="No preset named"):
        li.preset("nope")


def test_preset_targets_match_installed_transformers_classes():
    import transformers as t

    configs = {
        "llama": tiny_llama().config,
        "gpt2": tiny_gpt2().config,
        "bert": tiny_bert().config,
        "t5": t.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50),
        "vit": t.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=8, patch_size=4),
        "whisper": t.WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                   vocab_size=60, num_mel_bins=8, max_source_positions=8, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
    }
    for name, config in configs.items():
        model = t.AutoModel.from_config(config)
        li.inject(model)
        wrapped = {p.rsplit(".", 1)[-1] for p, _ in li.lora_layers(model)}
        assert wrapped == set(li.preset(name)), name
