"""The seams with the rest of the stack: the states a model goes through (eval then train) and the neighbours
that act on it. Each case was silently wrong once."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import lora_inject as li

X = torch.tensor([[1, 5, 9, 30, 2], [7, 7, 64, 3, 90]])


def _modes(model):
    return {name: module.training for name, module in model.named_modules()}


def _run_twice(model):
    with torch.no_grad():
        return model(X).logits, model(X).logits


@pytest.mark.parametrize("how", ["inject", "load_adapter", "copy_adapter", "combine", "tokens", "modules_to_save"])
def test_modules_added_to_an_eval_model_run_in_eval_mode(how, tmp_path):
    torch.manual_seed(0)
    trained = li.inject(tiny_llama(), targets=["q_proj", "v_proj"], r=4, dropout=0.5)
    li.save_adapter(trained, tmp_path / "a")
    model = tiny_llama()  # built in eval mode, as from_pretrained gives it
    assert not any(_modes(model).values())
    if how == "inject":
        li.inject(model, targets=["q_proj", "v_proj"], r=4, dropout=0.5)
    elif how == "load_adapter":
        li.load_adapter(model, tmp_path / "a")
    elif how == "copy_adapter":
        li.load_adapter(model, tmp_path / "a")
        li.copy_adapter(model, "default", "copy")
        li.set_adapter(model, "copy")
    elif how == "combine":
        li.load_adapter(model, tmp_path / "a")
        li.load_adapter(model, tmp_path / "a", adapter="b")
        li.combine_adapters(model, {"default": 0.5, "b": 0.5}, "mix")
        li.set_adapter(model, "mix")
    elif how == "tokens":
        li.inject(model, targets=["q_proj"], r=4, dropout=0.5, trainable_tokens=[3, 5])
    else:
        li.inject(model, targets=["q_proj"], r=4, dropout=0.5, modules_to_save=["lm_head"])
    assert [name for name, training in _modes(model).items() if training] == []
    first, second = _run_twice(model)
    assert torch.equal(first, second)  # no dropout at inference


def test_modules_added_to_a_training_model_train():
    model = tiny_llama().train()
    li.inject(model, targets=["q_proj"], r=4, dropout=0.5)
    assert all(_modes(model).values())
    model.eval()
    li.inject(model, targets=["k_proj"], r=4, dropout=0.5, adapter="second")  # a second adapter, eval again
    assert not any(_modes(model).values())


def _classifier(kind):
    import transformers as t

    torch.manual_seed(0)
    if kind == "SEQ_CLS":
        return t.LlamaForSequenceClassification(t.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, num_labels=3, pad_token_id=0)).eval()
    config = t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                          vocab_size=100, max_position_embeddings=64, num_labels=3 if kind == "TOKEN_CLS" else 2)
    cls = t.BertForTokenClassification if kind == "TOKEN_CLS" else t.BertForQuestionAnswering
    return cls(config).eval()


@pytest.mark.parametrize("task, head", [("SEQ_CLS", "score"), ("TOKEN_CLS", "classifier"),
                                        ("QUESTION_ANS", "qa_outputs")])
def test_peft_task_types_train_and_save_the_head_as_peft_does(task, head, tmp_path):
    import peft

    targets = ["q_proj", "v_proj"] if task == "SEQ_CLS" else ["query", "value"]
    config = peft.LoraConfig(task_type=task, target_modules=targets, r=4)
    ours = li.inject(_classifier(task), config)
    assert isinstance(ours.get_submodule(head), li.ModulesToSave)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any(n.startswith(f"{head}.modules_to_save.default") for n in trainable)
    theirs = peft.get_peft_model(_classifier(task), peft.LoraConfig(task_type=task, target_modules=targets, r=4))
    assert sorted(n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad) == \
        sorted(trainable)
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    li.save_adapter(ours, tmp_path / "a")
    assert head in li.read_adapter_config(tmp_path / "a").modules_to_save
    back = peft.PeftModel.from_pretrained(_classifier(task), tmp_path / "a").eval()
    x = torch.tensor([[1, 5, 9, 30, 2], [7, 7, 64, 3, 90]])
    with torch.no_grad():
        want = ours(input_ids=x, use_cache=False) if task == "SEQ_CLS" else ours(input_ids=x)
        got = back(input_ids=x, use_cache=False) if task == "SEQ_CLS" else back(input_ids=x)
    for key in ("logits", "start_logits", "end_logits"):
        if key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


def test_merging_a_trained_copy_of_a_tied_embedding_unties_the_config(tmp_path):
    import transformers as t

    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="tied weights"):
        li.inject(model, targets=["q_proj"], r=4, modules_to_save=["embed_tokens"])
    with torch.no_grad():
        model.model.embed_tokens.modules_to_save["default"].weight.add_(0.5)
        want = model(X).logits
    with pytest.warns(UserWarning, match="no longer shared"):
        merged = li.merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "m")
    again = t.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(X).logits, want, atol=1e-5, rtol=1e-5)


def test_unload_keeps_a_tied_embedding_tied():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.warns(UserWarning, match="tied weights"):
        li.inject(model, targets=["q_proj"], r=4, modules_to_save=["embed_tokens"])
    plain = li.unload(model)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight and plain.config.tie_word_embeddings


def test_a_regex_looking_target_without_the_prefix_gets_a_hint():
    model = tiny_llama()
    with pytest.raises(li.TargetNotFoundError, match="looks like a regular expression") as caught:
        li.inject(model, targets=[r".*\.q_proj"])
    assert "'re:.*" in str(caught.value)
    assert not any(isinstance(m, li.LoraLayer) for m in model.modules())


def test_the_base_model_name_known_at_save_time_is_written(tmp_path):
    model = li.inject(tiny_llama(), targets=["q_proj"], r=4)
    assert li.adapter_configs(model)["default"].base_model_name_or_path is None
    model.name_or_path = "org/tiny-llama"  # e.g. set by save_pretrained/from_pretrained after inject
    li.save_adapter(model, tmp_path / "a")
    assert li.read_adapter_config(tmp_path / "a").base_model_name_or_path == "org/tiny-llama"


def _mha_model():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.layer(self.attn(x, x, x)[0]))

    return Block().eval()


@pytest.mark.parametrize("target", ["attn.out_proj", "layer.linear1", "layer.self_attn.out_proj"])
def test_modules_whose_weight_is_read_directly_are_refused_by_name(target):
    model = _mha_model()
    with pytest.raises(li.UnsupportedModuleError, match="cannot take LoRA") as caught:
        li.inject(model, targets=[target], r=2)
    assert "weight" in str(caught.value)
    assert not any(isinstance(m, li.LoraLayer) for m in model.modules())


def test_all_linear_leaves_out_modules_whose_weight_is_read_directly():
    model = li.inject(_mha_model(), targets="all-linear", r=2)
    wrapped = sorted(p for p, m in model.named_modules() if isinstance(m, li.LoraLayer))
    assert wrapped == ["fc"]


def test_a_parametrized_linear_is_refused():
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4)))
    with pytest.raises(li.UnsupportedModuleError, match="parametrized"):
        li.inject(model, targets=["0"], r=2)


def test_mamba_dt_proj_and_conv1d_are_refused_and_all_linear_skips_dt_proj():
    import transformers as t

    config = t.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=50, expand=2,
                           conv_kernel=4, time_step_rank=4)
    for target in ("dt_proj", "conv1d"):
        with pytest.raises(li.UnsupportedModuleError, match="Mamba"):
            li.inject(t.MambaForCausalLM(config), targets=[target], r=2)
    model = li.inject(t.MambaForCausalLM(config), targets="all-linear", r=2)
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, li.LoraLayer)}
    assert wrapped == {"in_proj", "x_proj", "out_proj"}


def test_wrappers_answer_the_attributes_of_the_module_they_stand_in_for():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3, stride=2, padding=1)
            self.emb = torch.nn.Embedding(10, 4, padding_idx=0)
            self.head = torch.nn.Linear(4, 3)

    model = li.inject(Net(), targets=["conv", "emb"], r=2, modules_to_save=["head"])
    assert (model.conv.kernel_size, model.conv.stride, model.conv.padding) == ((3,), (2,), (1,))
    assert (model.emb.num_embeddings, model.emb.padding_idx, model.head.out_features) == (10, 0, 3)
    with pytest.raises(AttributeError):
        getattr(model.conv, "not_an_attribute")  # noqa: B009


def test_a_model_offloaded_by_accelerate_is_refused_before_anything_changes():
    from accelerate import cpu_offload

    model = cpu_offload(tiny_llama(), execution_device=torch.device("cpu"))
    with pytest.raises(li.UnsupportedModuleError, match="offloaded by accelerate"):
        li.inject(model, targets=["q_proj"], r=4)
    assert not any(isinstance(m, li.LoraLayer) for m in model.modules())


def test_a_model_offloaded_after_inject_refuses_merge(tmp_path):
    from accelerate import cpu_offload

    model = li.inject(tiny_llama(), targets=["q_proj"], r=4)
    cpu_offload(model, execution_device=torch.device("cpu"))
    for call in (li.merge, li.merge_and_unload, lambda m: li.load_adapter(m, tmp_path, adapter="b")):
        with pytest.raises(li.UnsupportedModuleError, match="offloaded"):
            call(model)


def test_from_pretrained_with_a_disk_offload_device_map_is_refused(tmp_path):
    import transformers as t

    tiny_llama().save_pretrained(tmp_path / "base")
    trained = li.inject(t.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), targets=["q_proj"], r=4)
    li.save_adapter(trained, tmp_path / "a")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(li.UnsupportedModuleError, match="offloaded by accelerate"):
        li.from_pretrained(tmp_path / "base", tmp_path / "a", device_map=device_map,
                           offload_folder=str(tmp_path / "offload"))


def test_a_peft_config_in_inference_mode_gives_frozen_adapters():
    import peft

    model = li.inject(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=4, inference_mode=True))
    assert li.trainable_parameters(model)[0] == 0
    trained = li.inject(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=4))
    assert li.trainable_parameters(trained)[0] > 0


def test_a_load_that_fails_while_copying_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    import lora_inject.formats.load as load

    model = li.inject(tiny_llama(), targets=["q_proj"], r=4)
    li.save_adapter(model, tmp_path / "a")
    li.inject(model, targets=["v_proj"], r=4, adapter="b")
    li.set_adapter(model, "default")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    real_copy, calls = torch.Tensor.copy_, []

    def copy_failing_third(self, value, *args, **kwargs):  # two tensors written, then a failure
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("copy failed")
        return real_copy(self, value, *args, **kwargs)

    real = load._copy_in

    def copy_then_fail(model_, tensors, targets, adapter, **options):
        monkeypatch.setattr(torch.Tensor, "copy_", copy_failing_third)
        try:
            real(model_, tensors, targets, adapter, **options)
        finally:
            monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
        raise AssertionError("the copy should have failed")

    monkeypatch.setattr(load, "_copy_in", copy_then_fail)
    with pytest.raises(RuntimeError, match="copy failed"):
        li.load_adapter(model, tmp_path / "a", adapter="c")
    assert li.active_adapters(model) == ["default"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_load_adapter_weights_writes_all_or_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"], r=4)
    li.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last].to(torch.float8_e4m3fn)  # a dtype the model cannot take
    save_file(tensors, file)
    before = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    changed = {k: v.clone() for k, v in li.lora_state_dict(model).items()}
    with pytest.raises(li.AdapterFileError, match="not floating point"):
        li.load_adapter_weights(model, tmp_path / "a")
    assert all(torch.equal(v, changed[k]) for k, v in li.lora_state_dict(model).items())
    assert before.keys() == changed.keys()


def test_modules_to_save_answers_attributes_of_the_running_copy():
    model = li.inject(tiny_llama(), targets=["q_proj"], r=4, modules_to_save=["lm_head"])
    head = model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    head.modules_to_save["default"].extra_flag = "copy"
    head.original_module.extra_flag = "original"
    assert head.extra_flag == "copy"
    with li.disabled_adapters(model):
        assert head.extra_flag == "original"


class _AttentionNet(torch.nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(8, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def _mha_reference(model, x, factors, scale):
    """The adapted net computed by hand: W_in + s * B @ A and W_out + s * B_o @ A_o, through torch's functional
    attention (differentiable in the factors)."""
    a, b, a_out, b_out = factors
    mha = model.attn.base_layer
    h = model.embed(x).transpose(0, 1) if mha.batch_first else model.embed(x)
    out, _ = torch.nn.functional.multi_head_attention_forward(
        h, h, h, 16, 2, mha.in_proj_weight + scale * b @ a, mha.in_proj_bias, None, None, False, 0.0,
        mha.out_proj.base_layer.weight + scale * b_out @ a_out, mha.out_proj.base_layer.bias, training=False,
        need_weights=False)
    return model.head(out.transpose(0, 1) if mha.batch_first else out)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_adapters_equal_the_hand_computed_update(batch_first, tmp_path):
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    ours = li.inject(_AttentionNet(batch_first), targets=["attn"], r=4, alpha=8)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    attn = ours.attn
    mine = [attn.lora_A["default"].weight, attn.lora_B["default"].weight,
            attn.base_layer.out_proj.lora_A["default"].weight, attn.base_layer.out_proj.lora_B["default"].weight]
    copies = [p.detach().clone().requires_grad_(True) for p in mine]
    got, want = ours(x), _mha_reference(ours, x, copies, 2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    for param, copy_ in zip(mine, copies):
        torch.testing.assert_close(param.grad, copy_.grad, atol=1e-5, rtol=1e-4)
    li.save_adapter(ours, tmp_path / "ours")
    ours.eval()
    with torch.no_grad():
        want = ours(x)
        again = li.load_adapter(_AttentionNet(batch_first).eval(), tmp_path / "ours")
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=1e-5)
        li.merge(again)
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=1e-5)
        li.unmerge(again)
        plain = li.merge_and_unload(again)
        assert type(plain.attn) is torch.nn.MultiheadAttention and type(plain.attn.out_proj) is not li.LoraLinear
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)


def test_multihead_attention_files_are_peft_s_and_load_in_peft(tmp_path):
    """Same keys both ways; outputs equal PEFT's where PEFT computes LoRA's update. (PEFT 0.21.2 adds the
    out_proj update twice, in training, inference and merge alike: measured below, documented in docs/targets.md.)"""
    import peft

    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    ours = li.inject(_AttentionNet(), targets=["attn"], r=4, alpha=8).eval()
    with torch.no_grad():
        ours.attn.lora_B["default"].weight.normal_(0, 0.1)  # the in-projection only
    li.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_AttentionNet(), tmp_path / "ours").eval()
    assert sorted(k.removeprefix("base_model.model.") for k, p in theirs.named_parameters() if "lora_" in k) == \
        sorted(li.lora_state_dict(ours))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "peft")
        torch.testing.assert_close(li.load_adapter(_AttentionNet().eval(), tmp_path / "peft")(x), ours(x),
                                   atol=1e-5, rtol=1e-5)
        ours.attn.base_layer.out_proj.lora_B["default"].weight.normal_(0, 0.1)
        li.save_adapter(ours, tmp_path / "both")
        theirs = peft.PeftModel.from_pretrained(_AttentionNet(), tmp_path / "both").eval()
        doubled = _AttentionNet().eval()
        doubled.attn.in_proj_weight += 2.0 * ours.attn.lora_B["default"].weight @ ours.attn.lora_A["default"].weight
        out = ours.attn.base_layer.out_proj
        doubled.attn.out_proj.weight += 2 * 2.0 * out.lora_B["default"].weight @ out.lora_A["default"].weight
        torch.testing.assert_close(theirs(x), doubled(x), atol=1e-5, rtol=1e-5)  # PEFT: out_proj's update twice


def test_multihead_attention_adapters_under_a_transformer_encoder_layer_in_eval():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = layer(x)
    li.inject(layer, targets=["self_attn"], r=4, init=False)  # random B: the output must change, fast path or not
    with torch.no_grad():
        adapted = layer(x)
        merged = li.merge_and_unload(layer)(x)
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)


def test_multihead_attention_unload_and_delete_restore_the_plain_module():
    model = li.inject(_AttentionNet(), targets=["attn"], r=4)
    li.inject(model, targets=["attn"], r=2, adapter="b")
    li.delete_adapter(model, "default")
    assert isinstance(model.attn.base_layer.out_proj, li.LoraLinear)
    li.delete_adapter(model, "b")
    assert type(model.attn) is torch.nn.MultiheadAttention and type(model.attn.out_proj) is not li.LoraLinear
    model = li.inject(_AttentionNet().train(), targets=["attn"], r=4, dropout=0.1)
    with pytest.raises(li.ConfigError, match="dropout"):
        model(torch.randn(2, 3, 8))
    model.eval()
    model(torch.randn(2, 3, 8))  # dropout is a training matter: inference runs


def test_an_edge_that_fails_while_attaching_undoes_the_injection():
    from lora_inject.inject import _HANDLERS, on_model_event

    def failing(model):
        raise RuntimeError("edge broke")

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    on_model_event("attached", failing)  # after transformers' methods were set on the model
    try:
        with pytest.raises(RuntimeError, match="edge broke"):
            li.inject(model, targets=["q_proj"], r=4)
    finally:
        _HANDLERS["attached"].remove(failing)
    assert not any(isinstance(m, li.LoraLayer) for m in model.modules())
    assert model.state_dict().keys() == before.keys() and not li.adapter_configs(model)
    assert "save_pretrained" not in model.__dict__  # the instance methods were taken off again
