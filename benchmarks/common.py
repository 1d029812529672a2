"""Shared helpers: models, interleaved A/B timing, saved-activation bytes."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch

warnings.filterwarnings("ignore")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# where the train/infer models live; run.py sets these from --device / --dtype
TARGET = {"device": "cpu", "dtype": torch.float32}


def sync() -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(TARGET["device"]).type == "cuda":
        torch.cuda.synchronize()


def token_ids(batch: int, length: int, vocab: int = 2000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), device=TARGET["device"])


def llama(hidden=512, layers=4, vocab=2000, intermediate=None, device=None, dtype=None):
    import transformers as t

    config = t.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate or hidden * 8 // 3 // 64 * 64 or hidden * 2,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        vocab_size=vocab, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return t.LlamaForCausalLM(config).to(device=device or TARGET["device"], dtype=dtype or TARGET["dtype"])


def ours(base, r=16, dropout=0.0, targets=SEVEN):
    import lora_inject as li

    return li.inject(copy.deepcopy(base), targets=targets, r=r, alpha=2 * r, dropout=dropout)


def peft(base, r=16, dropout=0.0, targets=SEVEN):
    import peft as p

    config = p.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets)
    return p.get_peft_model(copy.deepcopy(base), config)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call for each function, calls alternating A, B, A, B ..."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def paired_ratio(fn_a: Callable, fn_b: Callable, repeats: int = 10, warmup: int = 2) -> tuple[float, float, float]:
    """(median A seconds, median B seconds, median of per-pair ratios A/B)."""
    for _ in range(warmup):
        fn_a(), fn_b()
    a_times, b_times, ratios = [], [], []
    for i in range(repeats):
        order = (fn_a, fn_b) if i % 2 == 0 else (fn_b, fn_a)
        measured = {}
        for fn in order:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            measured[fn] = time.perf_counter() - start
        a_times.append(measured[fn_a])
        b_times.append(measured[fn_b])
        ratios.append(measured[fn_a] / measured[fn_b])
    return statistics.median(a_times), statistics.median(b_times), statistics.median(ratios)


def rotating_ratios(fns: dict[str, Callable], reference: str, repeats: int = 10) -> dict[str, float]:
    """Median over rounds of (each function's time / the reference's), the order rotating every round."""
    for fn in fns.values():
        fn()
    names = list(fns)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        times = {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name] = time.perf_counter() - start
        for name in names:
            ratios[name].append(times[name] / times[reference])
    return {name: statistics.median(r) for name, r in ratios.items()}


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
