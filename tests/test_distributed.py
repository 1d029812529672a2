"""DDP, FSDP2 and FSDP1 with two processes (gloo, CPU): one torchrun launch, one test per scenario."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = [
    "ddp", "ddp_checkpointing", "fsdp2_and_save", "fsdp2_checkpointing", "fsdp2_bf16_base",
    "fsdp2_load_adapter", "fsdp2_meta_init", "fsdp1_adapter_units", "broadcast_init", "guards_on_sharded_model",
    "save_failure_reaches_every_rank",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    worker = Path(__file__).with_name("distributed_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if not out.is_file():
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_distributed(results, scenario):
    assert results.get(scenario) == "ok", results.get(scenario, "scenario did not run")


def test_every_scenario_is_listed():
    text = Path(__file__).with_name("distributed_worker.py").read_text()
    defined = {line.split("(")[0].removeprefix("def scenario_") for line in text.splitlines()
               if line.startswith("def scenario_")}
    assert defined == set(SCENARIOS)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_example_script_runs_as_documented(mode, tmp_path):
    import lora_inject as li

    script = Path(__file__).parent.parent / "examples" / "train_distributed.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--mode", mode, "--steps", "3", "--out", str(tmp_path / "adapter")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapter saved" in proc.stdout
    config = li.read_adapter_config(tmp_path / "adapter")
    assert config.r == 8 and sorted(li.read_adapter_tensors(tmp_path / "adapter"))
