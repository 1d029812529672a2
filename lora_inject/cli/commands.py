"""The ``lora-inject`` command: ``inspect``, ``merge``, ``export`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
import time

from ..checkpoint.meta import build_on_meta
from ..errors import LoraInjectError


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..config import LoraConfig
    from ..inject import _resolve
    from ..targeting.presets import preset

    start = time.perf_counter()
    model = build_on_meta(args.model, args.bits)
    targets = args.targets or (preset(args.preset) if args.preset else None)
    config = LoraConfig(r=args.r, alpha=args.alpha, targets=targets, dora=args.dora,
                        target_parameters=args.target_parameters)
    if targets is not None or args.target_parameters:
        from ..targeting.plan import resolve

        result = resolve(model, config, "default", every_target_must_match=False)
    else:
        result = _resolve(model, config, "default")
    print(result.table(grouped=not args.full))
    print(f"({time.perf_counter() - start:.2f}s; built on the meta device, no weights read)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..checkpoint.merge import merge_checkpoint

    out = merge_checkpoint(
        args.base, args.adapter, args.out, dtype=args.dtype, force=args.force, verify=args.verify,
        progress=not args.quiet,
    )
    print(f"merged checkpoint written to {out}" + (" (verified)" if args.verify else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ExportError
    from ..formats.gguf import export_gguf

    if Path(args.out).exists() and not args.force:
        raise ExportError(f"{args.out} exists; pass --force to replace it (the new file replaces it whole).")
    out = export_gguf(args.adapter, args.out, base=args.base, outtype=args.outtype)
    print(f"GGUF LoRA adapter written to {out} (run: llama-server -m BASE.gguf --lora {out})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-inject", description="LoRA adapters for any PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="show what LoRA would wrap in a model, without reading its weights")
    inspect.add_argument("model", help="model folder, config.json, or hub id")
    inspect.add_argument("--targets", nargs="+", help="module names, 're:<regex>', or all-linear")
    inspect.add_argument("--target-parameters", nargs="+",
                         help="parameters to adapt directly, e.g. experts.gate_up_proj experts.down_proj gate.weight")
    inspect.add_argument("--preset", help="use a preset's targets (llama, gpt2, bert, t5, vit, whisper)")
    inspect.add_argument("-r", type=int, default=8, help="rank (default 8)")
    inspect.add_argument("--alpha", type=float, default=16.0, help="alpha (default 16)")
    inspect.add_argument("--full", action="store_true", help="one row per module instead of per layer pattern")
    inspect.add_argument("--dora", action="store_true", help="DoRA: count the magnitude vectors too")
    inspect.add_argument("--bits", type=int, choices=[4, 8], help="as loaded with bitsandbytes in 4 or 8 bits (QLoRA)")
    inspect.set_defaults(func=cmd_inspect)

    merge = sub.add_parser("merge", help="fold an adapter into a safetensors checkpoint, streaming")
    merge.add_argument("base", help="base model folder (model.safetensors or sharded with an index)")
    merge.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("out", help="output folder (must not exist unless --force)")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="dtype of the output's float tensors")
    merge.add_argument("--verify", action="store_true", help="spot-check merged rows in float64 before finishing")
    merge.add_argument("--force", action="store_true", help="replace OUT if it exists")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write an adapter as a GGUF LoRA file for llama.cpp / Ollama")
    export.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("out", help="output .gguf file (must not exist unless --force)")
    export.add_argument("--base", required=True, help="base model folder or its config.json (only the config is read)")
    export.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f32", help="tensor type (default f32)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 with LoRA on a small task, end to end")
    demo.add_argument("--out", help="keep the adapter and merged model in this folder")
    demo.add_argument("--epochs", type=int, default=6)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LoraInjectError, FileNotFoundError, OSError) as exc:
        print(f"lora-inject {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
