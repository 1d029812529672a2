"""combine_adapters: every method of PEFT's add_weighted_adapter, equal to PEFT where PEFT is right, `cat`
exact under rsLoRA, patterns and differing targets, and the result in PEFT's files."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

import lora_inject as li
from lora_inject.errors import AdapterExistsError, ConfigError
from lora_inject.formats.peft_config import disk_key
from lora_inject.serving.combine import METHODS

WEIGHTS = {"a": 0.7, "b": -0.4}


def _two(base_factory=tiny_llama, targets=("q_proj", "v_proj")):
    base = base_factory().eval()
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        li.inject(model, targets=list(targets), r=4, alpha=8, adapter=name)
        randomize_adapters(model, name, std=0.2)
    return base, model


def _peft_copy(base, model, targets=("q_proj", "v_proj")):
    config = peft.LoraConfig(target_modules=list(targets), r=4, lora_alpha=8)
    theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a")
    theirs.add_adapter("b", config)
    for name in ("a", "b"):
        values = {disk_key(k, name): v for k, v in li.lora_state_dict(model, name).items()}
        with torch.no_grad():
            for key, param in theirs.named_parameters():
                key = key.removeprefix("base_model.model.")
                if disk_key(key, name) != key:
                    param.copy_(values[disk_key(key, name)])
    return theirs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factory, targets", [(tiny_llama, ("q_proj", "v_proj")), (tiny_gpt2, ("c_attn", "wte"))])
def test_every_method_equals_peft(method, factory, targets, monkeypatch):
    base, ours = _two(factory, targets)
    theirs = _peft_copy(base, ours, targets)
    kwargs = dict(density=0.5) if any(k in method for k in ("ties", "dare", "magnitude")) else {}
    li.combine_adapters(ours, WEIGHTS, "ab", method, seed=0, svd_rank=6 if "svd" in method else None, **kwargs)
    # PEFT draws DARE's masks from the global generator after initialising the new adapter; give it the draws
    # our seed gives (same order: module by module, A's then B's), so the two can be compared exactly
    draws, bernoulli = torch.Generator().manual_seed(0), torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, *args, **kw: bernoulli(p, generator=draws))
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "ab", combination_type=method,
                                svd_rank=6 if "svd" in method else None, **kwargs)
    for path, layer in li.lora_layers(ours):
        want = theirs.base_model.model.get_submodule(path).get_delta_weight("ab")
        torch.testing.assert_close(layer.delta_weight("ab"), want, atol=1e-5, rtol=1e-4, msg=path)


def test_cat_is_exact_with_rslora_patterns_and_different_targets(tmp_path):
    base = tiny_llama().eval()
    model = copy.deepcopy(base)
    li.inject(model, targets=["q_proj", "v_proj"], r=4, alpha=8, rslora=True, rank_pattern={"v_proj": 2},
              adapter="a")
    li.inject(model, targets=["q_proj", "o_proj"], r=8, alpha=4, alpha_pattern={"o_proj": 32}, adapter="b")
    for name in ("a", "b"):
        randomize_adapters(model, name, std=0.2)
    expected = {}
    for path, layer in li.lora_layers(model):
        expected[path] = sum(w * layer.delta_weight(n) for n, w in WEIGHTS.items() if n in layer.r)
    li.combine_adapters(model, WEIGHTS, "ab")  # cat by default
    for path, layer in li.lora_layers(model):
        torch.testing.assert_close(layer.delta_weight("ab"), expected[path], atol=1e-6, rtol=1e-5, msg=path)
    assert model.model.layers[0].self_attn.q_proj.r["ab"] == 12 and model.model.layers[0].self_attn.v_proj.r["ab"] == 2
    assert li.active_adapters(model) == ["b"]  # the new adapter does not become active
    li.set_adapter(model, "ab")
    li.save_adapter(model, tmp_path / "ab", adapter="ab")
    x = torch.randint(0, 100, (2, 6))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ab").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model.eval()(x).logits, atol=1e-5, rtol=1e-5)


def test_errors_leave_the_model_as_it_was():
    _, model = _two()
    before = set(li.adapter_configs(model))
    with pytest.raises(AdapterExistsError):
        li.combine_adapters(model, WEIGHTS, "a")
    with pytest.raises(li.AdapterNotFoundError):
        li.combine_adapters(model, {"a": 1.0, "zz": 1.0}, "ab")
    with pytest.raises(ConfigError, match="method must be"):
        li.combine_adapters(model, WEIGHTS, "ab", "average")
    with pytest.raises(ConfigError, match="density"):
        li.combine_adapters(model, WEIGHTS, "ab", "ties")
    li.inject(model, targets=["q_proj"], r=2, adapter="c")
    with pytest.raises(ConfigError, match="one rank per module"):
        li.combine_adapters(model, {"a": 1.0, "c": 1.0}, "ac", "linear")
    assert set(li.adapter_configs(model)) == before | {"c"}


def test_pissa_adapters_are_not_combined():
    model = li.inject(tiny_llama(), targets=["q_proj"], r=2, init="pissa", adapter="a")
    li.inject(model, targets=["q_proj"], r=2, adapter="b")
    with pytest.raises(ConfigError, match="PiSSA"):
        li.combine_adapters(model, {"a": 0.5, "b": 0.5}, "ab")
