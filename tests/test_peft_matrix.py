"""PEFT 0.21's own LoRA test matrix (the LoRA rows of tests/test_custom_models.py TEST_CASES), replayed.

Each case is built and saved by PEFT (factors perturbed so nothing is zero), then loaded here:
outputs equal PEFT's, merged outputs equal too, our re-export loads back in PEFT to the same
outputs. Cases whose math lora_inject does not implement are refused naming the feature, the
model unchanged. The model classes mirror PEFT's test models.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_inject as li


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.relu, self.drop = nn.Linear(10, 20), nn.ReLU(), nn.Dropout(0.5)
        self.lin1, self.sm = nn.Linear(20, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class EmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv1d = nn.Embedding(100, 5), Conv1D(1, 5)
        self.relu, self.flat, self.lin0, self.sm = nn.ReLU(), nn.Flatten(), nn.Linear(10, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d, self.relu, self.flat = nn.Conv1d(1, 1, 2), nn.ReLU(), nn.Flatten()
        self.lin0, self.sm = nn.Linear(9, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(x.float().reshape(-1, 1, 10))))))


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d, self.relu, self.flat = nn.Conv2d(5, 10, 3), nn.ReLU(), nn.Flatten()
        self.lin0, self.sm = nn.Linear(10, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))))))


class Conv2dGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.conv2d = nn.Linear(90, 288), nn.Conv2d(16, 16, 3, groups=8)
        self.relu, self.flat, self.lin1, self.sm = nn.ReLU(), nn.Flatten(), nn.Linear(16, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        x = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(x)))))


class Conv2dGroups2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d, self.relu, self.flat = nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten()
        self.lin0, self.sm = nn.Linear(12800, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):  # as PEFT's: a fixed input of its own
        x = torch.arange(9 * 16 * 20 * 20).view(9, 16, 20, 20).float() / 1e5
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(x)))))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d, self.relu, self.flat = nn.Conv3d(5, 10, 3), nn.ReLU(), nn.Flatten()
        self.lin0, self.sm = nn.Linear(10, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        x = torch.stack([x.float()] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv3d(x)))))


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0, self.sm = nn.MultiheadAttention(10, 2), nn.Linear(10, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        out, _ = self.mha(x.float(), x.float(), x.float())
        return self.sm(self.lin0(out))


MODELS = {"MLP": MLP, "EmbConv1D": EmbConv1D, "Conv1d": Conv1dNet, "Conv2d": Conv2dNet,
          "Conv2dGroups": Conv2dGroups, "Conv2dGroups2": Conv2dGroups2, "Conv3d": Conv3dNet, "MHA": Mha}

LOADS = [  # (PEFT's case name, model, config)
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP",
     {"target_modules": ["lin0"], "velora_config": {"num_groups": 2, "init_type": "random"}}),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP",
     {"target_modules": ["lin0", "lin1"], "velora_config": {"num_groups": 2, "init_type": "batch_average"}}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True,
                                                    "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
]

REFUSALS = [  # (PEFT's case name, model, config, what the refusal names)
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", {"target_modules": ["lin0"], "monteclora_config": {"num_samples": 2}},
     "monteclora_config"),
    ("BD-LoRA both A and B", "MLP", {"target_modules": ["lin0", "lin1"], "use_bdlora": {
        "target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2}}, "use_bdlora"),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}, "DoRA"),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}, "DoRA"),
]
GROUPED = [
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
]

SUBCONFIGS = {"velora_config": "VeloraConfig", "monteclora_config": "MontecloraConfig", "use_bdlora": "BdLoraConfig"}


def _peft_model(model_id, config_kwargs):
    kwargs = dict(config_kwargs)
    for key, cls in SUBCONFIGS.items():
        if key in kwargs:
            kwargs[key] = getattr(peft, cls)(**kwargs[key])
    torch.manual_seed(0)
    base = MODELS[model_id]().eval()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    with torch.no_grad():  # nothing left at zero: every factor, magnitude and copy is exercised
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return base, model.eval()


def _inputs(model_id):
    if model_id == "EmbConv1D":
        return torch.arange(90).view(9, 10) % 100
    if model_id == "Conv2dGroups":
        return torch.randn(9, 10)
    return torch.arange(90).view(9, 10) / 90.0


def _loaded_and_round_tripped(model_id, config, tmp_path):
    """PEFT builds and saves the case; ours loads it (outputs equal PEFT's) and re-exports it, and PEFT
    loads that back on a fresh base (outputs equal again). Returns (ours, input, PEFT's output)."""
    base, theirs = _peft_model(model_id, config)
    theirs.save_pretrained(tmp_path / "peft")
    x = _inputs(model_id)
    ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        li.save_adapter(ours, tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
    return ours, x, expected


@pytest.mark.parametrize("name, model_id, config", LOADS, ids=[case[0] for case in LOADS])
def test_peft_case_loads_merges_and_round_trips(name, model_id, config, tmp_path):
    ours, x, expected = _loaded_and_round_tripped(model_id, config, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(li.merge_and_unload(ours)(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, model_id, config", GROUPED, ids=[case[0] for case in GROUPED])
def test_peft_grouped_conv_case_loads_and_round_trips_and_its_merge_is_refused(name, model_id, config, tmp_path):
    """PEFT trains LoRA on grouped convs with A over all input channels: a dense update, unmergeable into
    the grouped weight (PEFT raises NotImplementedError); here it runs unmerged and merging says why."""
    ours, x, expected = _loaded_and_round_tripped(model_id, config, tmp_path)
    with pytest.raises(li.MergeError, match="groups=.*cannot be merged"):
        li.merge_and_unload(ours)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name, model_id, config, names", REFUSALS, ids=[case[0] for case in REFUSALS])
def test_peft_case_we_do_not_implement_is_refused_by_name(name, model_id, config, names, strict, tmp_path):
    base, theirs = _peft_model(model_id, config)
    theirs.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(li.LoraInjectError, match=names):
        li.load_adapter(model, tmp_path / "peft", strict=strict)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]], ids=["MHA 1 LoRA", "MHA 2 LoRA"])
def test_peft_mha_case_loads_with_the_update_once_and_says_how_peft_differs(targets, tmp_path):
    """PEFT 0.21.2 adds nn.MultiheadAttention's out_proj update twice; loaded here it is added once (LoRA's
    definition), with a warning: the outputs equal PEFT's after halving the file's out_proj B."""
    base, theirs = _peft_model("MHA", {"target_modules": targets})
    theirs.save_pretrained(tmp_path / "peft")
    x = _inputs("MHA")
    with pytest.warns(UserWarning, match="out_proj update twice"):
        ours = li.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert not torch.allclose(ours(x), theirs(x), atol=1e-4)
        for module in theirs.modules():  # PEFT with its doubled out_proj update undone
            if type(module).__name__ == "Linear" and hasattr(module, "lora_B") and "out_proj" in str(
                    [n for n, m in theirs.named_modules() if m is module]):
                module.lora_B["default"].weight.mul_(0.5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
