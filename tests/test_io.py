"""Adapter files: PEFT compatibility both ways, and every bad input refused with the model untouched."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import peft
import pytest
import torch
from conftest import ConvNet, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_inject as li
import lora_inject.formats.folder as folder_io

warnings.filterwarnings("ignore", category=UserWarning, module="peft")


class PlainConvNet(ConvNet):
    """ConvNet without dilation or reflect padding, which PEFT's conv LoRA drops."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(8, 8, 3, padding=1)


def ids():
    return {"input_ids": torch.randint(0, 100, (2, 7))}


def run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


# name -> (model factory, input, PEFT LoraConfig kwargs)
PEFT_CASES = {
    "llama_qv": (tiny_llama, ids, dict(target_modules=["q_proj", "v_proj"])),
    "llama_all_linear": (tiny_llama, ids, dict(target_modules="all-linear")),
    "llama_regex": (tiny_llama, ids, dict(target_modules=r".*layers\.1\..*(k|o)_proj")),
    "llama_patterns_rslora": (tiny_llama, ids, dict(
        target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"down_proj": 3}, use_rslora=True,
    )),
    "llama_layers": (tiny_llama, ids, dict(target_modules=["q_proj"], layers_to_transform=[1])),
    "llama_embeddings": (tiny_llama, ids, dict(target_modules=["embed_tokens", "q_proj"])),
    "gpt2_conv1d": (tiny_gpt2, ids, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert_modules_to_save": (tiny_bert, ids, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert_bias_lora_only": (tiny_bert, ids, dict(target_modules=["query", "value"], bias="lora_only")),
    # PEFT adds modules_to_save ["classifier", "score"] to every SEQ_CLS adapter; BERT has no "score"
    "bert_seq_cls_task": (tiny_bert, ids, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "conv2d": (PlainConvNet, lambda: torch.randn(2, 3, 16, 16), dict(target_modules=["stem", "body", "point"])),
}


def peft_model(name):
    make, make_x, kwargs = PEFT_CASES[name]
    base = make()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    if kwargs.get("bias") == "lora_only" or kwargs.get("modules_to_save") or kwargs.get("task_type"):
        with torch.no_grad():  # make the extra tensors differ from the base so loading them is tested
            for n, p in model.named_parameters():
                if p.requires_grad and ("bias" in n or "modules_to_save" in n):
                    p.add_(0.5)
    return base, model, make_x()


@pytest.mark.parametrize("name", PEFT_CASES)
def test_peft_saved_adapter_loads_here_with_peft_outputs(name, tmp_path):
    base, theirs, x = peft_model(name)
    theirs.save_pretrained(tmp_path)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path).eval()
    expected = run(theirs, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-4)
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PEFT_CASES)
def test_adapter_saved_here_loads_in_peft_with_our_outputs(name, tmp_path):
    base, theirs, x = peft_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    randomize_adapters(ours)  # our own weights now, not PEFT's
    li.save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(run(reloaded, x), run(ours, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama_embeddings", "gpt2_conv1d", "conv2d"])
def test_float64_merge_equals_peft_to_float64_precision(name, tmp_path):
    """PEFT merges a float64 model in float64; so do we (a float32 delta was ~1e-6 off)."""
    base, theirs, _ = peft_model(name)
    base, theirs = base.double(), theirs.double()
    theirs.save_pretrained(tmp_path)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path)
    merged_ours, merged_theirs = li.merge_and_unload(ours).state_dict(), theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key, value in merged_theirs.items():
        assert merged_ours[key].dtype == value.dtype
        torch.testing.assert_close(merged_ours[key], value, atol=1e-13, rtol=1e-13, msg=key)


@pytest.mark.parametrize("targets", [
    ["re:.*\\.(q|k)_proj", "embed_tokens"],  # regex item in a list: PEFT has no such form
    [nn.Linear],  # a type
    "all-linear",
])
def test_our_target_forms_translate_faithfully_for_peft(targets, tmp_path):
    base = tiny_llama()
    ours = li.inject(copy.deepcopy(base), targets=targets, exclude=["layers.0.mlp.up_proj"], init=False).eval()
    li.save_adapter(ours, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours_paths = sorted(p for p, _ in li.lora_layers(ours))
    peft_layer = peft.tuners.lora.LoraLayer
    theirs_paths = sorted(
        n.removeprefix("base_model.model.") for n, m in reloaded.named_modules() if isinstance(m, peft_layer)
    )
    assert theirs_paths == ours_paths
    x = ids()
    torch.testing.assert_close(run(reloaded, x), run(ours, x), atol=1e-5, rtol=1e-5)


def test_saved_files_follow_peft_format(tmp_path):
    model = li.inject(tiny_llama(), targets=["q_proj", "embed_tokens"], r=4, alpha=8, rslora=True)
    li.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys, metadata = sorted(handle.keys()), handle.metadata()
    assert metadata["format"] == "pt" and metadata["lora_inject_version"] == li.__version__
    assert keys == sorted(
        ["base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B"]
        + [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"]
    )  # adapter tensors only: no base weights
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and sorted(config["target_modules"]) == ["embed_tokens", "q_proj"]
    for field in ("lora_dropout", "exclude_modules", "bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                  "modules_to_save", "layers_to_transform", "init_lora_weights", "base_model_name_or_path",
                  "task_type"):
        assert field in config


def test_peft_adapter_without_prefix_and_legacy_bin(tmp_path):
    base, theirs, x = peft_model("llama_qv")
    theirs.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for folder, writer in [("noprefix", "safetensors"), ("legacy", "bin")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
        if writer == "safetensors":
            stripped = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
            save_file(stripped, tmp_path / folder / "adapter_model.safetensors")
        else:
            torch.save(tensors, tmp_path / folder / "adapter_model.bin")
        ours = li.load_adapter(copy.deepcopy(base), tmp_path / folder).eval()
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)


def test_round_trip_here_preserves_everything(tmp_path):
    model = tiny_bert()
    li.inject(model, targets=["query", "value"], r=4, modules_to_save=["classifier"], bias="lora_only",
              rank_pattern={"value": 2})
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
        model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(1.0)
    li.save_adapter(model, tmp_path)
    fresh = li.load_adapter(tiny_bert_same_base(model), tmp_path)
    x = ids()
    torch.testing.assert_close(run(fresh.eval(), x), run(model.eval(), x), atol=1e-6, rtol=1e-6)


def tiny_bert_same_base(model):
    """A fresh base model with the same base weights as an injected one."""
    plain = li.unload(copy.deepcopy(model))
    # unload keeps trained lora_only biases; the base for loading must have the original ones
    fresh = tiny_bert()
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        fresh.bert.encoder.layer[0].attention.self.query.bias.sub_(1.0)
    return fresh


# ----- bad input ------------------------------------------------------------------------------
@pytest.fixture
def good_adapter(tmp_path):
    base, theirs, _ = peft_model("llama_qv")
    theirs.save_pretrained(tmp_path / "good")
    return base, tmp_path / "good"


def clone_folder(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def corrupt(folder, how):
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbage":
        weights.write_bytes(os.urandom(4000))
    elif how == "empty_weights":
        weights.write_bytes(b"")
    elif how == "bad_json":
        config.write_text('{"peft_type": "LORA", "r": ')
    elif how == "json_list":
        config.write_text("[1, 2]")
    elif how == "unknown_peft_type":
        edit_config(folder, peft_type="IA3")
    elif how == "dora":
        edit_config(folder, use_dora=True)
    elif how == "pissa":
        edit_config(folder, init_lora_weights="pissa")
    elif how == "no_targets":
        edit_config(folder, target_modules=None)
    elif how == "missing_key":
        edit_tensors(folder, lambda t: t.pop(f"{q0}.lora_B.weight"))
    elif how == "unexpected_key":
        edit_tensors(folder, lambda t: t.update({
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32)}))
    elif how == "shape_mismatch":
        edit_tensors(folder, lambda t: t.update({f"{q0}.lora_B.weight": torch.zeros(31, 4)}))
    elif how == "rank_disagrees":
        edit_config(folder, r=8)
    elif how == "other_architecture":
        edit_tensors(folder, lambda t: [t.__setitem__(k.replace("model.model.", "model.transformer."), t.pop(k))
                                        for k in list(t)])
    elif how == "integer_tensor":
        edit_tensors(folder, lambda t: t.update({f"{q0}.lora_A.weight": torch.zeros(4, 32, dtype=torch.int64)}))
    elif how == "no_weights":
        weights.unlink()
    elif how == "no_config":
        config.unlink()
    elif how == "catastrophic_regex":
        edit_config(folder, target_modules=r"(a|a)+$", rank_pattern={})
    elif how == "bad_rank":
        edit_config(folder, r=0)
    else:
        raise AssertionError(how)


BAD_INPUTS = {
    "truncated": (li.AdapterFileError, "truncated or corrupt"),
    "garbage": (li.AdapterFileError, "truncated or corrupt"),
    "empty_weights": (li.AdapterFileError, "truncated or corrupt"),
    "bad_json": (li.AdapterFileError, "not valid JSON"),
    "json_list": (li.AdapterFileError, "expected a JSON object"),
    "unknown_peft_type": (li.AdapterFileError, "peft_type is 'IA3'"),
    "dora": (li.AdapterFileError, "DoRA"),
    "pissa": (li.AdapterFileError, "changes the base weights"),
    "no_targets": (li.AdapterFileError, "target_modules is missing"),
    "missing_key": (li.AdapterFileError, "missing keys.*q_proj.lora_B.weight"),
    "unexpected_key": (li.AdapterFileError, "config does not account for.*k_proj.lora_A.weight.*strict=False"),
    "shape_mismatch": (li.AdapterFileError, r"shape mismatch.*\(31, 4\)"),
    "rank_disagrees": (li.AdapterFileError, "config gives rank 8.*rank 4"),
    "other_architecture": (li.AdapterFileError, "modules this model does not have.*transformer"),
    "integer_tensor": (li.AdapterFileError, "not floating point"),
    "no_weights": (li.AdapterFileError, "No adapter_model.safetensors"),
    "no_config": (li.AdapterFileError, "No adapter_config.json"),
    "catastrophic_regex": (li.PatternTimeoutError, "backtracks"),
    "bad_rank": (li.AdapterFileError, "r must be a positive int"),
}


@pytest.mark.parametrize("how", BAD_INPUTS)
def test_bad_adapter_is_refused_and_model_unchanged(how, good_adapter, tmp_path):
    base, good = good_adapter
    folder = clone_folder(good, tmp_path / how)
    corrupt(folder, how)
    model = copy.deepcopy(base)
    if how == "catastrophic_regex":  # give the pattern something long to chew on
        model.add_module("a" * 40 + "c", nn.Identity())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error, message = BAD_INPUTS[how]
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        li.load_adapter(model, folder)
    assert time.perf_counter() - start < 10
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not list(li.lora_layers(model)) and not li.adapter_configs(model)


def test_strict_false_warns_and_loads(good_adapter, tmp_path):
    base, good = good_adapter
    folder = clone_folder(good, tmp_path / "partial")
    corrupt(folder, "missing_key")
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="missing keys"):
        li.load_adapter(model, folder, strict=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # kept its init: no change
    assert torch.count_nonzero(model.model.layers[1].self_attn.q_proj.lora_B["default"].weight) > 0


def test_pickled_code_in_legacy_bin_is_never_run(good_adapter, tmp_path):
    base, good = good_adapter
    folder = clone_folder(good, tmp_path / "evil")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(li.AdapterFileError, match="weights_only"):
        li.load_adapter(copy.deepcopy(base), folder)
    assert not marker.exists()


def test_loading_into_an_existing_name_is_refused(good_adapter):
    base, good = good_adapter
    model = li.load_adapter(copy.deepcopy(base), good)
    with pytest.raises(li.AdapterExistsError):
        li.load_adapter(model, good)
    li.load_adapter(model, good, adapter="second")
    assert li.active_adapters(model) == ["second"]


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", "a\\b", "with space"])
def test_adapter_names_that_would_escape_a_folder_are_refused(name, good_adapter):
    base, good = good_adapter
    with pytest.raises(li.ConfigError, match="letters, digits"):
        li.load_adapter(copy.deepcopy(base), good, adapter=name)


# ----- atomic save ----------------------------------------------------------------------------
def test_failed_write_keeps_previous_adapter(tmp_path, monkeypatch):
    model = li.inject(tiny_llama(), targets=["q_proj"])
    li.save_adapter(model, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    randomize_adapters(model)

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(folder_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        li.save_adapter(model, tmp_path)
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    assert after == before  # no temp files left, nothing replaced


def test_killed_save_leaves_previous_adapter_intact(tmp_path):
    folder = tmp_path / "adapter"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch, lora_inject as li, lora_inject.formats.folder as io
        from conftest import tiny_llama, randomize_adapters
        model = li.inject(tiny_llama(), targets=["q_proj"])
        li.save_adapter(model, {str(folder)!r})
        print("SAVED", flush=True)
        real = io.save_file
        def slow(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            print("WRITING", flush=True)
            time.sleep(60)
        io.save_file = slow
        randomize_adapters(model)
        li.save_adapter(model, {str(folder)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVED"
        before = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    final = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    assert final == before
    model = li.load_adapter(tiny_llama(), folder)  # and it still loads
    assert len(list(li.lora_layers(model))) == 2


def test_saved_files_get_the_umasks_permissions_new_folder_or_existing(tmp_path):
    """safetensors writes its file 0600 (atomically, through a private temporary file): a checkpoint shared
    with other users must stay readable."""
    import stat

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    li.inject(model, targets=["0"], r=2)
    (tmp_path / "existing").mkdir()
    old = os.umask(0o022)
    try:
        for folder in (tmp_path / "new", tmp_path / "existing"):
            li.save_adapter(model, folder)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, (folder, name)
    finally:
        os.umask(old)
