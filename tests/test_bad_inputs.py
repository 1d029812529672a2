"""Bad adapter folders of every kind, through every reader: loaded exactly as PEFT would, or refused with a
library error and nothing changed. Each case here was silently wrong, raised a raw exception, hung or blew up
memory once (issue 29)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import lora_inject as li
from lora_inject.cli import main

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
X = torch.tensor([[1, 5, 9, 30, 2]])


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _adapter(base_dir, folder, **config):
    import transformers as t

    model = li.inject(t.AutoModelForCausalLM.from_pretrained(base_dir), **{"targets": ["q_proj", "v_proj"],
                                                                             "r": 4, **config})
    randomize_adapters(model)
    li.save_adapter(model, folder)
    return model


def _edit_config(folder, **fields):
    data = json.loads((folder / CONFIG).read_text())
    data.update(fields)
    (folder / CONFIG).write_text(json.dumps(data))


def _edit_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


def _fresh(base_dir):
    import transformers as t

    return t.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _merge(base_dir, adapter, out):
    return main(["merge", str(base_dir), str(adapter), str(out), "--quiet"])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in
                                                                     model.named_parameters()}


def _unchanged(model, before):
    state, flags = before
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ----- silently wrong before ----------------------------------------------------------------------
def test_a_key_stored_with_and_without_the_prefix_loads_the_prefixed_copy_as_peft(base_dir, tmp_path):
    import peft

    _adapter(base_dir, tmp_path / "a")
    _edit_tensors(tmp_path / "a", lambda t: t.update(
        {k.removeprefix("base_model.model."): torch.full_like(v, 9.0) for k, v in list(t.items())}))
    with pytest.warns(UserWarning, match="prefixed copies are used"):
        ours = li.load_adapter(_fresh(base_dir), tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_fresh(base_dir), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(X).logits, theirs(X).logits, atol=1e-5, rtol=1e-5)


def test_fan_in_fan_out_on_linear_targets_does_not_transpose_the_merge(base_dir, tmp_path):
    model = _adapter(base_dir, tmp_path / "a", targets=["q_proj", "o_proj"])  # square weights
    _edit_config(tmp_path / "a", fan_in_fan_out=True)
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") == 0
    merged = li.merge_and_unload(model)
    written = load_file(tmp_path / "out" / "model.safetensors")
    for key, value in merged.state_dict().items():
        if key in written:
            torch.testing.assert_close(written[key], value, atol=1e-6, rtol=1e-6)


def test_the_streaming_merge_still_transposes_gpt2_conv1d_with_square_weights(tmp_path):
    import transformers as t

    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = li.inject(t.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), targets=["c_proj"], r=4)
    randomize_adapters(model)  # attn.c_proj is square (32 x 32): its shape cannot tell the layout
    li.save_adapter(model, tmp_path / "a")
    _edit_config(tmp_path / "a", fan_in_fan_out=False)  # a wrong flag: the architecture decides
    assert _merge(tmp_path / "base", tmp_path / "a", tmp_path / "out") == 0
    written = load_file(tmp_path / "out" / "model.safetensors")
    merged = li.merge_and_unload(model).state_dict()
    for key in ("transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
        torch.testing.assert_close(written[key], merged[key], atol=1e-6, rtol=1e-6)


def test_dora_without_magnitudes_is_refused_by_every_reader(base_dir, tmp_path):
    _adapter(base_dir, tmp_path / "a", dora=True)
    _edit_tensors(tmp_path / "a", lambda t: [t.pop(k) for k in list(t) if "magnitude" in k])
    with pytest.raises(li.AdapterFileError, match="DoRA magnitudes"):
        li.load_adapter(_fresh(base_dir), tmp_path / "a", strict=False)
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") != 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reader", ["load_adapter", "load_adapter_weights"])
def test_a_wrong_shaped_tensor_is_refused_before_any_value_is_read(base_dir, tmp_path, monkeypatch, reader):
    """Shapes come from the header; values are read only once every shape fits the model. The file's tensors
    are handed over on the meta device here: reading any value of them would fail."""
    _adapter(base_dir, tmp_path / "a", dora=True)
    _edit_tensors(tmp_path / "a", lambda t: [t.__setitem__(k, torch.ones(64)) for k in list(t) if "magnitude" in k])
    model = _fresh(base_dir)
    if reader == "load_adapter_weights":
        li.inject(model, targets=["q_proj", "v_proj"], r=4, dora=True)
    before = _state(model)
    _on_meta(monkeypatch)
    with pytest.raises(li.AdapterFileError, match="shape mismatch"):
        getattr(li, reader)(model, tmp_path / "a")
    _unchanged(model, before)


def _on_meta(monkeypatch):
    """The files' tensors handed over on the meta device: reading any value of them fails."""
    from lora_inject.formats import peft

    real = peft.read_safetensors

    def headers_only(path, with_metadata=False):
        tensors, metadata = real(path, with_metadata=True)
        tensors = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
        return (tensors, metadata) if with_metadata else tensors

    monkeypatch.setattr(peft, "read_safetensors", headers_only)


def test_hot_swap_and_the_streaming_merge_refuse_a_wrong_shape_before_reading_values(base_dir, tmp_path, monkeypatch,
                                                                                      capsys):
    model = _adapter(base_dir, tmp_path / "a")
    li.prepare_hotswap(model, max_rank=8)
    _edit_tensors(tmp_path / "a", lambda t: [t.__setitem__(k, torch.ones(4, 999)) for k in list(t) if "lora_A" in k])
    _on_meta(monkeypatch)
    with pytest.raises(li.AdapterFileError, match="do not fit"):
        li.hotswap_adapter(model, tmp_path / "a")
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") != 0
    assert "shape" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_factor_is_refused_by_load_and_merge(base_dir, tmp_path, value):
    _adapter(base_dir, tmp_path / "a")
    _edit_tensors(tmp_path / "a", lambda t: t[sorted(t)[0]].view(-1).__setitem__(3, value))
    model = _fresh(base_dir)
    before = _state(model)
    with pytest.raises(li.AdapterFileError, match="NaN or inf"):
        li.load_adapter(model, tmp_path / "a")
    _unchanged(model, before)
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") != 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("use_rslora", "false"), ("use_dora", "true"), ("lora_bias", 1),
                                          ("r", 4.0), ("lora_alpha", True), ("lora_dropout", "0.1"),
                                          ("modules_to_save", 5), ("layers_pattern", 5), ("rank_pattern", [1]),
                                          ("alpha_pattern", {"q_proj": "8"}), ("target_parameters", "x")])
def test_config_fields_of_the_wrong_type_are_refused(base_dir, tmp_path, field, value):
    _adapter(base_dir, tmp_path / "a")
    _edit_config(tmp_path / "a", **{field: value})
    with pytest.raises(li.AdapterFileError, match=field):
        li.read_adapter_config(tmp_path / "a")
    with pytest.raises(li.AdapterFileError, match=field):
        li.load_adapter(_fresh(base_dir), tmp_path / "a")
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") != 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.float8_e4m3fn])
def test_factors_in_a_dtype_no_adapter_holds_are_refused_by_every_reader(base_dir, tmp_path, dtype):
    model = _adapter(base_dir, tmp_path / "a")
    _edit_tensors(tmp_path / "a", lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    for call in (lambda: li.load_adapter(_fresh(base_dir), tmp_path / "a"),
                 lambda: li.load_adapter_weights(model, tmp_path / "a")):
        with pytest.raises(li.AdapterFileError, match="not floating point"):
            call()
    li.prepare_hotswap(model, max_rank=8)
    with pytest.raises(li.AdapterFileError, match="not floating point"):
        li.hotswap_adapter(model, tmp_path / "a")
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") != 0


# ----- a failed call changed the model ------------------------------------------------------------
def test_a_failed_load_keeps_the_active_adapter_active_and_trainable(base_dir, tmp_path):
    model = _adapter(base_dir, tmp_path / "good")
    _adapter(base_dir, tmp_path / "bad")
    _edit_tensors(tmp_path / "bad", lambda t: t.update({k: v.to(torch.float8_e5m2) for k, v in t.items()}))
    before = _state(model)
    with pytest.raises(li.AdapterFileError):
        li.load_adapter(model, tmp_path / "bad", adapter="second")
    _unchanged(model, before)
    assert li.active_adapters(model) == ["default"]
    plain = _fresh(base_dir)
    before = _state(plain)
    with pytest.raises(li.AdapterFileError):
        li.load_adapter(plain, tmp_path / "bad")
    _unchanged(plain, before)  # a plain model's base parameters are not left frozen


# ----- raw exceptions before ----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[" * 2000 + "]" * 2000, '{"peft_type": "LORA", "r": ' + "9" * 5000 + "}",
                                  '{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "r": 1e999}',
                                  "\xff\xfe", ""])
def test_hostile_config_text_is_a_library_error(base_dir, tmp_path, text):
    _adapter(base_dir, tmp_path / "a")
    (tmp_path / "a" / CONFIG).write_bytes(text.encode("utf-8", "surrogatepass") if text != "\xff\xfe" else b"\xff\xfe")
    with pytest.raises(li.LoraInjectError):
        li.read_adapter_config(tmp_path / "a")
    with pytest.raises(li.LoraInjectError):
        li.load_adapter(_fresh(base_dir), tmp_path / "a")


@pytest.mark.parametrize("pattern", ["(", "[a-", 5, ["layers", 3]])
def test_a_bad_layers_pattern_is_a_config_error(base_dir, pattern):
    with pytest.raises(li.ConfigError):
        li.inject(_fresh(base_dir), targets=["q_proj"], layers=[0], layers_pattern=pattern)


def test_a_rank_no_model_could_allocate_is_refused_before_anything_is_allocated(base_dir, tmp_path):
    _adapter(base_dir, tmp_path / "a")
    _edit_config(tmp_path / "a", r=2**31)
    _edit_tensors(tmp_path / "a", lambda t: t.clear() or t.update({"unrelated": torch.zeros(1)}))
    with pytest.raises(li.AdapterFileError, match="usable rank"):
        li.load_adapter(_fresh(base_dir), tmp_path / "a", strict=False)


def test_hot_swap_of_a_file_missing_a_factor_or_with_disagreeing_ranks_is_refused(base_dir, tmp_path):
    model = _adapter(base_dir, tmp_path / "a")
    li.prepare_hotswap(model, max_rank=8)
    _adapter(base_dir, tmp_path / "missing")
    _edit_tensors(tmp_path / "missing", lambda t: t.pop(next(k for k in sorted(t) if "lora_B" in k)))
    _adapter(base_dir, tmp_path / "ranks")
    _edit_tensors(tmp_path / "ranks", lambda t: t.update({k: v[:2] for k, v in t.items() if "lora_A" in k}))
    before = _state(model)
    with pytest.raises(li.AdapterFileError, match="partner"):
        li.hotswap_adapter(model, tmp_path / "missing")
    with pytest.raises(li.AdapterFileError, match="disagree on the rank"):
        li.hotswap_adapter(model, tmp_path / "ranks")
    _unchanged(model, before)
    assert _merge(base_dir, tmp_path / "ranks", tmp_path / "out") != 0


# ----- hangs ---------------------------------------------------------------------------------------
def test_a_catastrophic_layers_pattern_times_out():
    from lora_inject.targeting.matching import layer_index

    with pytest.raises(li.PatternTimeoutError):
        layer_index("a" * 40 + "c", "(a|a)+")


def test_many_slow_patterns_share_one_time_budget():
    name = "a" * 20 + "z"  # each pattern below backtracks ~2^20 steps on this path: under the per-pattern limit
    model = torch.nn.Sequential()
    model.add_module(name, torch.nn.Linear(4, 4))
    slow = {f"(a|a)+y{i}": 2 for i in range(60)}
    start = time.monotonic()
    with pytest.raises(li.PatternTimeoutError):
        li.inject(model, targets=[name], rank_pattern=slow)
    assert time.monotonic() - start < 20  # a bound on the hang, not a speed test: 60 x ~0.15 s unbounded before
    assert not any(isinstance(m, li.LoraLayer) for m in model.modules())


def test_thousands_of_exact_rank_pattern_keys(base_dir):
    model = _fresh(base_dir)
    keys = {f"model.layers.{i}.self_attn.q_proj": 2 + i % 3 for i in range(20000)}
    li.inject(model, targets=["q_proj"], rank_pattern=keys)
    assert model.model.layers[1].self_attn.q_proj.r["default"] == 3


# ----- memory ------------------------------------------------------------------------------------
def test_token_ids_beyond_any_vocabulary_are_refused_before_resizing(base_dir, tmp_path):
    import transformers as t

    model = li.inject(t.AutoModelForCausalLM.from_pretrained(base_dir), targets=["q_proj"], r=4,
                      trainable_tokens=[3, 5])
    li.save_adapter(model, tmp_path / "a")
    _edit_config(tmp_path / "a", trainable_token_indices=[3, 2**20])
    _edit_config(tmp_path / "a", base_model_name_or_path=str(base_dir))
    with pytest.raises(li.AdapterFileError, match="do not fit"):
        li.from_pretrained(tmp_path / "a")


# ----- faults --------------------------------------------------------------------------------------
def test_a_new_adapter_folder_appears_whole_and_readable(base_dir, tmp_path, monkeypatch):
    from lora_inject.formats import folder

    model = _adapter(base_dir, tmp_path / "first")
    real = folder.save_file

    def failing(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(folder, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        li.save_adapter(model, tmp_path / "new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "first"]  # no folder, no staging left
    li.save_adapter(model, tmp_path / "new")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_saving_into_a_folder_keeps_what_else_it_holds(base_dir, tmp_path):
    model = _adapter(base_dir, tmp_path / "a")
    (tmp_path / "a" / "optimizer.pt").write_bytes(b"state")  # a Trainer checkpoint holds more than the adapter
    randomize_adapters(model)
    li.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "optimizer.pt").read_bytes() == b"state"
    stale = tmp_path / ".a.saving-999999999-xyz"  # what a killed save leaves: removed by the next one
    stale.mkdir()
    li.save_adapter(model, tmp_path / "a")
    assert not stale.exists()


def _outputs(base_dir, folder):
    import transformers as t

    model = li.load_adapter(t.AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    with torch.no_grad():
        return model(torch.arange(8)[None]).logits


def test_overwriting_an_adapter_folder_exchanges_it_whole(base_dir, tmp_path, monkeypatch):
    """Nothing can fall between the new weights and the new config: the folder is replaced in one step."""
    from lora_inject.formats import folder

    _adapter(base_dir, tmp_path / "a", alpha=8)
    os.chmod(tmp_path / "a", 0o750)
    inode = (tmp_path / "a").stat().st_ino
    renamed = []
    monkeypatch.setattr(folder.os, "replace", lambda *a: renamed.append(a))  # the file-by-file way: not taken
    _adapter(base_dir, tmp_path / "b", alpha=32)
    model = _adapter(base_dir, tmp_path / "a", alpha=32)
    assert renamed == [] and (tmp_path / "a").stat().st_ino != inode
    assert (tmp_path / "a").stat().st_mode & 0o7777 == 0o750  # the folder's own permissions stay
    assert json.loads((tmp_path / "a" / CONFIG).read_text())["lora_alpha"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base"]  # the previous folder is gone
    li.save_adapter(model, tmp_path / "b")
    torch.testing.assert_close(_outputs(base_dir, tmp_path / "a"), _outputs(base_dir, tmp_path / "b"))


def test_a_file_another_writer_adds_during_the_exchange_is_kept(base_dir, tmp_path, monkeypatch):
    from lora_inject.formats import folder

    model = _adapter(base_dir, tmp_path / "a")
    real = folder._replace_folder

    def meanwhile(staging, directory):  # another rank writes its file after the last look, before the exchange
        (directory / "rng_state_1.pth").write_bytes(b"rng")
        return real(staging, directory)

    monkeypatch.setattr(folder, "_replace_folder", meanwhile)
    li.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "rng_state_1.pth").read_bytes() == b"rng"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


def test_threads_saving_into_one_folder_at_once_all_succeed(base_dir, tmp_path):
    import threading

    model = _adapter(base_dir, tmp_path / "a")
    errors = []

    def saves():
        try:
            for _ in range(10):
                li.save_adapter(model, tmp_path / "a")
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=saves) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]
    torch.testing.assert_close(_outputs(base_dir, tmp_path / "a"), _outputs(base_dir, tmp_path / "a"))


def test_a_folder_whose_group_a_new_folder_would_not_get_is_saved_into_file_by_file(base_dir, tmp_path,
                                                                                     monkeypatch):
    from lora_inject.formats import folder

    model = _adapter(base_dir, tmp_path / "a")
    inode = (tmp_path / "a").stat().st_ino
    monkeypatch.setattr(folder, "_new_folder_gid", lambda directory: directory.stat().st_gid + 1)
    li.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a").stat().st_ino == inode  # the same folder: its owner, group and ACLs stay


def test_without_an_exchange_a_crash_between_the_renames_leaves_no_mix_and_the_next_save_mends_it(
        base_dir, tmp_path, monkeypatch):
    from lora_inject.formats import folder

    _adapter(base_dir, tmp_path / "a", alpha=8)
    before = _outputs(base_dir, tmp_path / "a")
    monkeypatch.setattr(folder, "_exchange", lambda a, b: False)  # no renameat2 (macOS, old kernels)
    real = os.rename

    def killed(src, dst):
        if Path(dst) == tmp_path / "a" and ".saving-" in str(src):
            raise KeyboardInterrupt  # the process dies between moving the old folder aside and the new one in
        return real(src, dst)

    monkeypatch.setattr(folder.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        _adapter(base_dir, tmp_path / "a", alpha=32)
    monkeypatch.setattr(folder.os, "rename", real)
    with pytest.raises(li.AdapterFileError):  # no folder: an error, never new weights with the old config
        _outputs(base_dir, tmp_path / "a")
    li.save_adapter(li.inject(tiny_llama(), targets=["q_proj"], r=2), tmp_path / "other")  # another target
    assert not (tmp_path / "a").exists()
    model = _adapter(base_dir, tmp_path / "b", alpha=32)
    li.save_adapter(model, tmp_path / "a")  # puts the previous folder back first, then replaces it whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]
    torch.testing.assert_close(_outputs(base_dir, tmp_path / "a"), _outputs(base_dir, tmp_path / "b"))
    assert not torch.allclose(_outputs(base_dir, tmp_path / "a"), before)


def test_a_crash_between_the_files_of_a_folder_holding_other_files_is_reported_when_read(base_dir, tmp_path,
                                                                                         monkeypatch):
    from lora_inject.formats import folder

    _adapter(base_dir, tmp_path / "a", alpha=8)
    (tmp_path / "a" / "optimizer.pt").write_bytes(b"state")  # a Trainer checkpoint: saved file by file
    real = os.replace

    def killed(src, dst):
        if Path(dst).name == CONFIG:
            raise KeyboardInterrupt  # dies after the weights went in, before the config did
        return real(src, dst)

    monkeypatch.setattr(folder.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _adapter(base_dir, tmp_path / "a", alpha=32)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"not the config these weights were saved with \(lora_alpha: 8 \(saved "
                                         r"with 32\)"):
        _outputs(base_dir, tmp_path / "a")


def test_a_failed_final_swap_of_a_forced_merge_restores_the_previous_output(base_dir, tmp_path, monkeypatch):
    from lora_inject.checkpoint import merge as checkpoint_merge

    _adapter(base_dir, tmp_path / "a")
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") == 0
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    real = os.replace

    def failing(src, dst):
        if Path(dst) == (tmp_path / "out").resolve() and ".partial-" in str(src):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(checkpoint_merge.os, "replace", failing)
    assert main(["merge", str(base_dir), str(tmp_path / "a"), str(tmp_path / "out"), "--force", "--quiet"]) != 0
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_leftovers_of_killed_merges_are_cleaned_on_the_next_merge(base_dir, tmp_path):
    _adapter(base_dir, tmp_path / "a")
    stale = tmp_path / ".out.partial-999999999-abc123"  # pid 999999999 runs nowhere
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    hidden = tmp_path / ".out.old-999999999"  # a merge killed after moving the previous output aside
    hidden.mkdir()
    (hidden / "config.json").write_text("{}")
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out2") == 0  # another output: not touched
    assert stale.exists() and hidden.exists()
    assert _merge(base_dir, tmp_path / "a", tmp_path / "out") != 0  # the hidden output came back first
    assert (tmp_path / "out" / "config.json").read_text() == "{}" and not stale.exists()


def test_missing_factors_that_would_outweigh_the_model_are_refused(base_dir, tmp_path):
    _adapter(base_dir, tmp_path / "a")
    _edit_config(tmp_path / "a", r=2**16, rank_pattern={})
    _edit_tensors(tmp_path / "a", lambda t: t.clear())
    model = _fresh(base_dir)
    before = _state(model)
    with pytest.raises(li.AdapterFileError, match="more than the"):
        li.load_adapter(model, tmp_path / "a", strict=False)
    _unchanged(model, before)
