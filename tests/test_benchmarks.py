"""The benchmark helpers do what their figures claim (no timing here: benchmarks/ measures that)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import tiny_llama

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import common  # noqa: E402


def _counting(monkeypatch, name):
    calls = []
    original = getattr(torch.Tensor, name) if name.endswith("_") else getattr(torch, name)

    def counted(*args, **kwargs):
        calls.append(tuple(a.shape for a in args if isinstance(a, torch.Tensor)))
        return original(*args, **kwargs)

    if name.endswith("_"):
        monkeypatch.setattr(torch.Tensor, name, counted)
    else:
        monkeypatch.setattr(torch, name, counted)
    return calls


def test_adapter_gemms_runs_exactly_the_gemms_of_an_exact_lora_step(monkeypatch):
    """Seven targets in 2 layers (14 modules): 1 + 3 mm each, 1 + 1 addmm_ each but the first layer's q/k/v."""
    model = tiny_llama()
    step = common.adapter_gemms(model, tokens=6, r=2)
    mm, addmm = _counting(monkeypatch, "mm"), _counting(monkeypatch, "addmm_")
    before = [p.detach().clone() for p in _adamw_params(step)]
    step()
    assert len(mm) == 14 * 4
    assert len(addmm) == 14 * 2 - 3
    assert (6, 32) in {shapes[0] for shapes in mm}  # x (tokens, in) of a 32-wide projection
    after = list(_adamw_params(step))
    assert len(after) == 28 and all(not torch.equal(a, b) for a, b in zip(after, before))  # AdamW moved A and B
    assert all(p.grad is None for p in after)  # and zero_grad(set_to_none) ran


def test_adapter_gemms_for_inference_runs_the_forward_gemms_only(monkeypatch):
    step = common.adapter_gemms(tiny_llama(), tokens=6, r=2, train=False)
    mm, addmm = _counting(monkeypatch, "mm"), _counting(monkeypatch, "addmm_")
    step()
    assert (len(mm), len(addmm)) == (14, 14)


def _adamw_params(step):
    optimizer = next(c.cell_contents for c in step.__wrapped__.__closure__
                     if isinstance(c.cell_contents, torch.optim.Optimizer))
    return [p for group in optimizer.param_groups for p in group["params"]]


def test_page_fault_counter_records_one_count_per_call():
    wrapped, faults = common.counting_page_faults({"a": lambda: torch.ones(1 << 20), "b": lambda: None})
    for _ in range(3):
        wrapped["a"](), wrapped["b"]()
    if sys.platform.startswith("linux"):
        assert len(faults["a"]) == len(faults["b"]) == 3
        assert all(isinstance(n, int) and n >= 0 for n in faults["a"] + faults["b"])


def test_keep_freed_heap_and_the_command_line(tmp_path):
    """In a child process: mallopt is process-wide, not something to leave behind in the test run."""
    code = f"import sys; sys.path.insert(0, {BENCHMARKS!r}); import common; print(common.keep_freed_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out in ("True", "False")
    if sys.platform.startswith("linux"):
        assert out == "True"  # glibc here
    usage = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "run.py"), "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "--keep-heap" in usage and "train" in usage
    refused = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "run.py"), "nonsense"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown sections" in refused.stderr


def test_runs_report_every_figure_as_its_range():
    from runs import merge_runs

    outputs = [["step: ours 0.95x PEFT, batch 64", "saved 164.0 MiB"],
               ["step: ours 0.91x PEFT, batch 64", "saved 164.0 MiB"],
               ["step: ours 1.02x PEFT, batch 64", "saved 164.0 MiB", "extra"]]
    merged = merge_runs(outputs)
    assert merged[0] == "step: ours 0.91-1.02x PEFT, batch 64"
    assert merged[1] == "saved 164.0 MiB"
    assert "only the common ones" in merged[2]
    assert merge_runs([["a 1 b"], ["c 2 d"]])[0].startswith("(runs disagree")
