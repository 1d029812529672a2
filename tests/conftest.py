"""Tiny models for tests: built from configs, so the real module classes and names are used."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*pad_token_id.*")


def tiny_llama(**overrides):
    import transformers as t

    cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )
    cfg.update(overrides)
    return t.LlamaForCausalLM(t.LlamaConfig(**cfg)).eval()


def tiny_gpt2(**overrides):
    import transformers as t

    cfg = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    return t.GPT2LMHeadModel(t.GPT2Config(**cfg)).eval()


def tiny_bert(**overrides):
    import transformers as t

    cfg = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=100, max_position_embeddings=64, num_labels=3,
    )
    cfg.update(overrides)
    return t.BertForSequenceClassification(t.BertConfig(**cfg)).eval()


class Holder(nn.Module):
    """A one-layer model, so a single module can be targeted by name ("layer")."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class ConvNet(nn.Module):
    """Conv1d/2d/3d with stride, padding, dilation and a non-zero padding mode, plus a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.point = nn.Conv2d(8, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body(x))
        x = self.depthwise(self.point(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_adapters(model, adapter="default", std=0.1):
    """Make every adapter factor non-zero so merges and loads are actually exercised."""
    import lora_inject as li

    with torch.no_grad():
        for _, layer in li.lora_layers(model):
            if adapter in layer.r:
                for p in layer.adapter_parameters(adapter):
                    p.normal_(0, std)


def assert_matches_peft(ours, theirs, x, out=lambda o: o, seed=0):
    """Outputs equal (1e-5) from the same RNG state (dropout draws the same masks), and after the same
    backward every trainable parameter's gradient equals PEFT's (1e-5 abs, 1e-4 rel). Returns the names."""
    torch.manual_seed(seed)
    got = out(ours(x))
    torch.manual_seed(seed)
    want = out(theirs(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {k.removeprefix("base_model.model."): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == peft_grads.keys()
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[key], atol=1e-5, rtol=1e-4, msg=key)
    return set(ours_grads)
