"""Loading a kohya SDXL LoRA: lora_inject vs diffusers' load_lora_weights, and vs the same tensors as a PEFT folder.

An SDXL-sized UNet (2.6 B parameters, built on meta, then given uninitialised float16 storage) and a kohya file
with SDXL's SGM names for the 722 attention/feed-forward/projection Linear layers of its 70 transformer blocks
(rank 32 in float16: ~160 MiB, as community SDXL LoRAs are). Each load is timed alone (the unload after it is
not), with Python's garbage collector held off during each load (a full collection lands on whichever load
happens to trigger it), the three loaders interleaved in rotating order; ratios of medians.

    python benchmarks/diffusion_load.py            # ~2 minutes on 2 cores, ~6 GB of memory
    python benchmarks/diffusion_load.py --rounds 5 --keep-heap   # no page faults from glibc returning freed heap
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sdxl_unet():
    import diffusers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**SDXL)
    finally:
        torch.set_default_dtype(previous)
    return unet.to_empty(device="cpu").eval().requires_grad_(False)


def lora_paths(unet) -> list[str]:
    return [p for p, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and (".transformer_blocks." in p or p.endswith(("proj_in", "proj_out")))]


def write_files(unet, folder: str, rank: int = 32) -> tuple[str, str]:
    """The kohya file (SGM names) and a PEFT folder with the same tensors; returns their paths."""
    from safetensors.torch import save_file

    from lora_inject.formats.diffusion_names import adaptable_modules, name_table

    sgm = {p[0].path: name for name, p in name_table(unet).items()
           if name.startswith(("input_blocks", "middle_block", "output_blocks"))}
    modules = adaptable_modules(unet)
    kohya, peft = {}, {}
    torch.manual_seed(0)
    for path in lora_paths(unet):
        out_features, in_features = modules[path].weight.shape
        down = torch.randn(rank, in_features, dtype=torch.float16) * 0.01
        up = torch.randn(out_features, rank, dtype=torch.float16) * 0.01
        name = "lora_unet_" + sgm.get(path, path.replace(".", "_"))
        kohya.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": torch.tensor(16.0, dtype=torch.float16)})
        peft.update({f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up})
    kohya_file = os.path.join(folder, "sdxl_lora.safetensors")
    save_file(kohya, kohya_file)
    peft_folder = os.path.join(folder, "peft")
    os.makedirs(peft_folder)
    save_file(peft, os.path.join(peft_folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": lora_paths(unet)}
    with open(os.path.join(peft_folder, "adapter_config.json"), "w") as handle:
        json.dump(config, handle)
    return kohya_file, peft_folder


def loaders(unet, kohya_file: str, peft_folder: str) -> dict:
    """``{name: (load, unload)}``."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    import lora_inject as li

    class Pipe(StableDiffusionXLLoraLoaderMixin):  # diffusers' loader on the one component it needs here
        hf_device_map, components, text_encoder, text_encoder_2 = None, {}, None, None

    pipe = Pipe()
    pipe.unet = unet
    return {
        "lora_inject (kohya file)": (lambda: li.load_adapter(unet, kohya_file, adapter="k"),
                                     lambda: li.delete_adapter(unet, "k")),
        "lora_inject (PEFT folder)": (lambda: li.load_adapter(unet, peft_folder, adapter="p"),
                                      lambda: li.delete_adapter(unet, "p")),
        "diffusers load_lora_weights": (lambda: pipe.load_lora_weights(kohya_file, adapter_name="d"),
                                        lambda: pipe.unload_lora_weights()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-heap", action="store_true", help="glibc keeps freed heap (see common.py)")
    args = parser.parse_args()
    if args.keep_heap:
        sys.path.insert(0, os.path.dirname(__file__))
        from common import keep_freed_heap

        keep_freed_heap()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    unet = sdxl_unet()
    with tempfile.TemporaryDirectory() as folder:
        kohya_file, peft_folder = write_files(unet, folder)
        size = os.path.getsize(kohya_file) / 2**20
        print(f"SDXL UNet: {sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B parameters; kohya file "
              f"{len(lora_paths(unet))} modules, {size:.0f} MiB")
        fns = loaders(unet, kohya_file, peft_folder)
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for round_ in range(args.rounds + 1):  # the first round warms caches and is dropped
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                load, unload = fns[name]
                gc.collect()
                gc.disable()  # a full collection over the UNet's ~100k objects costs ~0.25 s wherever it lands
                start = time.perf_counter()
                load()
                elapsed = time.perf_counter() - start
                gc.enable()
                unload()
                if round_:
                    times[name].append(elapsed)
        medians = {name: statistics.median(t) for name, t in times.items()}
        reference = medians["diffusers load_lora_weights"]
        for name, seconds in medians.items():
            print(f"{name:30s} {seconds:7.2f} s   {seconds / reference:5.2f}x diffusers   "
                  f"{seconds / medians['lora_inject (PEFT folder)']:5.2f}x PEFT folder   "
                  f"(rounds: {', '.join(f'{t:.2f}' for t in times[name])})")


if __name__ == "__main__":
    sys.exit(main())
