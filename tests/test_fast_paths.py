"""Fast paths against the plain formula ``base(x) + scale * B(A(dropout(x)))``, and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import Holder, randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lora_inject as li
from lora_inject.layers.dropout import keep_mask, keep_probability, pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 8), (2, 5, 13), (4, 1, 64)])
def test_bit_packing_round_trip(shape):
    mask = torch.rand(shape) > 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_bit_packing_every_byte_value():
    import itertools

    patterns = torch.tensor(list(itertools.product([False, True], repeat=8)))  # (256, 8)
    packed = pack_bits(patterns)
    weights = 2 ** torch.arange(8)
    assert torch.equal(packed.long(), (patterns.long() * weights).sum(1))  # element 8j + i is bit i of byte j
    assert torch.equal(unpack_bits(packed, patterns.shape), patterns)


def _reference(layer, x, mask, p):
    """The plain formula, with a given dropout mask."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dropped = x * mask / (1 - p) if mask is not None else x
    return layer.base_layer(x) + layer.scaling["default"] * F.linear(F.linear(dropped, a), b)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["fused", "general"])
def test_linear_forward_and_gradients_match_plain_formula(p, dtype, path):
    model = Holder(nn.Linear(24, 20).to(dtype))
    li.inject(model, targets=["layer"], r=4, alpha=8, dropout=p, adapter_dtype=dtype)
    randomize_adapters(model, std=0.2)
    model.train()
    layer = model.layer
    if path == "general":  # a hook on the base layer: it must be called, so the fused function is skipped
        layer.base_layer.register_forward_hook(lambda module, inputs, output: None)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)

    torch.manual_seed(123)
    out = model(x)
    assert _fused(out) == (path == "fused")
    out.backward(torch.ones_like(out))
    ours = (out.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
            layer.lora_B["default"].weight.grad.clone())
    x.grad = None
    layer.zero_grad()

    torch.manual_seed(123)  # the same draw gives the same mask
    mask = keep_mask(x.reshape(-1, 24).shape, p, x.device).view(x.shape) if p > 0 else None
    ref = _reference(layer, x, mask, 1 - keep_probability(p))
    ref.backward(torch.ones_like(ref))
    expected = (ref.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_mask_rate_and_quantisation(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([4096, 256]), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (4096, 256)
    assert abs(mask.float().mean().item() - keep_probability(p)) < 0.003
    assert abs(keep_probability(p) - (1 - p)) <= 1 / 65536


def test_dropout_keep_rate_and_same_mask_in_backward():
    p = 0.3
    model = Holder(nn.Linear(256, 8))
    li.inject(model, targets=["layer"], r=4, dropout=p)
    model.train()
    with torch.no_grad():
        model.layer.lora_B["default"].weight.fill_(1.0)
        model.layer.lora_A["default"].weight.fill_(1.0)
    x = torch.ones(64, 256, requires_grad=True)
    out = model(x)
    out.sum().backward()
    # with A = B = 1, each x element's gradient is (sum over outputs) * scale * mask / keep
    per_element = x.grad - model.layer.base_layer.weight.sum(0)  # remove the base path's gradient
    kept = per_element.abs() > 1e-6
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    expected_value = 8 * 4 * model.layer.scaling["default"] / keep_probability(p)
    torch.testing.assert_close(per_element[kept], torch.full_like(per_element[kept], expected_value))
    # forward used the same mask: the lora part of each output row counts the kept inputs
    lora_out = out - model.layer.base_layer(x)
    expected_lora = kept.sum(1).float() * 4 * model.layer.scaling["default"] / keep_probability(p)
    torch.testing.assert_close(lora_out[:, 0], expected_lora)


def _saved_storage_bytes(forward, exclude: nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``forward()`` runs,
    leaving out the parameters of ``exclude`` (they exist anyway; saving them costs nothing)."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def test_dropout_saves_no_copy_of_the_input():
    def saved(dropout):
        model = Holder(nn.Linear(512, 512))
        li.inject(model, targets=["layer"], r=16, dropout=dropout)
        model.train()
        x = torch.randn(1024, 512, requires_grad=True)
        return _saved_storage_bytes(lambda: model(x))

    assert saved(0.1) <= 1.1 * saved(0.0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saves_no_more_for_backward_than_peft(dropout):
    """Whole model, frozen base: the activations autograd keeps are at most PEFT's (with dropout,
    far less: PEFT keeps a dropped copy of every adapted module's input)."""
    peft = pytest.importorskip("peft")
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = li.inject(copy.deepcopy(base), targets=targets, r=8, dropout=dropout).train()
    config = peft.LoraConfig(r=8, target_modules=targets, lora_dropout=dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).train()
    ids = torch.randint(0, 100, (4, 64))
    ours_bytes = _saved_storage_bytes(lambda: ours(input_ids=ids, labels=ids), exclude=ours)
    peft_bytes = _saved_storage_bytes(lambda: theirs(input_ids=ids, labels=ids), exclude=theirs)
    assert ours_bytes <= peft_bytes * (1.0 if dropout == 0.0 else 0.75)


def test_bf16_input_is_not_cast_to_fp32():
    model = Holder(nn.Linear(64, 64).to(torch.bfloat16))
    li.inject(model, targets=["layer"], r=8, dropout=0.1)
    model.train()
    dtypes = set()
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.add((t.dtype, t.numel())) or t, lambda t: t):
        model(x)
    assert (torch.float32, x.numel()) not in dtypes  # no fp32 copy of the activations


def _compile_matches_eager(model, training):
    """Compiled (fullgraph) and eager give the same logits and, in training, the same adapter grads."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    randomize_adapters(model)
    model.train(training)
    ids = torch.randint(0, 100, (2, 8))
    compiled = torch.compile(model, fullgraph=True)

    def loss_of(logits):  # not labels=: GPT-2's loss lookup logs a warning, a graph break of its own
        return logits.float().square().mean()

    with inductor_config.patch(fallback_random=True):  # same RNG stream as eager
        torch.manual_seed(5)
        got = compiled(input_ids=ids).logits
        if training:
            loss_of(got).backward()
            got_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            model.zero_grad()
    torch.manual_seed(5)
    expected = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if training:
        loss_of(expected).backward()
        want = [p.grad for p in model.parameters() if p.requires_grad]
        assert len(want) == len(got_grads) > 0
        for g, w in zip(got_grads, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph_matches_eager(dropout, training):
    _compile_matches_eager(li.inject(tiny_llama(), targets="all-linear", r=4, dropout=dropout), training)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_torch_compile_fullgraph_without_autograd_matches_eager(mode):
    """Eager no-grad calls keep transposed operands between calls; compiled ones must not need them."""
    import torch._dynamo

    torch._dynamo.reset()
    model = li.inject(tiny_llama(), targets="all-linear", r=4, dropout=0.1)
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 100, (2, 8))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_gpt2_conv1d_with_dropout():
    """transformers' Conv1D takes the fused path transposed; compiled training must match too."""
    model = li.inject(tiny_gpt2(), targets=["c_attn", "c_proj", "c_fc"], r=4, dropout=0.1)
    _compile_matches_eager(model, training=True)


def _linear_cases():
    from transformers.pytorch_utils import Conv1D

    conv1d = Conv1D(20, 24)  # transformers' layout: weight (in=24, out=20)
    nn.init.normal_(conv1d.bias)
    return {"linear": nn.Linear(24, 20), "linear_no_bias": nn.Linear(24, 20, bias=False), "conv1d": conv1d}


def _fused(out: torch.Tensor) -> bool:
    """Whether ``out`` came from the fused LoRA function (possibly through a reshape)."""
    node = out.grad_fn
    if type(node).__name__ in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"):
        node = node.next_functions[0][0]
    return type(node).__name__ == "LoraLinearFunctionBackward"


def _plain_formula(layer, x, mask=None, keep=1.0):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dropped = x if mask is None else x * mask / keep
    return layer.base_layer(x) + layer.scaling["default"] * F.linear(F.linear(dropped, a), b)


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_path_taken_and_equal_to_plain_formula(kind, p, train_base):
    """Every input's gradient, with the base frozen or trained (bias='all' / full fine-tuning next to LoRA)."""
    model = Holder(_linear_cases()[kind].double())
    li.inject(model, targets=["layer"], r=3, alpha=5, dropout=p, adapter_dtype=torch.float64)
    randomize_adapters(model, std=0.3)
    model.train()
    layer = model.layer
    layer.base_layer.requires_grad_(train_base)
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)

    torch.manual_seed(7)
    out = model(x)
    assert _fused(out)  # the fast path ran
    grad_out = torch.randn_like(out)
    leaves = [x, *(p_ for p_ in model.parameters() if p_.requires_grad)]
    got = (out, *torch.autograd.grad(out, leaves, grad_out))

    torch.manual_seed(7)
    mask = keep_mask(torch.Size([14, 24]), p, x.device).view(x.shape) if p > 0 else None
    ref = _plain_formula(layer, x, mask, keep_probability(p))
    want = (ref, *torch.autograd.grad(ref, leaves, grad_out))
    assert len(leaves) == (3 if not train_base else 4 if kind == "linear_no_bias" else 5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_inference_equals_plain_formula(kind):
    model = Holder(_linear_cases()[kind])
    li.inject(model, targets=["layer"], r=4, dropout=0.3)
    randomize_adapters(model, std=0.3)
    model.eval()  # dropout off
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        got = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), got, atol=0, rtol=0)
        torch.testing.assert_close(got, _plain_formula(model.layer, x), atol=1e-6, rtol=1e-5)


# ----- no-grad calls: transposed operands kept between calls ----------------------------------


def _no_grad_layer(kind="linear", dtype=torch.float64, **inject):
    model = Holder(_linear_cases()[kind].to(dtype))
    li.inject(model, targets=["layer"], r=3, alpha=5, **inject)
    randomize_adapters(model, std=0.3)
    return model.eval()


def _assert_plain(model, x, **tol):
    with torch.no_grad():
        got, want = model(x), _plain_formula(model.layer, x)
    torch.testing.assert_close(got, want, **(tol or dict(atol=1e-12, rtol=1e-10)))


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d"])
def test_no_grad_calls_reuse_cached_operands_and_equal_plain_formula(kind):
    model = _no_grad_layer(kind, adapter_dtype=torch.float64)
    layer = model.layer
    for x in (torch.randn(2, 7, 24, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64),
              torch.randn(24, dtype=torch.float64), torch.randn(0, 24, dtype=torch.float64)):
        _assert_plain(model, x)
    views = layer.__dict__["_frozen"][-1]
    with torch.inference_mode():
        model(torch.randn(3, 24, dtype=torch.float64))
    assert layer.__dict__["_frozen"][-1] is views  # reused, not rebuilt
    weight = layer.base_layer.weight
    # the base weight is only ever viewed: Conv1D's (in, out) as it is, Linear's transposed
    assert views[0] is weight if kind == "conv1d" else views[0]._base is weight
    assert views[0].data_ptr() == weight.data_ptr()


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d"])
def test_no_grad_call_of_a_fresh_adapter_equals_the_base_bit_for_bit(kind):
    base = _linear_cases()[kind]
    model = li.inject(Holder(copy.deepcopy(base)), targets=["layer"], r=4).eval()  # B = 0
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)


def test_cached_operands_follow_every_change_to_the_weights():
    model = _no_grad_layer(adapter_dtype=torch.float64)
    layer, x = model.layer, torch.randn(4, 24, dtype=torch.float64)
    _assert_plain(model, x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x).square().sum().backward()
    optimizer.step()  # A and B change in place
    model.eval()
    _assert_plain(model, x)
    with torch.no_grad():
        layer.base_layer.weight.data = torch.randn(20, 24, dtype=torch.float64)  # new storage, same Parameter
        _assert_plain(model, x)
        layer.base_layer.weight = nn.Parameter(torch.randn(20, 24, dtype=torch.float64))
        _assert_plain(model, x)
        layer.lora_A["default"].weight.copy_(torch.randn(3, 24))
        _assert_plain(model, x)
    li.inject(model, targets=["layer"], r=2, adapter="other", adapter_dtype=torch.float64)
    randomize_adapters(model, adapter="other", std=0.3)
    li.set_adapter(model, "other")
    _assert_plain_for(model, x, "other")
    li.set_adapter(model, "default")
    with torch.no_grad():
        unmerged = model(x)
        li.merge(model)  # W changes in place (delta computed in float32); the adapter stops running
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        li.unmerge(model)
    _assert_plain(model, x)


def _assert_plain_for(model, x, adapter):
    layer = model.layer
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        want = layer.base_layer(x) + layer.scaling[adapter] * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-10)


def test_cached_casts_of_fp32_adapters_follow_training_of_a_bf16_model():
    model = _no_grad_layer(dtype=torch.bfloat16)  # adapters: float32 master weights
    layer = model.layer
    assert layer.lora_A["default"].weight.dtype == torch.float32
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(6, 24, dtype=torch.bfloat16)
    for _ in range(3):
        with torch.inference_mode():  # builds the casts (inference tensors) ...
            infer = model(x)
        with torch.no_grad():  # ... that serve here too
            torch.testing.assert_close(model(x), infer, atol=0, rtol=0)
        model.train()
        grad_path = model(x)
        torch.testing.assert_close(grad_path.detach(), infer, atol=0, rtol=0)  # same result as the grad path
        grad_path.float().square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
    assert layer.__dict__["_frozen"][-1][1].dtype == torch.bfloat16


def test_cached_operands_are_dropped_by_to_and_left_out_of_copies(tmp_path):
    model = _no_grad_layer(adapter_dtype=torch.float64)
    x = torch.randn(4, 24, dtype=torch.float64)
    _assert_plain(model, x)
    assert "_frozen" in model.layer.__dict__
    for twin in (copy.deepcopy(model), _pickled(model, tmp_path / "model.pt")):
        assert "_frozen" not in twin.layer.__dict__
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model(x), atol=0, rtol=0)
    model.float()  # .to() and friends: the old float64 storage must not stay alive through a view
    assert "_frozen" not in model.layer.__dict__
    _assert_plain(model, x.float(), atol=1e-5, rtol=1e-5)


def _pickled(model, path):
    torch.save(model, path)
    return torch.load(path, weights_only=False)


def test_no_grad_in_training_mode_still_applies_dropout():
    model = _no_grad_layer(dropout=0.5, adapter_dtype=torch.float64).train()
    x = torch.randn(64, 24, dtype=torch.float64)
    with torch.no_grad():
        dropped = model(x)
    assert "_frozen" not in model.layer.__dict__
    with torch.no_grad():
        clean = model.eval()(x)
    assert not torch.allclose(dropped, clean)


def test_no_grad_calls_with_hooks_take_the_general_path():
    model = _no_grad_layer()
    calls = []
    model.layer.lora_A["default"].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(4, 24, dtype=torch.float64)
    _assert_plain(model, x)
    assert calls == [torch.Size([4, 3])] and "_frozen" not in model.layer.__dict__


def test_hooks_and_autocast_take_the_general_path_and_still_run():
    model = Holder(nn.Linear(24, 20))
    li.inject(model, targets=["layer"], r=4)
    randomize_adapters(model, std=0.3)
    x = torch.randn(4, 24, requires_grad=True)
    calls = []
    handle = model.layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    out = model(x)
    handle.remove()
    assert calls == [torch.Size([4, 20])]  # the base layer's hook ran: it was called, not bypassed
    assert not _fused(out)
    torch.testing.assert_close(out, _plain_formula(model.layer, x))
    global_handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        model(x)
    finally:
        global_handle.remove()
    assert "Linear" in calls  # the global hook saw the base layer too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(x)
        expected = _plain_formula(model.layer, x)
    assert auto.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), expected.float(), atol=0.05, rtol=0.02)


def test_fused_path_with_bf16_base_and_fp32_adapters_matches_reference():
    torch.manual_seed(0)
    model = Holder(nn.Linear(64, 48).to(torch.bfloat16))
    li.inject(model, targets=["layer"], r=8)
    randomize_adapters(model, std=0.2)
    model.train()
    layer = model.layer
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    assert out.dtype == torch.bfloat16 and _fused(out)
    out.float().pow(2).sum().backward()
    grads = [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    assert all(g.dtype == torch.float32 for g in grads)
    # reference: the same computation in fp64 from the same bf16 inputs
    a, b = (layer.lora_A["default"].weight.detach().double().requires_grad_(),
            layer.lora_B["default"].weight.detach().double().requires_grad_())
    w, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    x64 = x.detach().double()
    ref = F.linear(x64, w, bias) + layer.scaling["default"] * F.linear(F.linear(x64, a), b)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.02)
    for g, w_ in zip(grads, (a.grad, b.grad)):
        assert (g.double() - w_).norm() / w_.norm() < 0.02


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_function_passes_gradcheck_and_gradgradcheck(p):
    """Finite differences for every input, and second derivatives (create_graph=True) too."""
    from lora_inject.layers.dropout import dropped_projection
    from lora_inject.layers.fused import lora_linear

    torch.manual_seed(0)
    shapes = {"x": (5, 6), "w": (4, 6), "bias": (4,), "a": (3, 6), "b": (4, 3)}
    inputs = tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes.values())

    def fused(x, w, bias, a, b):
        torch.manual_seed(3)  # the same dropout mask on every evaluation
        return lora_linear(x, w, bias, a, b, 1.7, dropout=p)

    assert torch.autograd.gradcheck(fused, inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)
    if p > 0:
        def general(x, a):
            torch.manual_seed(3)
            return dropped_projection(x, a, p)

        assert torch.autograd.gradcheck(general, (inputs[0], inputs[3]))
        assert torch.autograd.gradgradcheck(general, (inputs[0], inputs[3]))


# ----- conv inference: one conv with the kernel W + scale * B @ A ----------------------------------
CONV_CASES = {
    "conv1d_stride": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 40)),
    "conv2d_dilated_reflect": (
        lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 3, 12, 12)
    ),
    "conv2d_same_no_bias": (lambda: nn.Conv2d(3, 5, (3, 5), padding="same", bias=False), (1, 3, 10, 10)),
    "conv2d_1x1_unbatched": (lambda: nn.Conv2d(3, 5, 1), (3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (1, 2, 3, 6, 6)),
}


def _conv_model(case, dropout=0.0, dtype=torch.float64):
    make, shape = CONV_CASES[case]
    model = Holder(make().to(dtype))
    li.inject(model, targets=["layer"], r=2, alpha=3, dropout=dropout, adapter_dtype=dtype)
    randomize_adapters(model, std=0.3)
    calls = []
    conv_a = model.layer.lora_A["default"]
    plain_forward = conv_a._conv_forward
    conv_a._conv_forward = lambda *args: calls.append(1) or plain_forward(*args)  # counts runs of A
    return model, torch.randn(shape, dtype=dtype), calls


def _conv_plain_formula(layer, x):
    conv_a, conv_b = layer.lora_A["default"], layer.lora_B["default"]
    hidden = type(conv_a)._conv_forward(conv_a, x, conv_a.weight, None)
    return layer.base_layer(x) + layer.scaling["default"] * conv_b(hidden)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_inference_runs_one_conv_with_the_merged_kernel(case):
    model, x, a_runs = _conv_model(case)
    model.eval()
    with torch.no_grad():
        want = _conv_plain_formula(model.layer, x)
        got = model(x)
    with torch.inference_mode():
        got_inference = model(x)
    assert a_runs == []  # A never ran on its own: the merged kernel did its work
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_inference, want, atol=1e-12, rtol=1e-10)
    model.layer.requires_grad_(False)  # a frozen adapter outside no_grad needs no autograd either
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-10)
    assert a_runs == []


def test_conv_keeps_a_and_b_where_merging_would_change_results_or_cost_more():
    model, x, a_runs = _conv_model("conv2d_dilated_reflect")
    layer = model.layer

    out = model(x)  # autograd: A and B need their gradients
    assert len(a_runs) == 1 and out.requires_grad
    torch.testing.assert_close(out, _conv_plain_formula(layer, x), atol=1e-12, rtol=1e-10)

    dropped, _, a_runs = _conv_model("conv2d_dilated_reflect", dropout=0.5)
    dropped.train()
    with torch.no_grad():
        dropped(x)  # dropout in effect: the adapter sees a dropped x, the base does not
    assert len(a_runs) == 1

    half, x16, a_runs = _conv_model("conv2d_dilated_reflect", dtype=torch.bfloat16)
    with torch.no_grad():
        half(x16)  # a bf16 kernel would round the adapter's update away
    assert len(a_runs) == 1

    hooked, _, a_runs = _conv_model("conv2d_dilated_reflect")
    seen = []
    hooked.layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        hooked(x)
    assert len(a_runs) == 1 and len(seen) == 1  # the base's hook ran, so the base was called

    last, _, a_runs = _conv_model("conv2d_dilated_reflect")
    last.layer.base_layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(last(x), _conv_plain_formula(last.layer, x), atol=1e-12, rtol=1e-10)
    assert len(a_runs) == 1  # a channels_last kernel keeps its layout: the general path

    wide = Holder(nn.Conv2d(64, 64, 3, padding=1))
    li.inject(wide, targets=["layer"], r=4)
    with torch.no_grad():
        a = wide.layer.lora_A["default"]
        plain_forward, runs = a._conv_forward, []
        a._conv_forward = lambda *args: runs.append(1) or plain_forward(*args)
        wide(torch.randn(1, 64, 3, 3))  # 9 positions: a 64x576 kernel costs more than A and B there
    assert runs == [1]


def test_merging_is_cheaper_weighs_kernel_against_positions():
    from lora_inject.layers.conv import merging_is_cheaper

    # 3x3, 64 -> 64: the kernel costs 64 * 576 per rank; A and B cost 640 per position
    assert not merging_is_cheaper(positions=9, fan_in=576, fan_out=64)
    assert merging_is_cheaper(positions=8 * 32 * 32, fan_in=576, fan_out=64)
    assert merging_is_cheaper(positions=231, fan_in=576, fan_out=64)  # 64 * 576 <= 0.25 * 231 * 640
    assert not merging_is_cheaper(positions=230, fan_in=576, fan_out=64)


def test_torch_compile_fullgraph_conv_inference_and_training_match_eager():
    """The merged-kernel branch (eval, no grad) and the A/B branch (training) both compile whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    li.inject(model, targets=["0", "2"], r=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    model.train()
    got = compiled(x)
    got.square().mean().backward()
    got_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    want = model(x)
    want.square().mean().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for g, w in zip(got_grads, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
