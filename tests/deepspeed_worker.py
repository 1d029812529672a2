"""Two-rank DeepSpeed ZeRO-3 scenarios on the CPU accelerator, launched by tests/test_deepspeed.py through torchrun.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/deepspeed_worker.py SCENARIO OUT_DIR

Every parameter is really partitioned (``stage3_param_persistence_threshold: 0``: each rank holds a ``(0,)``
placeholder). Rank 0 writes what the test checks into OUT_DIR (``result.json`` and adapter folders).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402 (resolved now: importing lazily under

#   zero.Init, whose tensor patches torch._dynamo's import checks, fails)
import lora_inject as li  # noqa: E402

STEPS, LR = 3, 1e-2
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=100, max_position_embeddings=64)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the one-process reference does not clip
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                              "torch_adam": True}},
}
INJECT = dict(targets=["q_proj", "v_proj", "gate_proj"], r=4, alpha=8)


def batch(step: int, rank: int) -> torch.Tensor:
    """The micro-batch of ``rank`` at ``step`` (the test rebuilds the global batch from these)."""
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1000 * step + rank))


def model(**inject) -> LlamaForCausalLM:
    torch.manual_seed(0)
    built = LlamaForCausalLM(LlamaConfig(**CONFIG))
    torch.manual_seed(1)
    return li.inject(built, **{**INJECT, **inject})


def engine_for(module, stage: int = 3, lr: float = LR):
    params = [p for p in module.parameters() if p.requires_grad]
    config = {**DS_CONFIG, "zero_optimization": {**DS_CONFIG["zero_optimization"], "stage": stage}}
    config["optimizer"] = {**config["optimizer"], "params": {**config["optimizer"]["params"], "lr": lr}}
    return deepspeed.initialize(model=module, model_parameters=params, config=config)[0]


def step(engine, index: int, rank: int) -> None:
    ids = batch(index, rank)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def resumed(saved: str, out: str, rank: int, stage: int = 3, given: str = "engine", **inject) -> None:
    """A fresh model (other factors) takes the saved weights back, then one step at lr=0: what it saves must be
    the file again (the optimizer's own float32 copies must have taken the file's values too). ``given``: the
    engine or the module inside it."""
    fresh = engine_for(model(init=False, **inject), stage=stage, lr=0.0)
    li.distributed.load_adapter_weights(fresh if given == "engine" else fresh.module, saved)
    step(fresh, 0, rank)
    li.distributed.save_adapter(fresh, out)


def refusals(module) -> dict[str, str]:
    """What each call that cannot work on partitioned parameters says (it must raise DistributedError)."""
    calls = {
        "save_adapter": lambda: li.save_adapter(module, "/nonexistent/never-written"),
        "merge": lambda: li.merge(module),
        "merge_and_unload": lambda: li.merge_and_unload(module),
        "inject_after_initialize": lambda: li.inject(module, targets=["k_proj"], adapter="late"),
        "load_adapter_weights": lambda: li.load_adapter_weights(module, "/nonexistent"),
    }
    said = {}
    for name, call in calls.items():
        try:
            call()
            said[name] = "no error"
        except li.DistributedError as error:
            said[name] = str(error)
        except Exception as error:  # noqa: BLE001 (reported to the test, which fails on it)
            said[name] = f"{type(error).__name__}: {error}"
    return said


def train(out: str, rank: int) -> dict:
    untouched = engine_for(model())
    try:  # initialize hooks the model before any forward: adding an adapter now must be refused too
        li.inject(untouched.module, targets=["k_proj"], adapter="late")
        early = "no error"
    except li.DistributedError as error:
        early = str(error)
    engine = engine_for(model())
    for index in range(STEPS):
        step(engine, index, rank)
    result = {"trainable": li.trainable_parameters(engine.module), "early_inject": early,
              "plan": str(li.plan(engine.module, adapter="probe", **INJECT)),
              "plan_dora": str(li.plan(engine.module, adapter="probe", dora=True, **INJECT)),
              "refusals": refusals(engine.module)}
    li.distributed.save_adapter(engine, os.path.join(out, "trained"))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a caller's own gather
        li.distributed.save_adapter(engine, os.path.join(out, "inside-gather"))
    try:
        li.save_adapter(engine, "/nonexistent/never-written")
        result["engine"] = "no error"
    except li.DistributedError as error:
        result["engine"] = str(error)
    resumed(os.path.join(out, "trained"), os.path.join(out, "resumed"), rank)
    dora = engine_for(model(dora=True))
    step(dora, 0, rank)
    li.distributed.save_adapter(dora, os.path.join(out, "dora"))
    resumed(os.path.join(out, "dora"), os.path.join(out, "dora-resumed"), rank, dora=True)
    return result


def stage2(out: str, rank: int) -> dict:
    """ZeRO-2: weights whole on every rank (li.save_adapter works on the module); resume through the engine."""
    engine = engine_for(model(), stage=2)
    for index in range(STEPS):
        step(engine, index, rank)
    if rank == 0:
        li.save_adapter(engine.module, os.path.join(out, "trained"))
    dist.barrier()
    resumed(os.path.join(out, "trained"), os.path.join(out, "resumed"), rank, stage=2)
    resumed(os.path.join(out, "trained"), os.path.join(out, "resumed-module"), rank, stage=2, given="module")
    try:  # the plain loader would write the parameters and leave DeepSpeed's float32 copies behind
        li.load_adapter_weights(engine.module, os.path.join(out, "trained"))
        refused = "no error"
    except li.DistributedError as error:
        refused = str(error)
    return {"stage2": "saved", "plain_load": refused}


def zero_init(out: str, rank: int) -> dict:
    """Inject inside deepspeed.zero.Init (plain LoRA and DoRA): saved with the base's row norms, which DoRA's
    magnitudes must equal (zero.Init initialises base weights its own way, so a plain model has others)."""
    results = {}
    for name, options in (("lora", {}), ("dora", {"dora": True})):
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
            built = model(**options)
        engine = engine_for(built)
        li.distributed.save_adapter(engine, os.path.join(out, name))
        weight = engine.module.model.layers[0].self_attn.q_proj.base_layer.weight
        with deepspeed.zero.GatheredParameters([weight]):
            results[name] = weight.detach().norm(dim=1).tolist()  # DoRA's magnitudes start as these row norms
    results["pissa"] = _pissa_under_zero_init()
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        torch.manual_seed(0)
        built = LlamaForCausalLM(LlamaConfig(**CONFIG))
        try:
            li.inject(built, targets=["q_proj"], modules_to_save=["lm_head"])
            results["modules_to_save"] = "no error"
        except li.DistributedError as error:
            results["modules_to_save"] = str(error) + f" | adapters left: {li.adapter_configs(built)}"
    return results


def _pissa_under_zero_init() -> float:
    """PiSSA rewrites the base weight into residual + principal part: partitioned, the sum must stay W."""
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        torch.manual_seed(0)
        built = LlamaForCausalLM(LlamaConfig(**CONFIG))
        weight = built.model.layers[0].self_attn.q_proj.weight
        with deepspeed.zero.GatheredParameters([weight]):
            original = weight.detach().clone()
        li.inject(built, **{**INJECT, "init": "pissa"})
    layer = engine_for(built).module.model.layers[0].self_attn.q_proj
    parts = [layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    with deepspeed.zero.GatheredParameters(parts):
        whole = parts[0] + layer.scaling["default"] * parts[2] @ parts[1]
        return float((whole - original).abs().max())


def trainer(out: str, rank: int) -> dict:
    """HF Trainer (plain, on an injected model) and AdapterTrainer under DeepSpeed, with DeepSpeed's default
    ``stage3_gather_16bit_weights_on_model_save: false``: save_model writes the whole adapter."""
    from transformers import Trainer, TrainingArguments

    from lora_inject.hf import AdapterTrainer

    rows = [{"input_ids": batch(step, r)[i].tolist(), "labels": batch(step, r)[i].tolist()}
            for step in range(STEPS) for r in range(2) for i in range(2)]
    def arguments(name: str, **options) -> TrainingArguments:
        return TrainingArguments(os.path.join(out, f"run-{name}"), per_device_train_batch_size=2, max_steps=STEPS,
                                 learning_rate=LR, report_to=[], use_cpu=True, save_strategy="steps", save_steps=1,
                                 max_grad_norm=0.0, deepspeed={**DS_CONFIG, "train_micro_batch_size_per_gpu": "auto"},
                                 **options)

    # plain Trainer: checkpoints every step, the best one (lowest eval loss) loaded back at the end
    # AdapterTrainer: checkpoints every step; then a second run resumes from step 2 and finishes
    runs = {"plain": (Trainer, dict(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True)),
            "adapter": (AdapterTrainer, {})}
    for name, (cls, options) in runs.items():  # arguments made just before their Trainer (accelerate's state)
        run = cls(model=model(), args=arguments(name, **options), train_dataset=rows, eval_dataset=rows[:4])
        run.train()
        run.save_model(os.path.join(out, f"trainer-{name}"))
        li.distributed.save_adapter(run.model_wrapped, os.path.join(out, f"direct-{name}"))
    again = AdapterTrainer(model=model(init=False), args=arguments("adapter"), train_dataset=rows)
    again.train(resume_from_checkpoint=os.path.join(out, "run-adapter", "checkpoint-2"))
    again.save_model(os.path.join(out, "trainer-resumed"))
    return {"trainer": "saved"}


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    result = {"train": train, "stage2": stage2, "zero_init": zero_init, "trainer": trainer}[scenario](out, rank)
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's worker threads can outlive destroy_process_group and abort the interpreter at exit (1-2.5% of runs,
    # pytorch/pytorch#179291) after everything is written: leave without running that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
