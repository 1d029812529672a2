"""Property-based: valid adapter folders mutated at random (config fields set to wrong types and values, fields
removed, raw config text damaged, tensors dropped, renamed, re-typed, reshaped or poisoned), each sent through
every reader: ``load_adapter``, ``load_adapter_weights``, ``read_adapter_config``, ``hotswap_adapter`` and
``lora-inject merge``. Each call either loads exactly what the file says (checked against ``W + s * B @ A``
computed from the raw file with PEFT's rules, independently of the library) or raises a ``LoraInjectError``
with the model bit-identical; within a time and memory bound. Fixed seed, bounded example count."""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lora_inject as li
from lora_inject.cli import main

WEIGHTS, CONFIG, PREFIX = "adapter_model.safetensors", "adapter_config.json", "base_model.model."
X = torch.tensor([[1, 5, 9, 30, 2, 64]])
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def setup():
    import transformers as t

    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "base")
    model = li.inject(t.AutoModelForCausalLM.from_pretrained(root / "base"), targets=["q_proj", "v_proj"], r=4,
                      alpha=8, rank_pattern={"v_proj": 2})
    randomize_adapters(model)
    li.save_adapter(model, root / "valid")
    yield root
    shutil.rmtree(root, ignore_errors=True)


# ----- mutations ----------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([2**31, 10**30, -(2**63)])
    | st.floats(allow_nan=False, width=32) | st.sampled_from(["", "false", "true", "q_proj", "(", ".*", "(a|a)+$",
                                                                "re:.*", "layers", "all-linear", "LORA", "none"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["q_proj", "v_proj", "x", "("]),
                                                                      children, max_size=3),
    max_leaves=6,
)
FIELDS = ["r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "target_modules", "rank_pattern",
          "alpha_pattern", "layers_pattern", "layers_to_transform", "modules_to_save", "lora_dropout", "bias",
          "init_lora_weights", "trainable_token_indices", "fan_in_fan_out", "peft_type", "exclude_modules",
          "target_parameters", "task_type"]

config_mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELDS), JSON_VALUES),
    st.tuples(st.just("drop"), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("text"), st.sampled_from(["truncate", "garbage", "nested", "digits"]), st.none()),
)
tensor_mutation = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 7), st.none()),
    st.tuples(st.just("unprefix"), st.integers(0, 7), st.none()),
    st.tuples(st.just("rename"), st.integers(0, 7), st.sampled_from(["k_proj", "nothing", "mlp.up_proj"])),
    st.tuples(st.just("dtype"), st.integers(0, 7), st.sampled_from(
        [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.float8_e4m3fn, torch.complex64])),
    st.tuples(st.just("shape"), st.integers(0, 7), st.sampled_from(["rank-1", "rank+1", "transpose", "flat"])),
    st.tuples(st.just("poison"), st.integers(0, 7), st.sampled_from([math.nan, math.inf, 1e30])),
    st.tuples(st.just("extra"), st.integers(0, 7), st.sampled_from(["lora_magnitude_vector", "lora_B.bias", "w"])),
)
mutations = st.lists(st.one_of(config_mutation, tensor_mutation), min_size=1, max_size=3)


def _mutate_config(folder: Path, kind: str, field: str, value) -> None:
    path = folder / CONFIG
    if kind == "text":
        text = path.read_text()
        replacement = {"truncate": text[: len(text) // 2], "garbage": "\x00\xff{not json",
                       "nested": "[" * 3000 + "]" * 3000, "digits": text.replace('"r": 4', '"r": ' + "9" * 5000)}
        path.write_bytes(replacement[field].encode("utf-8", "surrogateescape"))
        return
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return
    if not isinstance(data, dict):
        return
    if kind == "set":
        data[field] = value
    else:
        data.pop(field, None)
    path.write_text(json.dumps(data))


def _mutate_tensors(folder: Path, kind: str, index: int, arg) -> None:
    try:
        tensors = load_file(folder / WEIGHTS)
    except Exception:
        return
    if not tensors:
        return
    key = sorted(tensors)[index % len(tensors)]
    value = tensors.pop(key)
    if kind == "drop":
        pass
    elif kind == "unprefix":
        tensors[key.removeprefix(PREFIX)] = value
        tensors[key] = value.clone()
    elif kind == "rename":
        tensors[re.sub(r"(q_proj|v_proj)", arg, key)] = value
    elif kind == "dtype":
        tensors[key] = value.to(arg)
    elif kind == "shape":
        tensors[key] = {"rank-1": value[:-1] if value.shape[0] > 1 else value, "rank+1": torch.cat([value, value[:1]]),
                        "transpose": value.t().contiguous(), "flat": value.reshape(-1)}[arg]
    elif kind == "poison":
        value = value.clone() if value.is_floating_point() else value.float()
        value.view(-1)[0] = arg
        tensors[key] = value
    else:
        tensors[key] = value
        tensors[key.rsplit(".lora_", 1)[0] + "." + arg] = torch.ones(value.shape[0])
    save_file(tensors, folder / WEIGHTS)


# ----- the independent reference ------------------------------------------------------------------
def _first_match(patterns: dict, path: str):
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _expected_weights(folder: Path, base_state: dict) -> dict:
    """``{weight key: W + s * B @ A}`` from the raw files, with PEFT's rules for scale and patterns."""
    config = json.loads((folder / CONFIG).read_text())
    tensors = {k.removeprefix(PREFIX): v.double() for k, v in load_file(folder / WEIGHTS).items()}
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        b = tensors[path + ".lora_B.weight"]
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = ranks[_first_match(ranks, path)] if _first_match(ranks, path) else config.get("r", 8)
        alpha = alphas[_first_match(alphas, path)] if _first_match(alphas, path) else config.get("lora_alpha", 8)
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        out[path + ".weight"] = (base_state[path + ".weight"].double() + scale * b @ a).float()
    return out


def _reference_logits(setup: Path, folder: Path) -> torch.Tensor:
    import transformers as t

    model = t.AutoModelForCausalLM.from_pretrained(setup / "base").eval()
    state = model.state_dict()
    state.update(_expected_weights(folder, state))
    model.load_state_dict(state)
    with torch.no_grad():
        return model(X).logits


# ----- the readers --------------------------------------------------------------------------------
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            li.active_adapters(model) if li.adapter_configs(model) else [])


def _assert_unchanged(model, before, what):
    state, flags, active = before
    now = model.state_dict()
    assert now.keys() == state.keys(), f"{what} changed the model's keys"
    assert all(torch.equal(v, state[k]) for k, v in now.items()), f"{what} changed values"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, f"{what} changed requires_grad"
    assert (li.active_adapters(model) if li.adapter_configs(model) else []) == active, f"{what} changed active"


def _call(what, fn, model=None):
    """Run a reader: its result, or None after a library error that left ``model`` as it was."""
    before = _snapshot(model) if model is not None else None
    start = time.monotonic()
    try:
        result = fn()
        COUNTS[f"{what} loaded"] = COUNTS.get(f"{what} loaded", 0) + 1
        return result
    except li.LoraInjectError:
        COUNTS[f"{what} refused"] = COUNTS.get(f"{what} refused", 0) + 1
        if model is not None:
            _assert_unchanged(model, before, what)
        return None
    finally:
        assert time.monotonic() - start < 30, f"{what} took {time.monotonic() - start:.1f}s"


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=mutations)
def test_mutated_adapter_folders_load_exactly_or_are_refused_with_the_model_unchanged(setup, changes):
    import transformers as t

    work = Path(tempfile.mkdtemp(prefix="case-", dir=setup))
    folder = work / "adapter"
    shutil.copytree(setup / "valid", folder)
    for kind, what, arg in changes:
        if isinstance(what, str) and kind in ("set", "drop", "text"):
            _mutate_config(folder, kind, what, arg)
        else:
            _mutate_tensors(folder, kind, what, arg)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fresh = t.AutoModelForCausalLM.from_pretrained(setup / "base").eval()

    _call("read_adapter_config", lambda: li.read_adapter_config(folder))
    loaded = _call("load_adapter", lambda: li.load_adapter(fresh, folder), fresh)
    if loaded is not None:
        with torch.no_grad():
            torch.testing.assert_close(loaded(X).logits, _reference_logits(setup, folder), atol=1e-4, rtol=1e-4)

    injected = li.load_adapter(t.AutoModelForCausalLM.from_pretrained(setup / "base").eval(), setup / "valid")
    if _call("load_adapter_weights", lambda: li.load_adapter_weights(injected, folder), injected) is not None:
        with torch.no_grad():
            torch.testing.assert_close(injected(X).logits, _reference_logits(setup, folder), atol=1e-4, rtol=1e-4)

    swapped = li.load_adapter(t.AutoModelForCausalLM.from_pretrained(setup / "base").eval(), setup / "valid")
    li.prepare_hotswap(swapped, max_rank=8)
    if _call("hotswap_adapter", lambda: li.hotswap_adapter(swapped, folder), swapped) is not None:
        with torch.no_grad():
            torch.testing.assert_close(swapped(X).logits, _reference_logits(setup, folder), atol=1e-4, rtol=1e-4)

    out = work / "merged"
    code = main(["merge", str(setup / "base"), str(folder), str(out), "--quiet"])
    assert code in (0, 2), f"lora-inject merge exited {code}"
    outcome = f"merge {'loaded' if code == 0 else 'refused'}"
    COUNTS[outcome] = COUNTS.get(outcome, 0) + 1
    if code == 0:
        written = load_file(out / "model.safetensors")
        base_state = load_file(setup / "base" / "model.safetensors")
        for key, value in _expected_weights(folder, base_state).items():
            torch.testing.assert_close(written[key], value, atol=1e-5, rtol=1e-5)
    else:
        assert not out.exists()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"
    shutil.rmtree(work, ignore_errors=True)


def test_the_fuzzing_reached_both_outcomes_of_every_reader(setup):
    """Runs after the property (file order): every reader both loaded and refused some mutated folders."""
    if not COUNTS:
        pytest.skip("run with the property test above")
    for reader in ("read_adapter_config", "load_adapter", "load_adapter_weights", "hotswap_adapter", "merge"):
        assert COUNTS.get(f"{reader} loaded", 0) > 0 and COUNTS.get(f"{reader} refused", 0) > 0, COUNTS
    print("fuzz outcomes:", dict(sorted(COUNTS.items())))
