"""Trainable tokens (PEFT's trainable_token_indices): only chosen rows train, PEFT's files both ways,
tied heads share the rows, merges keep the tie, the streaming merge, and what is refused."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import assert_matches_peft, tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_inject as li
from lora_inject.cli import main
from lora_inject.errors import ConfigError, LoraInjectError, TargetNotFoundError, UnsupportedModuleError

IDS = [3, 7, 50]
X = torch.tensor([[3, 1, 7, 50, 2, 3], [0, 50, 50, 9, 7, 4]])

CASES = {  # name: (base factory, inject kwargs)
    "llama_tied": (lambda: tiny_llama(tie_word_embeddings=True), dict(targets=["q_proj", "v_proj"])),
    "llama_untied": (lambda: tiny_llama(tie_word_embeddings=False), dict(targets=["q_proj", "v_proj"])),
    "gpt2_tied_conv1d": (tiny_gpt2, dict(targets=["c_attn"])),
    "llama_padding_row_among_ids": (  # the padding row gets no gradient, as in F.embedding
        lambda: tiny_llama(tie_word_embeddings=False, pad_token_id=0),
        dict(targets=["q_proj"], trainable_tokens=[0, 3, 7]),
    ),
    "llama_dict_embed_and_head": (
        lambda: tiny_llama(tie_word_embeddings=False),
        dict(targets=["q_proj"], trainable_tokens={"embed_tokens": [5, 9], "lm_head": [1, 9, 60]}),
    ),
}


def _perturb(model):
    """Move every trainable tensor (token rows and LoRA factors) so that every path is exercised."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def _trained(case):
    factory, kwargs = CASES[case]
    base = factory().eval()
    ours = li.inject(copy.deepcopy(base), **{"trainable_tokens": IDS, "r": 4, **kwargs})
    _perturb(ours)
    return base, ours


def _logits(o):
    return o.logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_peft_both_ways_with_gradients(case, tmp_path):
    base, ours = _trained(case)
    li.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == CASES[case][1].get("trainable_tokens", IDS)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    trained = assert_matches_peft(ours, theirs, X, _logits)
    assert any("trainable_tokens_delta" in k for k in trained)
    theirs.save_pretrained(tmp_path / "peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as peft_file, safe_open(
        str(tmp_path / "ours" / "adapter_model.safetensors"), "pt"
    ) as our_file:
        assert set(peft_file.keys()) == set(our_file.keys())  # a tied head saves nothing of its own, as PEFT's
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, ours(X).logits, atol=1e-6, rtol=1e-6)


def test_peft_made_adapter_loads_equal(tmp_path):
    base = tiny_llama(tie_word_embeddings=True).eval()
    config = peft.LoraConfig(target_modules=["k_proj"], r=2, trainable_token_indices=[2, 40, 8])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "p").eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(X).logits, theirs(X).logits, atol=1e-6, rtol=1e-6)
    assert li.adapter_configs(ours)["default"].trainable_tokens == [2, 40, 8]


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_keeps_the_tie_and_unmerge_restores(case, tmp_path):
    base, ours = _trained(case)
    ours.eval()
    tied = base.lm_head.weight is base.get_input_embeddings().weight
    with torch.no_grad():
        expected = ours(X).logits
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        li.merge(ours)
        torch.testing.assert_close(ours(X).logits, expected, atol=1e-5, rtol=1e-5)
        li.unmerge(ours)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-5, msg=key)
        merged = li.merge_and_unload(ours)
        torch.testing.assert_close(merged(X).logits, expected, atol=1e-5, rtol=1e-5)
    assert type(merged.get_input_embeddings()) is type(base.get_input_embeddings())
    assert (merged.lm_head.weight is merged.get_input_embeddings().weight) == tied


def test_only_the_chosen_rows_train_and_other_tokens_are_unchanged():
    base = tiny_llama(tie_word_embeddings=True).eval()
    model = li.inject(copy.deepcopy(base), targets=["q_proj"], trainable_tokens=IDS)
    embedding_before = base.get_input_embeddings().weight.detach().clone()
    rows = li.lora_state_dict(model)["model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    torch.testing.assert_close(rows, embedding_before[IDS], atol=0, rtol=0)  # starts as the model's own rows
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, base(X).logits, atol=1e-6, rtol=1e-6)  # starts unchanged
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(X).logits.square().mean().backward()
    optimizer.step()
    embedding = model.get_input_embeddings()
    assert torch.equal(embedding.base_layer.weight, embedding_before)  # the frozen base never moves
    looked_up = embedding(torch.arange(100))
    moved = (looked_up - embedding_before).abs().amax(dim=1) > 0
    assert moved.nonzero().flatten().tolist() == IDS
    assert li.trainable_parameters(model).trainable == len(IDS) * 32 + sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" in n
    )


class _Shapes(TorchDispatchMode):
    """Shapes of the tensors every op allocates (views of existing tensors are free and not counted)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_forward_and_backward_never_build_the_full_weight():
    """PEFT rebuilds the (V, D) weight on every call; here neither the embedding nor the tied head does."""
    model = li.inject(tiny_llama(vocab_size=3001, tie_word_embeddings=True), targets=["q_proj"], trainable_tokens=IDS)
    with _Shapes() as seen:
        model(X).logits.sum().backward()
    assert (3001, 32) not in seen.shapes
    with _Shapes() as seen:  # code that reads .weight gets the running weight, built on request
        weight = model.get_input_embeddings().weight
    assert (3001, 32) in seen.shapes and weight.shape == (3001, 32)


def test_tied_head_follows_the_embedding_rows():
    model = li.inject(tiny_llama(tie_word_embeddings=True), targets=["q_proj"], trainable_tokens=IDS)
    _perturb(model)
    head, embedding = model.lm_head, model.get_input_embeddings()
    assert isinstance(head, li.TrainableTokens) and head.tied_to is embedding
    h = torch.randn(2, 32)
    torch.testing.assert_close(head(h), h @ embedding.weight.T, atol=1e-6, rtol=1e-6)
    assert not any(k.startswith("lm_head") for k in li.lora_state_dict(model))


def test_compiled_fullgraph_trains_the_rows():
    model = li.inject(tiny_llama(tie_word_embeddings=True), targets=["q_proj"], trainable_tokens=IDS)
    _perturb(model)
    expected = model(X).logits
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(X).logits, expected, atol=1e-5, rtol=1e-5)
    compiled(X).logits.square().sum().backward()
    assert model.get_input_embeddings().rows("default").grad.abs().amax() > 0


def test_plan_lists_the_rows():
    text = str(li.plan(tiny_llama(tie_word_embeddings=True), targets=["q_proj"], trainable_tokens=IDS))
    assert "model.embed_tokens (Embedding) 3 ids, 96 params" in text
    assert "lm_head (Linear) shares the rows of model.embed_tokens" in text


def test_disable_delete_and_a_second_adapter():
    base = tiny_llama(tie_word_embeddings=True).eval()
    model = li.inject(copy.deepcopy(base), targets=["q_proj"], trainable_tokens=[3, 7])
    li.inject(model, targets=["v_proj"], trainable_tokens=[11], adapter="b")
    _perturb(model)
    li.set_adapter(model, ["default", "b"])
    with torch.no_grad():
        with li.disabled_adapters(model):
            torch.testing.assert_close(model(X).logits, base(X).logits, atol=1e-6, rtol=1e-6)
        both = model(X).logits
        li.merge(model, ["default", "b"])
        torch.testing.assert_close(model(X).logits, both, atol=1e-5, rtol=1e-5)
        li.unmerge(model)
    li.delete_adapter(model, "b")
    li.delete_adapter(model, "default")
    assert type(model.get_input_embeddings()) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)  # token rows unmerge exactly
    with torch.no_grad():  # LoRA's unmerge rounds
        torch.testing.assert_close(model(X).logits, base(X).logits, atol=1e-6, rtol=1e-5)


def test_overlapping_ids_of_two_active_adapters_are_refused():
    model = li.inject(tiny_llama(), targets=["q_proj"], trainable_tokens=[3, 7])
    li.inject(model, targets=["q_proj"], trainable_tokens=[7], adapter="b")
    with pytest.raises(LoraInjectError, match="both train token 7"):
        li.set_adapter(model, ["default", "b"])


def test_float32_rows_on_a_bf16_base_survive_casts():
    model = li.inject(tiny_llama().to(torch.bfloat16), targets=["q_proj"], trainable_tokens=IDS)
    rows = model.get_input_embeddings().rows("default")
    assert rows.dtype == torch.float32
    model.bfloat16()
    assert model.get_input_embeddings().rows("default").dtype == torch.float32
    assert model(X).logits.dtype == torch.bfloat16


def test_streaming_merge_equals_merge_and_unload(tmp_path):
    for tie in (True, False):
        base = tiny_llama(tie_word_embeddings=tie).eval()
        base.save_pretrained(tmp_path / f"base{tie}")
        model = li.inject(copy.deepcopy(base), targets=["q_proj"], trainable_tokens=IDS)
        _perturb(model)
        li.save_adapter(model, tmp_path / f"a{tie}")
        args = [str(tmp_path / n) for n in (f"base{tie}", f"a{tie}", f"out{tie}")]
        assert main(["merge", *args, "--verify", "--quiet"]) == 0
        merged = li.merge_and_unload(model)
        with safe_open(str(tmp_path / f"out{tie}" / "model.safetensors"), "pt") as out:
            for key, value in merged.state_dict().items():
                if key in out.keys():
                    assert torch.equal(out.get_tensor(key), value), key


def test_resize_then_train_new_tokens_and_reload(tmp_path, monkeypatch):
    """The documented way to teach new tokens: resize, train their rows, save a small adapter; loading
    resizes the fresh base by itself."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = tiny_llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    model.resize_token_embeddings(104)
    new = [100, 101, 102, 103]
    li.inject(model, targets=["q_proj"], trainable_tokens=new)
    _perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 20_000  # the rows and the LoRA factors, not the 104 x 32 embedding
    x = torch.tensor([[1, 100, 103, 5]])
    reloaded = li.from_pretrained(tmp_path / "base", tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_reload_warns_about_new_rows_the_adapter_does_not_hold(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = tiny_llama(tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    model.resize_token_embeddings(104)
    li.inject(model, targets=["q_proj"], trainable_tokens=[103])
    li.save_adapter(model, tmp_path / "adapter")
    with pytest.warns(UserWarning, match="3 new row"):
        li.from_pretrained(tmp_path / "base", tmp_path / "adapter")


def test_refusals_leave_the_model_unchanged():
    cases = [
        (dict(targets=["q_proj"], trainable_tokens=[100]), ConfigError, "resize_token_embeddings"),
        (dict(targets=["q_proj"], trainable_tokens={"nothing_here": [1]}), TargetNotFoundError, "nothing_here"),
        (dict(targets=["q_proj"], trainable_tokens={"q_proj": [1]}), ConfigError, "one module trains one way"),
        (dict(targets=["q_proj"], trainable_tokens={"norm": [1]}), UnsupportedModuleError, "nn.Embedding"),
        (dict(targets=["q_proj"], modules_to_save=["embed_tokens"], trainable_tokens=[1]), ConfigError, "one way"),
        (dict(targets=["q_proj", "lm_head"], trainable_tokens=[1]), ConfigError, "tied embeddings"),
        (dict(targets=["q_proj"], trainable_tokens={"embed_tokens": [1], "lm_head": [2]}), ConfigError, "differ"),
    ]
    for kwargs, error, message in cases:
        model = tiny_llama(tie_word_embeddings=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        modules = [type(m) for m in model.modules()]
        with pytest.raises(error, match=message):
            li.inject(model, **kwargs)
        assert [type(m) for m in model.modules()] == modules
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for bad in ([], [1, 1], [-2], "12", {"embed_tokens": []}):
        with pytest.raises(ConfigError):
            li.LoraConfig(trainable_tokens=bad)


def test_file_rows_without_ids_in_the_config_are_refused(tmp_path):
    """A file whose rows the config does not account for is refused even with strict=False."""
    base = tiny_llama(tie_word_embeddings=True)
    model = li.inject(copy.deepcopy(base), targets=["q_proj"], trainable_tokens=IDS)
    li.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraInjectError, match="trainable_tokens_delta"):
        li.load_adapter(copy.deepcopy(base), tmp_path / "a", strict=False)
    config["trainable_token_indices"] = [3, 7]  # two ids, three rows
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(), pytest.raises(LoraInjectError, match="shape mismatch"):
        li.load_adapter(copy.deepcopy(base), tmp_path / "a")


def test_resuming_reads_the_rows_back_into_the_injected_adapter(tmp_path):
    model = li.inject(tiny_llama(tie_word_embeddings=True), targets=["q_proj"], trainable_tokens=IDS)
    _perturb(model)
    li.save_adapter(model, tmp_path / "ckpt")
    saved = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    rows = model.get_input_embeddings().rows("default")
    _perturb(model)
    li.load_adapter_weights(model, tmp_path / "ckpt")
    assert model.get_input_embeddings().rows("default") is rows  # the optimizer's parameter, refilled in place
    for key, value in li.lora_state_dict(model).items():
        assert torch.equal(value, saved[key]), key


def test_resize_after_inject_keeps_the_rows_the_tie_and_saves_the_embedding_once(tmp_path):
    base = tiny_llama(tie_word_embeddings=True)
    model = li.inject(copy.deepcopy(base), targets=["q_proj"], trainable_tokens=[3, 7])
    _perturb(model)
    model.eval()
    with torch.no_grad():
        before = model(X).logits
        model.resize_token_embeddings(110)
        torch.testing.assert_close(model(X).logits[..., :100], before, atol=0, rtol=0)
    assert model.lm_head.base_layer.weight is model.get_input_embeddings().base_layer.weight
    li.save_adapter(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as saved:
        carried = [k for k in saved.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert carried == ["base_model.model.model.embed_tokens.weight"]  # tied: the shared weight once
    fresh = copy.deepcopy(base)
    fresh.resize_token_embeddings(110)  # its new rows differ: the saved embedding brings the trained model's
    with torch.no_grad():
        torch.testing.assert_close(li.load_adapter(fresh, tmp_path / "a").eval()(X).logits, model(X).logits,
                                   atol=1e-6, rtol=1e-6)
