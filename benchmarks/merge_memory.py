"""Peak memory and wall time of merging an adapter into a checkpoint: ``lora-inject merge`` vs PEFT's load,
merge, save.

    python benchmarks/merge_memory.py  # Llama-shaped, hidden 2048 x 16 layers: 1.9 GB of bf16 in 4 shards
    python benchmarks/merge_memory.py --hidden 1024 --layers 8 --dtype float32 --shards 2

The adapter is r=16 on all seven projections. Each merge runs in its own child process; peak RSS is the
child's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PEFT_MERGE = textwrap.dedent("""
    import sys, torch, transformers, peft
    base, adapter, out, shard = sys.argv[1:]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard)
""")
OURS_MERGE = "import sys; from lora_inject.cli import main; assert main(['merge', *sys.argv[1:], '--quiet']) == 0"
BASELINE = "import torch, safetensors, transformers"  # interpreter + libraries, nothing loaded


def child_peak_mib(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds of ``code`` alone) of a fresh Python child running ``code``."""
    script = (
        f"import time\n_start = time.perf_counter()\n{code}\n_wall = time.perf_counter() - _start\n"
        "import resource, sys\n"
        "sys.stderr.write(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {_wall}\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    line = [line.split() for line in result.stderr.splitlines() if line.startswith("PEAK")][-1]
    return int(line[1]) / 1024, float(line[2])


def make_checkpoint(folder: Path, hidden: int, layers: int, dtype: str, shards: int) -> None:
    import torch
    import transformers as t

    import lora_inject as li

    config = t.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000)
    model = t.LlamaForCausalLM(config).to(getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = f"{int(size / shards * 1.05) // 10**6 + 1}MB"  # a little over a quarter: exactly `shards` files
    model.save_pretrained(folder / "base", max_shard_size=shard)
    (folder / "shard").write_text(shard)
    li.inject(model, targets="all-linear", r=16)
    li.save_adapter(model, folder / "adapter")
    largest = max(p.numel() * p.element_size() for p in li.unload(model).parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    (folder / "sizes").write_text(f"{total} {largest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(Path(args.make), args.hidden, args.layers, args.dtype, args.shards)
        return
    # The parent stays small: a forked child's ru_maxrss starts from its parent's RSS.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make", str(tmp), "--hidden", str(args.hidden),
                        "--layers", str(args.layers), "--dtype", args.dtype, "--shards", str(args.shards)],
                       check=True, capture_output=True)
        total, largest = map(int, (tmp / "sizes").read_text().split())
        base, adapter, shard = str(tmp / "base"), str(tmp / "adapter"), (tmp / "shard").read_text()
        adapter_mib = os.path.getsize(tmp / "adapter" / "adapter_model.safetensors") / 2**20
        count = len(list((tmp / "base").glob("*.safetensors")))
        idle, _ = child_peak_mib(BASELINE)
        ours, ours_s = child_peak_mib(OURS_MERGE, base, adapter, str(tmp / "ours"))
        theirs, theirs_s = child_peak_mib(PEFT_MERGE, base, adapter, str(tmp / "peft"), shard)
    print(f"model {total / 2**20:.0f} MiB {args.dtype} in {count} shards; largest tensor {largest / 2**20:.0f} MiB; "
          f"adapter {adapter_mib:.1f} MiB; python+torch+transformers alone {idle:.0f} MiB")
    print(f"peak RSS: lora-inject merge {ours:.0f} MiB, PEFT load+merge+save {theirs:.0f} MiB "
          f"(above the idle interpreter: {ours - idle:.0f} vs {theirs - idle:.0f} MiB)")
    print(f"wall time: lora-inject merge {ours_s:.1f} s, PEFT {theirs_s:.1f} s ({ours_s / theirs_s:.2f}x)")


if __name__ == "__main__":
    main()
