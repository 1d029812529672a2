"""DeepSpeed ZeRO-3, two ranks on the CPU accelerator (tests/deepspeed_worker.py under torchrun), against one
process: training, the saved adapter (here and in PEFT), resume, inject under ``zero.Init``, and the refusals of
what cannot work on partitioned parameters. DeepSpeed's CPU communication op compiles once (~1 min, cached in
``TORCH_EXTENSIONS_DIR``); each launch then takes ~15 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_inject as li

pytest.importorskip("deepspeed", reason="deepspeed is not installed (the test extra installs it)")
WORKER = Path(__file__).with_name("deepspeed_worker.py")
sys.path.insert(0, str(WORKER.parent))
import deepspeed_worker as worker  # noqa: E402


def _launch(scenario: str, out: Path) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), scenario, str(out)], env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3-train")
    return _launch("train", out), out


def _single_process_training():
    """The same steps in one process: both ranks' micro-batches as one batch (DeepSpeed averages gradients)."""
    model = worker.model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=worker.LR,
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for step in range(worker.STEPS):
        ids = torch.cat([worker.batch(step, 0), worker.batch(step, 1)])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _outputs(model):
    ids = torch.arange(12).reshape(2, 6) % 100
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_two_rank_training_saves_the_single_process_adapter(trained):
    _, out = trained
    reference = _single_process_training()
    expected = li.formats.save.adapter_tensors(reference)
    saved = li.read_adapter_tensors(out / "trained")
    assert sorted(saved) == sorted(expected) and all(v.numel() > 0 for v in saved.values())
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=1e-5, msg=key)
    targets = li.adapter_configs(reference)["default"].targets
    assert sorted(li.read_adapter_config(out / "trained").targets) == sorted(targets)


def test_the_saved_adapter_loads_here_and_in_peft_to_equal_outputs(trained):
    from peft import PeftModel

    _, out = trained
    reference = _single_process_training()
    torch.manual_seed(0)
    ours = li.load_adapter(worker.LlamaForCausalLM(worker.LlamaConfig(**worker.CONFIG)), out / "trained")
    torch.manual_seed(0)
    theirs = PeftModel.from_pretrained(worker.LlamaForCausalLM(worker.LlamaConfig(**worker.CONFIG)), out / "trained")
    torch.testing.assert_close(_outputs(ours), _outputs(reference), rtol=0, atol=1e-5)
    torch.testing.assert_close(_outputs(theirs), _outputs(ours), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["trained", "dora"])
def test_resume_puts_the_saved_weights_back_optimizer_copies_included(trained, name):
    """Loaded into a fresh engine, then one step at lr=0: still the file (DeepSpeed's float32 copies took it)."""
    _, out = trained
    saved = li.read_adapter_tensors(out / name)
    resumed = li.read_adapter_tensors(out / ("dora-resumed" if name == "dora" else "resumed"))
    assert sorted(saved) == sorted(resumed)
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_zero2_resume_through_the_engine(tmp_path):
    result = _launch("stage2", tmp_path)
    saved = li.read_adapter_tensors(tmp_path / "trained")
    for folder in ("resumed", "resumed-module"):  # the engine given, or the module inside it
        resumed = li.read_adapter_tensors(tmp_path / folder)
        assert sorted(saved) == sorted(resumed) and all(torch.equal(saved[k], resumed[k]) for k in saved), folder
    assert "keeps its own float32 copy" in result["plain_load"]
    reference = li.formats.save.adapter_tensors(_single_process_training())
    for key, tensor in reference.items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=1e-5, msg=key)


def test_counts_and_plans_read_the_partitioned_shapes(trained):
    result, _ = trained
    reference = worker.model()
    assert result["trainable"] == list(li.trainable_parameters(reference))
    assert result["plan"] == str(li.plan(reference, adapter="probe", **worker.INJECT))
    assert result["plan_dora"] == str(li.plan(reference, adapter="probe", dora=True, **worker.INJECT))
    assert "32x32" in result["plan"]
    assert "deepspeed.initialize has already taken this model over" in result["early_inject"]
    assert "this is a DeepSpeed engine" in result["engine"] and "pass engine.module" in result["engine"]


def test_saving_inside_the_callers_own_gather(trained):
    _, out = trained
    saved, inside = li.read_adapter_tensors(out / "trained"), li.read_adapter_tensors(out / "inside-gather")
    assert sorted(saved) == sorted(inside) and all(torch.equal(saved[k], inside[k]) for k in saved)


@pytest.mark.parametrize("call,says", [
    ("save_adapter", "partitioned by DeepSpeed ZeRO-3.*lora_inject.distributed.save_adapter"),
    ("load_adapter_weights", "partitioned by DeepSpeed ZeRO-3.*load_adapter_weights"),
    ("merge", "lost when DeepSpeed partitions them again.*lora-inject merge"),
    ("merge_and_unload", "lost when DeepSpeed partitions them again"),
    ("inject_after_initialize", "deepspeed.initialize has already taken this model over"),
])
def test_what_cannot_work_on_partitioned_parameters_is_refused_by_name(trained, call, says):
    import re

    result, _ = trained
    assert re.search(says, result["refusals"][call], re.DOTALL), result["refusals"][call]


def test_inject_under_zero_init_initialises_every_factor_as_outside_it(tmp_path):
    norms = _launch("zero_init", tmp_path)
    for name, options in (("lora", {}), ("dora", {"dora": True})):
        expected = li.formats.save.adapter_tensors(worker.model(**options))
        saved = li.read_adapter_tensors(tmp_path / name)
        assert sorted(saved) == sorted(expected)
        for key, tensor in expected.items():
            if key.endswith("lora_magnitude_vector"):
                continue  # depends on the base weights, which zero.Init initialises differently
            assert torch.equal(saved[key], tensor), (name, key)
    magnitude = li.read_adapter_tensors(tmp_path / "dora")["model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    torch.testing.assert_close(magnitude, torch.tensor(norms["dora"]), rtol=1e-6, atol=0)
    assert magnitude.min() > 0
    assert norms["pissa"] < 1e-5  # residual + principal part == the original weight, partitioned
    assert "Cannot inject modules_to_save" in norms["modules_to_save"]
    assert norms["modules_to_save"].endswith("adapters left: {}")


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3-trainer")
    _launch("trainer", out)
    return out


def test_trainers_save_the_whole_adapter_whatever_the_gather_setting(trainers):
    """transformers' Trainer (plain, on an injected model) and AdapterTrainer, DeepSpeed's default
    stage3_gather_16bit_weights_on_model_save=false: save_model writes the adapter itself, complete."""
    import stat

    tmp_path = trainers
    expected_keys = sorted(li.formats.save.adapter_tensors(worker.model()))
    for name in ("plain", "adapter"):
        saved = li.read_adapter_tensors(tmp_path / f"trainer-{name}")
        direct = li.read_adapter_tensors(tmp_path / f"direct-{name}")
        assert sorted(saved) == expected_keys
        assert all(torch.equal(saved[k], direct[k]) and saved[k].numel() > 0 for k in saved)
        assert not torch.equal(saved["model.layers.0.self_attn.q_proj.lora_B.weight"],
                               torch.zeros_like(saved["model.layers.0.self_attn.q_proj.lora_B.weight"]))  # trained
        weights = tmp_path / f"trainer-{name}" / "adapter_model.safetensors"
        assert weights.stat().st_mode & stat.S_IROTH  # readable by others, as any saved file


def test_trainer_resume_from_a_checkpoint_equals_straight_training(trainers):
    """AdapterTrainer under ZeRO-3: 3 steps straight, against 2 steps, a checkpoint, and a fresh run resumed
    from it (DeepSpeed's own checkpoint carries the optimizer state) for the last step."""
    tmp_path = trainers
    straight = li.read_adapter_tensors(tmp_path / "trainer-adapter")
    resumed = li.read_adapter_tensors(tmp_path / "trainer-resumed")
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
