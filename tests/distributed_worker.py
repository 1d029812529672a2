"""Run under ``torchrun --nproc_per_node 2``: LoRA under DDP, FSDP2 and FSDP1 on CPU (gloo).

Every scenario trains a tiny Llama for a few steps with a different batch on each rank and
checks the adapter against one process trained on the concatenated batch. Rank 0 writes
``{scenario: "ok" | error text}`` as JSON to the path given as the first argument.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

import lora_inject as li  # noqa: E402
import lora_inject.distributed as lid  # noqa: E402

warnings.filterwarnings("ignore")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, LR = 3, 1e-2


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def batches():
    """Per step: the batch of every rank, (world, 2, 8) token ids; identical on all ranks."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 100, (world(), 2, 8), generator=g) for _ in range(STEPS)]


def fresh(dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype)
    return li.inject(model, targets=SEVEN, r=4, alpha=8)


def train(model, params_of, local: bool, checkpointing: bool = False):
    optimizer = torch.optim.AdamW(params_of(model), lr=LR)
    for step in batches():
        ids = step[rank()] if local else step.reshape(-1, step.shape[-1])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def reference(dtype=torch.float32):
    """One process, the concatenated batch."""
    return li.lora_state_dict(train(fresh(dtype), trainable, local=False))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_against_reference(state: dict, ref: dict, atol=1e-5, rel=None) -> None:
    assert state.keys() == ref.keys(), sorted(set(state) ^ set(ref))[:4]
    if rel is None:
        worst = max((full(state[k]).float() - ref[k].float()).abs().max().item() for k in ref)
        assert worst <= atol, f"adapter differs from single-process training by {worst:.3g}"
    else:  # bf16 matmuls round differently for a batch of 2 and of 4; AdamW amplifies sign flips of tiny grads
        ours = torch.cat([full(state[k]).float().flatten() for k in sorted(ref)])
        theirs = torch.cat([ref[k].float().flatten() for k in sorted(ref)])
        error = ((ours - theirs).norm() / theirs.norm()).item()
        assert error <= rel, f"adapter differs from single-process training by {error:.1%} (relative)"
    flat = torch.cat([full(state[k]).float().flatten() for k in sorted(state)])
    gathered = [torch.zeros_like(flat) for _ in range(world())]
    dist.all_gather(gathered, flat)
    drift = max((g - gathered[0]).abs().max().item() for g in gathered)
    assert drift == 0.0, f"ranks hold different adapters (max difference {drift:.3g})"


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


# ----- scenarios --------------------------------------------------------------------------------
def scenario_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = fresh()
    train(DDP(model), trainable, local=True)
    check_against_reference(li.lora_state_dict(model), reference())


def scenario_ddp_checkpointing():
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = fresh()
    li.hf.enable_gradient_checkpointing(model, reentrant=False)
    model.train()
    train(DDP(model), trainable, local=True)
    check_against_reference(li.lora_state_dict(model), reference())


def scenario_fsdp2_and_save():
    model = shard(fresh())
    train(model, trainable, local=True)
    ref = reference()
    check_against_reference(li.lora_state_dict(model), ref)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter" if rank() == 0 else None
        shared = [str(folder)]
        dist.broadcast_object_list(shared, src=0)
        written = lid.save_adapter(model, shared[0])
        assert (written is not None) == (rank() == 0)
        if rank() == 0:
            plain = li.load_adapter(tiny_llama(), shared[0])
            loaded = li.lora_state_dict(plain)
            worst = max((loaded[k] - ref[k]).abs().max().item() for k in ref)
            assert worst <= 1e-5, f"saved adapter differs by {worst:.3g}"
        dist.barrier()


def scenario_fsdp2_checkpointing():
    model = fresh()
    li.hf.enable_gradient_checkpointing(model, reentrant=False)
    model.train()
    train(shard(model), trainable, local=True)
    check_against_reference(li.lora_state_dict(model), reference())


def scenario_fsdp2_bf16_base():
    model = fresh(torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    train(shard(model), trainable, local=True)
    check_against_reference(li.lora_state_dict(model), reference(torch.bfloat16), rel=0.05)


def scenario_fsdp2_load_adapter():
    with tempfile.TemporaryDirectory() as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)
        folder = Path(shared[0]) / "adapter"
        if rank() == 0:
            torch.manual_seed(7)
            source = li.inject(tiny_llama(), targets=SEVEN, r=4, alpha=8, init=False)
            li.save_adapter(source, folder)
        dist.barrier()
        sharded = shard(fresh())
        lid.load_adapter_weights(sharded, folder)
        torch.manual_seed(0)  # the same base weights as fresh()
        plain = li.load_adapter(tiny_llama(), folder)
        base = tiny_llama()
        ids = batches()[0][rank()]
        with torch.no_grad():
            got, want = sharded(input_ids=ids).logits, plain(input_ids=ids).logits
            assert (want - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter does something
        difference = (got - want).abs().max().item()
        assert difference < 1e-5, f"sharded model with the loaded adapter differs by {difference:.3g}"
        dist.barrier()


def scenario_fsdp2_meta_init():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if rank() == 0:
        model = fresh()
        full_state = copy.deepcopy(model.state_dict())
    else:
        with torch.device("meta"):
            model = tiny_llama()
        li.inject(model, targets=SEVEN, r=4, alpha=8)
        full_state = {}
    shard(model)
    model.to_empty(device="cpu")
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    rotary = model.model.rotary_emb  # non-persistent buffers are not in any state dict
    rebuilt = type(rotary)(config=model.config)
    for name, buffer in rebuilt.named_buffers():
        rotary.get_buffer(name).copy_(buffer)
    train(model, trainable, local=True)
    check_against_reference(li.lora_state_dict(model), reference())


def scenario_fsdp1_adapter_units():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = fresh()
    n_trainable = sum(p.numel() for p in trainable(model))
    policy = lid.fsdp1_auto_wrap_policy(model, {LlamaDecoderLayer})
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
    flat_trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    units = sum(1 for m in wrapped.modules() if isinstance(m, FSDP))
    assert flat_trainable * world() <= n_trainable + units * world(), (flat_trainable, n_trainable)
    train(wrapped, trainable, local=True)
    state = lid.gather_adapter_state(wrapped)
    if rank() == 0:
        ref = reference()
        worst = max((state[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= 1e-5, f"FSDP1 adapter differs by {worst:.3g}"
    dist.barrier()


def scenario_broadcast_init():
    torch.manual_seed(0)
    model = tiny_llama()
    torch.manual_seed(100 + rank())  # a rank-dependent adapter init: the silent failure
    li.inject(model, targets=SEVEN, r=4, alpha=8)
    before = li.lora_state_dict(model)["model.layers.0.self_attn.q_proj.lora_A.default.weight"].clone()
    lid.broadcast_adapters(model)
    state = li.lora_state_dict(model)
    if rank() != 0:
        assert not torch.equal(before, state["model.layers.0.self_attn.q_proj.lora_A.default.weight"])
    flat = torch.cat([state[k].flatten() for k in sorted(state)])
    gathered = [torch.zeros_like(flat) for _ in range(world())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks still differ after broadcast_adapters"


def scenario_guards_on_sharded_model():
    model = shard(fresh())
    for call in (li.merge_and_unload, li.merge, li.unmerge, li.unload,
                 lambda m: li.inject(m, targets=["q_proj"], adapter="x")):
        try:
            call(model)
        except li.DistributedError as exc:
            assert "FSDP" in str(exc) or "sharded" in str(exc), str(exc)
        else:
            raise AssertionError("a sharded model was merged/injected without an error")
    with tempfile.TemporaryDirectory() as tmp:  # whole-tensor reads and writes name the call that works
        for call, advice in ((lambda m: li.save_adapter(m, tmp), "save_adapter"),
                             (lambda m: m.save_pretrained(tmp), "save_adapter"),
                             (lambda m: li.load_adapter_weights(m, tmp), "load_adapter_weights")):
            try:
                call(model)
            except li.DistributedError as exc:
                assert f"lora_inject.distributed.{advice}(" in str(exc) and "every rank" in str(exc), str(exc)
            else:
                raise AssertionError("a sharded model's adapter was read or written without an error")
        assert not list(Path(tmp).iterdir()), "something was written from a sharded model"
    state = li.lora_state_dict(model)  # works: the keys of the plain model, the values this rank's DTensors
    assert state and all(type(v).__name__ == "DTensor" and ".default." in k for k, v in state.items())


def scenario_save_failure_reaches_every_rank():
    model = shard(fresh())
    with tempfile.TemporaryDirectory() as tmp:
        blocker = Path(tmp) / "a_file"
        blocker.write_text("a file where rank 0 is told to make a folder")
        try:
            lid.save_adapter(model, blocker / "adapter")
        except Exception as error:  # noqa: BLE001 - the type is the point of the check
            raised = error
        else:
            raised = None
        expected = NotADirectoryError if rank() == 0 else li.DistributedError
        assert isinstance(raised, expected), f"rank {rank()} got {raised!r}, expected {expected.__name__}"
        if rank() != 0:
            assert "rank 0 could not write" in str(raised) and "NotADirectoryError" in str(raised), str(raised)
        shared = [str(Path(tmp) / "adapter")]
        dist.broadcast_object_list(shared, src=0)  # the ranks are still in step: the next save works
        lid.save_adapter(model, shared[0])
        for name in ("adapter_model.safetensors", "adapter_config.json"):  # complete when any rank returns
            assert (Path(shared[0]) / name).is_file(), f"rank {rank()} returned before rank 0 wrote {name}"
        dist.barrier()


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    wanted = sys.argv[2:] or [n for n in globals() if n.startswith("scenario_")]
    for name in wanted:
        try:
            globals()[name]()
            outcome = "ok"
        except Exception:
            outcome = traceback.format_exc(limit=6)
        outcomes = [None] * world()
        dist.all_gather_object(outcomes, outcome)
        results[name.removeprefix("scenario_")] = next((o for o in outcomes if o != "ok"), "ok")
    if rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
