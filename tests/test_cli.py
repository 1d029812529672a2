"""The lora-inject command, driven through its entry point."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as t
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open

import lora_inject as li
from lora_inject.cli import main


def read_all(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as handle:
                tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


def test_inspect_70b_config_on_meta(tmp_path, capsys):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path / "config.json"), "-r", "16"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.*.self_attn.q_proj  80" in out
    assert "560 layers wrapped" in out  # llama preset: 7 projections x 80 layers
    assert f"{80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672)):,}" in out
    assert f"of {70_553_706_496 + 207_093_760:,} total" in out  # Llama-3-70B: 70.55B base parameters


def test_inspect_counts_dora_magnitudes(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--targets", "q_proj", "-r", "4"]) == 0
    plain = capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--targets", "q_proj", "-r", "4", "--dora"]) == 0
    dora = capsys.readouterr().out
    assert f"adapter parameters {2 * 4 * (32 + 32):,} " in plain
    assert f"adapter parameters {2 * 4 * (32 + 32) + 2 * 32:,} " in dora  # one magnitude entry per output feature


def test_inspect_targets_and_near_misses(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--targets", "q_proj", "v_prj", "--full"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out
    assert "'v_prj' matched nothing; closest names: v_proj" in out


def test_inspect_unknown_model_type_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    assert main(["inspect", str(tmp_path / "config.json")]) == 2
    assert "model_type" in capsys.readouterr().err


# ----- streaming merge ------------------------------------------------------------------------
def _checkpoint(tmp_path, kind, dtype=torch.float32, **extra):
    """A sharded base checkpoint (stored in ``dtype``), an adapter for it, and the model class."""
    if kind == "llama":
        model, cls = tiny_llama(), t.LlamaForCausalLM
        li_kwargs = dict(targets=["q_proj", "v_proj", "down_proj", "embed_tokens"], rslora=True,
                         rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 5})
    elif kind == "gpt2":
        model, cls = tiny_gpt2(), t.GPT2LMHeadModel
        li_kwargs = dict(targets=["c_attn", "c_proj", "c_fc"])
    else:
        model, cls = tiny_bert(), t.BertForSequenceClassification
        li_kwargs = dict(targets=["query", "value"], modules_to_save=["classifier"], bias="lora_only")
    model = model.to(dtype)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    li.inject(model, r=4, **li_kwargs, **extra)
    randomize_adapters(model)
    if kind == "bert":
        with torch.no_grad():
            model.classifier.modules_to_save["default"].weight.add_(1)
            model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(1)
    li.save_adapter(model, tmp_path / "adapter")
    return cls


def _merged_both_ways(tmp_path, cls, dtype):
    """``lora-inject merge --verify`` of tmp_path's base and adapter, and merge_and_unload + save_pretrained
    of the same; returns (the command's argv, its tensors, the reference's tensors), same keys."""
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--verify"]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    torch_dtype = torch.bfloat16 if dtype else torch.float32
    reference = li.from_pretrained(tmp_path / "base", tmp_path / "adapter", model_class=cls, dtype=torch_dtype)
    li.merge_and_unload(reference).save_pretrained(tmp_path / "reference", max_shard_size="20KB")
    ours, theirs = read_all(tmp_path / "out"), read_all(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    return argv, ours, theirs


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_streaming_merge_is_bit_identical_to_merge_and_unload(kind, dtype, tmp_path):
    cls = _checkpoint(tmp_path, kind)
    shards = [n for n in os.listdir(tmp_path / "base") if n.endswith(".safetensors")]
    assert len(shards) > 1  # really sharded
    argv, ours, theirs = _merged_both_ways(tmp_path, cls, dtype)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.endswith(".safetensors")) == sorted(shards)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    reloaded = cls.from_pretrained(tmp_path / "out")  # plain transformers reads it
    assert not any("lora" in k for k in reloaded.state_dict())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_streaming_merge_of_dora_is_bit_identical_and_verified(kind, dtype, tmp_path, monkeypatch):
    """DoRA rescales every output feature of W + s*dW: row chunks for Linear (norms per row), the whole
    tensor for Conv1D and Embedding (norms per column); --verify recomputes it in float64."""
    from lora_inject.checkpoint import merge as checkpoint_merge

    cls = _checkpoint(tmp_path, kind, dora=True)
    with torch.no_grad():  # magnitudes away from their init: the merge must use them
        model = li.from_pretrained(tmp_path / "base", tmp_path / "adapter", model_class=cls)
        for _, layer in li.lora_layers(model):
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
        li.save_adapter(model, tmp_path / "adapter")
    argv, ours, theirs = _merged_both_ways(tmp_path, cls, dtype)
    changed = [k for k in theirs if not torch.equal(theirs[k], read_all(tmp_path / "base").get(k, theirs[k]))]
    assert changed
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    monkeypatch.setattr(checkpoint_merge, "CHUNK_ELEMENTS", 200)  # several row chunks per Linear: same values
    argv[3] = str(tmp_path / "chunked")
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    for key, value in read_all(tmp_path / "chunked").items():
        torch.testing.assert_close(value, ours[key], atol=1e-6, rtol=0 if dtype is None else 1e-2)


def test_streaming_merge_of_a_float64_checkpoint_keeps_float64_precision(tmp_path):
    """A float64 checkpoint is merged in float64, bit-identical to merge_and_unload of the float64 model."""
    cls = _checkpoint(tmp_path, "llama", dtype=torch.float64)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    reference = li.from_pretrained(tmp_path / "base", tmp_path / "adapter", model_class=cls, dtype=torch.float64)
    adapted = len(list(li.lora_layers(reference)))
    expected = {k: v for k, v in li.merge_and_unload(reference).state_dict().items() if k != "lm_head.weight"}
    merged, stored = read_all(tmp_path / "out"), read_all(tmp_path / "base")
    changed = 0
    for key, value in expected.items():
        assert merged[key].dtype == torch.float64, key
        assert torch.equal(merged[key], value), key
        changed += not torch.equal(merged[key], stored[key])
    assert changed == adapted > 0  # every adapted weight really merged, nothing else touched


def test_merge_refusals(tmp_path, capsys):
    _checkpoint(tmp_path, "llama")
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    before = {n: (tmp_path / "base" / n).read_bytes() for n in os.listdir(base)}
    assert main(["merge", base, adapter, base]) == 2
    assert "never written" in capsys.readouterr().err
    assert main(["merge", base, adapter, str(tmp_path / "base" / "sub")]) == 2
    (tmp_path / "out").mkdir()
    assert main(["merge", base, adapter, str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["merge", base, adapter, str(tmp_path / "out"), "--force", "--quiet"]) == 0
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "out")
    assert {n: (tmp_path / "base" / n).read_bytes() for n in os.listdir(base)} == before
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n or ".old-" in n]


def test_merge_refuses_a_grouped_conv_adapter_before_writing(tmp_path, capsys):
    from safetensors.torch import save_file
    from torch import nn

    model = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.Flatten(), nn.Linear(12, 2))
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    li.inject(model, targets=["0", "2"], r=8)
    li.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    assert "grouped conv makes a dense update" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_refuses_tied_embedding_and_foreign_adapter(tmp_path, capsys):
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    li.inject(gpt2, targets=["wte"])
    li.save_adapter(gpt2, tmp_path / "tied")
    assert main(["merge", str(tmp_path / "gpt2"), str(tmp_path / "tied"), str(tmp_path / "o1")]) == 2
    assert "tied" in capsys.readouterr().err
    llama = li.inject(tiny_llama(), targets=["q_proj"])
    li.save_adapter(llama, tmp_path / "foreign")
    assert main(["merge", str(tmp_path / "gpt2"), str(tmp_path / "foreign"), str(tmp_path / "o2")]) == 2
    assert "does not hold" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_verify_catches_a_wrong_merge(tmp_path, monkeypatch, capsys):
    from lora_inject.checkpoint import merge as checkpoint_merge

    _checkpoint(tmp_path, "llama")
    original = checkpoint_merge.Edit.add_to_rows
    monkeypatch.setattr(checkpoint_merge.Edit, "add_to_rows", lambda self, *rows: original(self, *rows).mul_(1.01))
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--verify"]
    assert main(argv) == 2
    assert "independent float64 computation" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_in_row_chunks_matches_whole(tmp_path, monkeypatch):
    from lora_inject.checkpoint import merge as checkpoint_merge

    _checkpoint(tmp_path, "gpt2")
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "adapter")]
    assert main(argv + [str(tmp_path / "whole"), "--quiet"]) == 0
    monkeypatch.setattr(checkpoint_merge, "CHUNK_ELEMENTS", 100)  # a few rows at a time
    assert main(argv + [str(tmp_path / "chunked"), "--quiet"]) == 0
    whole, chunked = read_all(tmp_path / "whole"), read_all(tmp_path / "chunked")
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-6, rtol=0)


def test_demo_runs_through_the_entry_point(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy before fine-tuning" in out and "accuracy after fine-tuning" in out
    assert "max |logit difference| = 0.00e+00" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_demo_dataset_is_deterministic_and_balanced():
    from lora_inject.cli.demo import make_dataset

    train, test = make_dataset()
    assert train == make_dataset()[0] and len(train) == 320 and len(test) == 160
    assert 0.35 < sum(y for _, y in train) / len(train) < 0.65
    train_words = {w.strip(".,") for s, _ in train for w in s.split()}
    assert "brilliant" not in train_words and any("brilliant" in s for s, _ in test)
    labels = dict(train + test)
    assert labels.get("the food was not great.", 0) == 0 and labels.get("the food was great.", 1) == 1


def test_merge_refuses_adapter_for_another_size_before_writing(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "base")
    other = li.inject(tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2), targets=["q_proj"])
    li.save_adapter(other, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    assert "trained on another model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_merge_settles_conv1d_layout_by_shape_even_if_config_says_otherwise(tmp_path):
    _checkpoint(tmp_path, "gpt2")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["fan_in_fan_out"] = False  # wrong, as some hand-written configs are
    config_path.write_text(json.dumps(config))
    base_args = [str(tmp_path / "base"), str(tmp_path / "adapter")]
    assert main(["merge", *base_args, str(tmp_path / "out"), "--verify", "--quiet"]) == 0
    reference = li.from_pretrained(tmp_path / "base", tmp_path / "adapter", model_class=t.GPT2LMHeadModel)
    merged = read_all(tmp_path / "out")
    expected = li.merge_and_unload(reference).state_dict()
    # c_fc (32, 128) shows the Conv1D layout by its shape; the square attn.c_proj (32, 32) follows it
    assert tuple(merged["transformer.h.0.attn.c_proj.weight"].shape) == (32, 32)
    for key in merged:
        assert torch.equal(merged[key], expected[key]), key
