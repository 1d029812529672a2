"""DoRA against PEFT 0.21 (outputs, gradients, merges, files both ways), its own formula, and bad input."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_matches_peft, randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lora_inject as li
from lora_inject.layers.dora import row_norms


class ConvNets(nn.Module):
    """Conv1d/2d/3d (stride, padding, dilation; zero padding: PEFT's DoRA ignores padding_mode) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1)
        self.c3 = nn.Conv3d(3, 4, 2, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        one = self.c1(x.mean(dim=(3, 4))).mean(dim=2)  # (N, 6)
        two = self.c2(x.mean(dim=4)).mean(dim=(2, 3))  # (N, 8)
        three = self.c3(x).mean(dim=(2, 3, 4))  # (N, 4)
        return self.head(two) + one.sum(1, keepdim=True) + three.sum(1, keepdim=True)


CASES = {  # name: (model factory, targets, input factory, output getter)
    "llama_linear_embedding_head": (tiny_llama, ["q_proj", "v_proj", "embed_tokens", "lm_head"],
                                    lambda: torch.randint(0, 100, (2, 7)), lambda o: o.logits),
    "gpt2_conv1d_and_wte": (tiny_gpt2, ["c_attn", "c_proj", "wte"], lambda: torch.randint(0, 100, (2, 7)),
                            lambda o: o.logits),
    "convs_1d_2d_3d": (lambda: ConvNets().eval(), ["c1", "c2", "c3", "head"], lambda: torch.randn(2, 3, 6, 6, 6),
                       lambda o: o),
}


def _trained_dora(case, **kw):
    factory, targets, make_input, out = CASES[case]
    base = factory()
    ours = copy.deepcopy(base)
    li.inject(ours, targets=targets, r=4, alpha=8, dora=True, **kw)
    randomize_adapters(ours)
    with torch.no_grad():  # magnitudes away from their init too
        for _, layer in li.lora_layers(ours):
            m = layer.lora_magnitude_vector["default"].weight
            m.mul_(torch.rand_like(m) + 0.5)
    return base, ours, make_input(), out


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fresh_dora_adapter_leaves_the_model_unchanged(case):
    factory, targets, make_input, out = CASES[case]
    base = factory()
    model = li.inject(copy.deepcopy(base), targets=targets, r=4, dora=True)
    x = make_input()
    with torch.no_grad():
        expected = out(base(x))
        assert torch.equal(out(model(x)), expected)  # cached no-grad path
    assert torch.equal(out(model(x)).detach(), expected)  # autograd path


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_gradients_and_files_equal_peft_both_ways(case, training, tmp_path):
    base, ours, x, out = _trained_dora(case)
    li.save_adapter(ours, tmp_path / "ours")
    config = li.read_adapter_config(tmp_path / "ours")
    assert config.dora and set(li.read_adapter_tensors(tmp_path / "ours")) == {
        k.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default", "")
        for k in li.lora_state_dict(ours)
    }
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    ours.train(training)
    theirs.train(training)
    assert any("magnitude" in k for k in assert_matches_peft(ours, theirs, x, out))  # GPT-2's dropout: same masks
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's file back here
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(out(back(x)), out(ours(x)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_peft(case, tmp_path):
    base, ours, x, out = _trained_dora(case)
    ours.eval()
    li.save_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        expected = out(ours(x))
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        li.merge(ours)
        torch.testing.assert_close(out(ours(x)), expected, atol=1e-5, rtol=1e-5)
        li.unmerge(ours)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-5, msg=key)
        plain = li.merge_and_unload(copy.deepcopy(ours))
        assert not list(li.lora_layers(plain))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").merge_and_unload()
        for key, value in plain.state_dict().items():
            if case.startswith("gpt2") and key == "lm_head.weight":
                continue  # PEFT merges into the weight wte shares with lm_head; we untie first (warned)
            torch.testing.assert_close(value, theirs.state_dict()[key], atol=1e-5, rtol=1e-5, msg=key)
        torch.testing.assert_close(out(plain(x)), expected, atol=1e-5, rtol=1e-5)


def test_several_dora_adapters_compose_as_peft_composes_them(tmp_path):
    """PEFT's rule: adapter k scales everything before it (base and earlier adapters) by g_k, minus the bias."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    li.inject(ours, targets=["q_proj", "v_proj"], r=4, dora=True, adapter="a")
    li.inject(ours, targets=["q_proj", "o_proj"], r=2, dora=True, adapter="b")
    li.inject(ours, targets=["q_proj"], r=2, adapter="plain")
    for name in ("a", "b", "plain"):
        randomize_adapters(ours, name)
        li.save_adapter(ours, tmp_path / name, adapter=name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    for name in ("b", "plain"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    x = torch.randint(0, 100, (2, 7))
    for names in (["a", "b"], ["b", "a"], ["a", "plain", "b"]):
        li.set_adapter(ours, names)
        theirs.base_model.set_adapter(names)
        with torch.no_grad():
            torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5, msg=str(names))


def test_dropout_in_training_follows_peft_formula(tmp_path):
    base = tiny_llama()
    ours = li.inject(copy.deepcopy(base), targets=["q_proj", "v_proj"], r=4, dora=True, dropout=0.3)
    randomize_adapters(ours)
    li.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    ours.train()
    theirs.train()
    x = torch.randint(0, 100, (2, 7))
    # one F.dropout per adapted layer in the same order on both sides: the same masks
    assert_matches_peft(ours, theirs, x, lambda o: o.logits, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norms_without_the_full_matrix_equal_the_direct_norm(dtype):
    torch.manual_seed(1)
    w = torch.randn(96, 200, dtype=dtype) * 0.05
    b, a = torch.randn(96, 8, dtype=dtype), torch.randn(8, 200, dtype=dtype)
    for scale in (0.0, 1e-3, 2.0, -0.7):
        direct = torch.linalg.vector_norm(w + scale * b @ a, dim=1)
        fast = row_norms(w, b, a, scale)
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(fast, direct, atol=0, rtol=tol)
    w_bf16 = w.to(torch.bfloat16)  # half-precision base, float32 adapter: float32 result, close to the direct one
    fast = row_norms(w_bf16, b.float(), a.float(), 0.01)
    direct = torch.linalg.vector_norm(w_bf16.float() + 0.01 * b.float() @ a.float(), dim=1)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, direct, atol=0, rtol=5e-3)


def test_no_grad_calls_keep_the_scale_and_follow_every_change():
    model = li.inject(tiny_llama(), targets=["q_proj"], r=4, dora=True)
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)

    def expected():
        w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        m = layer.lora_magnitude_vector["default"].weight
        merged = w + s * b @ a
        return (x @ merged.T) * (m / torch.linalg.vector_norm(merged, dim=1))

    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)
        kept = layer._dora_fast[-1]
        layer(x)
        assert layer._dora_fast[-1] is kept  # reused
        for change in (lambda: layer.lora_A["default"].weight.add_(0.1), lambda: layer.lora_B["default"].weight.mul_(2),
                       lambda: layer.lora_magnitude_vector["default"].weight.add_(1.0),
                       lambda: layer.base_layer.weight.mul_(1.5)):
            change()
            torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)


def test_bf16_base_keeps_float32_magnitudes_and_trains():
    model = li.inject(tiny_llama().to(torch.bfloat16), targets=["q_proj", "v_proj"], r=4, dora=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randint(0, 100, (2, 8))
    model.train()
    for _ in range(2):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = [not torch.equal(a, p) for a, p in zip(start, params)]
    assert all(moved)


def test_plan_and_counts_include_the_magnitudes():
    model = tiny_llama()
    plain = li.plan(model, targets=["q_proj"], r=4).added_params
    dora = li.plan(model, targets=["q_proj"], r=4, dora=True).added_params
    assert dora - plain == 2 * 32  # one magnitude entry per output feature, two layers
    li.inject(model, targets=["q_proj"], r=4, dora=True)
    assert li.trainable_parameters(model).trainable == dora


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph_with_dora_matches_eager(training):
    from test_fast_paths import _compile_matches_eager

    _compile_matches_eager(li.inject(tiny_llama(), targets="all-linear", r=4, dora=True), training)


def test_torch_compile_fullgraph_with_dora_without_autograd():
    import torch._dynamo

    torch._dynamo.reset()
    model = li.inject(tiny_llama(), targets=["q_proj", "v_proj", "embed_tokens"], r=4, dora=True).eval()
    randomize_adapters(model)
    x = torch.randint(0, 100, (2, 8))
    with torch.inference_mode():
        got = torch.compile(model, fullgraph=True)(x).logits
        expected = model(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ----- bad input -------------------------------------------------------------------------------
def _file(tmp_path):
    base, ours, _, _ = _trained_dora("llama_linear_embedding_head")
    li.save_adapter(ours, tmp_path / "a")
    return base, tmp_path / "a"


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("strict", [True, False])
def test_a_dora_file_without_magnitudes_is_refused_even_when_not_strict(tmp_path, strict):
    base, folder = _file(tmp_path)
    _rewrite(folder, lambda t: [t.pop(k) for k in [k for k in t if "magnitude" in k][:1]])
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(li.AdapterFileError, match="lacks the DoRA magnitudes"):
        li.load_adapter(model, folder, strict=strict)
    assert model.state_dict().keys() == before.keys() and not list(li.lora_layers(model))


def test_wrong_shaped_or_non_finite_magnitudes_are_refused(tmp_path):
    base, folder = _file(tmp_path)
    key = next(k for k in li.read_adapter_tensors(folder) if "q_proj.lora_magnitude" in k)
    _rewrite(folder, lambda t: t.update({"base_model.model." + key: torch.ones(7)}))
    with pytest.raises(li.AdapterFileError, match="shape mismatch.*lora_magnitude_vector"):
        li.load_adapter(copy.deepcopy(base), folder)
    _rewrite(folder, lambda t: t.update({"base_model.model." + key: torch.full((32,), float("nan"))}))
    model = copy.deepcopy(base)
    with pytest.raises(li.AdapterFileError, match="NaN or inf"):
        li.load_adapter(model, folder)
    assert not list(li.lora_layers(model))


def test_dora_on_a_layer_that_cannot_support_it_is_refused_before_any_change():
    class Custom(nn.Linear):
        pass

    class NoDora(li.LoraLinear):
        supports_dora = False

    li.register(Custom, NoDora)
    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4))
    with pytest.raises(li.UnsupportedModuleError, match="DoRA cannot adapt '1'"):
        li.inject(model, targets=["0", "1"], dora=True)
    assert type(model[0]) is nn.Linear
    li.inject(model, targets=["0", "1"])  # plain LoRA is fine


def test_merge_refuses_non_finite_dora_results():
    model = li.inject(tiny_llama(), targets=["q_proj"], r=4, dora=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight[0] = float("inf")
    before = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(li.MergeError, match="DoRA"):
        li.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, before)


def test_a_zero_magnitude_entry_still_gets_its_exact_gradient(tmp_path):
    """The fused path recovers the unscaled product from the output, which a zero magnitude erases:
    such a layer keeps the product itself instead."""
    base, ours, x, out = _trained_dora("llama_linear_embedding_head")
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight[3] = 0.0
    li.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    assert_matches_peft(ours, theirs, x, out)
    assert ours.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.grad[3] != 0


def test_saves_at_most_three_quarters_of_what_peft_dora_saves():
    from test_fast_paths import _saved_storage_bytes

    base = tiny_llama(hidden_size=64, intermediate_size=128)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = li.inject(copy.deepcopy(base), targets=targets, r=8, dora=True).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=targets, use_dora=True))
    ids = torch.randint(0, 100, (4, 64))
    ours_bytes = _saved_storage_bytes(lambda: ours(input_ids=ids, labels=ids), exclude=ours)
    peft_bytes = _saved_storage_bytes(lambda: theirs.train()(input_ids=ids, labels=ids), exclude=theirs)
    assert ours_bytes <= 0.75 * peft_bytes, (ours_bytes, peft_bytes)
