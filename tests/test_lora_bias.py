"""lora_bias (a trainable bias on B) against PEFT, its merge into the base bias, and where it cannot go."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_matches_peft, randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lora_inject as li


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(2, 3)))


CASES = {
    "linear_and_conv": (Net, ["conv", "lin"], lambda: torch.randn(2, 3, 5, 5), lambda o: o),
    "gpt2_conv1d": (tiny_gpt2, ["c_attn", "c_fc"], lambda: torch.randint(0, 100, (2, 6)), lambda o: o.logits),
}


def _trained(case):
    factory, targets, make_input, out = CASES[case]
    base = factory().eval()
    ours = li.inject(copy.deepcopy(base), targets=targets, r=4, alpha=8, lora_bias=True)
    randomize_adapters(ours)  # B's bias too
    return base, ours, make_input(), out


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_bias_equals_peft_both_ways_with_gradients_and_merge(case, tmp_path):
    base, ours, x, out = _trained(case)
    assert any(k.endswith("lora_B.default.bias") for k in li.lora_state_dict(ours))
    li.save_adapter(ours, tmp_path / "a")
    assert li.read_adapter_config(tmp_path / "a").lora_bias
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    assert any(k.endswith("lora_B.default.bias") for k in assert_matches_peft(ours, theirs, x, out))
    theirs.save_pretrained(tmp_path / "peft")
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    ours.eval()
    with torch.no_grad():
        expected = out(ours(x))
        torch.testing.assert_close(out(back(x)), expected, atol=1e-6, rtol=1e-6)
        merged = li.merge_and_unload(copy.deepcopy(ours))
        torch.testing.assert_close(out(merged(x)), expected, atol=1e-5, rtol=1e-5)
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        li.merge(ours)
        li.unmerge(ours)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_base_without_bias_is_warned_at_inject_and_refused_at_merge():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="no bias.*cannot be merged"):
        li.inject(model, targets=["0", "1"], lora_bias=True)
    randomize_adapters(model)
    x = torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(li.MergeError, match="lora_bias.*no bias"):
        li.merge_and_unload(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the second layer was not merged either
    model(x)


def test_lora_bias_where_it_does_not_exist_is_refused():
    with pytest.raises(li.UnsupportedModuleError, match="lora_bias cannot adapt 'model.embed_tokens'"):
        li.inject(tiny_llama(), targets=["embed_tokens"], lora_bias=True)
    with pytest.raises(li.ConfigError, match="lora_bias=True with dora=True"):
        li.inject(tiny_llama(), targets=["q_proj"], lora_bias=True, dora=True)


def test_streaming_merge_adds_b_bias_to_the_stored_bias(tmp_path):
    from test_cli import read_all

    from lora_inject.cli import main

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    li.inject(model, targets=["c_attn", "c_fc"], r=4, lora_bias=True)
    randomize_adapters(model)
    li.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--quiet"]) == 0
    li.merge_and_unload(model).save_pretrained(tmp_path / "reference")
    ours, theirs = read_all(tmp_path / "out"), read_all(tmp_path / "reference")
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.bias"], read_all(tmp_path / "base")[
        "transformer.h.0.attn.c_attn.bias"])
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
