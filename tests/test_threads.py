"""Several threads serving one model.

Per-call routing blocks (``using_adapter``, ``batch_adapters``, ``disabled_adapters``) belong to the thread that
entered them: blocks of different threads run at the same time, each sees its own adapters, and a plain forward
in another thread never sees them. What changes the adapters (hot swap, load, set_adapter, merge) waits for the
forwards and blocks in flight, so a forward sees the model before the change or after it, never a mix.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import tiny_llama

import lora_inject as li
from lora_inject import ConcurrencyError

ROUNDS = 30
WAIT = 20  # seconds a thread waits for another before the test calls it stuck


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


def _random_factors(model, seed, adapter=None):
    torch.manual_seed(seed)
    for key, p in model.named_parameters():
        if "lora_" in key and (adapter is None or f".{adapter}." in key or key.endswith(f".{adapter}")):
            p.data = torch.randn_like(p) * 0.3


def _saved(tmp_path, seeds):
    files = {}
    for name, seed in seeds.items():
        other = tiny_llama()
        li.inject(other, targets=["q_proj", "v_proj"], r=4, init=False)
        _random_factors(other, seed)
        files[name] = li.save_adapter(other, tmp_path / name)
    return files


def _prepared_for_swaps(tmp_path):
    """A model prepared for hot swaps of adapter "a", two saved adapters to swap in, and what each gives."""
    model, x = _model(), torch.randint(0, 100, (2, 6))
    li.prepare_hotswap(model, max_rank=4, adapter="a")
    files = _saved(tmp_path, {"x": 1, "y": 2})
    expected = []
    for folder in files.values():
        li.hotswap_adapter(model, folder, adapter="a")
        with torch.no_grad():
            expected.append(model(x).logits)
    return model, x, files, expected


def _held_open(block, inside: threading.Event, leave: threading.Event):
    """A thread body: enter ``block``, say so, and stay inside until ``leave``."""
    def run():
        with block():
            inside.set()
            assert leave.wait(WAIT), "the test never let this block end"
    return run


def test_blocks_of_two_threads_run_at_the_same_time_each_with_its_own_adapter():
    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected = {name: _logits(model, x, name) for name in ("a", "b")}
    inside = {name: threading.Event() for name in "ab"}
    outputs = {}

    def serve(name, other):
        def run():
            with torch.no_grad(), li.using_adapter(model, name):
                inside[name].set()
                assert inside[other].wait(WAIT), f"the {other!r} block never ran while the {name!r} block was open"
                outputs[name] = model(x).logits  # both blocks are open now
        return run

    _run_threads(serve("a", "b"), serve("b", "a"))
    for name in "ab":
        assert torch.equal(outputs[name], expected[name])


@pytest.mark.parametrize("block", ["batch_adapters", "using_adapter", "disabled_adapters"])
def test_a_plain_forward_never_sees_another_threads_block(block):
    model, x = _model(), torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        expected = model(x).logits  # adapter "a", the model's own
    blocks = {"batch_adapters": lambda: li.batch_adapters(model, ["b", None, "b"]),
              "using_adapter": lambda: li.using_adapter(model, "b"),
              "disabled_adapters": lambda: li.disabled_adapters(model)}
    inside, leave, wrong = threading.Event(), threading.Event(), []

    def plain_forwards():
        assert inside.wait(WAIT)
        try:
            for _ in range(ROUNDS):
                with torch.no_grad():
                    if not torch.equal(model(x).logits, expected):
                        wrong.append(1)
        finally:
            leave.set()

    _run_threads(_held_open(blocks[block], inside, leave), plain_forwards)
    assert wrong == []


def test_a_hot_swap_during_plain_forwards_never_gives_a_mix(tmp_path):
    model, x, files, expected = _prepared_for_swaps(tmp_path)
    wrong, done = [], threading.Event()

    def forwards():
        while not done.is_set():
            with torch.no_grad():
                out = model(x).logits  # no block: the model's own adapter, whatever the swaps do
            if not any(torch.equal(out, e) for e in expected):
                wrong.append(out)

    def swaps():
        try:
            for i in range(4 * ROUNDS):
                li.hotswap_adapter(model, files["xy"[i % 2]], adapter="a")
        finally:
            done.set()

    _run_threads(forwards, swaps)
    assert not wrong, f"{len(wrong)} forwards mixed two adapters"


def test_loading_and_deleting_adapters_during_forwards_shows_no_half_built_model(tmp_path):
    model, x = _model(), torch.randint(0, 100, (2, 6))
    folder = _saved(tmp_path, {"c": 3})["c"]
    with torch.no_grad():
        expected = [model(x).logits]
        li.load_adapter(model, folder, adapter="c")  # the loaded adapter runs
        expected.append(model(x).logits)
    li.delete_adapter(model, "c")
    li.set_adapter(model, "a")
    wrong, done = [], threading.Event()

    def forwards():
        while not done.is_set():
            with torch.no_grad():
                out = model(x).logits
            if not any(torch.equal(out, e) for e in expected):
                wrong.append(out)

    def loads():
        try:
            for _ in range(ROUNDS):
                li.load_adapter(model, folder, adapter="c")
                li.delete_adapter(model, "c")
                li.set_adapter(model, "a")
        finally:
            done.set()

    _run_threads(forwards, loads)
    assert not wrong, f"{len(wrong)} forwards saw neither the model before a load nor after it"


def test_a_change_waits_for_the_blocks_in_flight_and_new_forwards_wait_for_it():
    from lora_inject.threads import model_lock

    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected_b = _logits(model, x, "b")
    inside, leave, changed = threading.Event(), threading.Event(), threading.Event()
    order, late = [], []

    def change():
        assert inside.wait(WAIT)
        li.set_adapter(model, "b")
        order.append("changed")
        changed.set()

    def late_forward():  # starts while the change waits: it runs after the change, so with adapter "b"
        with torch.no_grad():
            late.append(model(x).logits)

    def release():
        assert inside.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while not model_lock(model)._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not changed.is_set(), "set_adapter did not wait for the open block"
        forward = threading.Thread(target=late_forward)
        forward.start()
        time.sleep(0.2)
        assert not late, "a new forward overtook the waiting change"
        order.append("left")
        leave.set()
        forward.join(WAIT)

    _run_threads(_held_open(lambda: li.using_adapter(model, "a"), inside, leave), change, release)
    assert order == ["left", "changed"]
    assert li.active_adapters(model) == ["b"]
    assert torch.equal(late[0], expected_b)


def test_a_thread_may_change_the_model_inside_its_own_block():
    model, x = _model(), torch.randint(0, 100, (2, 6))
    with torch.no_grad(), li.using_adapter(model, "b"):
        li.set_adapter(model, "b")  # the model's own state; the block's view still decides what runs here
        inside = model(x).logits
    with torch.no_grad():
        assert torch.equal(model(x).logits, inside)
    assert li.active_adapters(model) == ["b"]


def test_two_threads_changing_the_model_from_inside_their_blocks_do_not_deadlock():
    model = _model()
    both_inside = threading.Barrier(2, timeout=WAIT)
    outcomes = []

    def serve(name):
        def run():
            try:
                with li.using_adapter(model, name):
                    both_inside.wait()
                    li.set_adapter(model, name)
                outcomes.append("changed")
            except ConcurrencyError as error:
                assert "both tried to change" in str(error)
                outcomes.append("refused")
        return run

    _run_threads(serve("a"), serve("b"))
    assert sorted(outcomes) == ["changed", "refused"]


def test_the_views_are_per_thread_under_torch_compile(request):
    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected = {name: _logits(model, x, name) for name in ("a", "b", None)}
    torch._dynamo.reset()
    request.addfinalizer(torch._dynamo.reset)
    compiled = torch.compile(model, fullgraph=True)
    wrong = []

    def serve(names):
        def run():
            for i in range(8):
                name = names[i % len(names)]
                with torch.no_grad(), li.using_adapter(model, name):
                    out = compiled(x).logits
                if not torch.allclose(out, expected[name], atol=1e-5):
                    wrong.append(name)
        return run

    _run_threads(serve(["a", None]), serve(["b", "a"]))
    assert wrong == []
    with torch.no_grad():
        assert torch.allclose(compiled(x).logits, expected["a"], atol=1e-5)  # no stale graph after the blocks


def test_a_dataparallel_replica_runs_the_view_of_the_thread_that_made_it():
    model, x = _model(), torch.randn(2, 32)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), li.using_adapter(model, "b"):
        expected = layer(x)
        replica = layer._replicate_for_data_parallel()  # what DataParallel does before its worker threads run
    with torch.no_grad():
        assert not torch.equal(layer(x), expected)
    result = []
    _run_threads(lambda: result.append(replica(x)))
    assert torch.equal(result[0], expected)


def test_with_gradient_checkpointing_a_block_holds_for_backward_in_other_threads():
    """Gradient checkpointing runs forwards again during backward, on GPUs in autograd's threads: there a
    block changes the model itself (and holds it alone), so the recomputation runs the block's adapter."""
    model, x = _model(), torch.randint(0, 100, (2, 6))
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5 (the older name warns)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for key, p in model.named_parameters():
        p.requires_grad_("lora_" in key)

    def grads():
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    li.set_adapter(model, "b")
    for key, p in model.named_parameters():
        p.requires_grad_("lora_" in key)
    model.zero_grad()
    model(x).logits.square().sum().backward()
    expected = grads()
    li.set_adapter(model, "a")
    for key, p in model.named_parameters():
        p.requires_grad_("lora_" in key)
    model.zero_grad()
    with li.using_adapter(model, "b"):
        loss = model(x).logits.square().sum()
        _run_threads(loss.backward)  # recomputed in another thread, as autograd does on GPUs
    got = grads()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert li.active_adapters(model) == ["a"]


def test_unloading_takes_the_forward_hooks_away():
    from lora_inject.threads import _enter_forward, _leave_forward

    model = _model()
    assert _enter_forward in model._forward_pre_hooks.values()
    plain = li.unload(model)
    assert _enter_forward not in plain._forward_pre_hooks.values()
    assert _leave_forward not in plain._forward_hooks.values()


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_a_hot_swap_while_threads_serve_a_compiled_model_in_blocks_never_gives_a_mix(tmp_path, request, how):
    """A compiled graph cannot take the lock (the forward hooks are traced as nothing): requests inside blocks
    are held, since the block takes it outside the graph."""
    model, x, files, expected = _prepared_for_swaps(tmp_path)
    torch._dynamo.reset()
    request.addfinalizer(torch._dynamo.reset)
    compiled = torch.compile(model) if how == "torch.compile(model)" else model
    if how == "model.compile()":
        model.compile()

    def forward():
        with li.using_adapter(model, "a"):
            return compiled(x).logits
    wrong, done = [], threading.Event()

    def forwards():
        while not done.is_set():
            with torch.no_grad():
                out = forward()
            if not any(torch.allclose(out, e, atol=1e-5) for e in expected):
                wrong.append(out)

    def swaps():
        try:
            for i in range(ROUNDS):
                li.hotswap_adapter(model, files["xy"[i % 2]], adapter="a")
        finally:
            done.set()

    with torch.no_grad():
        forward()  # compiled before the race starts
    _run_threads(forwards, swaps)
    assert not wrong, f"{len(wrong)} forwards mixed two adapters"


KINDS = {
    "linear": dict(targets=["q_proj", "v_proj"]),
    "dora": dict(targets=["q_proj", "v_proj"], dora=True),
    "embedding and a trained head": dict(targets=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
    "trainable tokens": dict(targets=["q_proj"], trainable_tokens=[1, 5, 7]),
    "gpt2 conv1d": dict(targets=["c_attn", "c_proj"]),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_kind_follows_each_threads_own_block(kind):
    from conftest import tiny_gpt2

    model = tiny_gpt2() if "gpt2" in kind else tiny_llama()
    torch.manual_seed(0)
    for name in ("a", "b"):
        li.inject(model, r=4, adapter=name, **KINDS[kind])
        for p in model.parameters():
            if p.requires_grad:  # the new adapter's own tensors: make it change the output
                p.data += torch.randn_like(p) * 0.2
    model.requires_grad_(False)
    x = torch.randint(1, 9, (2, 6))
    expected = {}
    for names in (["a"], ["b"], []):
        li.set_adapter(model, names) if names else None
        with torch.no_grad(), (li.disabled_adapters(model) if not names else li.using_adapter(model, names)):
            expected[tuple(names)] = model(x).logits
    li.set_adapter(model, "a")
    assert not torch.allclose(expected[("a",)], expected[("b",)])
    inside, leave, got = threading.Event(), threading.Event(), {}

    def other_thread():
        assert inside.wait(WAIT)
        try:
            with torch.no_grad():
                got["plain"] = model(x).logits
                with li.disabled_adapters(model):
                    got["disabled"] = model(x).logits
                with li.batch_adapters(model, ["a", "b"]):
                    got["batch"] = model(x).logits
        finally:
            leave.set()

    def held():
        with torch.no_grad():
            return li.using_adapter(model, "b")

    _run_threads(_held_open(held, inside, leave), other_thread)
    torch.testing.assert_close(got["plain"], expected[("a",)])
    torch.testing.assert_close(got["disabled"], expected[()])
    torch.testing.assert_close(got["batch"], torch.cat([expected[("a",)][:1], expected[("b",)][1:]]))
    with torch.no_grad(), li.using_adapter(model, "b"):
        torch.testing.assert_close(model(x).logits, expected[("b",)])


def test_a_copied_or_unpickled_model_has_a_lock_of_its_own():
    import copy
    import io

    from lora_inject.threads import model_lock

    model, x = _model(), torch.randint(0, 100, (2, 6))
    with li.using_adapter(model, "b"):  # this thread holds the model's lock shared
        copied = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert model_lock(other) is not model_lock(model)
        done = []
        _run_threads(lambda other=other, done=done: (li.set_adapter(other, "b"), done.append(1)))  # nobody holds it
        assert done == [1]
        with torch.no_grad():
            torch.testing.assert_close(other(x).logits, _logits(model, x, "b"))


# ----- found by a review: each failed before its fix ---------------------------------------------------------
def test_lora_on_parameters_keeps_each_threads_adapter_and_the_owners_own_parameter():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    for name in ("a", "b"):
        li.inject(model, target_parameters=["0.weight"], r=4, init=False, adapter=name)
    model.requires_grad_(False)
    x = torch.randn(16, 64)
    expected = {}
    for name in ("a", "b", None):
        with torch.no_grad(), li.using_adapter(model, name):
            expected[name] = model(x)
    wrong = []

    def serve(name):
        def run():
            for _ in range(100):
                with torch.no_grad(), li.using_adapter(model, name):
                    if not torch.allclose(model(x), expected[name], atol=1e-5):
                        wrong.append(name)
        return run

    _run_threads(serve("a"), serve("b"), serve(None))
    assert wrong == []
    owner = model[0]
    while hasattr(owner, "base_layer"):
        owner = owner.base_layer
    assert type(owner._parameters["weight"]) is nn.Parameter


def test_a_block_ended_in_another_thread_is_an_error_and_leaves_the_first_thread_clean():
    from concurrent.futures import ThreadPoolExecutor

    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected_a = _logits(model, x, "a")

    def request():  # a streaming response: the block spans yields, a pool resumes the generator
        with torch.no_grad(), li.using_adapter(model, "b"):
            yield 1
            yield 2

    steps = request()
    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        assert first.submit(next, steps).result() == 1  # the block is entered in the first thread
        assert second.submit(next, steps).result() == 2
        with pytest.raises(ConcurrencyError, match="ended in another thread"):
            second.submit(next, steps).result()
        with torch.no_grad():  # the thread that entered the block sees the model's own adapter again
            assert torch.equal(first.submit(lambda: model(x).logits).result(), expected_a)
    _run_threads(lambda: li.set_adapter(model, "a"))  # no hold left behind: a change goes through


def test_carry_blocks_takes_the_block_into_a_thread_it_starts_even_with_a_change_waiting():
    from lora_inject.threads import model_lock

    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected_b = _logits(model, x, "b")
    got, changed = [], threading.Event()

    def request():
        with torch.no_grad(), li.using_adapter(model, "b"):
            plain = threading.Thread(target=lambda: got.append(("plain", model(x).logits)))
            plain.start()
            plain.join()  # no change waits yet: a plain thread runs the model's own adapter
            changer = threading.Thread(target=lambda: (li.set_adapter(model, "a"), changed.set()))
            changer.start()
            deadline = time.monotonic() + WAIT
            while not model_lock(model)._waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            worker = threading.Thread(target=li.carry_blocks(lambda: got.append(("carried", model(x).logits))))
            worker.start()  # a plain thread would now wait behind the change, which waits for this block
            worker.join(WAIT)
            assert not worker.is_alive(), "the carried thread waited behind the change"
        changer.join(WAIT)

    _run_threads(request)
    results = dict(got)
    assert not torch.equal(results["plain"], expected_b)
    assert torch.equal(results["carried"], expected_b)
    assert changed.is_set()


def test_a_forward_waiting_while_the_adapters_are_unloaded_holds_nothing_afterwards():
    from lora_inject.threads import model_lock

    model, x = _model(), torch.randint(0, 100, (2, 6))
    lock = model_lock(model)
    inside, leave = threading.Event(), threading.Event()

    def unload():
        assert inside.wait(WAIT)
        li.unload(model)

    def forward():
        deadline = time.monotonic() + WAIT
        while not lock._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        leave.set()  # the unload takes the model once the block leaves; this forward waits for it
        with torch.no_grad():
            model(x)

    _run_threads(_held_open(lambda: li.using_adapter(model, "a"), inside, leave), unload, forward)
    assert lock._shared == {} and lock._forwards == {}
    li.inject(model, targets=["q_proj"], r=2)  # would wait forever for a hold nobody lets go


def test_a_change_landing_between_a_blocks_first_look_and_its_lock_is_seen(monkeypatch):
    """The block decides under the lock: a merge that lands first makes disabled_adapters unmerge."""
    import sys

    inject_module = sys.modules["lora_inject.inject"]
    model, x = _model(), torch.randint(0, 100, (2, 6))
    with torch.no_grad(), li.disabled_adapters(model):
        base = model(x).logits
    real, merged = inject_module.needs_model_wide_block, threading.Event()
    calls = []

    def slow_first_look(m):
        calls.append(1)
        if len(calls) == 1:  # the look before the lock: a merge lands right now
            _run_threads(lambda: li.merge(model, "a"))
            merged.set()
        return real(m)

    monkeypatch.setattr(inject_module, "needs_model_wide_block", slow_first_look)
    with torch.no_grad(), li.disabled_adapters(model):
        assert merged.is_set()
        torch.testing.assert_close(model(x).logits, base, atol=1e-5, rtol=1e-5)


def test_adapter_modules_added_inside_a_block_join_its_view(tmp_path):
    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected_a = _logits(model, x, "a")
    with torch.no_grad(), li.using_adapter(model, "a"):
        li.inject(model, targets=["k_proj", "o_proj"], r=4, init=False, adapter="c")  # new layers, now active
        torch.testing.assert_close(model(x).logits, expected_a)  # the block still runs "a" alone
    assert li.active_adapters(model) == ["c"]


def test_a_model_pickled_before_per_thread_views_still_runs_and_serves_blocks():
    import io

    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected = {name: _logits(model, x, name) for name in ("a", "b")}
    for _, module in li.lora_layers(model):  # what the previous version kept in a wrapper's __dict__
        for field in ("_routing", "_running_kept"):
            module.__dict__.pop(field, None)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected["a"])
        with li.using_adapter(loaded, "b"):
            assert torch.equal(loaded(x).logits, expected["b"])


def test_backward_recomputing_the_whole_model_in_another_thread_does_not_wait_for_the_lock():
    """Activation checkpointing of the injected model itself: backward (autograd's thread on GPUs) runs its
    forward again while a model-wide block holds the lock alone."""
    from torch.utils.checkpoint import checkpoint

    model, x = _model(), torch.randint(0, 100, (2, 6))
    li.merge(model, "a")  # disabled_adapters must unmerge: it holds the model alone
    for key, p in model.named_parameters():
        p.requires_grad_("lora_" in key or "embed" in key)
    with li.disabled_adapters(model):
        loss = checkpoint(lambda ids: model(ids).logits.sum(), x, use_reentrant=False)
        finished = []
        worker = threading.Thread(target=lambda: (loss.backward(), finished.append(1)))
        worker.start()
        worker.join(WAIT)
    assert finished == [1], "backward waited for the lock its own block holds"


# ----- found by a second review: each failed before its fix ----------------------------------------------------
def _in_thread(function, timeout=WAIT):
    """Run ``function`` in a thread; ``(finished, result or error)``."""
    box = {}

    def run():
        try:
            box["result"] = function()
        except BaseException as error:  # noqa: BLE001 (handed back)
            box["result"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("result")


def test_a_keyboard_interrupt_inside_a_forward_does_not_keep_the_model_held():
    model, x = _model(), torch.randint(0, 100, (2, 6))

    def interrupted(module, args, output):
        raise KeyboardInterrupt  # Ctrl-C in the middle of a forward: torch skips the leaving hook then

    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(interrupted)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    finished, _ = _in_thread(lambda: li.set_adapter(model, "b"), timeout=10)
    assert finished, "a change from another thread waited for a forward that was over"


def test_a_carried_thread_is_its_own_holder_changes_wait_for_it_and_cannot_come_from_it():
    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected_b = _logits(model, x, "b")
    inside, release, got = threading.Event(), threading.Event(), {}
    layer = model.model.layers[0].self_attn.q_proj

    def slow(module, args, output):
        if threading.current_thread().name == "carried":
            inside.set()
            release.wait(WAIT)  # a long generation step in flight

    handle = layer.register_forward_hook(slow)

    def carried():
        with torch.no_grad():
            got["out"] = model(x).logits

    with li.using_adapter(model, "b"):
        worker = threading.Thread(target=li.carry_blocks(carried), name="carried")
        worker.start()
        assert inside.wait(WAIT)
    started = time.monotonic()
    threading.Timer(0.5, release.set).start()
    li.delete_adapter(model, "b")  # the block is over; its carried forward is not: the change waits for it
    assert time.monotonic() - started >= 0.4
    worker.join(WAIT)
    handle.remove()
    assert torch.equal(got["out"], expected_b)

    model = _model()
    refused = []
    with li.using_adapter(model, "b"):
        def change_from_carried():
            try:
                li.set_adapter(model, "b")
            except ConcurrencyError as error:
                refused.append(str(error))
        thread = threading.Thread(target=li.carry_blocks(change_from_carried))
        thread.start()
        thread.join(WAIT)
    assert refused and "carry" in refused[0]
    outside = li.carry_blocks(lambda: li.set_adapter(model, "b"))  # wrapped outside any block: an ordinary thread
    assert _in_thread(outside)[0] and li.active_adapters(model) == ["b"]


def test_dataparallel_replicas_run_while_the_maker_holds_the_model():
    model, x = _model(), torch.randint(0, 100, (2, 6))
    expected_b = _logits(model, x, "b")
    li.merge(model, "a")

    def replica_forward():  # what DataParallel does: replicate in the calling thread, run in its workers
        replica = model._replicate_for_data_parallel()
        return _in_thread(lambda: replica(x).logits, timeout=10)

    with torch.no_grad(), li.disabled_adapters(model):  # merged: the block holds the model alone
        finished, _ = replica_forward()
        assert finished, "the replica waited for the lock its maker holds"
    li.unmerge(model)
    with torch.no_grad(), li.using_adapter(model, "b"):
        changer = threading.Thread(target=lambda: li.set_adapter(model, "b"))
        changer.start()  # waits for this block
        time.sleep(0.3)
        replicas = {}
        for name, module in model.named_modules():
            replicas[name] = module._replicate_for_data_parallel()
        finished, _ = _in_thread(lambda: model(x), timeout=0.1)  # a plain thread would now wait for the change
        layer = replicas["model.layers.0.self_attn.q_proj"]
        assert layer.active_adapters == ("b",)  # the replica carries the maker's view
        finished, out = replica_forward()
        assert finished, "the replica waited behind a change that waits for its maker"
    changer.join(WAIT)
    assert torch.is_tensor(out) and out.shape == expected_b.shape


def test_a_save_waits_for_a_change_in_flight(tmp_path, monkeypatch):
    import sys

    from safetensors.torch import load_file

    hotswap = sys.modules["lora_inject.serving.hotswap"]
    model, x, files, expected = _prepared_for_swaps(tmp_path)
    li.hotswap_adapter(model, files["x"], adapter="a")
    half, resume = threading.Event(), threading.Event()
    real = hotswap._planned_writes

    def paused(*args, **kwargs):  # the swap writes its first layer, then waits
        def writes():
            for i, write in enumerate(real(*args, **kwargs)):
                if i == 1:
                    half.set()
                    resume.wait(WAIT)
                yield write
        return writes()

    monkeypatch.setattr(hotswap, "_planned_writes", paused)
    swap = threading.Thread(target=lambda: li.hotswap_adapter(model, files["y"], adapter="a"))
    swap.start()
    assert half.wait(WAIT)
    finished, _ = _in_thread(lambda: li.save_adapter(model, tmp_path / "saved", adapter="a"), timeout=0.5)
    assert not finished, "the save did not wait for the swap"
    resume.set()
    swap.join(WAIT)
    deadline = time.monotonic() + WAIT
    while not (tmp_path / "saved" / "adapter_model.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    want = load_file(files["y"] / "adapter_model.safetensors")
    for key, value in want.items():
        torch.testing.assert_close(saved[key][: value.shape[0]] if "lora_A" in key else saved[key][:, : value.shape[1]],
                                   value, rtol=1e-5, atol=1e-6)


def test_training_through_a_block_with_checkpointing_of_any_kind_recomputes_the_blocks_adapter():
    """torch.utils.checkpoint inside the model, no transformers flag: a block entered with grad on a model in
    training mode changes the model itself, so a recomputation in autograd's thread runs the block's adapter."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return checkpoint(self.l2, checkpoint(self.l1, x, use_reentrant=False), use_reentrant=False)

    torch.manual_seed(0)
    model = Checkpointed()
    for name in ("a", "b"):
        li.inject(model, targets=["l1", "l2"], r=2, init=False, adapter=name)
    li.set_adapter(model, "a")
    model.train()
    x = torch.randn(4, 8)

    def grads(backward_elsewhere):
        model.zero_grad()
        for key, p in model.named_parameters():
            p.requires_grad_("lora_" in key)
        with li.using_adapter(model, "b"):
            loss = model(x).square().sum()
            if backward_elsewhere:
                _run_threads(loss.backward)  # as autograd does on GPUs
            else:
                loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    want, got = grads(False), grads(True)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_diffusers_load_lora_is_one_change_and_takes_the_components_all_or_none(tmp_path, monkeypatch):
    import importlib

    from safetensors.torch import save_file
    from test_diffusion import File, clip_out, leaves, pipeline, unet_out
    from torch import nn

    pipe = pipeline()
    before = unet_out(pipe.unet)

    def kohya(name):
        unet, text = File(pipe.unet), File(pipe.text_encoder)
        for path in leaves(pipe.unet)[::3]:
            unet.add("lora_unet_" + path.replace(".", "_"), [path], alpha=2)
        for path in leaves(pipe.text_encoder, nn.Linear)[::2]:
            text.add("lora_te_text_model_" + path.replace(".", "_"), [path], alpha=1)
        save_file({**unet.tensors, **text.tensors}, tmp_path / f"{name}.safetensors")
        return tmp_path / f"{name}.safetensors"

    first, second = kohya("a"), kohya("b")
    seen = []
    integration = importlib.import_module("lora_inject.integrations.diffusers")
    real = integration._load_each

    def with_a_request_meanwhile(*args):
        real(*args)  # the adapter is in; its weight is not applied yet
        seen.append(_in_thread(lambda: unet_out(pipe.unet), timeout=0.5)[0])

    monkeypatch.setattr(integration, "_load_each", with_a_request_meanwhile)
    li.diffusers.load_lora(pipe, first, adapter="a", weight=0.0)
    monkeypatch.undo()
    assert seen == [False]  # the request waited for the whole load, weight included
    torch.testing.assert_close(unet_out(pipe.unet), before, atol=1e-5, rtol=1e-5)

    encoded, go, outcome = threading.Event(), threading.Event(), {}

    def request():  # a block on the text encoder, then the denoiser
        with torch.no_grad(), li.using_adapter(pipe.text_encoder, "a"):
            clip_out(pipe.text_encoder)
            encoded.set()
            go.wait(WAIT)
            unet_out(pipe.unet)
        outcome["request"] = True

    serving = threading.Thread(target=request)
    serving.start()
    assert encoded.wait(WAIT)
    loading = threading.Thread(target=lambda: (li.diffusers.load_lora(pipe, second, adapter="b"),
                                               outcome.setdefault("load", True)))
    loading.start()
    time.sleep(0.5)  # the load now waits for the text encoder, holding nothing
    go.set()
    serving.join(WAIT)
    loading.join(WAIT)
    assert outcome == {"request": True, "load": True}


# ----- found by a third review: each failed before its fix -----------------------------------------------------
def test_threads_carried_into_a_block_that_holds_the_model_alone_run():
    """A block entered with grad on a model in training mode holds it alone: its carried threads still run."""
    model, x = _model(), torch.randint(0, 100, (2, 6))
    model.train()
    expected_b = _logits(model.eval(), x, "b")
    model.train()
    with li.using_adapter(model, "b"):  # grad on, training mode: model-wide
        finished, out = _in_thread(li.carry_blocks(lambda: model.eval()(x).logits.detach()), timeout=10)
        model.train()
    assert finished, "the carried thread waited for its own block"
    torch.testing.assert_close(out, expected_b)


def test_two_interrupted_forwards_in_one_thread_leave_nothing_held():
    model, x = _model(), torch.randint(0, 100, (2, 6))
    layer = model.model.layers[0].self_attn.q_proj

    def interrupted(module, args, output):
        raise KeyboardInterrupt

    handle = layer.register_forward_hook(interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            model(x)
    handle.remove()
    assert _in_thread(lambda: li.set_adapter(model, "b"), timeout=10)[0]
    assert _in_thread(lambda: model(x), timeout=10)[0]


def _pipeline_with_adapter():
    from test_diffusion import leaves, pipeline
    from torch import nn

    pipe = pipeline()
    li.inject(pipe.unet, targets=leaves(pipe.unet, nn.Linear)[:4], r=2, adapter="a", init=False)
    li.inject(pipe.text_encoder, targets=leaves(pipe.text_encoder, nn.Linear)[:4], r=2, adapter="a", init=False)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe


def test_two_threads_changing_a_pipeline_from_blocks_on_different_components_do_not_deadlock():
    pipe = _pipeline_with_adapter()
    both = threading.Barrier(2, timeout=WAIT)
    outcomes = []

    def request(component, weight):
        def run():
            try:
                with torch.no_grad(), li.using_adapter(component, "a"):
                    both.wait()
                    li.diffusers.set_weights(pipe, {"a": weight})
                outcomes.append("changed")
            except ConcurrencyError:
                outcomes.append("refused")
        return run

    threads = [threading.Thread(target=request(pipe.unet, 0.5)),
               threading.Thread(target=request(pipe.text_encoder, 0.7))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads), "both waited for each other"
    assert sorted(outcomes) == ["changed", "refused"]


def test_a_pipeline_change_is_not_starved_by_steady_requests():
    from test_diffusion import clip_out, unet_out

    pipe, stop = _pipeline_with_adapter(), threading.Event()

    def traffic(run_once):
        def run():
            while not stop.is_set():
                with torch.no_grad():
                    run_once()
        return run

    workers = [threading.Thread(target=traffic(lambda: unet_out(pipe.unet))) for _ in range(3)]
    workers += [threading.Thread(target=traffic(lambda: clip_out(pipe.text_encoder))) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        finished, _ = _in_thread(lambda: li.diffusers.set_weights(pipe, {"a": 0.5}), timeout=WAIT)
    finally:
        stop.set()
        for worker in workers:
            worker.join(WAIT)
    assert finished, "the change never found both components free"


def test_set_adapter_inside_a_model_wide_block_lasts_as_inside_a_per_thread_one():
    model = _model()
    model.train()
    with li.using_adapter(model, "a"):  # grad on, training mode: model-wide
        li.set_adapter(model, "b")
    assert li.active_adapters(model) == ["b"]
