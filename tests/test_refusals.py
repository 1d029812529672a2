"""Adapter files whose math lora_inject does not implement are refused by name, strict or not, model unchanged."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_llama

import lora_inject as li
from lora_inject.formats.peft_config import IGNORED_FIELDS, READ_FIELDS, REFUSED_FIELDS


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain") / "a"
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def _with_config(source, folder, **changes):
    import shutil

    shutil.copytree(source, folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def _assert_refused(folder, match, strict=True):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(li.AdapterFileError, match=match):
        li.load_adapter(model, folder, strict=strict)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_every_field_of_peft_lora_config_is_in_one_of_the_tables():
    fields = set(peft.LoraConfig().to_dict()) | {"runtime_config"}
    known = set(READ_FIELDS) | set(IGNORED_FIELDS) | set(REFUSED_FIELDS)
    assert fields <= known, sorted(fields - known)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
def test_each_math_changing_field_is_refused_by_name(field, strict, plain_adapter, tmp_path):
    value = {"layer_replication": [[0, 1]], "alora_invocation_tokens": [5, 6]}.get(field, {"x": 1})
    if field.startswith("use_"):
        value = True
    folder = _with_config(plain_adapter, tmp_path / "a", **{field: value})
    _assert_refused(folder, rf"{field}=.*{REFUSED_FIELDS[field].split(' (')[0]}", strict=strict)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", ["kasa", "monteclora", "bdlora"])
def test_real_peft_files_of_unimplemented_variants_are_refused_by_name(kind, strict, tmp_path):
    configs = {
        "kasa": dict(kasa_config=peft.KasaConfig()),
        "monteclora": dict(monteclora_config=peft.MontecloraConfig()),
        "bdlora": dict(use_bdlora=peft.BdLoraConfig(target_modules_bd_a=["q_proj"], nblocks=2, match_strict=False)),
    }
    names = {"kasa": "kasa_config", "monteclora": "monteclora_config", "bdlora": "use_bdlora"}
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **configs[kind]))
    model.save_pretrained(tmp_path / "a")
    _assert_refused(tmp_path / "a", names[kind], strict=strict)


@pytest.mark.parametrize("strict", [True, False])
def test_tensors_that_carry_math_are_never_dropped_even_when_not_strict(strict, tmp_path):
    """A KaSA file with its config field removed still carries lora_diag: refused by its keys."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], kasa_config=peft.KasaConfig()))
    model.save_pretrained(tmp_path / "k")
    folder = _with_config(tmp_path / "k", tmp_path / "stripped", kasa_config=None)
    _assert_refused(folder, r"lora_diag.*even with strict=False", strict=strict)


def test_factors_for_modules_the_config_does_not_target_are_not_dropped(plain_adapter, tmp_path):
    ours = li.inject(tiny_llama(), targets=["q_proj", "v_proj"])
    li.save_adapter(ours, tmp_path / "a")
    folder = _with_config(tmp_path / "a", tmp_path / "narrow", target_modules=["q_proj"])
    _assert_refused(folder, r"v_proj.lora_A.weight.*even with strict=False", strict=False)


def test_velora_adapters_load_exactly_and_ignore_their_training_buffers(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], velora_config=peft.VeloraConfig(), init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "v")
    assert any("velora" in k for k in li.read_adapter_tensors(tmp_path / "v"))
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "v").eval()
    x = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs.eval()(x).logits, atol=1e-5, rtol=1e-5)


def test_unknown_fields_warn_and_unknown_variants_are_refused(plain_adapter, tmp_path):
    newer = _with_config(plain_adapter, tmp_path / "newer", some_new_setting=3)
    with pytest.warns(UserWarning, match="some_new_setting"):
        li.load_adapter(tiny_llama(), newer)
    variant = _with_config(plain_adapter, tmp_path / "variant", use_newlora=True, fancy_config={"k": 2})
    _assert_refused(variant, r"fancy_config=.*use_newlora=True.*newer PEFT")
    off = _with_config(plain_adapter, tmp_path / "off", use_newlora=False, fancy_config=None)
    with warnings.catch_warnings(record=True):
        li.load_adapter(tiny_llama(), off)  # unset: nothing changes the math


def test_plain_inits_that_do_not_change_loaded_math_load(plain_adapter, tmp_path):
    base = tiny_llama()
    source = li.inject(copy.deepcopy(base), targets=["q_proj"])
    randomize_adapters(source)
    li.save_adapter(source, tmp_path / "a")
    for init in (True, False, "gaussian", "orthogonal", "eva"):
        folder = _with_config(tmp_path / "a", tmp_path / str(init), init_lora_weights=init, eva_config={"rho": 2.0})
        loaded = li.load_adapter(copy.deepcopy(base), folder)
        x = torch.randint(0, 100, (2, 5))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, source(x).logits, atol=1e-6, rtol=1e-6)
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"):
        _assert_refused(_with_config(tmp_path / "a", tmp_path / init, init_lora_weights=init), "changes the base")
