"""GGUF LoRA export (formats/gguf.py), checked without llama.cpp: the file read back with the ``gguf`` package's
reader, each tensor's update computed as llama.cpp computes it (``alpha / rank`` from the file, rope rows put
back) against this library's ``scale * B @ A``; every refusal leaves nothing behind. ``test_llama_cpp.py`` runs
the files in llama.cpp itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import lora_inject as li
from lora_inject.cli import main as cli_main

gguf = pytest.importorskip("gguf")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def _randomised(model, seed=0):
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p) * 0.3
    return model


def _adapted(targets=ALL, **options):
    model = tiny_llama(head_dim=8, tie_word_embeddings=False)  # 4 heads, 2 kv heads: grouped-query attention
    li.inject(model, targets=targets, r=options.pop("r", 4), alpha=options.pop("alpha", 8), **options)
    return _randomised(model)


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in t.shape[::-1])  # the reader gives ggml's order
        data = np.asarray(t.data)
        if int(t.tensor_type) == 30:  # bf16 comes back as raw bytes: numpy has no bfloat16
            tensor = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).float()
        else:
            tensor = torch.from_numpy(data.astype(np.float32))
        tensors[t.name] = (tensor.reshape(shape), t.tensor_type)
    return fields, tensors


def _unpermute_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's rope permutation row by row: its row h*d + 2j + i holds row h*d + i*d/2 + j."""
    d = b.shape[0] // heads
    out = torch.empty_like(b)
    for h in range(heads):
        for j in range(d // 2):
            for i in range(2):
                out[h * d + i * d // 2 + j] = b[h * d + 2 * j + i]
    return out


def _llama_cpp_updates(path, heads=4, kv_heads=2):
    """``{gguf base tensor: update as llama.cpp applies it}`` in Hugging Face's row order."""
    fields, tensors = _read(path)
    alpha = float(fields["adapter.lora.alpha"])
    updates = {}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b = tensors[name + ".lora_a"][0].double(), tensors[name + ".lora_b"][0].double()
        scale = alpha / b.shape[1] if alpha else 1.0
        if name.startswith("token_embd"):
            updates[name] = scale * (a @ b.T)  # (vocab, hidden), as llama.cpp's get_rows(A) then B
            continue
        delta = scale * (b @ a)
        if ".attn_q." in name or ".attn_k." in name:
            delta = _unpermute_rows(delta, heads if ".attn_q." in name else kv_heads)
        updates[name] = delta
    return updates


def _our_updates(model):
    updates = {}
    for path, layer in li.lora_layers(model):
        config = li.adapter_configs(model)["default"]
        if hasattr(layer, "lora_embedding_A"):
            a, b = layer.lora_embedding_A["default"].double(), layer.lora_embedding_B["default"].double()
            updates[path] = config.scale_for(path) * (b @ a).T
        else:
            a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
            updates[path] = config.scale_for(path) * (b @ a)
    return updates


def _gguf_name(path):
    if path.endswith("embed_tokens"):
        return "token_embd.weight"
    if path == "lm_head":
        return "output.weight"
    parts = path.split(".")
    return f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:])]}.weight"


def _assert_same_updates(model, path):
    ours = {_gguf_name(p): u for p, u in _our_updates(model).items()}
    theirs = _llama_cpp_updates(path)
    assert sorted(ours) == sorted(theirs)
    for name, update in ours.items():
        torch.testing.assert_close(theirs[name], update, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("options", [
    {},
    {"rslora": True},
    {"rank_pattern": {"k_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"down_proj": 3.0, "v_proj": 0.5}},
    {"alpha": 0.3},
], ids=["plain", "rslora", "patterns", "odd-alpha"])
def test_every_module_updates_as_this_library_computes(tmp_path, options):
    model = _adapted(**options)
    li.save_adapter(model, tmp_path / "adapter")
    out = li.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=model.config)
    _assert_same_updates(model, out)
    fields, tensors = _read(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(options.get("alpha", 8), rel=1e-7)
    rank = li.adapter_configs(model)["default"].rank_for("model.layers.0.self_attn.k_proj")
    assert tensors["blk.0.attn_k.weight.lora_a"][0].shape == (rank, 32)


def test_plain_adapters_keep_their_factors_and_only_q_k_rows_move(tmp_path):
    """No scale folded where alpha/rank says it already: A and B as trained (llama.cpp's converter writes the same)."""
    model = _adapted()
    out = li.export_gguf(model, tmp_path / "a.gguf")
    _, tensors = _read(out)
    layer = dict(li.lora_layers(model))["model.layers.1.self_attn.v_proj"]
    assert torch.equal(tensors["blk.1.attn_v.weight.lora_a"][0], layer.lora_A["default"].weight.detach())
    assert torch.equal(tensors["blk.1.attn_v.weight.lora_b"][0], layer.lora_B["default"].weight.detach())
    q = dict(li.lora_layers(model))["model.layers.0.self_attn.q_proj"].lora_B["default"].weight.detach()
    assert torch.equal(_unpermute_rows(tensors["blk.0.attn_q.weight.lora_b"][0], 4), q)
    assert not torch.equal(tensors["blk.0.attn_q.weight.lora_b"][0], q)


def test_embedding_and_untied_head(tmp_path):
    model = _adapted(targets=["embed_tokens", "lm_head", "q_proj"])
    out = li.export_gguf(model, tmp_path / "a.gguf")
    _, tensors = _read(out)
    assert tensors["token_embd.weight.lora_a"][0].shape == (100, 4)  # A stored transposed: (vocab, r)
    assert tensors["token_embd.weight.lora_b"][0].shape == (32, 4)
    assert tensors["output.weight.lora_b"][0].shape == (100, 4)
    _assert_same_updates(model, out)


@pytest.mark.parametrize("outtype,code,dtype", [("f16", 1, torch.float16), ("bf16", 30, torch.bfloat16)])
def test_half_precision_exports_round_each_factor_once(tmp_path, outtype, code, dtype):
    model = _adapted(rslora=True)
    li.save_adapter(model, tmp_path / "adapter")
    out = li.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=model.config, outtype=outtype)
    f32 = li.export_gguf(tmp_path / "adapter", tmp_path / "b.gguf", base=model.config)
    _, half = _read(out)
    _, full = _read(f32)
    for name, (tensor, kind) in half.items():
        assert int(kind) == code
        assert torch.equal(tensor, full[name][0].to(dtype).float()), name


def test_the_command_writes_and_refuses_to_overwrite(tmp_path, capsys):
    model = _adapted()
    li.save_adapter(model, tmp_path / "adapter")
    model.config.save_pretrained(tmp_path / "base")
    args = ["export", str(tmp_path / "adapter"), str(tmp_path / "a.gguf"), "--base", str(tmp_path / "base")]
    assert cli_main(args) == 0
    _assert_same_updates(model, tmp_path / "a.gguf")
    before = (tmp_path / "a.gguf").read_bytes()
    assert cli_main(args + ["--outtype", "f16"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "a.gguf").read_bytes() == before
    assert cli_main(args + ["--outtype", "f16", "--force"]) == 0
    assert (tmp_path / "a.gguf").read_bytes() != before


def test_save_adapter_format_gguf_and_gguf_files_are_not_read_back(tmp_path):
    model = _adapted()
    li.save_adapter(model, tmp_path / "a.gguf", format="gguf")
    _assert_same_updates(model, tmp_path / "a.gguf")
    with pytest.raises(li.AdapterFileError, match="does not read it back"):
        li.load_adapter(tiny_llama(), tmp_path / "a.gguf")


def _refused(tmp_path, source, base, match, **kw):
    out = tmp_path / "out" / "a.gguf"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(b"previous")
    with pytest.raises(li.ExportError, match=match) as info:
        li.export_gguf(source, out, base=base, **kw)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in out.parent.iterdir()] == ["a.gguf"]  # no partial file
    return str(info.value)


ROUTE = "lora-inject merge"


@pytest.mark.parametrize("options,match", [
    ({"dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["model.norm"]}, "modules_to_save"),
    ({"trainable_tokens": [3, 5]}, "trainable tokens"),
])
def test_what_llama_cpp_cannot_compute_is_refused_with_the_route_that_works(tmp_path, options, match):
    model = _adapted(**options)
    li.save_adapter(model, tmp_path / "adapter")
    message = _refused(tmp_path, tmp_path / "adapter", model.config, match)
    assert ROUTE in message and "convert_hf_to_gguf.py" in message


def test_resized_embeddings_that_travel_are_refused(tmp_path):
    model = _adapted()
    model.resize_token_embeddings(104)
    li.save_adapter(model, tmp_path / "adapter")
    assert "model.embed_tokens.weight" in li.read_adapter_tensors(tmp_path / "adapter")
    _refused(tmp_path, tmp_path / "adapter", model.config, "resized embeddings")


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_head_or_embedding_on_a_tied_base_is_refused(tmp_path, target):
    """llama.cpp has no output tensor on a tied base, and applies a token_embd adapter to the output too."""
    model = tiny_llama(head_dim=8, tie_word_embeddings=True)
    li.inject(model, targets=[target, "q_proj"], r=4)
    _refused(tmp_path, _randomised(model), None, "ties lm_head")


def test_architectures_llama_cpp_names_differently_are_refused_by_name(tmp_path):
    model = tiny_gpt2()
    li.inject(model, targets=["c_attn"], r=4)
    message = _refused(tmp_path, model, None, "model_type 'gpt2'")
    assert "llama, mistral, qwen2, qwen3" in message


def test_wrong_base_and_unknown_modules_are_refused(tmp_path):
    model = _adapted()
    li.save_adapter(model, tmp_path / "adapter")
    other = tiny_llama(head_dim=8, hidden_size=48).config
    _refused(tmp_path, tmp_path / "adapter", other, "Is --base the model")
    shallow = tiny_llama(head_dim=8, num_hidden_layers=1).config
    _refused(tmp_path, tmp_path / "adapter", shallow, "layers.1.*has no tensor")
    _refused(tmp_path, tmp_path / "adapter", None, "no base given")
    _refused(tmp_path, tmp_path / "adapter", tmp_path / "nowhere", "No config.json")
    with pytest.raises(li.ExportError, match="outtype"):
        li.export_gguf(tmp_path / "adapter", tmp_path / "x.gguf", base=model.config, outtype="q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_a_failing_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from lora_inject.formats import gguf as gguf_format

    model = _adapted()
    out = tmp_path / "a.gguf"
    out.write_bytes(b"previous")

    def broken(handle, metadata, tensors):
        handle.write(b"GGUF-half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_format, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        li.export_gguf(model, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_gguf_header_by_hand(tmp_path):
    """The writer's bytes, checked against the GGUF v3 layout without any reader."""
    import io
    import struct

    from lora_inject.formats.gguf_file import write_gguf

    handle = io.BytesIO()
    write_gguf(handle, {"k": "v", "a": 1.5}, {"t": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    raw = handle.getvalue()
    assert raw[:4] == b"GGUF" and struct.unpack_from("<IQQ", raw, 4) == (3, 1, 2)
    data_start = len(raw) - 32  # one tensor of 24 bytes, padded to 32
    assert data_start % 32 == 0
    assert struct.unpack_from("<6f", raw, data_start) == (0, 1, 2, 3, 4, 5)
    info = raw.index(b"\x01\x00\x00\x00\x00\x00\x00\x00t") + 9  # name "t", then dims, type, offset
    assert struct.unpack_from("<I2QIQ", raw, info) == (2, 3, 2, 0, 0)  # ggml order: (in, out)
    assert math.isclose(struct.unpack_from("<f", raw, raw.index(b"a") + 5)[0], 1.5)


def test_a_config_whose_rank_disagrees_with_the_weights_is_refused(tmp_path):
    """llama.cpp divides by the tensors' rank; a config saying another rank would rescale every update."""
    import json

    model = _adapted()
    li.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(li.AdapterFileError, match="rank-4 factors but the config gives it rank 8"):
        li.export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=model.config)
    assert not (tmp_path / "a.gguf").exists()


def test_pissa_exports_for_the_original_base_and_its_residual_form_is_refused(tmp_path):
    model = tiny_llama(head_dim=8, tie_word_embeddings=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    li.inject(model, targets=["q_proj", "v_proj"], r=2, init="pissa")
    _randomised(model)
    out = li.export_gguf(model, tmp_path / "a.gguf")
    merged = li.merge_and_unload(__import__("copy").deepcopy(model)).state_dict()
    updates = _llama_cpp_updates(out)
    for path, name in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                       ("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight")):
        expected = (merged[path + ".weight"] - original[path + ".weight"]).double()
        torch.testing.assert_close(updates[name], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(li.ExportError, match="residual form"):
        li.save_adapter(model, tmp_path / "b.gguf", format="gguf", principal_as_lora=False)
    assert not (tmp_path / "b.gguf").exists()


def test_a_damaged_base_config_is_an_error_not_a_crash(tmp_path, capsys):
    model = _adapted()
    li.save_adapter(model, tmp_path / "adapter")
    config = model.config.to_dict() | {"num_attention_heads": 0, "head_dim": None}
    _refused(tmp_path, tmp_path / "adapter", config, "positive integer")
