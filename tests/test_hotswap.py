"""Hot swap: adapters of other ranks, alphas and target subsets written in place, equal to loading them,
without recompiling a compiled model; what does not fit is refused with nothing changed."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch._dynamo
from conftest import randomize_adapters, tiny_llama

import lora_inject as li
from lora_inject.errors import AdapterFileError, ConfigError

X = torch.randint(0, 100, (2, 6))


def _saved(base, folder, targets, r, alpha, **kwargs):
    model = li.inject(copy.deepcopy(base), targets=targets, r=r, alpha=alpha, **kwargs)
    randomize_adapters(model, std=0.3)
    li.save_adapter(model, folder)
    return li.load_adapter(copy.deepcopy(base), folder).eval()


@pytest.fixture
def adapters(tmp_path):
    base = tiny_llama().eval()
    made = {
        "first": _saved(base, tmp_path / "first", ["q_proj", "v_proj"], 4, 8),
        "second": _saved(base, tmp_path / "second", ["q_proj", "v_proj"], 8, 32, rslora=True),
        "subset": _saved(base, tmp_path / "subset", ["v_proj"], 2, 2, rank_pattern={"layers.1.self_attn.v_proj": 6}),
    }
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["v_proj"], r=3, lora_alpha=5))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    made["peft"] = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    return base, tmp_path, made


def test_swaps_equal_loading_and_the_compiled_model_never_recompiles(adapters):
    base, folder, made = adapters
    model = li.load_adapter(copy.deepcopy(base), folder / "first").eval()
    li.prepare_hotswap(model, max_rank=8)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, made["first"](X).logits, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()  # graphs of LlamaForCausalLM.forward compiled by earlier tests would count as recompiles
    compiled = torch.compile(model)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled(X)
        for name in ("second", "subset", "peft", "first"):
            li.hotswap_adapter(model, folder / name)
            torch.testing.assert_close(compiled(X).logits, made[name](X).logits, atol=1e-5, rtol=1e-5, msg=name)


def test_the_swapped_adapter_saves_as_what_it_computes(adapters):
    base, folder, made = adapters
    model = li.load_adapter(copy.deepcopy(base), folder / "first").eval()
    li.prepare_hotswap(model, max_rank=8)
    li.hotswap_adapter(model, folder / "second")
    li.save_adapter(model, folder / "again")
    with torch.no_grad():
        torch.testing.assert_close(li.load_adapter(copy.deepcopy(base), folder / "again").eval()(X).logits,
                                   made["second"](X).logits, atol=1e-5, rtol=1e-5)


def test_what_does_not_fit_is_refused_and_nothing_changes(adapters, tmp_path):
    base, folder, made = adapters
    model = li.load_adapter(copy.deepcopy(base), folder / "subset").eval()
    with pytest.raises(ConfigError, match="prepare_hotswap"):
        li.hotswap_adapter(model, folder / "first")
    with pytest.raises(ConfigError, match="below this adapter's own ranks"):
        li.prepare_hotswap(model, max_rank=4)
    li.prepare_hotswap(model, max_rank=6)
    before = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    with pytest.raises(AdapterFileError, match="cannot add layers"):
        li.hotswap_adapter(model, folder / "first")  # q_proj is not among the prepared layers
    _saved(base, tmp_path / "big", ["v_proj"], 8, 8)
    with pytest.raises(AdapterFileError, match="max_rank=6"):
        li.hotswap_adapter(model, tmp_path / "big")
    assert all(torch.equal(v, before[k]) for k, v in li.lora_state_dict(model).items())


def test_a_file_with_more_than_factors_is_refused(adapters, tmp_path):
    base, folder, _ = adapters
    model = li.load_adapter(copy.deepcopy(base), folder / "first").eval()
    li.prepare_hotswap(model, max_rank=8)
    before = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    resized = li.load_adapter(copy.deepcopy(base), folder / "first")
    li.save_adapter(resized, tmp_path / "with_embedding", save_embedding_layers=True)
    with pytest.raises(AdapterFileError, match="not LoRA factors"):
        li.hotswap_adapter(model, tmp_path / "with_embedding")
    assert all(torch.equal(v, before[k]) for k, v in li.lora_state_dict(model).items())
