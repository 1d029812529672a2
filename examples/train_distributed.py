"""LoRA training on several processes with DDP or FSDP2; saves the adapter from rank 0.

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode ddp
    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode fsdp2 --out out/adapter
    accelerate launch --multi_gpu --num_processes 2 examples/train_distributed.py --mode ddp   # GPUs
    python examples/train_distributed.py          # one process

Runs on CPU (gloo) as written, with a tiny Llama built from a config, so nothing is
downloaded; on GPUs (nccl) each rank uses its own device. Pass --model PATH to train a real
checkpoint instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import transformers

import lora_inject as li
import lora_inject.distributed as lid


def build(model_path: str | None) -> torch.nn.Module:
    torch.manual_seed(0)  # identical base and adapter init on every rank (or: lid.broadcast_adapters)
    if model_path:
        return transformers.AutoModelForCausalLM.from_pretrained(model_path)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=1000)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--model", help="a local transformers checkpoint (default: a tiny Llama)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="out/adapter")
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    args = parser.parse_args()

    if "RANK" not in os.environ:  # plain `python`, or `accelerate launch --cpu` (one process): a group of one
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build(args.model).to(device)
    li.inject(model, r=8, alpha=16)  # 1. inject into the plain model (the preset picks the targets)
    if args.checkpointing:
        li.hf.enable_gradient_checkpointing(model, reentrant=False)
    if args.mode == "ddp":  # 2. then wrap
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
    vocab = model.config.vocab_size
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (4, 64), generator=generator).to(device)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f}")

    saved = lid.save_adapter(wrapped if args.mode == "ddp" else model, args.out)  # 3. gather, rank 0 writes
    if saved:
        print(f"adapter saved to {saved} ({li.trainable_parameters(model).trainable:,} trainable parameters)")
    dist.destroy_process_group()
    if not cuda:
        leave_without_teardown()


def leave_without_teardown() -> None:
    """Exit without Python's interpreter teardown (gloo only; everything is written by now).

    With torch 2.13, gloo's worker threads outlive ``destroy_process_group`` and still hold
    the last collective's tensors; one that releases them while the interpreter shuts down
    aborts the process ("terminate called without an active exception", 5 of ~290 runs
    here). See pytorch/pytorch#179291.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
