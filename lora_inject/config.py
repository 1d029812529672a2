"""`LoraConfig`: what to adapt and how, with validation.

Field names are short and Pythonic (``alpha``, ``targets``, ``rslora``); the
translation to and from PEFT's ``adapter_config.json`` lives in :mod:`lora_inject.formats.peft_config`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import torch

from .errors import ConfigError
from .layers.principal import is_principal_init
from .targeting.matching import TargetSpec, compile_pattern, first_pattern_match

BiasMode = Literal["none", "all", "lora_only"]
InitMode = Union[bool, Literal["kaiming", "gaussian"]]
TargetsArg = Union[str, TargetSpec, Sequence[TargetSpec], None]

_BIAS_MODES = ("none", "all", "lora_only")
_INIT_MODES = (True, False, "kaiming", "gaussian")


@dataclasses.dataclass
class LoraConfig:
    """Everything that decides which modules get an adapter and what it computes.

    Args:
        r: rank of the update ``B @ A``; A is (r, in), B is (out, r).
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        targets: what to wrap. A plain name matches a module whose dotted path equals it or
            ends with ``.name``; ``"re:<pattern>"`` or a compiled pattern is full-matched
            against the dotted path; a module type (``nn.Linear``) matches instances;
            ``"all-linear"`` is every Linear/Conv1D except the output head. ``None`` picks
            the preset for ``model.config.model_type`` (Hugging Face models).
        exclude: same forms as ``targets``; matched modules are never wrapped.
        layers: only modules inside these layer indices (the first ``.<name>.<digits>.``
            segment of the path, or the one after ``layers_pattern``).
        rank_pattern / alpha_pattern: ``{pattern: value}`` per-module overrides; a pattern
            matches a path when ``(.*\\.)?(pattern)$`` does; the first matching key wins.
        dropout: dropout on the adapter's input only; the base path never sees it.
        bias: ``"none"`` (all biases frozen), ``"all"`` (every bias trains),
            ``"lora_only"`` (biases of wrapped layers train and belong to the adapter).
        modules_to_save: modules trained in full; each adapter keeps its own copy.
        init: ``True``/``"kaiming"`` (A Kaiming-uniform, B zero), ``"gaussian"``
            (A ~ N(0, 1/r), B zero), ``False`` (both random: the model changes at once;
            for tests), ``"pissa"``/``"pissa_niter_<k>"``/``"olora"`` (A and B the weight's principal
            part, the base weight the residual; Linear and Conv1D; see ``layers/principal.py``).
        adapter_dtype: dtype of the adapter parameters. ``None``: float32 when the base
            weight is float16/bfloat16 (stable optimizer updates), else the base dtype.
        dora: weight-decomposed LoRA (DoRA, PEFT's ``use_dora``): each adapted layer also learns a
            magnitude per output feature and computes with ``m * (W + s*B@A) / ||W + s*B@A||``.
        lora_bias: B gets a trainable bias (PEFT's ``lora_bias``): the layer adds ``s * b_B``; merging
            adds it to the base bias (refused for a base without one). Linear, Conv1D and convs.
        trainable_tokens: token ids whose embedding rows train in full (PEFT's ``trainable_token_indices``):
            a list for the input embedding, or ``{module name: ids}``. A head tied to the embedding shares
            the rows. The way to train tokens added with ``resize_token_embeddings``.
        target_parameters: parameters to adapt directly (PEFT's field of the same name): fused MoE experts
            ``(E, out, in)`` (``"experts.gate_up_proj"``), routers (``"gate.weight"``). A name matches
            ``<module path>.<parameter>`` when it equals it or ends with ``.<name>``. Each expert gets its own
            rank-r update; see ``layers/parameter.py``.
    """

    r: int = 8
    alpha: float = 16.0
    targets: TargetsArg = None
    exclude: TargetsArg = None
    layers: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rslora: bool = False
    dropout: float = 0.0
    bias: BiasMode = "none"
    modules_to_save: Sequence[str] | None = None
    init: InitMode = True
    adapter_dtype: torch.dtype | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    dora: bool = False
    lora_bias: bool = False
    trainable_tokens: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    target_parameters: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any value that cannot work."""
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
                raise ConfigError(f"{name} must map patterns (strings) to values; got {str(value)[:80]}.")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora must be True or False; got {self.rslora!r}.")
        _check_layers_pattern(self.layers_pattern)
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be a float in [0, 1); got {self.dropout!r}.")
        if self.bias not in _BIAS_MODES:
            raise ConfigError(f"bias must be one of {_BIAS_MODES}; got {self.bias!r}.")
        if not isinstance(self.dora, bool) or not isinstance(self.lora_bias, bool):
            raise ConfigError(f"dora and lora_bias must be True or False; got {self.dora!r}, {self.lora_bias!r}.")
        if is_principal_init(self.init) and (self.dora or self.lora_bias):
            raise ConfigError(f"init={self.init!r} (PiSSA/OLoRA) goes with plain LoRA only, not dora or lora_bias.")
        if self.dora and self.lora_bias:
            raise ConfigError("lora_bias=True with dora=True is not defined (PEFT refuses it too); pick one.")
        if self.init not in _INIT_MODES and not is_principal_init(self.init):
            raise ConfigError(
                f"init must be one of {_INIT_MODES}, 'pissa', 'pissa_niter_<k>' or 'olora'; got {self.init!r}."
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.adapter_dtype is not None and not (
            isinstance(self.adapter_dtype, torch.dtype) and self.adapter_dtype.is_floating_point
        ):
            raise ConfigError(
                f"adapter_dtype must be a floating torch.dtype such as torch.float32; got {self.adapter_dtype!r}."
            )
        self.trainable_tokens = _checked_tokens(self.trainable_tokens)
        self.target_parameters = _checked_parameter_names(self.target_parameters)
        if self.layers is not None:
            indices = [self.layers] if isinstance(self.layers, int) else list(self.layers)
            if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
                raise ConfigError(f"layers must be non-negative ints; got {self.layers!r}.")

    def rank_for(self, path: str) -> int:
        """The rank for the module at ``path``: ``rank_pattern``'s first match, else ``r``."""
        key = first_pattern_match(self.rank_pattern, path)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, path: str) -> float:
        """The alpha for the module at ``path``: ``alpha_pattern``'s first match, else ``alpha``."""
        key = first_pattern_match(self.alpha_pattern, path)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    def scale_for(self, path: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for the module at ``path``."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.rslora else r)

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Config objects of other libraries that inject accepts as they are (peft.LoraConfig): registered by the format
# that knows their fields (formats/peft_config.py), so this module stays below every format.
_FOREIGN_CONFIGS: list[tuple[Callable[[Any], bool], Callable[[Any], LoraConfig]]] = []


def register_foreign_config(accepts: Callable[[Any], bool], convert: Callable[[Any], LoraConfig]) -> None:
    """Let :func:`lora_inject.inject` take config objects for which ``accepts(obj)``, read by ``convert``."""
    _FOREIGN_CONFIGS.append((accepts, convert))


def foreign_config(config: Any) -> Any:
    """``config`` as a :class:`LoraConfig` when a registered reader accepts it; otherwise unchanged."""
    for accepts, convert in _FOREIGN_CONFIGS:
        if accepts(config):
            return convert(config)
    return config


# PEFT's rule: an adapter for these tasks also trains and saves the model's head in full (modules_to_save)
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",),
}


# PEFT's LoraConfig field -> ours; a PEFT name passed to LoraConfig/inject gets "did you mean" with this
PEFT_FIELD_NAMES = {
    "target_modules": "targets",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_rslora": "rslora",
    "init_lora_weights": "init",
    "exclude_modules": "exclude",
    "layers_to_transform": "layers",
    "use_dora": "dora",
    "trainable_token_indices": "trainable_tokens",
}


def unknown_field_message(names: Sequence[str]) -> str:
    """'did you mean' for each unknown LoraConfig field: PEFT's name for ours, or a near spelling."""
    import difflib

    fields = list(LoraConfig.__dataclass_fields__)
    hints = []
    for name in names:
        ours = PEFT_FIELD_NAMES.get(name) or next(iter(difflib.get_close_matches(name, fields, n=1, cutoff=0.6)), None)
        if ours:
            hints.append(f"{name!r} (did you mean {ours!r}?)")
        else:
            hints.append(f"{name!r}")
    return (
        f"LoraConfig has no field {', '.join(hints)}. Valid fields: {', '.join(fields)}. A peft.LoraConfig can be "
        "passed as it is: lora_inject.inject(model, peft_config)."
    )


def _init_with_field_check(init):
    import functools

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in LoraConfig.__dataclass_fields__]
        if unknown:
            raise ConfigError(unknown_field_message(unknown))
        init(self, *args, **kwargs)

    return checked


LoraConfig.__init__ = _init_with_field_check(LoraConfig.__init__)


# far above any rank in use (LoRA ranks are 4-512; the widest layers have ~50k features), far below one whose
# factors could not be allocated: a config from a file cannot ask for terabytes
MAX_RANK = 2**16


def _check_rank(what: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{what} must be a positive int; got {str(value)[:60]!r}.")
    if value > MAX_RANK:
        raise ConfigError(f"{what} is {value}, above any usable rank (at most {MAX_RANK}); the config is damaged.")


def _check_layers_pattern(value: Any) -> None:
    names = [value] if isinstance(value, str) else value
    if value is not None and not (isinstance(names, Sequence) and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"layers_pattern must be a name (string) or a list of names; got {str(value)[:80]}.")
    for name in names or ():
        compile_pattern(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.")  # raises ConfigError naming a bad pattern


def _check_alpha(what: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ConfigError(f"{what} must be a positive finite number; got {value!r}.")


def _checked_tokens(value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_tokens`` as a list of distinct non-negative ids, or ``{module name: such a list}``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ConfigError(f"trainable_tokens as a dict maps module names to token ids; got {value!r}.")
        return {name: _checked_ids(f"trainable_tokens[{name!r}]", ids) for name, ids in value.items()}
    return _checked_ids("trainable_tokens", value)


def _checked_parameter_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    names = list(value) if isinstance(value, (Sequence, set, frozenset)) else None
    if not names or not all(isinstance(n, str) and n and not n.startswith(".") for n in names):
        raise ConfigError(f"target_parameters must be a non-empty list of parameter names; got {value!r}.")
    return list(dict.fromkeys(sorted(names)))


def _checked_ids(what: str, ids: Any) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) and not hasattr(ids, "tolist"):
        raise ConfigError(f"{what} must be a list of token ids; got {ids!r}.")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{what} must be a non-empty list of non-negative int token ids; got {ids!r}.")
    repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if repeated:
        raise ConfigError(f"{what} lists token ids more than once: {repeated}; each row can have one value.")
    return ids


def exact_config(template: LoraConfig, ranks: Mapping[str, int], scales: Mapping[str, float]) -> LoraConfig:
    """``template`` rewritten to give each module path exactly its rank and scale: those paths as targets,
    the most common rank and alpha as ``r``/``alpha``, patterns for the rest, rsLoRA off. For adapters whose
    layers were built or changed directly (combinations, hot-swap padding), so they save and reload exactly."""
    import re

    alphas = {p: float(scales[p]) * ranks[p] for p in ranks}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    key = exact_pattern_keys(ranks)
    return template.replace(
        r=r, alpha=alpha, rslora=False, init=True, exclude=None, layers=None, layers_pattern=None,
        targets=[f"re:{re.escape(p)}" for p in ranks],
        rank_pattern={key[p]: k for p, k in ranks.items() if k != r},
        alpha_pattern={key[p]: a for p, a in alphas.items() if a != alpha},
    )


def exact_pattern_keys(paths: Iterable[str]) -> dict[str, str]:
    """``{path: rank/alpha pattern key that matches exactly that path}``. A key matches every path that ends
    with it (PEFT's rule): a path that is the tail of another ("proj_out" and "blocks.0.proj_out") is anchored
    with "^" so it keeps to its own module; PEFT reads the anchored key the same way."""
    import re

    paths = list(paths)
    tails = {p.split(".", i)[-1] for p in paths for i in range(1, p.count(".") + 1)}
    return {p: ("^" if p in tails else "") + re.escape(p) for p in paths}
