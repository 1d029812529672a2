"""Translate between :class:`LoraConfig` and PEFT's ``adapter_config.json``, and between key names.

On disk (PEFT's format) the adapter name is not part of a key:
``base_model.model.<path>.lora_A.weight``; in memory it is: ``<path>.lora_A.<adapter>.weight``.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

from torch import nn

from ..config import TASK_HEADS, LoraConfig, register_foreign_config
from ..errors import AdapterFileError, ConfigError
from ..layers import LoraConv1D, LoraLayer
from ..layers.parameter import LoraParameter
from ..layers.principal import is_principal_init
from ..targeting.matching import ALL_LINEAR, REGEX_PREFIX, NameTarget, select
from ..targeting.plan import logical_modules

PEFT_PREFIX = "base_model.model."
LORA_CONTAINERS = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "modules_to_save",
    "trainable_tokens_delta",
)
# Every field of PEFT's LoRA adapter_config.json (0.21), and what loading does with it; README.md
# lists the same. READ: becomes a LoraConfig field. IGNORED: cannot change what a loaded adapter
# computes (bookkeeping, or how training initialised or compressed it). REFUSED: changes the
# math and is not implemented here; loading it as plain LoRA would compute another model.
READ_FIELDS = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias", "modules_to_save", "init_lora_weights",
    "base_model_name_or_path", "task_type", "use_dora", "lora_bias", "trainable_token_indices", "target_parameters",
)
IGNORED_FIELDS = (
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "fan_in_fan_out", "megatron_core",
    "qalora_group_size", "eva_config", "corda_config", "lora_ga_config", "loftq_config", "runtime_config",
    "velora_config",  # VeLoRA compresses activations in training only; its buffers are ignored by rule below
    "ensure_weight_tying",
)
REFUSED_FIELDS = {
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_alora": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "kasa_config": "KaSA (a singular-value diagonal between A and B)",
    "monteclora_config": "MonteCLoRA (sampled mixtures of A)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing between adapters",
    "megatron_config": "Megatron tensor-parallel LoRA layers",
}
# tensors some PEFT variants save that cannot change what a loaded adapter computes
IGNORED_KEY_SUFFIXES = (".lora_velora_embed",)
# inits that change the *base* weights, so the saved adapter alone does not reproduce the model
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def disk_key(memory_key: str, adapter: str) -> str:
    """``x.lora_A.<adapter>.weight`` -> ``x.lora_A.weight``; ``x.modules_to_save.<adapter>.w`` -> ``x.w``."""
    parts = memory_key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in LORA_CONTAINERS and parts[i + 1] == adapter:
            if part == "modules_to_save":
                return ".".join(parts[:i] + parts[i + 2:])
            if part in ("lora_magnitude_vector", "trainable_tokens_delta"):  # PEFT: no ".weight" after these
                return ".".join(parts[: i + 1])
            return ".".join(parts[: i + 1] + parts[i + 2:])
    return memory_key


def _peft_targets(model: nn.Module, adapter: str, config: LoraConfig) -> list[str]:
    """The adapter's wrapped paths in PEFT's list form: leaf names when they select exactly these
    paths under PEFT's rules, else the full paths (always exact)."""
    paths = sorted(p for p, _, w in logical_modules(model)
                   if isinstance(w, LoraLayer) and not isinstance(w, LoraParameter) and adapter in w.r)
    if not paths:
        return []
    named = [(p, m) for p, m, _ in logical_modules(model)]
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    exclude = [NameTarget(m) for m in config.modules_to_save or ()]
    layers = [config.layers] if isinstance(config.layers, int) else config.layers
    chosen, _, _ = select(named, [NameTarget(n) for n in names], exclude, layers, config.layers_pattern)
    return names if sorted(p for p, _ in chosen) == paths else paths


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# PEFT's task types, each with the transformers auto mapping whose classes it wraps (first hit wins)
_TASK_MAPPINGS = (
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)




def infer_task_type(model: nn.Module, config: LoraConfig) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from the auto class its class belongs to
    (``LlamaForCausalLM`` -> ``CAUSAL_LM``), so ``AutoPeftModelFor...`` can load the adapter.

    None for other models, for classes no PEFT task covers (e.g. speech seq2seq), and for the
    head tasks (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) when the adapter does not save the head:
    PEFT's model for those tasks would refuse to load it (the head's tensors are missing).
    """
    if "transformers" not in sys.modules or not hasattr(getattr(model, "config", None), "model_type"):
        return None
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    task = next(
        (task for task, mapping in _TASK_MAPPINGS for value in getattr(modeling_auto, mapping, {}).values()
         if name == value or (isinstance(value, (tuple, list)) and name in value)),
        None,
    )
    if task in TASK_HEADS:
        saved = [NameTarget(m) for m in config.modules_to_save or ()]
        heads = [p for p, m, _ in logical_modules(model) if p.rsplit(".", 1)[-1] in TASK_HEADS[task]]
        if not all(any(t.matches(p, None) for t in saved) for p in heads):
            return None
    return task


def to_peft_dict(model: nn.Module, adapter: str, config: LoraConfig) -> dict[str, Any]:
    """PEFT's adapter_config.json fields for ``adapter`` as injected into ``model``."""
    fan_in_fan_out = any(
        isinstance(w, LoraConv1D) and adapter in w.r for _, _, w in logical_modules(model)
    )
    init = config.init if config.init in (True, False, "gaussian") or is_principal_init(config.init) else True
    layers = [config.layers] if isinstance(config.layers, int) else config.layers
    return {
        "peft_type": "LORA",
        "task_type": config.task_type or infer_task_type(model, config),
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": _peft_targets(model, adapter, config),
        "exclude_modules": None,
        "bias": config.bias,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": bool(config.rslora),
        "rank_pattern": {k: int(v) for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: _number(v) for k, v in config.alpha_pattern.items()},
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "layers_to_transform": list(layers) if layers is not None else None,
        "layers_pattern": config.layers_pattern,
        "init_lora_weights": init,
        "inference_mode": True,
        "use_dora": bool(config.dora),
        "lora_bias": bool(config.lora_bias),
        "trainable_token_indices": _tokens_for_peft(config.trainable_tokens),
        "revision": None,
        **_parameter_fields(config),
    }


# the PEFT version whose layout of expert-parameter factors this library writes (see layers/parameter.py);
# readers tell it from the older one (PEFT <= 0.19.0) by peft_version where the shapes cannot tell
PARAMETER_LAYOUT_VERSION = "0.21.2"


def _parameter_fields(config: LoraConfig) -> dict[str, Any]:
    if not config.target_parameters:
        return {}
    return {"target_parameters": list(config.target_parameters), "peft_version": PARAMETER_LAYOUT_VERSION}


def _tokens_for_peft(tokens: Any) -> Any:
    if tokens is None:
        return None
    return {k: list(v) for k, v in tokens.items()} if isinstance(tokens, dict) else list(tokens)


def _targets_from_peft(value: Any, field: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return value if value == ALL_LINEAR else REGEX_PREFIX + value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AdapterFileError(f"adapter_config.json: {field} must be a string or a list of strings; got {value!r}.")


# peft.LoraConfig fields that carry nothing about the adapter's math (bookkeeping, or derived here)
_PEFT_BOOKKEEPING = {
    "peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "fan_in_fan_out", "megatron_core",
    "qalora_group_size",  # only read with use_qalora, which is refused on its own
}


def from_peft_config(peft_config: Any) -> LoraConfig:
    """A :class:`LoraConfig` from a ``peft.LoraConfig`` object, for ``inject(model, peft_config)``.

    Every field lora_inject implements is converted; any other field set to a non-default value
    is refused by name (training with it here would silently train something else).
    """
    data = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in peft_config.to_dict().items()}
    defaults = type(peft_config)().to_dict()
    supported = set(_PEFT_TO_OURS) | _PEFT_BOOKKEEPING
    odd = sorted(k for k, v in data.items() if k not in supported and v != defaults.get(k))
    if odd:
        raise ConfigError(
            f"peft.LoraConfig sets {', '.join(f'{k}={data[k]!r}' for k in odd)}, which lora_inject does not "
            "implement; training without it would give another adapter. Drop these fields, or use PEFT for this one."
        )
    init = data.get("init_lora_weights", True)
    if init not in _INIT_VALUES and not is_principal_init(init):
        raise ConfigError(
            f"peft.LoraConfig init_lora_weights={init!r} is not implemented here; lora_inject initialises with "
            f"{_INIT_VALUES}, 'pissa', 'pissa_niter_<k>' or 'olora' (True is PEFT's default)."
        )
    values = {ours: data.get(theirs) for theirs, ours in _PEFT_TO_OURS.items()}
    values["task_type"] = getattr(values["task_type"], "value", values["task_type"])
    values["targets"] = _targets_from_peft(values["targets"], "target_modules") or None
    values["exclude"] = _exclude_from_peft(values["exclude"])
    values["rank_pattern"] = values["rank_pattern"] or {}
    values["alpha_pattern"] = values["alpha_pattern"] or {}
    values["layers_pattern"] = values["layers_pattern"] or None
    values["modules_to_save"] = values["modules_to_save"] or None
    return LoraConfig(**values)


_INIT_VALUES = (True, False, "gaussian")
_PEFT_TO_OURS = {
    "r": "r", "lora_alpha": "alpha", "target_modules": "targets", "exclude_modules": "exclude",
    "layers_to_transform": "layers", "layers_pattern": "layers_pattern", "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern", "use_rslora": "rslora", "lora_dropout": "dropout", "bias": "bias",
    "modules_to_save": "modules_to_save", "init_lora_weights": "init",
    "base_model_name_or_path": "base_model_name_or_path", "task_type": "task_type", "use_dora": "dora",
    "lora_bias": "lora_bias", "trainable_token_indices": "trainable_tokens",
    "target_parameters": "target_parameters",
}


def is_peft_config(config: Any) -> bool:
    return type(config).__module__.startswith("peft") and type(config).__name__ == "LoraConfig"


register_foreign_config(is_peft_config, from_peft_config)


def _exclude_from_peft(value: Any) -> Any:
    """PEFT excludes a listed name's own module only (path equal to it or ending in ``.name``), never the
    modules under it; a plain name here would exclude a container's children too, so keep PEFT's rule
    exactly as a regex per name."""
    value = _targets_from_peft(value, "exclude_modules")
    if isinstance(value, list):
        return [rf"{REGEX_PREFIX}(?:.*\.)?{re.escape(name)}" for name in value]
    return value


def _refuse_unimplemented(data: dict, source: str) -> None:
    """Refuse, by name, every set field whose math lora_inject does not implement; warn about fields it does
    not know (a newer PEFT), refusing those that look like a new variant (``use_*``, ``*_config``) when set."""
    for key, what in REFUSED_FIELDS.items():
        if data.get(key):
            raise AdapterFileError(
                f"{source}: {key}={data[key]!r} asks for {what}, which lora_inject does not implement; loading it "
                "as plain LoRA would compute another model. Load it with PEFT instead."
            )
    unknown = sorted(set(data) - set(READ_FIELDS) - set(IGNORED_FIELDS) - set(REFUSED_FIELDS))
    variants = [k for k in unknown if data[k] and (k.startswith("use_") or k.endswith("_config"))]
    if variants:
        raise AdapterFileError(
            f"{source}: {', '.join(f'{k}={data[k]!r}' for k in variants)}: fields this version of lora_inject does "
            "not know, which look like a LoRA variant (from a newer PEFT). Loading them as plain LoRA could compute "
            "another model; load the adapter with PEFT, or upgrade lora_inject."
        )
    if unknown:
        warnings.warn(
            f"{source}: fields lora_inject does not know (from a newer PEFT?), ignored: {', '.join(unknown)}.",
            stacklevel=4,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# the JSON types each field read may have (None: the field's default); checked before any value is used, so
# a string "false" never turns a flag on and a number never stands where names belong
_FIELD_TYPES: dict[str, tuple[str, Any]] = {
    "r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "lora_alpha": ("a number", _is_number),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "lora_dropout": ("a number", _is_number),
    "bias": ("a string", lambda v: isinstance(v, str)),
    "layers_pattern": ("a string or a list of strings", lambda v: isinstance(v, str) or _is_names(v)),
    "layers_to_transform": ("an integer or a list of integers", lambda v: (isinstance(v, int) and not isinstance(
        v, bool)) or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))),
    "rank_pattern": ("an object of {pattern: integer}", lambda v: isinstance(v, dict) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v.values())),
    "alpha_pattern": ("an object of {pattern: number}", lambda v: isinstance(v, dict) and all(
        _is_number(x) for x in v.values())),
    "modules_to_save": ("a list of module names", _is_names),
    "target_parameters": ("a list of parameter names", _is_names),
    "trainable_token_indices": ("a list of token ids or an object of {module: ids}", lambda v: isinstance(
        v, (list, dict))),
    "base_model_name_or_path": ("a string", lambda v: isinstance(v, str)),
    "task_type": ("a string", lambda v: isinstance(v, str)),
    "init_lora_weights": ("true, false or a string", lambda v: isinstance(v, (bool, str))),
    "peft_version": ("a string", lambda v: isinstance(v, str)),
}


def _check_field_types(data: dict, source: str) -> None:
    wrong = [f"{name} is {data[name]!r} (expected {kind})" for name, (kind, ok) in _FIELD_TYPES.items()
             if data.get(name) is not None and not ok(data[name])]
    if wrong:
        shown = "; ".join(w if len(w) < 200 else w[:200] + "...)" for w in wrong[:4])
        raise AdapterFileError(f"{source}: fields of the wrong type: {shown}. The config is damaged or was written "
                               "by hand; fix these fields or re-save the adapter.")


def from_peft_dict(data: Any, source: str = "adapter_config.json") -> LoraConfig:
    """A :class:`LoraConfig` from PEFT's config fields; refuses what would load wrong."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object; found {type(data).__name__}.")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(
            f"{source}: peft_type is {peft_type!r}; lora_inject reads LoRA adapters only (peft_type 'LORA')."
        )
    _refuse_unimplemented(data, source)
    _check_field_types(data, source)
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{source}: init_lora_weights={init!r} changes the base weights as well as the adapter, so this "
            "adapter cannot be applied to the plain base model. Convert it to a plain LoRA in PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
    targets = _targets_from_peft(data.get("target_modules"), "target_modules")
    parameters = data.get("target_parameters") or None
    if not targets and not parameters:
        raise AdapterFileError(f"{source}: target_modules is missing or empty; the adapter names no module.")
    try:
        return LoraConfig(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            targets=targets or None,
            exclude=_exclude_from_peft(data.get("exclude_modules")),
            layers=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern") or None,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            rslora=data.get("use_rslora") or False,
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save") or None,
            init=init if init in (True, False, "gaussian") else True,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            task_type=data.get("task_type"),
            dora=data.get("use_dora") or False,
            lora_bias=data.get("lora_bias") or False,
            trainable_tokens=data.get("trainable_token_indices") or None,
            target_parameters=parameters,
        )
    except AdapterFileError:
        raise
    except Exception as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
