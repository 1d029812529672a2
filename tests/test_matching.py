"""Matcher semantics: pure string and type logic, no surgery."""

from __future__ import annotations

import re
import time

import pytest
import regex
from torch import nn

import lora_inject as li
from lora_inject.targeting.matching import (
    AllLinearTarget,
    NameTarget,
    RegexTarget,
    TypeTarget,
    first_pattern_match,
    layer_index,
    parse_target,
    parse_targets,
    select,
)

LIN, EMB = nn.Linear(2, 2), nn.Embedding(3, 2)
PATHS = [
    ("model.embed_tokens", EMB),
    ("model.layers.0.self_attn.q_proj", LIN),
    ("model.layers.0.self_attn.k_proj", LIN),
    ("model.layers.0.mlp.up_proj", LIN),
    ("model.layers.1.self_attn.q_proj", LIN),
    ("model.layers.1.self_attn.k_proj", LIN),
    ("model.layers.1.mlp.experts.0.up_proj", LIN),
    ("lm_head", LIN),
]


def picked(targets, **kw):
    chosen, missed, _ = select(PATHS, parse_targets(targets), **kw)
    return [p for p, _ in chosen], [str(t) for t in missed]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("q_proj", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        ("self_attn.q_proj", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        ("layers.1.self_attn.q_proj", ["model.layers.1.self_attn.q_proj"]),
        ("lm_head", ["lm_head"]),  # exact path
        ("re:.*layers\\.1\\..*_proj", [
            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
            "model.layers.1.mlp.experts.0.up_proj",
        ]),
        (re.compile(r"model\.layers\.\d+\.mlp\.up_proj"), ["model.layers.0.mlp.up_proj"]),
        (nn.Embedding, ["model.embed_tokens"]),
    ],
)
def test_target_forms(spec, expected):
    assert picked([spec])[0] == expected


def test_plain_name_is_not_a_substring_match():
    assert picked(["q"]) == ([], ["q"])
    assert picked(["proj"]) == ([], ["proj"])
    assert picked(["_proj"]) == ([], ["_proj"])


def test_regex_is_full_match_not_search():
    assert picked(["re:q_proj"])[0] == []  # would match with search()
    assert picked(["re:.*q_proj"])[0] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_regex_item_mixed_with_names_in_one_list():
    paths, missed = picked(["k_proj", "re:lm_.*"])
    assert paths == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj", "lm_head"]
    assert missed == []


def test_all_linear_skips_output_head_and_non_linear():
    targets = [AllLinearTarget(frozenset({"lm_head"}))]
    chosen, _, _ = select(PATHS, targets)
    names = [p for p, _ in chosen]
    assert "lm_head" not in names and "model.embed_tokens" not in names
    assert len(names) == 6


def test_exclude_layers_and_misses():
    paths, _ = picked(["q_proj", "k_proj"], exclude=parse_targets(["layers.0.self_attn.k_proj"]))
    assert paths == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"
    ]
    paths, _ = picked(["up_proj"], layers=[1])
    assert paths == ["model.layers.1.mlp.experts.0.up_proj"]  # layer 1, not expert 0
    paths, missed = picked(["q_proj", "o_proj"])
    assert missed == ["o_proj"] and len(paths) == 2


def test_excluded_target_still_counts_as_hit():
    paths, missed = picked(["lm_head"], exclude=parse_targets(["lm_head"]))
    assert paths == [] and missed == []


@pytest.mark.parametrize(
    "path, pattern, index",
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("model.layers.1.mlp.experts.7.up_proj", None, 1),
        ("encoder.block.2.layer.0.SelfAttention.q", None, 2),
        ("encoder.block.2.layer.0.SelfAttention.q", "layer", 0),
        ("lm_head", None, None),
        ("h.4.attn.c_attn", None, None),  # no name before h: PEFT's rule needs a '.<name>.<digits>.' segment
        ("transformer.h.4.attn.c_attn", None, 4),
    ],
)
def test_layer_index(path, pattern, index):
    assert layer_index(path, pattern) == index


def test_rank_pattern_rule_is_peft_rule_first_key_wins():
    patterns = {"q_proj": 2, "layers.1.self_attn.q_proj": 7, "re_only": 3}
    assert first_pattern_match(patterns, "model.layers.1.self_attn.q_proj") == "q_proj"
    assert first_pattern_match({"layers.1.self_attn.q_proj": 7, "q_proj": 2}, "model.layers.1.self_attn.q_proj") == (
        "layers.1.self_attn.q_proj"
    )
    assert first_pattern_match(patterns, "model.layers.1.self_attn.xq_proj") is None
    assert first_pattern_match({r"layers\.\d\.mlp\..*": 4}, "model.layers.0.mlp.up_proj") is not None


def test_config_rank_alpha_and_rslora_scale():
    cfg = li.LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.scale_for("a.q_proj") == 2.0
    assert cfg.scale_for("a.v_proj") == 2.0 and cfg.rank_for("a.v_proj") == 2
    rs = li.LoraConfig(r=16, alpha=8, rslora=True)
    assert rs.scale_for("x") == pytest.approx(8 / 4)


def test_parse_target_kinds():
    assert isinstance(parse_target("q"), NameTarget)
    assert isinstance(parse_target("re:q.*"), RegexTarget)
    assert isinstance(parse_target(regex.compile("q.*")), RegexTarget)
    assert isinstance(parse_target(nn.Linear), TypeTarget)
    assert isinstance(parse_target("all-linear"), AllLinearTarget)


@pytest.mark.parametrize("bad", ["", " q", 3, None, nn.Linear(1, 1), "re:(unclosed"])
def test_bad_target_specs(bad):
    with pytest.raises(li.ConfigError):
        parse_targets([bad])


def test_catastrophic_regex_times_out_fast():
    long_path = "a" * 40 + "c"
    target = parse_target("re:(a|a)+$")  # exponential for any backtracking engine
    start = time.perf_counter()
    with pytest.raises(li.PatternTimeoutError, match="backtracks"):
        target.matches(long_path, LIN)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "field, value",
    [("r", 0), ("r", -1), ("r", 2.5), ("alpha", 0), ("alpha", float("nan")), ("dropout", 1.0), ("dropout", -0.1),
     ("bias", "some"), ("init", "pissa_niter_x"), ("layers", [-1]), ("rank_pattern", {"q": 0}),
     ("adapter_dtype", "fp32")],
)
def test_config_validation(field, value):
    with pytest.raises(li.ConfigError, match=field.split("_")[0]):
        li.LoraConfig(**{field: value})
