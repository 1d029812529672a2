"""One adapter per batch row (lora_inject.batch_adapters): each row equals that row run alone with its
adapter, for every layer type, in forward and generate; and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ConvNet, randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lora_inject as li
from lora_inject.errors import AdapterNotFoundError, ConfigError, MergeError

NAMES = ["b", None, "a", "a", "c", "b"]  # unsorted, repeated, a base row


def _three_adapters(model, embedding=False, dora_c=False, modules_to_save=None):
    """a: r=4 on q/v; b: r=8 rsLoRA on q/o/mlp (other targets); c: r=2 on v (+ the embedding), DoRA if asked."""
    li.inject(model, targets=["q_proj", "v_proj"], r=4, alpha=8, adapter="a")
    li.inject(model, targets=["q_proj", "o_proj", "up_proj"], r=8, alpha=4, rslora=True, adapter="b",
              modules_to_save=modules_to_save)
    c_targets = ["v_proj", "embed_tokens"] if embedding else ["v_proj"]
    li.inject(model, targets=c_targets, r=2, alpha=16, adapter="c", dora=dora_c)
    for name in ("a", "b", "c"):
        randomize_adapters(model, name, std=0.2)
    return model.eval()


def _alone(model, x, names, out=lambda o: o.logits):
    """The reference: every row run by itself with its adapter active (the base for None)."""
    rows = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with li.disabled_adapters(model):
                    rows.append(out(model(x[i:i + 1])))
            else:
                li.set_adapter(model, name)
                rows.append(out(model(x[i:i + 1])))
    return torch.cat(rows)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", ["llama", "llama_embedding_dora", "gpt2_conv1d"])
def test_each_row_equals_that_row_alone(case, grad):
    if case == "gpt2_conv1d":
        model = tiny_gpt2()
        for name, targets, r in (("a", ["c_attn"], 4), ("b", ["c_proj", "wte"], 8), ("c", ["c_fc"], 2)):
            li.inject(model, targets=targets, r=r, adapter=name)
            randomize_adapters(model, name, std=0.2)
        model.eval()
    else:
        model = _three_adapters(tiny_llama(), embedding="embedding" in case, dora_c="dora" in case)
    x = torch.randint(0, 100, (len(NAMES), 7))
    expected = _alone(model, x, NAMES)
    li.set_adapter(model, "c")
    with torch.set_grad_enabled(grad), li.batch_adapters(model, NAMES):
        got = model(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert li.active_adapters(model) == ["c"]  # left as it was


def test_generate_with_beams_and_sequences_and_left_padding():
    model = _three_adapters(tiny_llama(pad_token_id=0), dora_c=True)  # decode steps: one token per row
    prompts = torch.randint(1, 100, (3, 5))
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = 0, 0  # left padding on one row
    names = ["c", "a", None]
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    for extra in ({"do_sample": False}, {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}):
        with li.batch_adapters(model, names):
            together = model.generate(prompts, **kwargs, **extra)
        alone = []
        for i, name in enumerate(names):
            row = dict(kwargs, attention_mask=mask[i:i + 1])
            if name is None:
                with li.disabled_adapters(model):
                    alone.append(model.generate(prompts[i:i + 1], **row, **extra))
            else:
                li.set_adapter(model, name)
                alone.append(model.generate(prompts[i:i + 1], **row, **extra))
        assert torch.equal(together, torch.cat(alone)), extra


def _linear_with_two_adapters():
    layer = nn.Sequential(nn.Linear(16, 8))
    for name, r in (("a", 2), ("b", 4)):
        li.inject(layer, targets=["0"], r=r, adapter=name)
        randomize_adapters(layer, name, std=0.3)
    return layer


def test_two_dimensional_inputs_bf16_and_a_conv_net():
    layer = _linear_with_two_adapters()
    x = torch.randn(4, 16)
    names = ["b", "a", None, "b"]
    expected = _alone(layer, x, names, out=lambda o: o)
    with torch.no_grad(), li.batch_adapters(layer, names):
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    expected = _alone(bf16, x.bfloat16(), names, out=lambda o: o)
    with torch.no_grad(), li.batch_adapters(bf16, names):
        torch.testing.assert_close(bf16(x.bfloat16()), expected, atol=2e-2, rtol=2e-2)
    net = ConvNet().eval()
    for name in ("a", "b"):
        li.inject(net, targets=["stem", "head"], r=2, adapter=name)
        randomize_adapters(net, name, std=0.3)
    images = torch.randn(3, 3, 8, 8)
    expected = _alone(net, images, ["a", None, "b"], out=lambda o: o)
    with torch.no_grad(), li.batch_adapters(net, ["a", None, "b"]):
        torch.testing.assert_close(net(images), expected, atol=1e-5, rtol=1e-5)


def test_modules_to_save_and_trainable_tokens_per_row():
    model = tiny_llama()
    li.inject(model, targets=["q_proj"], r=2, modules_to_save=["lm_head"], adapter="a")
    li.inject(model, targets=["v_proj"], r=2, trainable_tokens=[3, 5], adapter="b")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05) if p.requires_grad or "modules_to_save" in str(p) else None
        model.lm_head.modules_to_save["a"].weight.add_(0.3)
        model.model.embed_tokens.rows("b").add_(1.0)
        randomize_adapters(model, "a", 0.2)
    x = torch.tensor([[3, 5, 7], [3, 5, 7], [1, 3, 2]])
    names = ["b", "a", None]
    model.eval()
    expected = _alone(model, x, names)
    with torch.no_grad(), li.batch_adapters(model, names):
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_errors_and_the_state_is_restored_when_the_call_raises():
    model = _three_adapters(tiny_llama())
    x = torch.randint(0, 100, (4, 3))
    with pytest.raises(AdapterNotFoundError, match=r"\['nope'\]"):
        with li.batch_adapters(model, ["a", "nope"]):
            pass
    with pytest.raises(ConfigError, match="not a multiple"), li.batch_adapters(model, ["a", "b", "c"]):
        model(x)
    assert all(m.__dict__.get("_routing") is None for _, m in li.lora_layers(model))
    with pytest.raises(ConfigError, match="list"), li.batch_adapters(model, "a"):
        pass
    li.merge(model, "a")
    with pytest.raises(MergeError, match="unmerge"), li.batch_adapters(model, ["a"]):
        pass
    li.unmerge(model)
    with li.disabled_adapters(model), pytest.raises(ConfigError, match="disabled"):
        with li.batch_adapters(model, ["a"]):
            pass
    with li.batch_adapters(model, ["a", "b"]), pytest.raises(ConfigError, match="inside batch_adapters"):
        with li.disabled_adapters(model):
            pass
    with torch.no_grad():
        expected = model(x).logits
        with pytest.raises(RuntimeError, match="boom"), li.batch_adapters(model, ["b"] * 4):
            raise RuntimeError("boom")
        torch.testing.assert_close(model(x).logits, expected, atol=0, rtol=0)


def test_uneven_groups_take_the_sorted_layout():
    """Most rows on one adapter: padding every group to the largest would waste work, so tokens are sorted."""
    layer = _linear_with_two_adapters()
    x = torch.randn(9, 16)
    names = ["a"] * 7 + ["b", None]
    expected = _alone(layer, x, names, out=lambda o: o)
    with torch.no_grad(), li.batch_adapters(layer, names):
        got = layer(x)
        assert layer[0]._routing.tokens(9, 1, x.device).pos is None
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_stacked_factors_are_rebuilt_when_an_adapter_changes():
    model = _three_adapters(tiny_llama())
    x = torch.randint(0, 100, (2, 4))
    names = ["a", "b"]
    with torch.no_grad(), li.batch_adapters(model, names):
        model(x)
        randomize_adapters(model, "a", std=0.5)  # an optimizer step or a load changes the factors in place
        got = model(x).logits
    torch.testing.assert_close(got, _alone(model, x, names), atol=1e-5, rtol=1e-5)
