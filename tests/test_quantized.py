"""LoRA on quantized bases (bitsandbytes nf4/fp4/int8, torchao int8/int4 weight-only), for real on CPU in
float32 compute: training equal to PEFT, files both ways, merges that never lose the update silently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers as t
from conftest import assert_matches_peft, tiny_llama
from safetensors import safe_open
from torch import nn

import lora_inject as li
from lora_inject.cli import main
from lora_inject.errors import MergeError, UnsupportedModuleError

bnb = pytest.importorskip("bitsandbytes")
X = torch.tensor([[1, 5, 9, 30, 2], [7, 7, 64, 3, 90]])


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("float")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return folder


def _bnb(float_dir, avx512bf16=False, **config):
    """bitsandbytes takes another 4-bit path on CPUs with AVX512-BF16; the tests choose the path, not the CPU."""
    quantization = t.BitsAndBytesConfig(**config)
    model = t.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=quantization, dtype=torch.float32)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = avx512bf16
    return model


def _torchao(float_dir, config):
    from torchao.quantization import quantize_

    model = t.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    quantize_(model.model.layers, config)
    return model


def _torchao_config(name):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if name == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


BACKENDS = {
    "bnb_nf4_double_quant": lambda d: _bnb(d, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    "bnb_fp4": lambda d: _bnb(d, load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "bnb_int8": lambda d: _bnb(d, load_in_8bit=True),
    "torchao_int8_weight_only": lambda d: _torchao(d, _torchao_config("int8")),
    "torchao_int4_weight_only": lambda d: _torchao(d, _torchao_config("int4")),
}
BNB = [name for name in BACKENDS if name.startswith("bnb")]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(o):
    return o.logits


def _adapted(backend, float_dir):
    model = li.inject(BACKENDS[backend](float_dir), targets=TARGETS, r=4, alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _copy_into_peft(ours, theirs):
    values = {k.replace(".default", ""): v for k, v in li.lora_state_dict(ours).items()}
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(values[name.removeprefix("base_model.model.").replace(".default", "")])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_training_equals_peft_and_files_load_both_ways(backend, float_dir, tmp_path):
    ours = _adapted(backend, float_dir)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if ".lora_" in n)
    theirs = peft.get_peft_model(BACKENDS[backend](float_dir), peft.LoraConfig(target_modules=TARGETS, r=4))
    _copy_into_peft(ours, theirs)
    trained = assert_matches_peft(ours, theirs, X, _logits)  # outputs and every adapter gradient, 1e-5
    assert len(trained) == 2 * 2 * len(TARGETS)
    li.save_adapter(ours, tmp_path / "ours")
    ours.eval()
    with torch.no_grad():
        expected = ours(X).logits
        loaded = peft.PeftModel.from_pretrained(BACKENDS[backend](float_dir), tmp_path / "ours").eval()
        torch.testing.assert_close(loaded(X).logits, expected, atol=1e-6, rtol=1e-6)
        loaded.save_pretrained(tmp_path / "peft")
        back = li.load_adapter(BACKENDS[backend](float_dir), tmp_path / "peft").eval()
        torch.testing.assert_close(back(X).logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_merge_is_refused_by_default_and_nothing_changes(backend, float_dir):
    model = _adapted(backend, float_dir).eval()
    with torch.no_grad():
        before = model(X).logits
    for merge in (li.merge, li.merge_and_unload):
        with pytest.raises(MergeError, match=r"quantized.*dequantize=torch.bfloat16.*lora-inject merge"):
            merge(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, li.LoraLayer)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_dequantized_merge_keeps_the_update_exactly(backend, float_dir, tmp_path):
    model = _adapted(backend, float_dir).eval()
    layer = model.model.layers[1].mlp.down_proj
    expected_weight = li.quantized.dequantized_weight(layer.base_layer) + layer.delta_weight("default")
    merged = li.merge_and_unload(model, dequantize=torch.float32)
    assert all(li.quantized.quantized_kind(m) is None for m in merged.modules())
    assert type(merged.model.layers[0].mlp.up_proj) is nn.Linear  # unadapted quantized layers too
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, expected_weight, atol=1e-6, rtol=0)
    assert not hasattr(merged.config, "quantization_config") and not getattr(merged, "is_quantized", False)
    merged.save_pretrained(tmp_path / "plain")
    reloaded = t.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X).logits, merged(X).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["bnb_nf4_double_quant", "bnb_int8"])
def test_requantized_merge_reports_the_loss_and_unmerge_restores_exactly(backend, float_dir):
    model = _adapted(backend, float_dir).eval()
    layer = model.model.layers[0].self_attn.q_proj
    packed = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        before = model(X).logits
    with pytest.warns(UserWarning, match=r"re-quantizing: the stored weights differ from W \+ dW by [0-9.]+% of"):
        li.merge(model, requantize=True)
    assert layer.merged_adapters == ["default"] and not torch.equal(layer.base_layer.weight.data, packed)
    li.unmerge(model)
    assert torch.equal(layer.base_layer.weight.data, packed)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, before, atol=0, rtol=0)


def test_requantizing_a_small_update_into_nf4_loses_most_of_it(float_dir):
    """Why merging into 4 bits is refused by default: an update of ~1% of the weight mostly rounds away."""
    model = li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=["q_proj"], r=4, alpha=4)
    layer = model.model.layers[0].self_attn.q_proj
    weight = li.quantized.dequantized_weight(layer.base_layer)
    with torch.no_grad():  # B @ A scaled to about 1% of W's norm
        layer.lora_B["default"].weight.normal_()
        delta = layer.delta_weight("default")
        layer.lora_B["default"].weight.mul_(0.01 * weight.norm() / delta.norm())
    lost, update = layer.merge_requantized(["default"])
    assert lost / update > 0.5


def test_parameters_are_counted_as_peft_counts_them(float_dir):
    ours = li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=TARGETS, r=4)
    config = peft.LoraConfig(target_modules=TARGETS, r=4)
    theirs = peft.get_peft_model(BACKENDS["bnb_nf4_double_quant"](float_dir), config)
    assert tuple(li.trainable_parameters(ours)) == theirs.get_nb_trainable_parameters()
    plan = li.plan(BACKENDS["bnb_int8"](float_dir), targets=["q_proj"], r=4)
    assert plan.layers[0].quantized == "bitsandbytes 8-bit" and plan.layers[0].weight_shape == (64, 64)
    assert "Linear8bitLt (bitsandbytes 8-bit)" in plan.table()
    plan = li.plan(BACKENDS["bnb_fp4"](float_dir), targets=["q_proj"], r=4)
    assert plan.layers[0].weight_shape == (64, 64)  # logical, not the packed (2048, 1)


class QBytesTensor(torch.Tensor):
    """Stands in for optimum-quanto's weight class (only its module path is read)."""


QBytesTensor.__module__ = "optimum.quanto.tensor.weights.qbytes"


def test_bases_that_cannot_train_are_refused_at_inject(float_dir):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    dynamic = _torchao(float_dir, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedModuleError, match="no gradient reaches"):
        li.inject(dynamic, targets=["q_proj"])
    assert not list(li.lora_layers(dynamic))
    quanto = nn.Sequential(nn.Linear(8, 8))
    quanto[0].weight = nn.Parameter(quanto[0].weight.detach().as_subclass(QBytesTensor), requires_grad=False)
    with pytest.raises(UnsupportedModuleError, match="optimum-quanto"):
        li.inject(quanto, targets=["0"])
    with pytest.raises(UnsupportedModuleError, match="DoRA on .* quantized base"):
        li.inject(BACKENDS["bnb_int8"](float_dir), targets=["q_proj"], dora=True)
    with pytest.raises(UnsupportedModuleError, match="quantized base"):
        li.inject(BACKENDS["torchao_int8_weight_only"](float_dir), targets=["q_proj"], init="pissa")


def test_adapter_trained_on_nf4_merges_into_the_float_checkpoint(float_dir, tmp_path):
    """The honest export: the adapter goes into the full-precision weights, kept to float32 rounding."""
    model = li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=TARGETS, r=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=X, labels=X).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    li.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(float_dir), str(tmp_path / "adapter"), str(tmp_path / "out"), "--verify", "--quiet"]) == 0
    float_model = li.load_adapter(t.AutoModelForCausalLM.from_pretrained(float_dir), tmp_path / "adapter")
    expected = li.merge_and_unload(float_model).state_dict()
    layer = model.model.layers[1].mlp.down_proj
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as out, safe_open(
        str(float_dir / "model.safetensors"), "pt"
    ) as base:
        key = "model.layers.1.mlp.down_proj.weight"
        by_hand = base.get_tensor(key) + layer.delta_weight("default")
        torch.testing.assert_close(out.get_tensor(key), by_hand, atol=2e-7, rtol=0)
        for name in out.keys():
            assert torch.equal(out.get_tensor(name), expected[name]), name


def test_prepare_for_kbit_training(float_dir):
    model = _bnb(float_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model.model.norm.to(torch.bfloat16)
    model.lm_head.to(torch.bfloat16)
    li.hf.prepare_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    assert model.is_activation_checkpointing
    li.inject(model, targets=TARGETS, r=4)
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A gets none while B is zero
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_example_runs(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "qlora.py"
    done = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_inspect_shows_a_checkpoint_as_qlora_would_load_it(float_dir, capsys):
    assert main(["inspect", str(float_dir), "--targets", "q_proj", "down_proj", "--bits", "4"]) == 0
    table = capsys.readouterr().out
    assert "Linear4bit (bitsandbytes 4-bit)  64x64" in table and "64x128" in table
    assert main(["inspect", str(float_dir), "--targets", "q_proj", "--bits", "8"]) == 0
    assert "Linear8bitLt (bitsandbytes 8-bit)" in capsys.readouterr().out


def test_loftq_takes_the_best_rank_r_part_of_the_quantization_error(float_dir):
    model = li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=TARGETS, r=8, alpha=32)
    with torch.no_grad():
        before = model(X).logits
    errors = li.loftq(model, float_dir)
    assert len(errors) == 2 * len(TARGETS)
    float_model = t.AutoModelForCausalLM.from_pretrained(float_dir)
    for path, (error_before, error_after) in errors.items():
        layer = model.get_submodule(path)
        weight = float_model.get_submodule(path).weight.detach()
        residual = weight - li.quantized.dequantized_weight(layer.base_layer)
        singular = torch.linalg.svdvals(residual)
        assert error_before == pytest.approx(singular.norm().item(), rel=1e-5)
        assert error_after == pytest.approx(singular[8:].norm().item(), rel=1e-4)  # Eckart-Young: optimal
        merged = li.quantized.dequantized_weight(layer.base_layer) + layer.delta_weight("default")
        torch.testing.assert_close(torch.linalg.vector_norm(weight - merged).item(), error_after, rtol=1e-4, atol=0)
    with torch.no_grad():  # the adapted model is now closer to the float model than the plain nf4 model
        want = float_model(X).logits
        assert (model(X).logits - want).norm() < (before - want).norm()
    with pytest.raises(li.ConfigError, match="no quantized Linear"):
        li.loftq(li.inject(tiny_llama(), targets=["q_proj"]), float_dir)


def test_requantized_merge_refuses_a_lora_bias_it_cannot_carry(float_dir):
    model = li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=["down_proj"], r=4, lora_bias=True)
    packed = model.model.layers[0].mlp.down_proj.base_layer.weight.data.clone()
    with pytest.raises(MergeError, match="lora_bias"):
        li.merge(model, requantize=True)
    assert torch.equal(model.model.layers[0].mlp.down_proj.base_layer.weight.data, packed)
    assert model.model.layers[0].mlp.down_proj.merged_adapters == []


def _convert_4bit_layers(model, pack: bool):
    """``pack``: what ``Linear4bit.forward`` does to every 4-bit layer on its first eval no-grad forward on a CPU
    with AVX512-BF16 (bitsandbytes >= 0.48), done directly so that it happens on every CPU. Else bitsandbytes'
    own inverse, and its path for CPUs without AVX512-BF16 (the reference)."""
    from bitsandbytes import functional

    convert = functional._convert_weight_packed_for_cpu if pack else functional._convert_weight_packed_for_cpu_inverse
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = pack
            weight = module.weight
            weight.data, weight.quant_state = convert(weight.data, weight.quant_state)
    return model


def _repacked_as_on_avx512bf16(model):
    return _convert_4bit_layers(model, pack=True)


def _unpacked_by_bitsandbytes(model):
    return _convert_4bit_layers(model, pack=False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_4bit_base_repacked_for_avx512bf16_inference_trains_every_adapter(float_dir, quant_type):
    make = BACKENDS["bnb_nf4_double_quant" if quant_type == "nf4" else "bnb_fp4"]
    repacked, reference = _repacked_as_on_avx512bf16(make(float_dir)), _unpacked_by_bitsandbytes(
        _repacked_as_on_avx512bf16(make(float_dir)))
    torch.manual_seed(1)
    ours = li.inject(repacked, targets=TARGETS, r=4, alpha=8)
    torch.manual_seed(1)
    li.inject(reference, targets=TARGETS, r=4, alpha=8)
    layers = [m for m in ours.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)  # unadapted o_proj too
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    ours.eval()
    with torch.no_grad():  # the forward that repacks on such CPUs: the layout stays the training one
        ours(X)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    for model in (ours, reference):
        model.train()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.05)
        model(X).logits.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 * len(TARGETS) and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)


def test_a_repacked_4bit_weight_is_read_in_its_training_layout(float_dir):
    model = _repacked_as_on_avx512bf16(BACKENDS["bnb_nf4_double_quant"](float_dir))
    layer = model.model.layers[0].self_attn.q_proj
    expected = li.quantized.dequantized_weight(
        _unpacked_by_bitsandbytes(_repacked_as_on_avx512bf16(BACKENDS["bnb_nf4_double_quant"](float_dir)))
        .model.layers[0].self_attn.q_proj
    )
    torch.testing.assert_close(li.quantized.dequantized_weight(layer), expected, atol=0, rtol=0)
    assert not layer.weight.quant_state.packing_format_for_cpu and tuple(layer.weight.quant_state.shape) == (64, 64)


def _lm_rows(n=8, length=6):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, 100, (n, length), generator=g)]


@pytest.mark.parametrize("trainer", ["transformers", "adapter", "trl"])
def test_qlora_trains_with_every_trainer(trainer, float_dir, tmp_path):
    model = li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=TARGETS, r=4)
    before = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    common = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", bf16=False)
    if trainer == "trl":
        import datasets
        from trl import SFTConfig

        from lora_inject.trl import SFTTrainer

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from tiny_lm import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        assert len(tokenizer) <= 100  # its ids fit the float model's vocabulary
        rows = datasets.Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in _lm_rows()])
        SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=rows, processing_class=tokenizer).train()
    else:
        cls = t.Trainer if trainer == "transformers" else li.hf.AdapterTrainer
        cls(model=model, args=t.TrainingArguments(**common), train_dataset=_lm_rows()).train()
    after = li.lora_state_dict(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)


def test_a_quantized_model_without_adapters_is_still_refused_by_trainer(float_dir, tmp_path):
    li.inject(BACKENDS["bnb_nf4_double_quant"](float_dir), targets=TARGETS, r=4)  # the check is wrapped now
    bare = BACKENDS["bnb_nf4_double_quant"](float_dir)
    args = t.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="purely quantized"):
        t.Trainer(model=bare, args=args, train_dataset=_lm_rows())
