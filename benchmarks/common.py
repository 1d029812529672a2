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


def ours(base, r=16, dropout=0.0, targets=SEVEN, dora=False, copy_base=True):
    import lora_inject as li

    model = copy.deepcopy(base) if copy_base else base
    return li.inject(model, targets=targets, r=r, alpha=2 * r, dropout=dropout, dora=dora)


def peft(base, r=16, dropout=0.0, targets=SEVEN, dora=False, copy_base=True):
    import peft as p

    config = p.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, use_dora=dora)
    return p.get_peft_model(copy.deepcopy(base) if copy_base else base, config)


def adapter_gemms(base, tokens: int, r: int = 16, targets=SEVEN, train: bool = True) -> Callable:
    """What an exact LoRA step must add to the frozen base, alone: the adapter GEMMs and AdamW on A and B.

    Per adapted Linear (in -> out) over ``tokens`` rows: forward ``h = x @ A.T`` (N, r) and
    ``y += h @ B.T``; backward ``grad_B = grad_y.T @ h``, ``grad_h = grad_y @ B``,
    ``grad_A = grad_h.T @ x`` and ``grad_x += grad_h @ A`` (skipped for the first layer's
    q/k/v, whose input needs no gradient); then one AdamW step over every A and B. No
    autograd, no library, one Python loop. Each module gets its own x, y, grad_y, grad_x, so
    the caches see what a real step's activations give them. Added to the frozen-base floor,
    this is the fastest an exact-gradient LoRA step can be with PyTorch's kernels here.
    ``train=False``: the forward GEMMs only, what unmerged inference must add to the base.
    """
    kw = {"device": TARGET["device"], "dtype": TARGET["dtype"]}
    layers = []
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf in targets:
            first_qkv = ".layers.0.self_attn." in f".{name}" and leaf in ("q_proj", "k_proj", "v_proj")
            n_in, n_out = module.in_features, module.out_features
            a, b = torch.nn.Parameter(torch.randn(r, n_in, **kw)), torch.nn.Parameter(torch.randn(n_out, r, **kw))
            activations = [torch.randn(tokens, n, **kw) for n in (n_in, n_out, n_out, n_in)]  # x, y, grad_y, grad_x
            layers.append((a, b, *activations, not first_qkv))
    optimizer = torch.optim.AdamW([p for layer in layers for p in layer[:2]], lr=1e-4)

    @torch.no_grad()
    def step():
        hs = []
        for a, b, x, y, _, _, _ in layers:
            h = torch.mm(x, a.t())
            y.addmm_(h, b.t())
            hs.append(h)
        if not train:
            return
        for (a, b, x, _, grad_y, grad_x, need_x), h in zip(reversed(layers), reversed(hs)):
            b.grad = torch.mm(grad_y.t(), h)
            grad_h = torch.mm(grad_y, b)
            a.grad = torch.mm(grad_h.t(), x)
            if need_x:
                grad_x.addmm_(grad_h, a)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def keep_freed_heap() -> bool:
    """glibc only: stop returning freed heap to the system (trim threshold 1 GiB, mmap threshold 32 MiB).

    Then no step faults pages back in because an earlier one freed them, and ratios compare
    work, not allocator luck. Process-wide, so both sides of every comparison get it. False
    where there is no glibc ``mallopt``.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 1 << 25))


def counting_page_faults(fns: dict[str, Callable]) -> tuple[dict[str, Callable], dict[str, list[int]]]:
    """``fns`` wrapped to record each call's minor page faults (fresh pages the kernel zeroes).

    glibc returns freed heap to the system once enough of it sits at the top, so the next step
    faults its pages back in (measured here: 16k faults, 64 MiB, took a step from 453 to 515 ms),
    and whether a step pays depends on where its last allocations landed, not on its own work.
    Empty lists where the platform has no ``resource`` module.
    """
    try:
        import resource
    except ImportError:
        return fns, {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}

    def wrap(name: str, fn: Callable) -> Callable:
        def call():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return call

    return {name: wrap(name, fn) for name, fn in fns.items()}, faults


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


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """The most bytes held at once by tensors created during ``fn`` (each storage counted once, freed when
    its last tensor goes): the transient memory a call needs, on any device, without allocator noise."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    live: dict[int, int] = {}
    peak = [0]

    def release(key: int) -> None:
        live.pop(key, None)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in live:
                        live[key] = storage.nbytes()
                        weakref.finalize(storage, release, key)
                        peak[0] = max(peak[0], sum(live.values()))
            return out

    with Track():
        fn()
    return peak[0]
