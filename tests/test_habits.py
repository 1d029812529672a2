"""Habits users bring from PEFT, transformers and torch: each one works or fails loudly, never silently wrong."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from torch import nn

import lora_inject as li


def ids(n=2, length=7):
    return torch.randint(0, 100, (n, length))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ----- 1. a second inject under one name ----------------------------------------------------------------
def test_second_inject_under_the_same_name_is_refused_and_changes_nothing():
    model = tiny_llama()
    li.inject(model, targets=["q_proj"], r=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(li.AdapterExistsError, match=r"already has an adapter named 'default'.*one call"):
        li.inject(model, targets=["v_proj"], r=8, alpha=8)
    with pytest.raises(li.AdapterExistsError):  # same rank, other alpha: the doubled-scale case
        li.inject(model, targets=["v_proj"], r=4, alpha=16)
    with pytest.raises(li.AdapterExistsError):
        li.plan(model, targets=["v_proj"])
    assert [p for p, _ in li.lora_layers(model)] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert model.state_dict().keys() == before.keys()
    li.inject(model, targets=["v_proj"], r=8, adapter="other")  # another name works


def test_loading_under_an_existing_name_on_other_layers_is_refused(tmp_path):
    source = tiny_llama()
    li.inject(source, targets=["v_proj"])
    li.save_adapter(source, tmp_path / "v")
    model = tiny_llama()
    li.inject(model, targets=["q_proj"])
    with pytest.raises(li.AdapterExistsError, match="'default'"):
        li.load_adapter(model, tmp_path / "v")
    assert not any("v_proj" in p for p, _ in li.lora_layers(model))


# ----- 3. compiled models -----------------------------------------------------------------------
def test_compiled_model_saves_loads_and_lists_like_the_plain_one(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    li.inject(model, targets=["q_proj", "v_proj"], r=4)
    randomize_adapters(model)
    compiled = torch.compile(model)
    state = li.lora_state_dict(compiled)
    assert state.keys() == li.lora_state_dict(model).keys() and not any("_orig_mod" in k for k in state)
    li.save_adapter(compiled, tmp_path / "a")
    keys = li.read_adapter_tensors(tmp_path / "a")
    assert keys and not any("_orig_mod" in k for k in keys)
    target = torch.compile(copy.deepcopy(base))
    assert li.load_adapter(target, tmp_path / "a") is target
    x = ids()
    torch.testing.assert_close(logits(target._orig_mod, x), logits(model, x), atol=1e-6, rtol=1e-6)
    assert li.active_adapters(target) == ["default"] and li.adapter_configs(target).keys() == {"default"}
    li.load_adapter_weights(target, tmp_path / "a")
    plain = li.merge_and_unload(target)
    assert isinstance(plain, type(model)) and not list(li.lora_layers(plain))
    torch.testing.assert_close(logits(plain, x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_inject_into_a_compiled_model_returns_it_and_adapts_the_model_inside():
    compiled = torch.compile(tiny_llama())
    assert li.inject(compiled, targets=["q_proj"]) is compiled
    assert len(list(li.lora_layers(compiled._orig_mod))) == 2


# ----- 4. casting after inject ----------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_casting_the_model_keeps_float32_adapters_that_train(cast):
    model = tiny_llama()
    li.inject(model, targets=["q_proj", "v_proj", "embed_tokens"], r=4)
    randomize_adapters(model, std=0.02)
    half = {"to": lambda m: m.to(torch.bfloat16), "half": nn.Module.half, "bfloat16": nn.Module.bfloat16}[cast]
    half(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype in (torch.bfloat16, torch.float16)
    adapter = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    start = [p.detach().clone() for p in adapter]
    optimizer = torch.optim.AdamW(adapter, lr=1e-4)
    x = ids()
    model.train()
    for _ in range(5):
        loss = model(x, labels=x).loss.float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for before, p in zip(start, adapter):
        assert (p.detach() != before).all(), "an adapter entry never moved: the training signal was lost"


def test_casting_moves_nothing_it_should_not():
    model = tiny_llama()
    li.inject(model, targets=["q_proj"], adapter_dtype=torch.bfloat16)  # half adapters asked for: kept
    model.float()
    assert model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    model.half()
    assert model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    model.double()
    assert model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float64
    other = tiny_llama()
    li.inject(other, targets=["q_proj"], adapter_dtype=torch.bfloat16)
    other.half()  # created half on purpose: converted as asked
    assert other.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float16


def test_casting_keeps_values_exact_and_moves_gradients():
    model = tiny_llama()
    li.inject(model, targets=["q_proj"])
    randomize_adapters(model)
    a = model.model.layers[0].self_attn.q_proj.lora_A.default.weight
    a.grad = torch.randn_like(a)
    before = a.detach().clone()
    model.to(torch.bfloat16)
    assert torch.equal(a.detach(), before) and a.grad.dtype == torch.float32


# ----- 6. task type ------------------------------------------------------------------------------------
def test_task_type_is_written_from_the_model_class(tmp_path):
    import transformers as t
    from conftest import tiny_bert

    t5 = t.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    cases = [(tiny_llama(), "CAUSAL_LM", None), (tiny_bert(), "SEQ_CLS", ["classifier"]),
             (t.BertModel(tiny_bert().config), "FEATURE_EXTRACTION", None),
             (t.BertForTokenClassification(tiny_bert().config), "TOKEN_CLS", ["classifier"]),
             (t.BertForQuestionAnswering(tiny_bert().config), "QUESTION_ANS", ["qa_outputs"]),
             (t.T5ForConditionalGeneration(t5), "SEQ_2_SEQ_LM", None),
             (tiny_bert(), None, None)]  # a head task whose head the adapter does not save: PEFT could not load it
    for i, (model, expected, heads) in enumerate(cases):
        li.inject(model, targets="all-linear", modules_to_save=heads)
        li.save_adapter(model, tmp_path / str(i))
        assert li.read_adapter_config(tmp_path / str(i)).task_type == expected, type(model).__name__
    plain = nn.Sequential(nn.Linear(4, 4))
    li.inject(plain, targets=["0"])
    li.save_adapter(plain, tmp_path / "plain")
    assert li.read_adapter_config(tmp_path / "plain").task_type is None
    model = tiny_llama()
    li.inject(model, targets=["q_proj"], task_type="SEQ_CLS")  # the user's choice wins
    li.save_adapter(model, tmp_path / "mine")
    assert li.read_adapter_config(tmp_path / "mine").task_type == "SEQ_CLS"


def test_auto_peft_model_loads_our_adapter(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    import transformers as t

    model = t.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    li.inject(model, targets=["q_proj", "v_proj"], r=4)
    randomize_adapters(model)
    li.save_adapter(model, tmp_path / "adapter")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    x = ids()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)


# ----- 7. PEFT's vocabulary ----------------------------------------------------------------------------
def test_a_peft_lora_config_is_accepted_and_means_the_same(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             use_rslora=True, rank_pattern={"v_proj": 2}, task_type="CAUSAL_LM")
    base = tiny_llama()
    ours = copy.deepcopy(base)
    li.inject(ours, config)
    randomize_adapters(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    missing = theirs.load_state_dict({"base_model.model." + k: v for k, v in li.lora_state_dict(ours).items()},
                                     strict=False).unexpected_keys
    assert not missing
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-6, rtol=1e-6)
    layer = ours.model.layers[0].self_attn.v_proj
    assert layer.r["default"] == 2 and layer.scaling["default"] == pytest.approx(12 / 2**0.5)
    dora = li.inject(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))  # DoRA converts too
    assert li.adapter_configs(dora)["default"].dora
    pissa = li.inject(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    assert li.adapter_configs(pissa)["default"].init == "pissa"
    tokens = li.inject(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4, 2]))
    assert li.adapter_configs(tokens)["default"].trainable_tokens == [4, 2]


@pytest.mark.parametrize("field, value", [
    ("init_lora_weights", "orthogonal"), ("init_lora_weights", "mica"), ("layer_replication", [[0, 1]]),
])
def test_a_peft_config_with_what_we_do_not_implement_is_refused_by_name(field, value):
    config = peft.LoraConfig(target_modules=["q_proj"], **{field: value})
    model = tiny_llama()
    with pytest.raises(li.ConfigError, match=field):
        li.inject(model, config)
    assert not list(li.lora_layers(model))


@pytest.mark.parametrize("peft_name, ours", [
    ("target_modules", "targets"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"), ("use_rslora", "rslora"),
    ("init_lora_weights", "init"), ("exclude_modules", "exclude"), ("layers_to_transform", "layers"),
])
def test_peft_field_names_say_which_name_we_use(peft_name, ours):
    with pytest.raises(li.ConfigError, match=rf"'{peft_name}' \(did you mean '{ours}'\?\)"):
        li.inject(tiny_llama(), targets=["q_proj"], **{peft_name: 1})
    with pytest.raises(li.ConfigError, match=rf"did you mean '{ours}'"):
        li.LoraConfig(**{peft_name: 1})
    with pytest.raises(li.ConfigError, match="did you mean 'alpha'"):
        li.LoraConfig(alhpa=3)


# ----- 9. exclude ---------------------------------------------------------------------------------
def test_exclude_naming_a_container_excludes_what_is_under_it(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    li.inject(model, targets=[nn.Linear], exclude=["mlp", "lm_head"])
    paths = [p for p, _ in li.lora_layers(model)]
    assert paths and all("self_attn" in p for p in paths) and len(paths) == 8
    randomize_adapters(model)
    li.save_adapter(model, tmp_path / "a")  # the file names the modules: exact in PEFT too
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    x = ids()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-6, rtol=1e-6)
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(paths)
    by_type = tiny_llama()
    li.inject(by_type, targets=[nn.Linear], exclude=[type(by_type.model.layers[0].mlp), "lm_head"])
    assert [p for p, _ in li.lora_layers(by_type)] == paths


def test_an_exclude_that_matches_nothing_is_an_error_with_close_names():
    model = tiny_llama()
    with pytest.raises(li.TargetNotFoundError, match=r"'mpl' matched nothing; closest names: mlp"):
        li.inject(model, targets=[nn.Linear], exclude=["mpl"])
    assert not list(li.lora_layers(model))


def test_peft_exclude_modules_keep_peft_meaning_when_loading(tmp_path):
    config = peft.LoraConfig(target_modules=["up_proj", "q_proj"], exclude_modules=["mlp", "layers.1.self_attn.q_proj"])
    theirs = peft.get_peft_model(tiny_llama(), config)  # PEFT excludes a listed module itself, not its children
    theirs.save_pretrained(tmp_path / "p")
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    ours = li.load_adapter(tiny_llama(), tmp_path / "p")
    assert {p for p, _ in li.lora_layers(ours)} == wrapped
    assert "model.layers.1.self_attn.q_proj" not in wrapped and "model.layers.0.mlp.up_proj" in wrapped


# ----- 10. near misses -------------------------------------------------------------------------------
@pytest.mark.parametrize("miss, expected", [("q", "q_proj"), ("proj", "q_proj"), ("gate", "gate_proj"),
                                            ("q_prj", "q_proj")])
def test_short_or_misspelt_targets_suggest_the_names_that_exist(miss, expected):
    with pytest.raises(li.TargetNotFoundError, match=rf"'{miss}' matched nothing; closest names: .*{expected}"):
        li.inject(tiny_llama(), targets=[miss])


# ----- 2. save_pretrained & co on an injected model ------------------------------------------------------
@pytest.fixture
def llama_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _trained(llama_dir, **kw):
    import transformers as t

    model = t.AutoModelForCausalLM.from_pretrained(llama_dir)
    li.inject(model, targets=["q_proj", "v_proj"], r=4, **kw)
    randomize_adapters(model)
    return model.eval()


def _assert_adapter_folder(folder):
    import os

    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not any(f.startswith(("model", "pytorch_model", "config.json")) for f in files), files


def test_save_pretrained_writes_the_adapter_and_every_loader_restores_the_model(llama_dir, tmp_path):
    import transformers as t

    model = _trained(llama_dir)
    model.save_pretrained(tmp_path / "saved")
    _assert_adapter_folder(tmp_path / "saved")
    x = ids()
    expected = logits(model, x)
    for loaded in (li.from_pretrained(tmp_path / "saved"),
                   peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "saved"),
                   t.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")):  # transformers' PEFT integration
        torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=1e-5)


def test_save_pretrained_with_several_adapters_follows_peft_layout(llama_dir, tmp_path):
    model = _trained(llama_dir)
    li.inject(model, targets=["k_proj"], adapter="second")
    randomize_adapters(model, "second")
    model.save_pretrained(tmp_path / "saved")
    _assert_adapter_folder(tmp_path / "saved")
    _assert_adapter_folder(tmp_path / "saved" / "second")
    theirs = peft.PeftModel.from_pretrained(_fresh(llama_dir), tmp_path / "saved")
    theirs.load_adapter(tmp_path / "saved" / "second", adapter_name="second")
    theirs.set_adapter("second")
    x = ids()
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "only", selected_adapters=["second"])
    assert li.read_adapter_config(tmp_path / "only" / "second").targets == ["k_proj"]
    model.save_pretrained(tmp_path / "nothing", is_main_process=False)
    assert not (tmp_path / "nothing").exists()


def _fresh(llama_dir):
    import transformers as t

    return t.AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def test_save_pretrained_stays_the_adapter_one_through_deepcopy_and_pickling(llama_dir, tmp_path):
    import io

    model = _trained(llama_dir)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        folder = tmp_path / str(id(other))
        other.save_pretrained(folder)
        _assert_adapter_folder(folder)
        x = ids()
        torch.testing.assert_close(logits(li.load_adapter(_fresh(llama_dir), folder), x), logits(other, x),
                                   atol=1e-6, rtol=1e-6)


def test_merge_and_unload_gives_back_transformers_save_pretrained(llama_dir, tmp_path):
    import transformers as t

    model = _trained(llama_dir)
    x = ids()
    expected = logits(model, x)
    plain = li.merge_and_unload(model)
    assert "save_pretrained" not in plain.__dict__
    plain.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "config.json").is_file()
    torch.testing.assert_close(logits(t.AutoModelForCausalLM.from_pretrained(tmp_path / "full"), x), expected,
                               atol=1e-5, rtol=1e-5)
    other = _trained(llama_dir)
    li.delete_adapter(other, "default")  # the last adapter gone: the class's method again
    assert "save_pretrained" not in other.__dict__


def test_push_to_hub_uploads_the_adapter_files(llama_dir, tmp_path, monkeypatch):
    import shutil

    import transformers as t
    import transformers.utils.hub as hub

    uploaded = tmp_path / "uploaded"

    class Repo:
        repo_id = "me/adapter"

    class Api:
        def create_repo(self, *args, **kwargs):
            return Repo()

    class Card:
        def save(self, path):
            open(path, "w").write("card")

    def upload(self, folder, repo_id, **kwargs):
        shutil.copytree(folder, uploaded)
        return repo_id

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: Card())
    monkeypatch.setattr(t.PreTrainedModel, "_upload_modified_files", upload)
    model = _trained(llama_dir)
    assert model.push_to_hub("me/adapter") == "me/adapter"
    _assert_adapter_folder(uploaded)
    x = ids()
    torch.testing.assert_close(logits(li.from_pretrained(llama_dir, uploaded), x), logits(model, x),
                               atol=1e-5, rtol=1e-5)


def test_trainer_save_model_writes_the_adapter(llama_dir, tmp_path):
    import transformers as t

    model = _trained(llama_dir)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 100, (8, 8))]
    args = t.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                               learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
                               logging_strategy="no")
    trainer = t.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    _assert_adapter_folder(tmp_path / "run" / "checkpoint-2")  # checkpoints too: kilobytes, not the model
    trainer.save_model(tmp_path / "final")
    _assert_adapter_folder(tmp_path / "final")
    x = ids()
    torch.testing.assert_close(logits(li.from_pretrained(tmp_path / "final"), x), logits(model.eval(), x),
                               atol=1e-5, rtol=1e-5)


def test_accelerator_save_model_reloads_into_an_injected_model_and_is_refused_as_a_base(llama_dir, tmp_path):
    import accelerate

    model = _trained(llama_dir)
    accelerate.Accelerator(cpu=True).save_model(model, tmp_path / "acc")
    again = _fresh(llama_dir)
    li.inject(again, targets=["q_proj", "v_proj"], r=4)
    accelerate.load_checkpoint_in_model(again, str(tmp_path / "acc"))
    x = ids()
    torch.testing.assert_close(logits(again, x), logits(model, x), atol=1e-6, rtol=1e-6)
    model.config.save_pretrained(tmp_path / "acc")  # now it looks like a transformers folder
    with pytest.raises(li.AdapterFileError, match="LoRA wrappers.*randomly initialised"):
        li.from_pretrained(tmp_path / "acc")


# ----- 5. resize_token_embeddings after inject -------------------------------------------------------
RESIZE_CASES = {
    "lora_elsewhere": ("llama", dict(targets=["q_proj", "v_proj"])),
    "lora_on_embedding_and_head": ("llama", dict(targets=["q_proj", "embed_tokens", "lm_head"])),
    "new_rows_trained": ("llama", dict(targets=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    "tied_gpt2_lora_on_wte": ("gpt2", dict(targets=["c_attn", "wte"])),
    "tied_gpt2_wte_trained": ("gpt2", dict(targets=["c_attn"], modules_to_save=["wte"])),
}


@pytest.mark.parametrize("case", sorted(RESIZE_CASES))
def test_resize_token_embeddings_after_inject_trains_saves_and_reloads(case, tmp_path):
    from conftest import tiny_gpt2

    family, kw = RESIZE_CASES[case]
    base = tiny_gpt2() if family == "gpt2" else tiny_llama()
    model = copy.deepcopy(base)
    li.inject(model, **kw)
    randomize_adapters(model)
    x = ids()
    before = logits(model, x)
    model.resize_token_embeddings(110)
    assert model.config.vocab_size == 110 and model.get_input_embeddings().weight.shape[0] == 110
    torch.testing.assert_close(logits(model, x)[..., :100], before, atol=1e-6, rtol=1e-6)  # old tokens unchanged
    new_ids = torch.randint(100, 110, (2, 7))
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    for _ in range(2):
        model(new_ids, labels=new_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert any(not torch.equal(a, p) for a, p in zip(start, trainable))
    if "modules_to_save" in kw:  # the documented way to train the new rows themselves
        copy_ = model.get_input_embeddings().modules_to_save["default"]
        assert not torch.equal(copy_.weight[100:], model.get_input_embeddings().original_module.weight[100:])
    model.save_pretrained(tmp_path / "a")
    x2 = torch.randint(0, 110, (2, 7))
    expected = logits(model, x2)
    ours = copy.deepcopy(base)
    ours.resize_token_embeddings(110)
    torch.testing.assert_close(logits(li.load_adapter(ours, tmp_path / "a"), x2), expected, atol=1e-5, rtol=1e-5)
    theirs = copy.deepcopy(base)
    theirs.resize_token_embeddings(110)
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "a")
    torch.testing.assert_close(logits(theirs, x2), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(li.AdapterFileError, match=r"resize_token_embeddings\(110\)"):
        li.load_adapter(copy.deepcopy(base), tmp_path / "a")  # a fresh base: told to resize, nothing changed


def test_from_pretrained_resizes_to_the_adapters_vocabulary(llama_dir, tmp_path):
    model = _trained(llama_dir)
    model.resize_token_embeddings(120)
    model.save_pretrained(tmp_path / "a")
    x = torch.randint(0, 120, (2, 7))
    loaded = li.from_pretrained(tmp_path / "a")
    assert loaded.config.vocab_size == 120
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)
    again = li.load_adapter(loaded, tmp_path / "a", adapter="again")  # and re-export keeps the carried rows
    li.save_adapter(again, tmp_path / "b", adapter="again")
    assert li.read_adapter_tensors(tmp_path / "b").keys() == li.read_adapter_tensors(tmp_path / "a").keys()


def test_a_failing_resize_leaves_the_model_exactly_as_it_was(monkeypatch):
    model = tiny_llama()
    li.inject(model, targets=["q_proj", "embed_tokens", "lm_head"])
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(li.LoraLinear, "follow_base_resize", broken)  # after the embedding was resized
    with pytest.raises(RuntimeError, match="out of memory"):
        model.resize_token_embeddings(130)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.vocab_size == 100 and isinstance(model.lm_head, li.LoraLinear)
    assert model.model.embed_tokens.in_features == 100 and model.model.embed_tokens.base_layer.num_embeddings == 100
    assert model.lm_head.out_features == 100 and model.lm_head.base_layer.out_features == 100
    logits(model, ids())


# ----- 8. paths and hub ids ------------------------------------------------------------------------
def test_missing_local_paths_say_they_do_not_exist(llama_dir, tmp_path):
    missing = tmp_path / "nope"
    for call in (lambda: li.from_pretrained(missing), lambda: li.from_pretrained(llama_dir, missing),
                 lambda: li.from_pretrained(str(missing)), lambda: li.from_pretrained("./not/here/adapter"),
                 lambda: li.load_adapter(tiny_llama(), missing), lambda: li.read_adapter_config(missing)):
        with pytest.raises(li.AdapterFileError, match="does not exist"):
            call()


def _hub_cache(cache, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """A hub cache laid out as huggingface_hub lays it out: blobs, a snapshot of links, refs/main."""
    import hashlib
    import os
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for sub in ("blobs", f"snapshots/{commit}", "refs"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    for source in files:
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        shutil.copyfile(source, blob)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / commit), repo / "snapshots" / commit / source.name)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_for_base_and_adapter_read_the_cache_offline(llama_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import
    model = _trained(llama_dir)
    model.save_pretrained(tmp_path / "adapter")
    cache = tmp_path / "cache"
    _hub_cache(cache, "me/tiny-llama", sorted(llama_dir.iterdir()))
    config = (tmp_path / "adapter" / "adapter_config.json")
    config.write_text(config.read_text().replace(str(llama_dir), "me/tiny-llama"))
    _hub_cache(cache, "me/tiny-adapter", sorted((tmp_path / "adapter").iterdir()))
    x = ids()
    expected = logits(model, x)
    kw = dict(cache_dir=str(cache), local_files_only=True)
    for loaded in (li.from_pretrained("me/tiny-adapter", **kw),  # base from the adapter's config, also a hub id
                   li.from_pretrained("me/tiny-llama", "me/tiny-adapter", **kw),
                   li.load_adapter(_fresh(llama_dir), "me/tiny-adapter", **kw)):
        torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(li.AdapterFileError, match="could not be read as a Hugging Face hub repo id"):
        li.load_adapter(_fresh(llama_dir), "me/not-cached", **kw)
    with pytest.raises(li.AdapterFileError, match="revision"):
        li.load_adapter(_fresh(llama_dir), "me/tiny-adapter", revision="v2", **kw)


# ----- scaled embeddings (Gemma 3's embed_scale) -----------------------------------------------------
class ScaledEmbedding(nn.Embedding):
    """As transformers' Gemma3TextScaledWordEmbedding: the lookup times a fixed scale."""

    def __init__(self, *args, embed_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


@pytest.mark.parametrize("dora", [False, True])
def test_scaled_embeddings_scale_the_update_like_peft_and_merge_consistently(dora, tmp_path):
    base = nn.Sequential(ScaledEmbedding(50, 16, embed_scale=4.0), nn.Linear(16, 8))
    ours = li.inject(copy.deepcopy(base), targets=["0"], r=4, dora=dora)
    randomize_adapters(ours)
    li.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    x = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(expected, theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(li.merge_and_unload(ours)(x), expected, atol=1e-5, rtol=1e-5)


# ----- LoRA+ ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_equal_peft_create_loraplus_optimizer(dora):
    from conftest import tiny_bert
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_bert()
    kw = dict(r=4, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"],
              bias="lora_only")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=dora, **kw))
    ours = li.inject(copy.deepcopy(base), peft.LoraConfig(use_dora=dora, **kw))
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                         loraplus_weight_decay=0.01)
    ours_opt = li.loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.01)

    def by_name(model, optimizer, prefix=""):
        names = {id(p): n.removeprefix(prefix) for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}

    got, want = by_name(ours, ours_opt), by_name(theirs, peft_opt, "base_model.model.")
    assert got == want and len(got) > 10
    assert {lr for lr, _ in got.values()} == {1e-3, 1.6e-2, 1e-6}


def test_loraplus_trains_b_faster_in_a_trainer(tmp_path):
    import transformers as t

    model = li.inject(tiny_llama(), targets=["q_proj", "v_proj"], r=4)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 100, (8, 8))]
    args = t.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                               use_cpu=True, save_strategy="no", logging_strategy="no")
    optimizer = li.loraplus_optimizer(model, lr=1e-3, ratio=16)
    t.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    lrs = sorted(g["initial_lr"] for g in optimizer.param_groups if g["params"])  # the Trainer's schedule kept them
    assert lrs == pytest.approx([1e-3, 1.6e-2])
    with pytest.raises(li.ConfigError, match="ratio > 0"):
        li.loraplus_param_groups(model, lr=1e-3, ratio=0)


def test_resize_with_lora_bias_on_the_head_and_refusal_for_dora_or_pissa_there():
    model = li.inject(tiny_llama(), targets=["lm_head"], lora_bias=True)
    randomize_adapters(model)
    x = ids()
    before = logits(model, x)
    model.resize_token_embeddings(108)
    assert model.lm_head.lora_B["default"].bias.shape == (108,)
    torch.testing.assert_close(logits(model, x)[..., :100], before, atol=1e-6, rtol=1e-6)
    for kw in (dict(dora=True), dict(init="pissa")):
        other = li.inject(tiny_llama(), targets=["lm_head", "q_proj"], **kw)
        with pytest.raises(li.ConfigError, match="DoRA or PiSSA/OLoRA.*Nothing was changed"):
            other.resize_token_embeddings(108)
        assert other.config.vocab_size == 100 and other.lm_head.base_layer.out_features == 100
