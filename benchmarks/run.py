"""lora_inject vs PEFT, side by side in one process: ratios of medians, interleaved.

    python benchmarks/run.py            # everything (a few minutes on 2 cores)
    python benchmarks/run.py train infer decode dora conv overhead inject merge
    python benchmarks/run.py train infer --device cuda --dtype bfloat16
    python benchmarks/run.py train --keep-heap  # no page-fault noise from glibc's heap trimming
    python benchmarks/run.py train infer --runs 5  # each section in 5 fresh processes, figures as ranges
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    SEVEN,
    TARGET,
    adapter_gemms,
    counting_page_faults,
    keep_freed_heap,
    llama,
    ours,
    paired_ratio,
    peft,
    rotating_ratios,
    saved_bytes,
    token_ids,
)


def overhead_ratio(ours_vs_base: float, peft_vs_base: float) -> float:
    """Our time above the base's, as a fraction of PEFT's time above it."""
    return (ours_vs_base - 1) / max(1e-9, peft_vs_base - 1)


def _train_step(model, ids, optimizer):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _frozen_base_step(base, ids, copy_base: bool = True):
    """The floor for any LoRA library: the backward every frozen layer needs, no adapter at all.

    A zero scalar added to the first layer's q/k/v outputs makes exactly the tensors require
    grad that do under LoRA on all seven projections: the attention's backward runs in every
    layer, but the first layer's q/k/v inputs need no grad_x (a LoRA step computes none there).
    """
    frozen = (copy.deepcopy(base) if copy_base else base).train().requires_grad_(False)
    spark = torch.zeros((), device=TARGET["device"], dtype=TARGET["dtype"], requires_grad=True)
    attention = frozen.model.layers[0].self_attn
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        projection.register_forward_hook(lambda module, args, out: out + spark)

    def step():
        frozen(input_ids=ids, labels=ids).loss.backward()
        spark.grad = None
    return step


def bench_train(dropout: float, repeats: int) -> list[str]:
    base = llama()
    ids = token_ids(4, 256)
    a, b = ours(base, dropout=dropout).train(), peft(base, dropout=dropout).train()
    step_a = _train_step(a, ids, torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-4))
    step_b = _train_step(b, ids, torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-4))
    steps = {"ours": step_a, "peft": step_b, "frozen": _frozen_base_step(base, ids),
             "gemms": adapter_gemms(base, ids.numel())}
    steps, faults = counting_page_faults(steps)
    ratios = rotating_ratios(steps, "peft", repeats=2 * repeats)  # steps move by +-10%: more rounds, steadier median
    torch.manual_seed(0)
    bytes_a = saved_bytes(lambda: a(input_ids=ids, labels=ids).loss)
    bytes_b = saved_bytes(lambda: b(input_ids=ids, labels=ids).loss)
    floor, gemms = ratios["frozen"], ratios["gemms"]
    bound = floor + gemms  # the least an exact LoRA step costs with PyTorch's kernels, as a share of PEFT's step
    above = ratios["ours"] - bound
    if dropout:  # drawing the mask is work an exact dropout must do that the bound leaves out
        verdict = "the bound leaves out drawing the dropout mask: no target"
    else:
        verdict = f"target <= +0.02 with --keep-heap: {'met' if above <= 0.02 else 'NOT met'}"
    return [
        f"train step, dropout={dropout}: ours {ratios['ours']:.3f} of PEFT's step; exact-LoRA bound {bound:.3f} "
        f"(frozen base {floor:.3f} + adapter GEMMs and AdamW {gemms:.3f}); ours - bound {above:+.3f} ({verdict}); "
        f"PEFT - bound {1 - bound:+.3f}",
        f"saved for backward, dropout={dropout}: ours {bytes_a / 2**20:.1f} MiB, PEFT {bytes_b / 2**20:.1f} MiB",
        f"minor page faults per step, dropout={dropout} (median, max): "
        + ", ".join(f"{name} {statistics.median(n):.0f}, {max(n)}" for name, n in faults.items() if n),
    ]


def bench_dropout_memory() -> list[str]:
    base = llama()
    ids = token_ids(4, 256)
    plain = saved_bytes(lambda: ours(base, dropout=0.0).train()(input_ids=ids, labels=ids).loss)
    dropped = saved_bytes(lambda: ours(base, dropout=0.05).train()(input_ids=ids, labels=ids).loss)
    return [f"saved bytes with dropout 0.05 / without (ours): {dropped / plain:.3f}"]


def bench_infer(hidden: int, batch: int, tokens: int, repeats: int) -> list[str]:
    base = llama(hidden=hidden).eval()
    ids = token_ids(batch, tokens)
    a, b = ours(base).eval(), peft(base).eval()

    def run(model):
        def call():
            with torch.inference_mode():
                model(input_ids=ids)
        return call

    gemms = adapter_gemms(base, ids.numel(), train=False)
    ratios = rotating_ratios({"ours": run(a), "peft": run(b), "base": run(base), "gemms": gemms}, "base", repeats)
    ours_vs_base, peft_vs_base = ratios["ours"], ratios["peft"]
    return [f"unmerged inference hidden {hidden}, {batch}x{tokens}: ours {ours_vs_base:.3f}x base, "
            f"PEFT {peft_vs_base:.3f}x base (overhead ratio {overhead_ratio(ours_vs_base, peft_vs_base):.2f}); "
            f"the adapter GEMMs alone {ratios['gemms']:.3f}x base, so at least {1 + ratios['gemms']:.3f}x"]


def bench_decode(repeats: int) -> list[str]:
    """Greedy ``generate``: 32 new tokens one at a time (KV cache) after a 16-token prompt, batch 1.

    What an inference server pays for an unmerged adapter: each step runs every module on one
    token, so per-call overhead, not FLOPs, sets the cost.
    """
    base = llama().eval()
    base.generation_config.pad_token_id = 0
    ids = token_ids(1, 16)
    a, b = ours(base).eval(), peft(base).eval()

    def run(model):
        def call():
            with torch.inference_mode():
                model.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return call

    r = rotating_ratios({"ours": run(a), "peft": run(b), "base": run(base)}, "base", repeats)
    return [f"greedy decode, 32 tokens after 16, batch 1: ours {r['ours']:.3f}x base, PEFT {r['peft']:.3f}x base "
            f"(overhead ratio {overhead_ratio(r['ours'], r['peft']):.2f})"]


def bench_dora(repeats: int) -> list[str]:
    """DoRA on the training workload and in greedy decode, side by side with PEFT's DoRA (and LoRA)."""
    base = llama()
    ids = token_ids(4, 256)
    a, b = ours(base, dora=True).train(), peft(base, dora=True).train()
    lora_a, lora_b = ours(base).train(), peft(base).train()
    steps = {name: _train_step(m, ids, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
             for name, m in (("ours", a), ("peft", b), ("ours_lora", lora_a), ("peft_lora", lora_b))}
    r = rotating_ratios(steps, "peft", repeats=2 * repeats)
    saved = {name: saved_bytes(lambda m=m: m(input_ids=ids, labels=ids).loss) / 2**20
             for name, m in (("ours", a), ("peft", b), ("ours_lora", lora_a), ("peft_lora", lora_b))}
    lines = [
        f"DoRA train step: ours / PEFT DoRA {r['ours']:.3f}; LoRA steps / PEFT DoRA: ours {r['ours_lora']:.3f}, "
        f"PEFT {r['peft_lora']:.3f} (PEFT's DoRA costs {1 / r['peft_lora']:.2f}x its LoRA, ours "
        f"{r['ours'] / r['ours_lora']:.2f}x ours)",
        f"DoRA saved for backward: ours {saved['ours']:.1f} MiB, PEFT {saved['peft']:.1f} MiB (ratio "
        f"{saved['ours'] / saved['peft']:.2f}); LoRA: ours {saved['ours_lora']:.1f}, PEFT {saved['peft_lora']:.1f}",
    ]
    base.eval().generation_config.pad_token_id = 0
    prompt = token_ids(1, 16)
    a.eval()
    b.eval()

    def run(model):
        def call():
            with torch.inference_mode():
                model.generate(input_ids=prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return call

    r = rotating_ratios({"ours": run(a), "peft": run(b), "base": run(base)}, "base", 2 * repeats)
    lines.append(f"DoRA greedy decode, 32 tokens after 16, batch 1: ours {r['ours']:.3f}x base, "
                 f"PEFT {r['peft']:.3f}x base")
    return lines


def bench_inject(repeats: int) -> list[str]:
    import peft as p
    import transformers as t

    import lora_inject as li

    config = t.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           vocab_size=32000)
    with torch.device("meta"):
        meta = t.LlamaForCausalLM(config)

    copies_a = [copy.deepcopy(meta) for _ in range(repeats + 1)]  # meta models: no memory to speak of
    copies_b = [copy.deepcopy(meta) for _ in range(repeats + 1)]

    def ours_inject():
        li.inject(copies_a.pop(), targets=SEVEN, r=16)

    def peft_inject():
        p.get_peft_model(copies_b.pop(), p.LoraConfig(r=16, target_modules=SEVEN))

    ta, tb, ratio = paired_ratio(ours_inject, peft_inject, repeats=repeats, warmup=1)
    lines = [f"inject 7B-shaped Llama on meta: ours {ta * 1e3:.0f} ms, PEFT {tb * 1e3:.0f} ms, ratio {ratio:.3f}"]
    real = llama(hidden=1024, layers=24, vocab=32000, intermediate=2816, device="cpu", dtype=torch.float32)  # ~370M
    n = sum(p_.numel() for p_ in real.parameters())
    real_a, real_b = copy.deepcopy(real), copy.deepcopy(real)

    def ours_real():  # inject, then unload (untimed would be better, but unload is cheap: no weights move)
        li.unload(li.inject(real_a, targets=SEVEN, r=16))

    def peft_real():
        p.get_peft_model(real_b, p.LoraConfig(r=16, target_modules=SEVEN)).unload()

    ta, tb, ratio = paired_ratio(ours_real, peft_real, repeats=max(3, repeats // 2), warmup=1)
    lines.append(f"inject (+unload) real {n / 1e6:.0f}M Llama: ours {ta * 1e3:.0f} ms, PEFT {tb * 1e3:.0f} ms, "
                 f"ratio {ratio:.3f}")
    return lines


def bench_merge(repeats: int) -> list[str]:
    import peft as p

    import lora_inject as li

    base = llama(hidden=1024, layers=8, device="cpu", dtype=torch.float32)
    a, b = ours(base), peft(base)
    copy_a = [copy.deepcopy(a) for _ in range(repeats + 1)]
    copy_b = [copy.deepcopy(b) for _ in range(repeats + 1)]
    ta, tb, ratio = paired_ratio(lambda: li.merge_and_unload(copy_a.pop()), lambda: copy_b.pop().merge_and_unload(),
                                 repeats=repeats, warmup=1)
    lines = [f"merge_and_unload: ours {ta * 1e3:.0f} ms, PEFT {tb * 1e3:.0f} ms, ratio {ratio:.2f}"]
    with tempfile.TemporaryDirectory() as tmp:
        _, _, save_ratio = paired_ratio(lambda: li.save_adapter(a, f"{tmp}/a"), lambda: b.save_pretrained(f"{tmp}/b"),
                                        repeats=repeats)
        _, _, load_ratio = paired_ratio(
            lambda: li.load_adapter(copy.deepcopy(base), f"{tmp}/a"),
            lambda: p.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/b"), repeats=repeats)
    lines += [f"save adapter: ratio {save_ratio:.2f}", f"load adapter (incl. model copy): ratio {load_ratio:.2f}"]
    merged = li.merge_and_unload(copy.deepcopy(a)).eval()
    ids = torch.randint(0, 2000, (2, 128))

    def fwd(model):
        def call():
            with torch.inference_mode():
                model(input_ids=ids)
        return call

    _, _, fwd_ratio = paired_ratio(fwd(merged), fwd(base.eval()), repeats=4 * repeats)  # a 2% question: many pairs
    lines.append(f"merged model forward / base forward: {fwd_ratio:.3f}")
    return lines


def bench_conv(repeats: int) -> list[str]:
    """A conv stack (LoRA on four 3x3 Conv2d, 64 channels, batch 8 x 32 x 32): inference and a training step."""
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(*(layer for _ in range(4) for layer in (nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())))
    base = base.to(device=TARGET["device"], dtype=TARGET["dtype"])
    targets = ["0", "2", "4", "6"]
    a, b = ours(base, targets=targets), peft(base, targets=targets)
    x = torch.randn(8, 64, 32, 32, device=TARGET["device"], dtype=TARGET["dtype"])

    def infer(model):
        def call():
            with torch.inference_mode():
                model(x)
        return call

    def train(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    r = rotating_ratios({"ours": infer(a.eval()), "peft": infer(b.eval()), "base": infer(base.eval())}, "base",
                        2 * repeats)
    t = rotating_ratios({"ours": train(a.train()), "peft": train(b.train())}, "peft", 2 * repeats)
    return [f"conv inference (4 x Conv2d 64ch, 8x32x32): ours {r['ours']:.3f}x base, PEFT {r['peft']:.3f}x base "
            f"(overhead ratio {overhead_ratio(r['ours'], r['peft']):.2f})",
            f"conv training step: ours / PEFT {t['ours']:.2f}"]


def bench_overhead(repeats: int) -> list[str]:
    """Per-layer cost that does not shrink with the model: a 16x16 Linear, 2 tokens, one thread.

    What a launch-bound GPU decode step (batch 1) pays per adapted module, measured on the CPU.
    """
    from torch import nn

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(16, 16, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = One()
    a, b = ours(base, r=4, targets=["q_proj"]), peft(base, r=4, targets=["q_proj"])
    frozen = copy.deepcopy(base).requires_grad_(False)
    x = torch.randn(1, 2, 16)
    x_grad = x.clone().requires_grad_()

    def infer(model):
        def calls():
            with torch.inference_mode():
                for _ in range(200):
                    model(x)
        return calls

    def train(model):
        def calls():
            for _ in range(50):
                model(x_grad).sum().backward()
        return calls

    lines = []
    for label, make, models in (("inference call", infer, (a.eval(), b.eval(), base.eval())),
                                ("training fwd+bwd", train, (a.train(), b.train(), frozen))):
        r = rotating_ratios({"ours": make(models[0]), "peft": make(models[1]), "base": make(models[2])}, "base",
                            repeats * 2)
        lines.append(f"per-layer fixed cost, {label}: ours {r['ours']:.2f}x base, PEFT {r['peft']:.2f}x base "
                     f"(overhead ratio {overhead_ratio(r['ours'], r['peft']):.2f})")
    torch.set_num_threads(threads)
    return lines


def _held_bytes(model) -> int:
    """Bytes of every tensor the model holds between calls: parameters, gradients, buffers and tensors kept
    in module attributes (caches), each storage once."""
    seen: dict[int, int] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_modules", "_forward_hooks", "_forward_pre_hooks"):
                visit(value)
        for param in module.parameters(recurse=False):
            visit(param.grad)
    return sum(seen.values())


def bench_qlora(repeats: int) -> list[str]:
    """LoRA on all seven projections of a bitsandbytes nf4 (double-quant) base, float32 compute, batch 4 x 256:
    what each library adds above the frozen quantized base's own step, and what it holds."""
    import transformers as t

    with tempfile.TemporaryDirectory() as folder:
        llama(hidden=512).save_pretrained(folder)
        nf4 = t.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        models = [t.AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4) for _ in range(3)]
    a, b, frozen = ours(models[0], copy_base=False).train(), peft(models[1], copy_base=False).train(), models[2]
    ids = token_ids(4, 256)
    steps = {name: _train_step(m, ids, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
             for name, m in (("ours", a), ("peft", b))}
    steps["frozen"] = _frozen_base_step(frozen, ids, copy_base=False)
    r = rotating_ratios(steps, "peft", repeats=2 * repeats)
    added = (r["ours"] - r["frozen"]) / (1 - r["frozen"])
    floor = _held_bytes(frozen)  # the quantized model itself
    held = {name: (_held_bytes(m) - floor - sum(p.numel() * p.element_size() for p in m.parameters()
                                               if p.requires_grad)) / 2**20 for name, m in (("ours", a), ("peft", b))}
    saved = {name: saved_bytes(lambda m=m: m(input_ids=ids, labels=ids).loss) / 2**20
             for name, m in (("ours", a), ("peft", b))}
    return [
        f"QLoRA (nf4) train step: ours / PEFT {r['ours']:.3f}; the frozen nf4 base alone is {r['frozen']:.3f} of "
        f"PEFT's step; what LoRA adds above it: ours {added:.2f}x PEFT's",
        f"QLoRA saved for backward: ours {saved['ours']:.1f} MiB, PEFT {saved['peft']:.1f} MiB; held between steps "
        f"beyond the quantized model and the adapters: ours {held['ours']:.2f} MiB, PEFT {held['peft']:.2f} MiB",
    ]


def _many(base, count: int):
    """ours and PEFT with ``count`` adapters a0..a{count-1} (r=16, all seven projections, distinct weights)."""
    import peft as p

    import lora_inject as li

    a = copy.deepcopy(base).eval()
    for i in range(count):
        li.inject(a, targets=SEVEN, r=16, alpha=32, adapter=f"a{i}", init=False)
    config = p.LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN)
    b = p.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, count):
        b.add_adapter(f"a{i}", config)
    state = li.lora_state_dict  # copy ours into PEFT, adapter by adapter
    for i in range(count):
        values = {k.replace(f".a{i}.", "."): v for k, v in state(a, f"a{i}").items()}
        with torch.no_grad():
            for name, param in b.named_parameters():
                if f".a{i}." in name:
                    param.copy_(values[name.removeprefix("base_model.model.").replace(f".a{i}.", ".")])
    return a, b.eval()


def _routed_call(model, names, ids, cache, is_peft):
    """One forward of ``ids`` with per-row ``names``; a decode step re-uses ``cache`` (cropped back after)."""
    import lora_inject as li

    def call():
        with torch.inference_mode():
            if is_peft:
                model(input_ids=ids, past_key_values=cache, adapter_names=names)
            else:
                with li.batch_adapters(model, names):
                    model(input_ids=ids, past_key_values=cache)
            if cache is not None:
                cache.crop(-1)  # drop the step just appended
    return call


def bench_many_adapters(repeats: int) -> list[str]:
    """Different adapters per row (li.batch_adapters vs PEFT's adapter_names), Llama-shaped, r=16 on all seven
    projections, 64 adapters loaded: a decode step (batch x 1 token after a 16-token prompt, KV cache) and a
    prefill (batch x 64 tokens), with 1, 4, 16 and 64 distinct adapters among the rows. ``LORA_BENCH_HIDDEN``
    (default 512) sets the width: at 2048 the base's own matmuls take ~85% of a step on a CPU, so no adapter
    path can be much faster than PEFT's there."""
    from transformers import DynamicCache

    hidden = int(os.environ.get("LORA_BENCH_HIDDEN", "512"))
    base = llama(hidden=hidden, layers=4 if hidden <= 1024 else 2)
    ours_model, peft_model = _many(base, 64)
    lines = []
    for batch in (16, 64):
        for kind in ("decode", "prefill"):
            calls = {}
            for distinct in (d for d in (1, 4, 16, 64) if d <= batch):
                names = [f"a{i % distinct}" for i in range(batch)]
                for label, model in (("ours", ours_model), ("peft", peft_model)):
                    cache = None
                    if kind == "decode":
                        cache = DynamicCache(config=base.config)
                        _routed_call(model, names, token_ids(batch, 16), cache, label == "peft")()
                    ids = token_ids(batch, 1 if kind == "decode" else 64)
                    calls[f"{label}{distinct}"] = _routed_call(model, names, ids, cache, label == "peft")
            r = rotating_ratios(calls, "ours1", repeats=repeats)
            row = ", ".join(f"{d}: {r[f'ours{d}']:.2f}x one, {r[f'ours{d}'] / r[f'peft{d}']:.2f}x PEFT"
                            for d in (1, 4, 16, 64) if d <= batch)
            lines.append(f"many adapters, {kind}, batch {batch} (distinct adapters: ours vs one adapter for all "
                         f"rows, ours vs PEFT) {row}")
    return lines


def bench_hotswap(repeats: int) -> list[str]:
    """Swap adapters of other ranks into a compiled model: the swap's latency, and the compiled forward's time
    before and after (no recompilation: the first call after a swap costs what the others do)."""

    import torch._dynamo

    import lora_inject as li

    base = llama().eval()
    ids = token_ids(1, 32)
    with tempfile.TemporaryDirectory() as folder:
        for name, r in (("r8", 8), ("r16", 16)):
            made = li.inject(copy.deepcopy(base), targets=SEVEN, r=r, alpha=2 * r, init=False)
            li.save_adapter(made, f"{folder}/{name}")
        model = li.load_adapter(copy.deepcopy(base), f"{folder}/r8").eval()
        li.prepare_hotswap(model, max_rank=16)
        compiled = torch.compile(model)

        def step():
            with torch.inference_mode():
                compiled(input_ids=ids)

        step()
        before = statistics.median(_timed(step) for _ in range(5 * repeats))
        swaps, first, after = [], [], []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(repeats):
                swaps.append(_timed(lambda i=i: li.hotswap_adapter(model, f"{folder}/{('r16', 'r8')[i % 2]}")))
                first.append(_timed(step))
                after.append(statistics.median(_timed(step) for _ in range(3)))
    swap = 1e3 * statistics.median(swaps)
    return [f"hot swap (7 projections x 4 layers, r8 <-> r16, max_rank 16): swap {swap:.1f} ms; "
            f"compiled forward 1x32: {1e3 * before:.2f} ms before, {1e3 * statistics.median(first):.2f} ms on the "
            f"first call after a swap, {1e3 * statistics.median(after):.2f} ms after (recompilation is an error)"]


def bench_combine(repeats: int) -> list[str]:
    """Combining two adapters (r=16, all seven projections, 4 layers of 512) into a new one, ours vs PEFT's
    add_weighted_adapter, per method; each side on its own model, the new adapter deleted after each run."""
    import lora_inject as li

    ours_model, peft_model = _many(llama(), 2)
    weights = {"a0": 0.6, "a1": 0.4}
    lines = []
    for method in ("cat", "linear", "svd", "ties"):
        extra = {"density": 0.5} if method == "ties" else {}

        def ours_run(method=method, extra=extra):
            li.combine_adapters(ours_model, weights, "mix", method, **extra)
            li.delete_adapter(ours_model, "mix")

        def peft_run(method=method, extra=extra):
            peft_model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=method,
                                            **extra)
            peft_model.delete_adapter("mix")

        r = rotating_ratios({"ours": ours_run, "peft": peft_run}, "peft", repeats=repeats)
        lines.append(f"combine two adapters, {method}: ours {r['ours']:.2f}x PEFT's time")
    return lines


def _moe_model(kind: str):
    import transformers as t

    if kind == "mixtral":
        config = t.MixtralConfig(vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                 num_experts_per_tok=2)
        return t.MixtralForCausalLM(config)
    config = t.Qwen3MoeConfig(vocab_size=2000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=384,
                              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, num_experts=16,
                              num_experts_per_tok=4, head_dim=64)
    return t.Qwen3MoeForCausalLM(config)


def bench_moe(repeats: int) -> list[str]:
    """LoRA r=16 on fused experts (gate_up_proj, down_proj) and the router, forward + backward, batch 4 x 128:
    time (ours / PEFT) and the peak of tensors alive during the step, per experts implementation."""
    import peft as peft_lib
    from common import peak_tensor_bytes

    import lora_inject as li

    targets = ["experts.gate_up_proj", "experts.down_proj", "gate.weight"]
    lines = []
    for kind in ("mixtral", "qwen3_moe"):
        base = _moe_model(kind)
        a = li.inject(copy.deepcopy(base), target_parameters=targets, r=16).train()
        b = peft_lib.get_peft_model(copy.deepcopy(base), peft_lib.LoraConfig(
            r=16, target_modules=[], target_parameters=targets)).train()
        ids = token_ids(4, 128)
        for implementation in ("grouped_mm", "eager"):
            for model in (a, b.base_model.model):
                model.config._experts_implementation = implementation

            def step(model, ids=ids):
                return lambda: model(input_ids=ids, labels=ids).loss.backward()

            _, _, ratio = paired_ratio(step(a), step(b), repeats=repeats)
            peaks = {name: peak_tensor_bytes(step(m)) / 2**20 for name, m in (("ours", a), ("peft", b))}
            lines.append(
                f"MoE {kind} ({implementation}) train step: ours / PEFT {ratio:.3f}; peak tensors during the step: "
                f"ours {peaks['ours']:.1f} MiB, PEFT {peaks['peft']:.1f} MiB"
            )
    return lines


def _timed(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SECTIONS = {
    "train": lambda r: bench_train(0.0, r) + bench_train(0.05, r),
    "dropout-memory": lambda r: bench_dropout_memory(),
    "infer": lambda r: bench_infer(512, 1, 32, 25 * r) + bench_infer(1024, 4, 512, 3 * r),  # ~15 ms and ~0.4 s a call
    "decode": lambda r: bench_decode(4 * r),
    "dora": lambda r: bench_dora(r),
    "conv": lambda r: bench_conv(r),
    "overhead": lambda r: bench_overhead(r),
    "inject": lambda r: bench_inject(r),
    "merge": lambda r: bench_merge(r),
    "qlora": lambda r: bench_qlora(r),
    "many-adapters": lambda r: bench_many_adapters(r),
    "hotswap": lambda r: bench_hotswap(r),
    "combine": lambda r: bench_combine(r),
    "moe": lambda r: bench_moe(r),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="for train, dropout-memory, infer, decode, conv (e.g. cuda); "
                        "inject and merge always run on the CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="base model dtype for train, dropout-memory, infer, decode, conv (adapters stay float32)")
    parser.add_argument("--runs", type=int, default=1,
                        help="run each section in this many fresh processes and report every figure's range")
    parser.add_argument("--keep-heap", action="store_true",
                        help="glibc: never hand freed heap back to the system, so steps pay no page faults for "
                        "earlier frees (both sides alike); default: the allocator as users get it")
    args = parser.parse_args()
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = args.sections or list(SECTIONS)
    if args.runs > 1:
        from runs import run_sections

        passthrough = ["--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype]
        run_sections(args.sections, args.runs, passthrough + (["--keep-heap"] if args.keep_heap else []))
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    heap = "default heap"
    if args.keep_heap:
        heap = "freed heap kept" if keep_freed_heap() else "default heap (no glibc mallopt here)"
    TARGET.update(device=args.device, dtype=getattr(torch, args.dtype))
    import peft

    import lora_inject

    machine = platform.processor() or platform.machine()
    if torch.device(args.device).type == "cuda":
        machine = torch.cuda.get_device_name()
    print(f"# {machine}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"peft {peft.__version__}, lora_inject {lora_inject.__version__}, {heap}")
    for name in args.sections:
        for line in SECTIONS[name](args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
