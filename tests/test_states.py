"""A model driven through random sequences of what users do, checked after every step against PEFT.

Each example picks one kind of adapter (Linear, Conv1D, Conv2d, Embedding, expert parameters, DoRA, lora_bias,
trainable tokens, modules_to_save, bitsandbytes 4-bit and 8-bit, torchao) and walks: train/eval, forwards with
and without grad, a training step, merge/unmerge, switching and disabling adapters, save and load into a fresh
model, a copy, and a dtype round trip. After every step the outputs are compared with PEFT's model built on the
same base and given the same adapter values (an implementation written by others), in the same mode and with
the same RNG state (dropout draws the same masks); a training step must give every trainable tensor a gradient.
Bounded (fixed seed, a few examples of a few steps) so that it runs in CI in well under a minute.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
import transformers as t
from conftest import ConvNet, tiny_gpt2, tiny_llama
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import lora_inject as li

IDS = torch.tensor([[1, 5, 9, 30, 2, 7], [7, 7, 64, 3, 90, 11]])


@dataclass(frozen=True)
class Kind:
    """One kind of adapter: how to build the base, our config, and what PEFT gets."""

    name: str
    base: callable
    ours: dict
    peft: dict
    inputs: callable = lambda: {"input_ids": IDS}
    mergeable: bool = True
    quantized: bool = False
    float64: bool = True  # transformers' grouped expert kernels take no float64

    def reference_base(self):
        return self.base(avx512bf16=False) if self.quantized and "bnb" in self.name else self.base()


def _llama(**extra):
    torch.manual_seed(0)
    return tiny_llama(**extra)


def _gpt2():
    torch.manual_seed(0)
    return tiny_gpt2()


def _convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


def _mixtral():
    torch.manual_seed(0)
    config = t.MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return t.MixtralForCausalLM(config).eval()


_FLOAT_DIR: Path | None = None


def _float_dir() -> Path:
    global _FLOAT_DIR
    if _FLOAT_DIR is None:
        _FLOAT_DIR = Path(tempfile.mkdtemp(prefix="states-float-"))
        torch.manual_seed(0)
        tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(_FLOAT_DIR)
    return _FLOAT_DIR


def _quantized(**config):
    def build(avx512bf16: bool = True):
        model = t.AutoModelForCausalLM.from_pretrained(
            _float_dir(), quantization_config=t.BitsAndBytesConfig(**config), dtype=torch.float32).eval()
        for module in model.modules():  # ours takes the AVX512-BF16 path on every CPU: the one that broke
            if hasattr(module, "support_avx512bf16_for_cpu"):  # PEFT (the reference) the training layout
                module.support_avx512bf16_for_cpu = avx512bf16
        return model
    return build


def _torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = t.AutoModelForCausalLM.from_pretrained(_float_dir(), dtype=torch.float32).eval()
    quantize_(model.model.layers, Int8WeightOnlyConfig())
    return model


COMMON = dict(r=4, alpha=8, dropout=0.1)
PEFT_COMMON = dict(r=4, lora_alpha=8, lora_dropout=0.1)
KINDS = [
    Kind("linear+embedding", _llama, dict(targets=["q_proj", "v_proj", "embed_tokens"]),
         dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    Kind("conv1d", _gpt2, dict(targets=["c_attn", "c_fc"]), dict(target_modules=["c_attn", "c_fc"])),
    # PEFT's conv factors ignore dilation and padding modes ("body"): only plain convs are compared
    Kind("conv2d", _convnet, dict(targets=["stem", "point", "head"]), dict(target_modules=["stem", "point", "head"]),
         inputs=lambda: {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}),
    Kind("dora", _llama, dict(targets=["q_proj", "down_proj"], dora=True),
         dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    Kind("lora_bias", lambda: _llama(attention_bias=True), dict(targets=["q_proj", "o_proj"], lora_bias=True),
         dict(target_modules=["q_proj", "o_proj"], lora_bias=True)),
    Kind("tokens+modules_to_save", lambda: _llama(tie_word_embeddings=False),
         dict(targets=["q_proj"], trainable_tokens=[3, 5, 64], modules_to_save=["lm_head"]),
         dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 64], modules_to_save=["lm_head"])),
    Kind("experts", _mixtral, dict(targets=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"], dropout=0.0),
         dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"], lora_dropout=0.0),
         float64=False),
    Kind("bnb-nf4", _quantized(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32),
         dict(targets=["q_proj", "v_proj", "down_proj"]), dict(target_modules=["q_proj", "v_proj", "down_proj"]),
         mergeable=False, quantized=True),
    Kind("bnb-int8", _quantized(load_in_8bit=True), dict(targets=["q_proj", "v_proj"]),
         dict(target_modules=["q_proj", "v_proj"]), mergeable=False, quantized=True),
    Kind("torchao-int8", _torchao_int8, dict(targets=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "v_proj"]),
         mergeable=False, quantized=True),
]


def _out(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result


STEPS: collections.Counter = collections.Counter()  # (kind, rule) -> executions, so a run cannot be vacuous


class AdapterStates(RuleBasedStateMachine):
    """One model, ours, and PEFT's on the same base; ``reference`` is refreshed from ours before each check."""

    def build(self, kind):
        self.kind = kind
        self.folder = Path(tempfile.mkdtemp(prefix="states-"))
        torch.manual_seed(0)
        self.model = li.inject(kind.base(), **{**COMMON, **kind.ours})
        self._randomize()
        self.theirs = peft.get_peft_model(kind.reference_base(), peft.LoraConfig(**{**PEFT_COMMON, **kind.peft}))
        self.merged = False
        self.disabled = False
        self.active = "default"
        self.copied = False
        self.dtype = torch.float32
        ours, theirs = self._our_state(), self._their_state()
        assert ours.keys() <= theirs.keys(), sorted(ours.keys() - theirs.keys())[:3]

    def teardown(self):
        shutil.rmtree(getattr(self, "folder", "/nonexistent"), ignore_errors=True)

    # ----- helpers -----------------------------------------------------------------------------
    def _randomize(self):
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad and (".lora_B." in name or "trainable_tokens_delta" in name):
                    param.add_(torch.randn_like(param) * 0.05)

    def _batch(self) -> dict:
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in self.kind.inputs().items()}

    def _our_state(self) -> dict:
        state = {}
        for name in li.adapter_configs(self.model):
            state.update(li.lora_state_dict(self.model, name))
        return state

    def _their_state(self) -> dict:
        return dict(self.theirs.base_model.model.state_dict(keep_vars=True))

    def _sync_reference(self):
        """PEFT gets our adapter values, our active adapter, disabled state and mode (never merged: the
        reference for a merged model is the same model unmerged)."""
        theirs = self._their_state()
        with torch.no_grad():
            for key, value in self._our_state().items():
                if key in theirs:
                    theirs[key].copy_(value.to(theirs[key].dtype))
        self.theirs.train(self.model.training)

    def _compare(self, grad: bool):
        self._sync_reference()
        batch = self._batch()
        context = torch.enable_grad() if grad else torch.no_grad()
        with context:
            torch.manual_seed(7)
            if self.disabled:
                with li.disabled_adapters(self.model):
                    got = _out(self.model(**batch))
            else:
                got = _out(self.model(**batch))
            torch.manual_seed(7)
            if self.disabled:
                with self.theirs.disable_adapter():
                    want = _out(self.theirs(**batch))
            else:
                self.theirs.set_adapter(self.active)
                want = _out(self.theirs(**batch))
        tolerance = 2e-4 if self.merged else 2e-5  # a merge rounds W + sBA once into float32
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)

    # ----- what users do -----------------------------------------------------------------------
    @rule(training=st.booleans())
    def set_mode(self, training):
        STEPS[self.kind.name, "set_mode"] += 1
        self.model.train(training)

    @rule(grad=st.booleans())
    def forward(self, grad):
        STEPS[self.kind.name, "forward"] += 1
        dropout = self.kind.ours.get("dropout", COMMON["dropout"])
        if self.model.training and (self.merged or dropout):
            return  # training-mode dropout: masks are drawn differently (PEFT skips it on embeddings)
        self._compare(grad)

    @precondition(lambda self: not self.merged and not self.disabled)
    @rule()
    def training_step(self):
        STEPS[self.kind.name, "training_step"] += 1
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        assert trainable, "nothing trains"
        batch = self._batch()
        loss = _out(self.model(**batch)).float().square().mean()
        loss.backward()
        missing = [n for n, p in trainable.items() if p.grad is None]
        assert not missing, f"no gradient reached {missing[:4]}"
        with torch.no_grad():
            for param in trainable.values():
                param.add_(param.grad, alpha=-0.05)
                param.grad = None

    @precondition(lambda self: self.kind.mergeable and not self.disabled)
    @rule()
    def merge_or_unmerge(self):
        STEPS[self.kind.name, "merge_or_unmerge"] += 1
        if self.merged:
            li.unmerge(self.model)
        else:
            li.merge(self.model)
        self.merged = not self.merged

    @precondition(lambda self: not self.merged)
    @rule()
    def toggle_disabled(self):
        STEPS[self.kind.name, "toggle_disabled"] += 1
        self.disabled = not self.disabled

    @precondition(lambda self: not self.merged and not self.disabled and not self.kind.quantized)
    @rule()
    def copy_and_switch(self):
        STEPS[self.kind.name, "copy_and_switch"] += 1
        if self.kind.name == "tokens+modules_to_save":
            return  # two adapters training one token id are refused (tested elsewhere)
        if not self.copied:
            li.copy_adapter(self.model, "default", "snapshot")
            self.theirs.add_adapter("snapshot", peft.LoraConfig(**{**PEFT_COMMON, **self.kind.peft}))
            if self.dtype != torch.float32:
                self.theirs.to(self.dtype)
            self.copied = True
        self.active = "snapshot" if self.active == "default" else "default"
        li.set_adapter(self.model, self.active)

    @precondition(lambda self: not self.merged)
    @rule()
    def save_and_load_into_a_fresh_model(self):
        STEPS[self.kind.name, "save_and_load_into_a_fresh_model"] += 1
        folder = self.folder / "adapter"
        li.save_adapter(self.model, folder, adapter=self.active)
        training = self.model.training
        fresh = self.kind.base().to(self.dtype) if not self.kind.quantized else self.kind.base()
        self.model = li.load_adapter(fresh, folder).train(training)  # the active adapter, as "default"
        self.active, self.copied = "default", False
        self.theirs = peft.get_peft_model(self.kind.reference_base(),
                                          peft.LoraConfig(**{**PEFT_COMMON, **self.kind.peft}))
        if self.dtype != torch.float32:
            self.theirs = self.theirs.to(self.dtype)

    @precondition(lambda self: not self.kind.quantized and self.kind.float64 and not self.merged)
    @rule()
    def dtype_round_trip(self):
        STEPS[self.kind.name, "dtype_round_trip"] += 1
        self.dtype = torch.float64 if self.dtype == torch.float32 else torch.float32
        self.model.to(self.dtype)
        self.theirs.to(self.dtype)

    @invariant()
    def outputs_equal_the_reference(self):
        if hasattr(self, "model"):
            STEPS[self.kind.name, "checked"] += 1
            self.forward(grad=False)

    @invariant()
    def eval_mode_reaches_every_module(self):
        if hasattr(self, "model"):
            modes = {m.training for m in self.model.modules()}
            assert modes == {self.model.training}, "modules in another mode than the model"


def machine_for(kind: Kind) -> type[RuleBasedStateMachine]:
    class OneKind(AdapterStates):
        @initialize()
        def start(self):
            self.build(kind)

    OneKind.__name__ = f"States_{kind.name}"
    OneKind.TestCase.settings = settings(
        max_examples=6, stateful_step_count=12, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return OneKind


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_states_against_peft(kind):
    machine_for(kind).TestCase().runTest()
    ran = {rule: count for (name, rule), count in STEPS.items() if name == kind.name}
    assert sum(ran.values()) >= 40 and ran.get("checked", 0) >= 20, ran


def test_the_state_machine_would_catch_dropout_at_inference():
    """The checks are not vacuous: a wrapper left in training mode in an eval model is caught."""
    machine = AdapterStates()
    machine.build(KINDS[0])
    machine.set_mode(False)
    layer = next(m for _, m in li.lora_layers(machine.model))
    layer.training = True  # what inject into an eval model used to leave: dropout at inference
    with pytest.raises(AssertionError):
        machine.eval_mode_reaches_every_module()
    machine.teardown()


def test_the_state_machine_would_catch_a_wrong_output():
    machine = AdapterStates()
    machine.build(KINDS[0])
    machine.set_mode(False)
    machine.forward(grad=False)
    with torch.no_grad():
        machine.model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(0.01)
    with pytest.raises(AssertionError):
        machine.forward(grad=False)
    machine.teardown()
