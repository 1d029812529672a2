"""Each wrapper against hand-computed values: init, forward, merge, unmerge, gradients, dtypes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Holder, randomize_adapters
from torch import nn

import lora_inject as li


def hf_conv1d(nx=5, nf=7):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def ids(shape, high=10):
    return torch.randint(0, high, shape)


# name -> (base factory, input factory)
CASES = {
    "linear": (lambda: nn.Linear(5, 7), lambda: torch.randn(3, 4, 5)),
    "linear_nobias": (lambda: nn.Linear(5, 7, bias=False), lambda: torch.randn(3, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9)),
    "conv2d_dilated_reflect": (
        lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2, padding_mode="reflect"), lambda: torch.randn(2, 3, 8, 8)
    ),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 5, 1), lambda: torch.randn(2, 3, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), lambda: torch.randn(1, 2, 3, 5, 5)),
    "embedding_padding": (lambda: nn.Embedding(10, 6, padding_idx=0), lambda: ids((3, 5))),
    "hf_conv1d": (hf_conv1d, lambda: torch.randn(3, 5)),
}


def wrapped(case, r=3, alpha=6.0, **kw):
    make_base, make_x = CASES[case]
    model = Holder(make_base())
    li.inject(model, targets=["layer"], r=r, alpha=alpha, **kw)
    return model, model.layer, make_x()


def factors(layer, name="default"):
    if isinstance(layer, li.LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def set_random(layer, std=0.3):
    with torch.no_grad():
        for p in factors(layer):
            p.normal_(0, std)


def reference_forward(layer, x):
    """base(x) + scale * B A x written out per layer type, independently of the wrapper code."""
    base, scale = layer.base_layer, layer.scaling["default"]
    a, b = factors(layer)
    if isinstance(layer, li.LoraEmbedding):
        return F.embedding(x, base.weight) + scale * (a.T[x] @ b.T)
    if isinstance(layer, li.LoraConv):
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        if base.padding_mode != "zeros":
            xp = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            hidden = conv(xp, a, stride=base.stride, dilation=base.dilation)
        else:
            hidden = conv(x, a, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return base(x) + scale * conv(hidden, b)
    if isinstance(layer, li.LoraConv1D):
        return x @ base.weight + base.bias + scale * (x @ a.T @ b.T)
    out = x @ base.weight.T + scale * (x @ a.T @ b.T)
    return out + base.bias if base.bias is not None else out


def reference_delta(layer):
    a, b = factors(layer)
    scale = layer.scaling["default"]
    if isinstance(layer, li.LoraEmbedding):
        return scale * (b @ a).T
    if isinstance(layer, li.LoraConv):
        return scale * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    if isinstance(layer, li.LoraConv1D):
        return scale * (b @ a).T
    return scale * (b @ a)


@pytest.mark.parametrize("case", CASES)
def test_init_rules_and_identity_at_init(case):
    make_base, make_x = CASES[case]
    base = make_base()
    x = make_x()
    expected = base(x)
    model = Holder(base)
    li.inject(model, targets=["layer"], r=4, alpha=8)
    layer = model.layer
    a, b = factors(layer)
    if isinstance(layer, li.LoraEmbedding):
        assert torch.count_nonzero(a) == 0  # A zero, B normal: the reverse of Linear
        assert b.std().item() == pytest.approx(1.0, abs=0.5)
    else:
        assert torch.count_nonzero(b) == 0
        fan_in = a[0].numel()
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound
        assert a.abs().max() <= bound + 1e-7
        assert a.abs().max() > 0.5 * bound  # actually drawn, not zero
    assert torch.equal(model(x), expected)


def test_gaussian_init_has_std_one_over_r():
    model = Holder(nn.Linear(512, 512))
    li.inject(model, targets=["layer"], r=4, init="gaussian")
    a = model.layer.lora_A["default"].weight
    assert a.std().item() == pytest.approx(0.25, rel=0.05)
    assert torch.count_nonzero(model.layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_hand_computation(case):
    model, layer, x = wrapped(case)
    set_random(layer)
    torch.testing.assert_close(model(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_delta(case):
    model, layer, x = wrapped(case)
    set_random(layer)
    original = layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    torch.testing.assert_close(layer.delta_weight("default"), reference_delta(layer), atol=1e-6, rtol=1e-6)
    li.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, original + reference_delta(layer), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    li.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_accumulates_without_a_delta_tensor(case, dtype, monkeypatch):
    """Every layer type merges by one GEMM into the weight: the weight-sized delta is never built."""
    model, layer, _ = wrapped(case)
    layer.base_layer.to(dtype)
    set_random(layer)
    original = layer.base_layer.weight.detach().clone()
    expected = (original.float() + reference_delta(layer)).to(dtype)
    monkeypatch.setattr(type(layer), "_delta_from_factors", lambda *_: pytest.fail("delta materialised"))
    li.merge(model)
    tol = 2**-7 * expected.float().abs() + 1e-6 if dtype == torch.bfloat16 else 1e-6
    assert ((layer.base_layer.weight.float() - expected.float()).abs() <= tol).all()
    li.unmerge(model)
    assert ((layer.base_layer.weight.float() - original.float()).abs() <= 2 * tol).all()


@pytest.mark.parametrize("case", CASES)
def test_float64_merge_keeps_float64_precision(case):
    """A float64 model merges in float64: delta and sum to ~1e-15, not float32's ~1e-7."""
    model, layer, x = wrapped(case)
    model.double()
    x = x.double() if x.is_floating_point() else x
    set_random(layer)
    original = layer.base_layer.weight.detach().clone()
    delta = reference_delta(layer)  # float64 factors: the exact formula
    assert layer.delta_weight("default").dtype == torch.float64
    torch.testing.assert_close(layer.delta_weight("default"), delta, atol=1e-13, rtol=1e-13)
    unmerged = model(x)
    li.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, original + delta, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(model(x), unmerged, atol=1e-12, rtol=1e-12)
    li.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-13, rtol=0)


@pytest.mark.parametrize("case", ["linear", "conv2d_1x1", "embedding_padding", "hf_conv1d"])
def test_float64_adapters_on_a_float32_base_merge_with_one_rounding(case):
    """adapter_dtype=float64 on a float32 weight: the delta in float64, the sum rounded to float32 once."""
    model, layer, _ = wrapped(case, adapter_dtype=torch.float64)
    set_random(layer)
    original = layer.base_layer.weight.detach().clone()
    expected = (original.double() + reference_delta(layer)).float()
    li.merge(model)
    assert layer.base_layer.weight.dtype == torch.float32
    torch.testing.assert_close(layer.base_layer.weight, expected, atol=0, rtol=0)


def test_merge_into_a_channels_last_conv_weight():
    """A weight that cannot be viewed as (out, -1) gets a materialised delta instead, same result."""
    model, layer, x = wrapped("conv2d_dilated_reflect")
    layer.base_layer.to(memory_format=torch.channels_last)
    assert not layer.base_layer.weight.is_contiguous()
    set_random(layer)
    original = layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    li.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, original + reference_delta(layer), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_and_unload(case):
    make_base, _ = CASES[case]
    model, layer, x = wrapped(case)
    set_random(layer)
    base_type = type(layer.base_layer)
    original = layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    delta = reference_delta(layer)
    plain = li.merge_and_unload(model)
    assert type(plain.layer) is base_type
    torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-5)
    # unload + manual merge gives the same weights
    model2, layer2, _ = wrapped(case)
    with torch.no_grad():
        layer2.base_layer.weight.copy_(original)
        for p, q in zip(factors(layer2), factors(layer)):
            p.copy_(q)
    plain2 = li.unload(model2)
    assert type(plain2.layer) is base_type
    torch.testing.assert_close(plain2.layer.weight, original)
    torch.testing.assert_close(plain2.layer.weight + delta, plain.layer.weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_only_adapter(case):
    model, layer, x = wrapped(case)
    set_random(layer)
    out = model(x)
    out.float().square().sum().backward()
    a, b = factors(layer)
    assert a.grad is not None and b.grad is not None
    assert torch.count_nonzero(a.grad) > 0 and torch.count_nonzero(b.grad) > 0
    assert all(p.grad is None for p in layer.base_layer.parameters())
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


def test_embedding_padding_row_never_moves():
    model, layer, _ = wrapped("embedding_padding")
    set_random(layer)
    x = torch.tensor([[0, 1, 2, 0]])
    model(x).sum().backward()
    a = layer.lora_embedding_A["default"]
    assert torch.count_nonzero(a.grad[:, 0]) == 0  # padding_idx gets no gradient, as in the base
    assert torch.count_nonzero(a.grad[:, 1]) > 0


def test_state_dict_key_names():
    model, _, _ = wrapped("linear")
    assert sorted(model.state_dict()) == [
        "layer.base_layer.bias", "layer.base_layer.weight",
        "layer.lora_A.default.weight", "layer.lora_B.default.weight",
    ]
    model, _, _ = wrapped("embedding_padding")
    assert sorted(model.state_dict()) == [
        "layer.base_layer.weight", "layer.lora_embedding_A.default", "layer.lora_embedding_B.default"
    ]


@pytest.mark.parametrize("case", ["linear", "conv2d_dilated_reflect", "embedding_padding", "hf_conv1d"])
def test_bf16_base_keeps_fp32_adapters_and_bf16_activations(case):
    make_base, make_x = CASES[case]
    model = Holder(make_base().to(torch.bfloat16))
    x = make_x()
    x = x if not x.is_floating_point() else x.to(torch.bfloat16)
    li.inject(model, targets=["layer"], r=4)
    layer = model.layer
    a, b = factors(layer)
    assert a.dtype == b.dtype == torch.float32
    set_random(layer)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32
    original = layer.base_layer.weight.detach().clone()
    merged_expected = (original.float() + reference_delta(layer).float()).to(torch.bfloat16)
    li.merge(model)
    assert torch.equal(layer.base_layer.weight, merged_expected)  # fp32 sum, one cast
    li.unmerge(model)
    # stated tolerance: one bf16 rounding of |W| + |delta|
    tol = (original.float().abs() + reference_delta(layer).abs()) * 2**-7 + 1e-6
    assert ((layer.base_layer.weight.float() - original.float()).abs() <= tol).all()


def test_explicit_adapter_dtype():
    model = Holder(nn.Linear(4, 4))
    li.inject(model, targets=["layer"], adapter_dtype=torch.float64)
    assert model.layer.lora_A["default"].weight.dtype == torch.float64
    assert model(torch.randn(2, 4)).dtype == torch.float32


def test_merge_twice_is_a_noop_with_warning():
    model, layer, x = wrapped("linear")
    set_random(layer)
    li.merge(model)
    once = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        li.merge(model)
    assert torch.equal(layer.base_layer.weight, once)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_safe_merge_refuses_non_finite_and_changes_nothing(bad):
    model, layer, _ = wrapped("linear")
    set_random(layer)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = bad
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(li.MergeError, match="NaN or inf"):
        li.merge_and_unload(model)
    assert torch.equal(layer.base_layer.weight, before)
    assert isinstance(model.layer, li.LoraLinear) and layer.merged_adapters == []


def test_fp16_overflow_is_caught_by_safe_merge():
    model = Holder(nn.Linear(4, 4).half())
    li.inject(model, targets=["layer"])
    with torch.no_grad():
        model.layer.lora_A["default"].weight.fill_(300.0)
        model.layer.lora_B["default"].weight.fill_(300.0)
    with pytest.raises(li.MergeError, match="overflows"):
        li.merge(model)


def test_grouped_conv_needs_a_rank_divisible_by_its_groups():
    model = Holder(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(li.UnsupportedModuleError, match="groups=2.*divisible by 2.*r=3"):
        li.inject(model, targets=["layer"], r=3)
    assert type(model.layer) is nn.Conv2d
    with pytest.raises(li.UnsupportedModuleError, match="DoRA cannot adapt"):
        li.inject(model, targets=["layer"], r=2, dora=True)
    assert type(model.layer) is nn.Conv2d


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.grouped(x).mean(dim=(2, 3)))


def test_grouped_conv_lora_runs_trains_and_loads_as_peft_and_refuses_to_merge(tmp_path):
    """PEFT's layout: A (r, in, k, k) over all input channels, B (out, r/groups, 1, 1) grouped."""
    peft = pytest.importorskip("peft")
    base = GroupedNet().eval()
    ours = li.inject(copy.deepcopy(base), targets=["grouped", "head"], r=8, alpha=4)
    layer = ours.grouped
    assert layer.lora_B["default"].weight.shape == (12, 2, 1, 1)
    randomize_adapters(ours)
    x = torch.randn(2, 8, 6, 6)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base.grouped(x) + layer.scaling["default"] * F.conv2d(F.conv2d(x, a, padding=1), b, groups=4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    li.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    torch.testing.assert_close(a.grad, theirs.base_model.model.grouped.lora_A["default"].weight.grad,
                               atol=1e-5, rtol=1e-4)
    theirs.save_pretrained(tmp_path / "peft")
    back = li.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(x), ours(x), atol=1e-6, rtol=1e-6)
    head_before = ours.head.base_layer.weight.clone()
    with pytest.raises(li.MergeError, match="grouped.*groups=4.*dense kernel"):
        li.merge_and_unload(ours, safe=False)
    assert torch.equal(ours.head.base_layer.weight, head_before) and not ours.head.merged_adapters  # nothing merged


def test_embedding_with_max_norm_refused():
    model = Holder(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(li.UnsupportedModuleError, match="max_norm"):
        li.inject(model, targets=["layer"])


def test_meta_device_injection_allocates_nothing_and_reset_reinitialises():
    with torch.device("meta"):
        model = Holder(nn.Linear(4096, 4096))
    li.inject(model, targets=["layer"], r=8)
    a, b = factors(model.layer)
    assert a.device.type == "meta" and b.device.type == "meta"
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.layer.lora_B["default"].weight.fill_(7.0)  # uninitialised memory stand-in
    li.reset_adapters(model)
    assert torch.count_nonzero(model.layer.lora_B["default"].weight) == 0
    assert model.layer.lora_A["default"].weight.abs().max() <= 1 / math.sqrt(4096) + 1e-7


def test_dropout_only_on_adapter_path():
    model, layer, x = wrapped("linear", dropout=0.5)
    set_random(layer)
    model.eval()
    torch.testing.assert_close(model(x), reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    model.train()
    base_out = layer.base_layer(x)
    out = model(x)
    assert not torch.allclose(out, reference_forward(layer, x))
    # base path unaffected: with B = 0 the output is exactly the base
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    assert torch.equal(model(x), base_out)
