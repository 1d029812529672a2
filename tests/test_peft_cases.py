"""Cases from PEFT's own test matrix: PEFT makes and saves, we load, merge and re-export, PEFT loads back."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import tiny_llama
from torch import nn

import lora_inject as li


class MLP(nn.Module):
    """PEFT's test_custom_models "MLP" shape: lin0 -> relu -> lin1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def _perturbed_peft(base, config):
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _round_trip(base, theirs, x, tmp_path, out=lambda o: o):
    """PEFT's folder -> ours (outputs, merge) -> our folder -> PEFT on a fresh base (outputs)."""
    theirs.save_pretrained(tmp_path / "peft")
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = out(theirs(x))
        torch.testing.assert_close(out(ours(x)), expected, atol=1e-5, rtol=1e-5)
        li.save_adapter(ours, tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(out(back(x)), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out(li.merge_and_unload(ours)(x)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_vanilla_mlp_with_modules_to_save_and_every_bias_mode(bias, tmp_path):
    """"Vanilla MLP 5 LoRA" with each bias mode; bias="all" writes lin1.modules_to_save.bias and
    lin1.original_module.bias besides lin1.bias."""
    torch.manual_seed(0)
    base = MLP()
    config = peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], bias=bias, init_lora_weights=False)
    theirs = _perturbed_peft(base, config)
    _round_trip(base, theirs, torch.randn(3, 10), tmp_path)


def test_a_saved_base_embedding_survives_load_and_re_export(tmp_path):
    """PEFT writes the full embedding with an adapter that targets it (save_embedding_layers="auto");
    whatever the folder carried must be in our re-export too, or PEFT loads another model from it."""
    torch.manual_seed(0)
    base = tiny_llama()
    theirs = _perturbed_peft(base, peft.LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    with torch.no_grad():  # the base embedding changed too (a resized or edited vocabulary)
        theirs.base_model.model.model.embed_tokens.base_layer.weight.add_(0.05)
    theirs.save_pretrained(tmp_path / "peft")
    assert "model.embed_tokens.base_layer.weight" in li.read_adapter_tensors(tmp_path / "peft")
    x = torch.randint(0, 100, (2, 7))
    _round_trip(base, theirs, x, tmp_path / "trip", out=lambda o: o.logits)
    assert "model.embed_tokens.base_layer.weight" in li.read_adapter_tensors(tmp_path / "trip" / "ours")


@pytest.mark.parametrize("mode", [True, False, "auto"])
def test_save_embedding_layers_as_peft_offers_it(mode, tmp_path):
    base = tiny_llama()
    model = li.inject(copy.deepcopy(base), targets=["q_proj"])
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.05)  # the user changed the vocabulary's rows
    li.save_adapter(model, tmp_path / "a", save_embedding_layers=mode)
    keys = set(li.read_adapter_tensors(tmp_path / "a"))
    assert ({"model.embed_tokens.weight", "lm_head.weight"} <= keys) == (mode is True)
    if mode is True:
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
        x = torch.randint(0, 100, (2, 5))
        with torch.no_grad():
            torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_not_saving_carried_embeddings_is_said_out_loud(tmp_path):
    model = li.inject(tiny_llama(), targets=["q_proj"])
    model.resize_token_embeddings(104)
    with pytest.warns(UserWarning, match="resize_token_embeddings.*not saved"):
        li.save_adapter(model, tmp_path / "a", save_embedding_layers=False)
    assert not any("embed" in k for k in li.read_adapter_tensors(tmp_path / "a"))
