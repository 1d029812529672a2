"""PiSSA and OLoRA inits: PEFT's factors, the residual base, and adapters saved for the original base."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import lora_inject as li

X = torch.randint(0, 100, (2, 7))
KW = dict(r=4, alpha=8, rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 6})


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _train(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        model(X, labels=X).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft_and_leaves_the_output_unchanged(init):
    base = tiny_llama()
    ours = li.inject(copy.deepcopy(base), targets=["q_proj", "v_proj"], init=init, **KW)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 6}, init_lora_weights=init)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    for key, value in li.lora_state_dict(ours).items():
        torch.testing.assert_close(value, theirs.state_dict()["base_model.model." + key], atol=1e-6, rtol=1e-5)
    residual = ours.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(residual, theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    torch.testing.assert_close(_logits(ours), _logits(base), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_saved_adapter_gives_the_trained_model_on_the_original_base(factory, targets, init, tmp_path):
    base = factory()
    kw = dict(KW, rank_pattern={targets[1]: 2}, alpha_pattern={targets[0]: 6})
    ours = _train(li.inject(copy.deepcopy(base), targets=targets, init=init, **kw))
    trained = _logits(ours)
    li.save_adapter(ours, tmp_path / "a")
    config = li.read_adapter_config(tmp_path / "a")
    assert (config.init, config.r, config.rank_pattern) == (True, 8, {targets[1]: 4})
    assert config.alpha == pytest.approx(8 * 2**0.5) and config.alpha_pattern[targets[0]] == pytest.approx(6 * 2**0.5)
    for loaded in (li.load_adapter(copy.deepcopy(base), tmp_path / "a"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")):
        torch.testing.assert_close(_logits(loaded.eval()), trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(li.merge_and_unload(copy.deepcopy(ours))), trained, atol=1e-5, rtol=1e-5)


def test_residual_form_on_request_and_the_base_comes_back_on_unload_and_delete(tmp_path):
    import json

    base = tiny_llama()
    ours = _train(li.inject(copy.deepcopy(base), targets=["q_proj", "v_proj"], init="pissa", r=4))
    li.save_adapter(ours, tmp_path / "residual", principal_as_lora=False)  # PEFT's form, for the residual base
    written = json.loads((tmp_path / "residual" / "adapter_config.json").read_text())
    assert (written["init_lora_weights"], written["r"]) == ("pissa", 4)
    tensors = li.read_adapter_tensors(tmp_path / "residual")
    for key, value in li.lora_state_dict(ours).items():
        assert torch.equal(tensors[key.replace(".default", "")], value)
    with pytest.raises(li.AdapterFileError, match="changes the base weights"):
        li.load_adapter(copy.deepcopy(base), tmp_path / "residual")  # never applied to the original base
    restored = li.unload(copy.deepcopy(ours))  # the original weights again
    for key, value in base.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    deleted = copy.deepcopy(ours)
    li.delete_adapter(deleted, "default")
    torch.testing.assert_close(_logits(deleted), _logits(base), atol=1e-5, rtol=1e-5)


def test_a_peft_converted_adapter_loads_as_plain_lora(tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path / "initial")
    _train(theirs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "converted")
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)


def test_principal_inits_where_they_cannot_apply_are_refused():
    model = tiny_llama()
    with pytest.raises(li.UnsupportedModuleError, match="PiSSA/OLoRA.*embed_tokens"):
        li.inject(model, targets=["q_proj", "embed_tokens"], init="pissa")
    assert not list(li.lora_layers(model))
    with pytest.raises(li.ConfigError, match="plain LoRA only"):
        li.LoraConfig(init="olora", dora=True)
    with pytest.raises(li.ConfigError, match="pissa_niter_<k>"):
        li.LoraConfig(init="pissa_niter_x")


def test_resuming_from_an_adapter_saved_as_plain_lora_restores_the_trained_factors(tmp_path):
    """AdapterTrainer checkpoints go through save_adapter, which writes PiSSA as rank-2r LoRA: resuming must
    read it back into the rank-r adapter (and refuse a file from another initialisation)."""
    base = tiny_llama()
    ours = _train(li.inject(copy.deepcopy(base), targets=["q_proj", "v_proj"], init="pissa", r=4))
    trained = _logits(ours)
    li.save_adapter(ours, tmp_path / "a")
    resumed = li.inject(copy.deepcopy(base), targets=["q_proj", "v_proj"], init="pissa", r=4)  # same init
    li.load_adapter_weights(resumed, tmp_path / "a")
    torch.testing.assert_close(_logits(resumed), trained, atol=1e-5, rtol=1e-5)
    other = li.inject(tiny_llama(), targets=["q_proj", "v_proj"], init="pissa", r=4)  # other weights, other init
    before = li.lora_state_dict(other)
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(li.AdapterFileError, match="initial factors are not this model's"):
        li.load_adapter_weights(other, tmp_path / "a")
    assert all(torch.equal(v, li.lora_state_dict(other)[k]) for k, v in before.items())
