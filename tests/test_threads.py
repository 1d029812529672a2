"""Several threads serving one model: per-call routing blocks (``using_adapter``, ``batch_adapters``,
``disabled_adapters``) and hot swaps take turns (the model's lock), so each block sees its own adapters, the
state before it comes back after it, and a forward inside a block never sees a half-swapped adapter."""

from __future__ import annotations

import threading

import torch
from conftest import tiny_llama

import lora_inject as li

ROUNDS = 30


def _model():
    model = tiny_llama()
    li.inject(model, targets=["q_proj", "v_proj"], r=4, init=False, adapter="a")
    li.inject(model, targets=["q_proj", "v_proj"], r=4, init=False, adapter="b")
    li.set_adapter(model, "a")
    return model.requires_grad_(False)


def _run_threads(*targets):
    errors = []

    def guarded(target):
        def run():
            try:
                target()
            except BaseException as error:  # noqa: BLE001 (reported to the test)
                errors.append(error)
        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


def _logits(model, x, names):
    with torch.no_grad(), li.using_adapter(model, names):
        return model(x).logits


def test_using_adapter_in_two_threads_each_sees_its_own_and_the_state_comes_back():
    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected = {name: _logits(model, x, name) for name in ("a", "b", None)}
    wrong = []

    def serve(name):
        def run():
            for _ in range(ROUNDS):
                with torch.no_grad(), li.using_adapter(model, name):
                    out = model(x).logits
                if not torch.equal(out, expected[name]):
                    wrong.append(name)
        return run

    _run_threads(serve("a"), serve("b"), serve(None))
    assert wrong == []
    assert li.active_adapters(model) == ["a"]


def test_batch_adapters_in_two_threads_do_not_trip_over_each_other():
    model, x = _model(), torch.randint(0, 100, (3, 6))
    plans = [["a", "b", None], [None, "a", "a"]]
    expected = []
    for names in plans:
        with torch.no_grad(), li.batch_adapters(model, names):
            expected.append(model(x).logits)
    wrong = []

    def serve(i):
        def run():
            for _ in range(ROUNDS):
                with torch.no_grad(), li.batch_adapters(model, plans[i]):
                    out = model(x).logits
                if not torch.equal(out, expected[i]):
                    wrong.append(i)
        return run

    _run_threads(serve(0), serve(1))
    assert wrong == []


def test_a_hot_swap_waits_for_the_blocks_that_run_the_adapter(tmp_path):
    model, x = _model(), torch.randint(0, 100, (2, 6))
    li.prepare_hotswap(model, max_rank=4, adapter="a")
    files = {}
    for name, seed in (("x", 1), ("y", 2)):
        other = tiny_llama()
        li.inject(other, targets=["q_proj", "v_proj"], r=4, init=False)
        torch.manual_seed(seed)
        for key, p in other.named_parameters():
            if "lora_" in key:
                p.data = torch.randn_like(p) * 0.3
        files[name] = li.save_adapter(other, tmp_path / name)
    expected = {}
    for name, folder in files.items():
        li.hotswap_adapter(model, folder, adapter="a")
        expected[name] = _logits(model, x, "a")
    wrong = []

    def forwards():
        for _ in range(ROUNDS):
            with torch.no_grad(), li.using_adapter(model, "a"):
                out = model(x).logits
            if not any(torch.equal(out, e) for e in expected.values()):
                wrong.append(out)

    def swaps():
        for i in range(ROUNDS):
            li.hotswap_adapter(model, files["xy"[i % 2]], adapter="a")

    _run_threads(forwards, swaps)
    assert not wrong, f"{len(wrong)} of {ROUNDS} outputs mixed two adapters"
