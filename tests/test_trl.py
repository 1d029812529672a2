"""TRL's trainers on injected models: what trains, adapter-only checkpoints, exact resume, the reference
policy of DPO and GRPO (the starting adapter, on the policy's own weights), and the examples."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import datasets
import peft
import pytest
import torch

import lora_inject as li

trl = pytest.importorskip("trl")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from tiny_lm import preference_pairs, sft_texts, tiny_llama, tiny_tokenizer  # noqa: E402

from lora_inject.trl import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, per_device_train_batch_size=4, seed=7)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _adapter(model, name="default"):
    return {k: v.clone() for k, v in li.lora_state_dict(model, name).items()}


def _sft(tokenizer, out, steps=4, resume=None, model=None):
    model = model or li.inject(tiny_llama(tokenizer), targets=["q_proj", "v_proj"], r=4)
    args = trl.SFTConfig(output_dir=str(out), max_steps=steps, save_steps=2, learning_rate=1e-2, **COMMON)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(sft_texts()),
                         processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_sft_trains_only_the_adapter_checkpoints_are_adapter_folders_and_resume_exactly(tokenizer, tmp_path):
    straight = _sft(tokenizer, tmp_path / "a")
    model = straight.model
    base_before = {k: v for k, v in tiny_llama(tokenizer).state_dict().items()}
    for key, value in model.state_dict().items():  # the frozen base never moved
        if ".lora_" not in key:
            assert torch.equal(value, base_before[key.replace(".base_layer", "")]), key
    checkpoint = tmp_path / "a" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    adapter_bytes = sum(v.numel() * v.element_size() for v in li.lora_state_dict(model).values())
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < adapter_bytes + 4096
    resumed = _sft(tokenizer, tmp_path / "b", resume=str(checkpoint))
    for key, value in _adapter(straight.model).items():
        torch.testing.assert_close(li.lora_state_dict(resumed.model)[key], value, atol=1e-6, rtol=1e-5, msg=key)
    straight.save_model(str(tmp_path / "final"))  # loads in PEFT to the same outputs
    theirs = peft.PeftModel.from_pretrained(tiny_llama(tokenizer), tmp_path / "final").eval()
    x = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, straight.model.eval()(x).logits, atol=1e-5, rtol=1e-5)


def _dpo(tokenizer, model, out, lr=0.0, steps=2, resume=None, **extra):
    args = trl.DPOConfig(output_dir=str(out), max_steps=steps, save_steps=2, learning_rate=lr, logging_steps=1,
                         **COMMON, **extra)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(preference_pairs()),
                         processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _first_log(trainer, key):
    return next(h[key] for h in trainer.state.log_history if key in h)


def _sft_adapter(tokenizer, folder):
    model = li.inject(tiny_llama(tokenizer), targets=["q_proj", "v_proj"], r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # far from the base: the wrong reference would show at once
    li.save_adapter(model, folder)
    return folder


@pytest.mark.parametrize("start", ["fresh", "sft_adapter"])
def test_dpo_reference_is_the_starting_policy_without_a_second_base(start, tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    if start == "fresh":
        li.inject(model, targets=["q_proj", "v_proj"], r=4)
    else:
        li.load_adapter(model, _sft_adapter(tokenizer, tmp_path / "sft"))
    trainer = _dpo(tokenizer, model, tmp_path / "dpo")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert _first_log(trainer, key) == 0.0, key
    reference, policy = trainer.ref_model, trainer.model
    storages = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    assert {p.untyped_storage().data_ptr() for p in reference.parameters()} <= storages  # no weight of its own
    assert li.active_adapters(policy) == ["default"]
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".reference" in n)


def test_dpo_with_the_bare_base_as_reference_would_not_start_at_zero(tokenizer, tmp_path):
    """What the reference fixes: after SFT the base is another policy (the margin TRL logged before)."""
    model = li.load_adapter(tiny_llama(tokenizer), _sft_adapter(tokenizer, tmp_path / "sft"))
    base_view = li.trl.reference_model(model)  # the copy of the adapter...
    with torch.no_grad():
        for _, layer in li.lora_layers(model):
            layer.lora_B["reference"].weight.zero_()  # ...made the bare base
    trainer = DPOTrainer(model=model, ref_model=base_view, args=trl.DPOConfig(
        output_dir=str(tmp_path / "d"), max_steps=1, learning_rate=0.0, logging_steps=1, **COMMON),
        train_dataset=datasets.Dataset.from_list(preference_pairs()), processing_class=tokenizer)
    trainer.train()
    assert _first_log(trainer, "rewards/margins") != 0.0


def test_dpo_trains_and_resumes_exactly(tokenizer, tmp_path):
    straight = _dpo(tokenizer, li.inject(tiny_llama(tokenizer), targets=["q_proj"], r=4), tmp_path / "a",
                    lr=1e-2, steps=4)
    assert any(v.abs().max() > 0 for k, v in _adapter(straight.model).items() if "lora_B" in k)
    resumed = _dpo(tokenizer, li.inject(tiny_llama(tokenizer), targets=["q_proj"], r=4), tmp_path / "b",
                   lr=1e-2, steps=4, resume=str(tmp_path / "a" / "checkpoint-2"))
    for key, value in _adapter(straight.model).items():
        torch.testing.assert_close(li.lora_state_dict(resumed.model)[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert "adapter_model.safetensors" in {p.name for p in (tmp_path / "a" / "checkpoint-2").iterdir()}


def test_grpo_kl_reference_is_the_starting_policy(tokenizer, tmp_path):
    model = li.load_adapter(tiny_llama(tokenizer), _sft_adapter(tokenizer, tmp_path / "sft"))

    def reward(completions, **_):
        return [float(len(c)) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path / "g"), max_steps=2, save_steps=2, num_generations=2,
                          max_completion_length=6, beta=0.1, learning_rate=1e-3, logging_steps=1, **COMMON)
    prompts = datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in preference_pairs()])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=tokenizer)
    assert type(trainer.ref_model).__name__ == "ReferenceLlamaForCausalLM"
    trainer.train()
    assert _first_log(trainer, "kl") == 0.0
    assert "adapter_model.safetensors" in {p.name for p in (tmp_path / "g" / "checkpoint-2").iterdir()}


def test_reference_view_runs_the_copy_and_leaves_the_policy_as_it_was(tokenizer):
    model = li.inject(tiny_llama(tokenizer), targets=["q_proj"], r=4)
    x = torch.tensor([[2, 5, 6, 7]])
    start = model(x).logits.detach()
    view = li.trl.reference_model(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # the policy trains away from its start
    torch.testing.assert_close(view(x).logits, start, atol=0, rtol=0)
    assert not view(x).logits.requires_grad
    assert not torch.allclose(model(x).logits, start)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".default" in n
    ]


def test_using_adapter_restores_the_active_adapter_when_the_call_raises(tokenizer):
    model = li.inject(tiny_llama(tokenizer), targets=["q_proj"], r=4)
    li.copy_adapter(model, "default", "snapshot")
    with pytest.raises(RuntimeError), li.using_adapter(model, "snapshot"):
        assert li.active_adapters(model) == ["snapshot"]
        raise RuntimeError("boom")
    assert li.active_adapters(model) == ["default"]
    with pytest.raises(li.AdapterNotFoundError):
        with li.using_adapter(model, "nope"):
            pass
    with pytest.raises(li.AdapterExistsError):
        li.copy_adapter(model, "default", "snapshot")


@pytest.mark.parametrize("script, extra", [("trl_sft.py", []), ("trl_grpo.py", []), ("trl_dpo.py", ["sft"])])
def test_examples_run(script, extra, tmp_path, tokenizer):
    args = [str(_sft_adapter(tokenizer, tmp_path / "sft"))] if extra else []
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    if script != "trl_sft.py":
        assert " 0.0 " in done.stdout  # rewards/margins or kl at step 1


def test_copy_adapter_of_pissa_does_not_touch_the_base(tokenizer):
    model = li.inject(tiny_llama(tokenizer), targets=["q_proj"], r=4, init="pissa")
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    x = torch.tensor([[2, 5, 6, 7]])
    expected = model(x).logits
    li.copy_adapter(model, "default", "copy")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with li.using_adapter(model, "copy"):
        torch.testing.assert_close(model(x).logits, expected, atol=0, rtol=0)
    copy.deepcopy(model)  # a model with a copied adapter still deep-copies (Trainer does)
