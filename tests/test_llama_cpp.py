"""Exported GGUF adapters run in llama.cpp itself (llama-cpp-python, f32 weights and KV cache) and give the logits
of ``li.merge_and_unload`` to 1e-5; llama.cpp's own converters make the bases and, for plain adapters, the same
tensors as the export. Bases: a tiny Llama and Mistral (grouped-query attention, rope rows permuted), Qwen2 with
tied embeddings and Qwen3 (its own head_dim, q/k norms), built from configs, with an offline SentencePiece
tokenizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from llama_cpp_tools import (
    AdapterRefused,
    convert_base,
    convert_lora,
    logits,
    requires_llama_cpp,
    sentencepiece_tokenizer,
)

import lora_inject as li

pytestmark = requires_llama_cpp

TOKENS = [1, 5, 9, 20, 33, 7, 100, 3, 64, 12]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


def _base(tmp_path_factory, name: str):
    import transformers as t

    config = {"llama": lambda: t.LlamaConfig(**SIZES, tie_word_embeddings=False),
              "mistral": lambda: t.MistralConfig(**SIZES, tie_word_embeddings=False),
              "qwen2": lambda: t.Qwen2Config(**SIZES, tie_word_embeddings=True),
              "qwen3": lambda: t.Qwen3Config(**SIZES, head_dim=16, tie_word_embeddings=False)}[name]()
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(folder / "base")
    sentencepiece_tokenizer(folder / "base" / "tokenizer.model")
    return folder, convert_base(folder / "base", folder / "base.gguf")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each base converted once per module, on first use."""
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = (arch, *_base(tmp_path_factory, arch))
        return built[arch]

    return get


@pytest.fixture(params=["llama", "mistral", "qwen2", "qwen3"])
def base(request, bases):
    return bases(request.param)


def _model(folder):
    import transformers as t

    return t.AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32).eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def _adapter(folder, name, targets=PROJECTIONS, seed=1, **options):
    model = _model(folder)
    li.inject(model, targets=targets, r=options.pop("r", 4), alpha=options.pop("alpha", 8), init=False, **options)
    torch.manual_seed(seed)
    for key, p in model.named_parameters():
        if "lora_" in key:
            p.data = torch.randn_like(p) * 0.2
    li.save_adapter(model, folder / name)
    return model


def _merged_logits(model) -> np.ndarray:
    """The merged model's logits computed in float64: float32 merging alone is off by ~3e-5 on these logits
    (llama.cpp, which adds the update unmerged, is closer to the float64 reference than that)."""
    merged = li.merge_and_unload(copy.deepcopy(model).double())
    with torch.no_grad():
        return merged(torch.tensor([TOKENS])).logits[0].numpy()


def test_the_converted_bases_match_transformers(base, tmp_path):
    _, folder, gguf = base
    np.testing.assert_allclose(logits(gguf, TOKENS, tmp_path), _logits(_model(folder)), atol=1e-5, rtol=0)


CASES = {
    "plain": dict(),
    "rslora": dict(rslora=True, r=8),
    "patterns": dict(rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"down_proj": 3.0, "layers.1.self_attn.q_proj": 5.0}),
    "embedding": dict(targets=["embed_tokens", "q_proj", "k_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_exports_run_in_llama_cpp_as_the_merged_model(base, tmp_path, case):
    arch, folder, gguf = base
    model = _adapter(folder, f"adapter-{case}", **copy.deepcopy(CASES[case]))
    if case == "embedding" and arch == "qwen2":  # tied: llama.cpp would apply it to the output too, and aborts
        with pytest.raises(li.ExportError, match="ties lm_head"):
            li.export_gguf(folder / f"adapter-{case}", tmp_path / "a.gguf", base=folder / "base")
        return
    out = li.export_gguf(folder / f"adapter-{case}", tmp_path / "a.gguf", base=folder / "base")
    expected = _merged_logits(model)
    assert np.abs(expected - _logits(_model(folder))).max() > 0.05  # the adapter changes the outputs
    np.testing.assert_allclose(logits(gguf, TOKENS, tmp_path, lora=out), expected, atol=1e-5, rtol=0)


def test_untied_head_and_the_runtime_scale(bases, tmp_path):
    _, folder, gguf = bases("llama")
    model = _adapter(folder, "adapter-head", targets=["lm_head", "v_proj"])
    out = li.export_gguf(folder / "adapter-head", tmp_path / "a.gguf", base=folder / "base")
    np.testing.assert_allclose(logits(gguf, TOKENS, tmp_path, lora=out), _merged_logits(model), atol=1e-5, rtol=0)
    # llama-server's --lora-scaled: the same as this library's adapter scale
    half = copy.deepcopy(model)
    for _, layer in li.lora_layers(half):
        for b in layer.lora_B.values():
            b.weight.data *= 0.5
    np.testing.assert_allclose(logits(gguf, TOKENS, tmp_path, lora=out, scale=0.5), _merged_logits(half),
                               atol=1e-5, rtol=0)


def test_tied_head_is_refused(bases, tmp_path):
    _, folder, _ = bases("qwen2")
    model = _adapter(folder, "adapter-tied", targets=["lm_head"])
    with pytest.raises(li.ExportError, match="ties lm_head"):
        li.export_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_f16_export_is_as_close_as_f16_arithmetic_allows(base, tmp_path):
    """ggml multiplies an f16 tensor by the activations rounded to f16 too, so an f16 adapter costs ~5e-3 on these
    logits whatever its factors; a wrong scale or a row out of place would cost ~1."""
    _, folder, gguf = base
    model = _adapter(folder, "adapter-f16", rslora=True, r=8)
    out = li.export_gguf(folder / "adapter-f16", tmp_path / "a.gguf", base=folder / "base", outtype="f16")
    expected = _merged_logits(model)
    assert np.abs(expected - _logits(_model(folder))).max() > 0.1
    np.testing.assert_allclose(logits(gguf, TOKENS, tmp_path, lora=out), expected, atol=1.5e-2, rtol=0)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_plain_adapters_equal_llama_cpps_own_converter(base, tmp_path, outtype):
    import gguf as gguf_py

    arch, folder, _ = base
    _adapter(folder, "adapter-same", targets=PROJECTIONS + (["embed_tokens"] if arch != "qwen2" else []))
    ours = li.export_gguf(folder / "adapter-same", tmp_path / "ours.gguf", base=folder / "base", outtype=outtype)
    theirs = convert_lora(folder / "adapter-same", folder / "base", tmp_path / "theirs.gguf", outtype)
    mine = {t.name: t for t in gguf_py.GGUFReader(ours).tensors}
    other = {t.name: t for t in gguf_py.GGUFReader(theirs).tensors}
    assert sorted(mine) == sorted(other)
    for name, tensor in other.items():
        assert mine[name].tensor_type == tensor.tensor_type, name
        assert list(mine[name].shape) == list(tensor.shape), name
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(tensor.data)), name


def test_llama_cpps_converter_gets_rslora_wrong_and_the_export_does_not(base, tmp_path):
    """Why the export exists: convert_lora_to_gguf.py writes alpha/r for an rsLoRA adapter (alpha/sqrt(r))."""
    _, folder, gguf = base
    model = _adapter(folder, "adapter-rs", rslora=True, r=8)
    theirs = convert_lora(folder / "adapter-rs", folder / "base", tmp_path / "theirs.gguf")
    assert np.abs(logits(gguf, TOKENS, tmp_path, lora=theirs) - _merged_logits(model)).max() > 1e-2


def test_an_adapter_llama_cpp_refuses_is_noticed(base, tmp_path):
    """The harness itself: a file for another architecture is refused by llama.cpp, and the test sees it."""
    arch, folder, gguf = base
    model = _adapter(folder, "adapter-other")
    config = model.config.to_dict()
    config["model_type"] = "qwen3" if arch in ("llama", "mistral") else "llama"
    out = li.export_gguf(folder / "adapter-other", tmp_path / "a.gguf", base=config)
    with pytest.raises(AdapterRefused):
        logits(gguf, TOKENS, tmp_path, lora=out)
