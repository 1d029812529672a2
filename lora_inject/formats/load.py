"""Loading: an adapter in canonical form checked against a model, then copied in, transactionally.

Every reader ends here: whatever format the file was, the same checks run (keys, shapes, dtypes, DoRA
magnitudes) before the model changes, and a failure while copying takes the new adapter out again.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, DistributedError, LoraInjectError, preview
from ..guards import (
    SHARDED_LOAD,
    ZERO3_LOAD,
    check_not_distributed,
    check_not_sharded,
    full_shape,
    has_optimizer_copies,
    unwrap,
)
from ..inject import (
    _require_adapter,
    adapter_configs,
    carried_paths,
    check_adapter_name,
    delete_adapter,
    inject_resolved,
    lora_layers,
    require_new_adapter,
    restored_on_failure,
)
from ..layers import ModulesToSave, TrainableTokens
from ..layers.attention import LoraMultiheadAttention
from ..layers.parameter import LoraParameter
from ..layers.principal import is_principal_init
from ..targeting.plan import Plan, PlannedLayer, logical_modules, resolve
from ..targeting.tokens import TokenTarget
from ..threads import changes_adapters
from .adapter import Adapter
from .hub import adapter_folder
from .peft_config import IGNORED_KEY_SUFFIXES
from .registry import convert, read_adapter
from .validate import checked_values


def _principal_from_lora(model: nn.Module, adapter: str, tensors: dict, where: str) -> dict:
    """Undo :func:`_principal_as_lora` for a PiSSA/OLoRA adapter still injected (resuming from a checkpoint
    saved in plain LoRA form): ``[A; A0]`` -> A, ``[B, -B0]`` -> B, after checking that the second halves are
    this adapter's initial factors (else the file belongs to another run, and is refused)."""
    for path, layer in lora_layers(model):
        if adapter not in layer.principal:
            continue
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        a, b = tensors.get(a_key), tensors.get(b_key)
        r = layer.r[adapter]
        if a is None or b is None or a.shape[0] != 2 * r or b.shape[1] != 2 * r:
            continue  # residual form, or a mismatch the shape check reports
        a0, b0 = layer.principal[adapter]
        same_start = torch.allclose(a[r:], a0.to(a), rtol=1e-5, atol=1e-6) and torch.allclose(
            -b[:, r:], b0.to(b), rtol=1e-5, atol=1e-6)
        if not same_start:
            raise AdapterFileError(
                f"{where}: {path} holds a PiSSA/OLoRA adapter saved as plain LoRA, but its initial factors are not "
                "this model's: it was initialised from other weights. Load it with load_adapter on the original base."
            )
        tensors = {**tensors, a_key: a[:r].contiguous(), b_key: b[:, :r].contiguous()}
    return tensors


def _expected(model: nn.Module, resolved: Plan, config: LoraConfig) -> tuple[dict, dict]:
    """``{disk key: (shape, target)}`` for the tensors the file must hold, and for those it may hold.

    Optional: trained biases (``bias`` != "none") and the full base weight of a targeted
    embedding, which PEFT writes ("save_embedding_layers") in case the vocabulary was resized.
    """
    required: dict[str, tuple[tuple[int, ...], tuple]] = {}
    optional: dict[str, tuple[tuple[int, ...], tuple]] = {}
    for path, module in embedding_modules(model):
        optional[f"{path}.weight"] = (full_shape(module.weight), ("carried", path, module.weight))
    for layer in resolved.layers:
        wrapper = resolved.wrappers[layer.path]
        for suffix, shape in wrapper.adapter_shapes(layer.r, config.dora, config.lora_bias).items():
            required[f"{layer.path}.{suffix}"] = (shape, ("factor", wrapper, suffix))
        if isinstance(wrapper, LoraParameter):
            continue  # the module's other parameters are not the adapter's
        base = wrapper.base_layer
        optional.pop(f"{layer.path}.weight", None)
        if isinstance(getattr(base, "weight", None), torch.Tensor):  # (nn.MultiheadAttention has none)
            optional[f"{layer.path}.base_layer.weight"] = (full_shape(base.weight),
                                                           ("carried", layer.path, base.weight))
        if config.bias != "none" and isinstance(getattr(base, "bias", None), torch.Tensor):
            optional[f"{layer.path}.base_layer.bias"] = (full_shape(base.bias), ("tensor", base.bias))
    for path in resolved.modules_to_save:
        module = model.get_submodule(path)
        original = getattr(module, "original_module", module)
        for key, value in original.state_dict(keep_vars=True).items():
            required[f"{path}.{key}"] = (full_shape(value), ("save", path, key))
            if config.bias == "all" and key.rpartition(".")[2] == "bias":
                # PEFT's bias="all" also writes every bias under its wrapper name: the copy's (the same
                # tensor as above) and the original module's (used while adapters are disabled)
                optional[f"{path}.modules_to_save.{key}"] = (full_shape(value), ("save", path, key))
                optional[f"{path}.original_module.{key}"] = (full_shape(value), ("tensor", value))
    for token in resolved.tokens:
        if token.tied_to is None:
            shape = (len(token.ids), token.weight_shape[1])
            required[f"{token.path}.{TOKEN_ROWS}"] = (shape, ("tokens", token.wrapper))
    if config.bias == "all":
        for path, module, wrapper in logical_modules(model):
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and wrapper is None and path not in resolved.wrappers:
                optional[f"{path}.bias"] = (full_shape(bias), ("tensor", bias))
    return required, optional


def embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the input and output embeddings (transformers models), seen without wrappers:
    PEFT saves their full weights with an adapter when the vocabulary was resized."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is None:
            continue
        for path, logical, wrapper in logical_modules(model):
            if (module is logical or module is wrapper) and isinstance(getattr(logical, "weight", None), torch.Tensor):
                found.append((path, logical))
    return found


TOKEN_ROWS = "token_adapter.trainable_tokens_delta"
_LORA_SUFFIXES = (
    f".{TOKEN_ROWS}",
    ".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector",
    ".base_layer.bias",
    ".base_layer.weight",
)


def _module_of(key: str) -> str:
    """The module path a disk key belongs to (``a.b.lora_A.weight`` -> ``a.b``)."""
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key.rpartition(".")[0]


def _check_tensors(
    model: nn.Module, tensors: dict, required: dict, optional: set, config: LoraConfig, strict: bool, where: str
) -> None:
    missing = sorted(required.keys() - tensors.keys())
    unexpected = sorted(k for k in tensors.keys() - required.keys() - optional.keys()
                        if not k.endswith(IGNORED_KEY_SUFFIXES))
    known = {**optional, **required}
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)}, model expects {known[k][0]}"
        for k in sorted(known.keys() & tensors.keys())
        if tuple(tensors[k].shape) != tuple(known[k][0])
    ]
    not_float = [k for k in tensors if not tensors[k].is_floating_point()]
    if not_float:
        raise AdapterFileError(f"{where}: tensors that are not floating point: {preview(not_float)}.")
    known_paths = {path for path, _, _ in logical_modules(model)}
    if unexpected and not any(_module_of(k) in known_paths for k in unexpected):
        raise AdapterFileError(
            f"{where}: the file names modules this model does not have: {preview(unexpected)}; the model's "
            f"closest: {_closest(_module_of(unexpected[0]), known_paths)}. Neither the model's names nor "
            "transformers' rules for names saved under transformers 4 account for them: the adapter was probably "
            "trained on another architecture; load it into the model it was made for."
        )
    carrying = [k for k in unexpected if ".lora_" in k or k.endswith(f".{TOKEN_ROWS}")]
    if carrying:
        raise AdapterFileError(
            f"{where}: adapter tensors that the config does not account for: {preview(carrying)}. They are part of "
            "what the adapter computes (a LoRA variant lora_inject does not implement, or factors for modules the "
            "config does not target), so the file is refused even with strict=False: dropping them would load "
            "another model."
        )
    _check_magnitudes(tensors, missing, where)
    _check_size(model, {k: required[k][0] for k in missing}, where)
    if mismatched:
        hint = _vocabulary_hint(model, tensors, known) or _rank_hint(tensors, required, config)
        raise AdapterFileError(f"{where}: shape mismatch: {preview(mismatched, 3)}.{hint}")
    problems = []
    if missing:
        problems.append(f"missing keys (the config targets them, the file lacks them): {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the file, not targeted by the config): {preview(unexpected)}")
    if problems and strict:
        raise AdapterFileError(
            f"{where}: " + "; ".join(problems) + ". The file and its config disagree. Pass strict=False to load "
            "anyway (missing adapters start at their init, i.e. no change; unexpected tensors that are not adapter "
            "factors are ignored)."
        )
    if problems:
        warnings.warn(f"{where}: " + "; ".join(problems) + ".", stacklevel=3)


def _check_size(model: nn.Module, missing: dict[str, tuple], where: str) -> None:
    """Factors the file lacks start at their init (``strict=False``), allocated from the config's ranks: refuse
    a config that would allocate more than the whole model holds (a damaged rank, not an adapter)."""
    wanted = sum(math.prod(shape) for shape in missing.values())
    held = sum(p.numel() for p in model.parameters())
    if wanted > max(held, 1):
        raise AdapterFileError(
            f"{where}: the config's ranks ask for {wanted:,} adapter values the file does not hold, more than the "
            f"{held:,} of the whole model. The ranks are damaged; fix r/rank_pattern or re-save the adapter."
        )


def _closest(path: str, known: set[str]) -> str:
    import difflib

    return ", ".join(difflib.get_close_matches(path, sorted(known), n=3, cutoff=0.3)) or "nothing alike"


def _check_magnitudes(tensors: dict, missing: list[str], where: str) -> None:
    """A DoRA file must carry every magnitude: even with strict=False, a magnitude left at its init would
    silently compute another model. (Their values are checked with every other value, once shapes fit.)"""
    lost = [k for k in missing if k.endswith(".lora_magnitude_vector")]
    if lost:
        raise AdapterFileError(
            f"{where}: the config says use_dora=true but the file lacks the DoRA magnitudes {preview(lost)}. "
            "Without them the adapter computes something else; re-save it with its magnitudes."
        )


def _vocabulary_hint(model: nn.Module, tensors: dict, known: dict) -> str:
    """An input/output embedding weight whose row count differs: the adapter was saved after
    resize_token_embeddings."""
    vocabulary = {path for path, _ in embedding_modules(model)}
    for key, (shape, _) in known.items():
        if _module_of(key) in vocabulary and key in tensors and tuple(tensors[key].shape[1:]) == tuple(shape[1:]):
            rows = tensors[key].shape[0]
            if rows != shape[0]:
                return (
                    f" {key} has {rows} rows, the model {shape[0]}: the adapter was saved from a model whose "
                    f"vocabulary was resized. Call model.resize_token_embeddings({rows}) first (with the tokenizer "
                    "saved next to the adapter); lora_inject.from_pretrained does this by itself."
                )
    return ""


def _rank_hint(tensors: dict, required: dict, config: LoraConfig) -> str:
    for key, (shape, _) in required.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")) and key in tensors:
            file_rank = tensors[key].shape[0]
            if file_rank != shape[0]:
                return (
                    f" The config gives rank {shape[0]} for {key.rsplit('.', 2)[0]!r} but its tensors have rank "
                    f"{file_rank}: r/rank_pattern in the adapter's config disagree with the weights."
                )
    return ""


def _warn_doubled_out_proj(resolved: Plan, tensors: dict, found) -> None:
    """PEFT (0.21.2) adds an nn.MultiheadAttention adapter's out_proj update twice; lora_inject adds it once, as
    LoRA defines it. A file another library wrote with a non-zero out_proj update computes differently there."""
    if found.notes.get("written_by_us", True):
        return
    attention = [p for p, w in resolved.wrappers.items() if isinstance(w, LoraMultiheadAttention)]
    moved = [p for p in attention if bool(tensors.get(f"{p}.base_layer.out_proj.lora_B.weight", torch.zeros(1)).any())]
    if moved:
        warnings.warn(
            f"{found.source}: nn.MultiheadAttention adapters ({', '.join(moved[:3])}) from another library: PEFT "
            "0.21.2 adds their out_proj update twice (training, inference and merge alike), lora_inject once, as "
            "LoRA defines it, so outputs differ from PEFT's by that update. To reproduce PEFT's numbers, double "
            "those out_proj lora_B tensors before loading.", stacklevel=3,
        )


def refuse_or_warn_unplaced(adapter: Adapter, strict: bool) -> None:
    """Keys a ``names`` dialect could not put on the model (``notes["unplaced"]``: key -> why): an error
    (``strict``: nothing is loaded) or a warning listing them."""
    unplaced = adapter.notes.get("unplaced") or {}
    if not unplaced and adapter.tensors:
        return
    listed = preview([f"{key} ({why})" for key, why in unplaced.items()], 4)
    if not adapter.tensors:
        raise AdapterFileError(f"{adapter.source}: nothing in the file fits this model: {listed}.")
    if strict:
        raise AdapterFileError(
            f"{adapter.source}: {len(unplaced)} key(s) cannot be placed on this model, so nothing was loaded: "
            f"{listed}. Pass strict=False to load the {len(adapter.tensors) // 2} module(s) that fit (with a warning)."
        )
    warnings.warn(f"{adapter.source}: left out {len(unplaced)} key(s) that do not fit this model: {listed}.",
                  stacklevel=3)


def load_adapter(
    model: nn.Module,
    source: str | os.PathLike,
    adapter: str = "default",
    *,
    strict: bool = True,
    revision: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> nn.Module:
    """Inject the adapter saved at ``source`` (ours or PEFT's) into ``model`` and load its weights.

    ``source`` is a file or folder in any registered format (read by the format that claims it), or a
    Hugging Face hub id (``org/name``, with ``revision``, ``subfolder`` and
    ``cache_dir``/``token``/``local_files_only``; ``weight_name`` for a single-file diffusion LoRA in the repo)
    read through the hub cache.
    Everything is read and checked first; on any error the model is left exactly as it was.
    The loaded adapter becomes the active one and its parameters require grad (to resume
    training); call ``model.requires_grad_(False)`` for inference.
    """
    check_adapter_name(adapter)
    check_not_distributed(model, "load an adapter", zero3_alternative=ZERO3_LOAD)
    given, model = model, unwrap(model)
    require_new_adapter(model, adapter)
    path = adapter_folder(source, revision=revision, subfolder=subfolder, **hub_kwargs)
    load_read_adapter(model, read_adapter(path, values=False), adapter, strict)
    return given


@changes_adapters
def load_read_adapter(model: nn.Module, read: Adapter, adapter: str, strict: bool) -> None:
    """:func:`load_adapter` after reading: convert, check everything against ``model``, then inject and copy
    (``model`` unwrapped, ``adapter`` a new name). On any error the model is left exactly as it was."""
    if read.config.init is False:  # a tensor missing from the file (strict=False) must mean "no change"
        read = read.with_(config=read.config.replace(init=True))
    found = convert(read, "names", model)
    if "unplaced" in found.notes:
        refuse_or_warn_unplaced(found, strict)
    try:
        resolved = resolve(model, found.config, adapter, every_target_must_match=False)
    except AdapterFileError:
        raise
    except LoraInjectError as exc:
        raise type(exc)(f"{found.source}: the adapter's config does not fit this model. {exc}") from None
    found = convert(found, "layout", resolved.wrappers)
    config, tensors = found.config, found.tensors
    _warn_doubled_out_proj(resolved, tensors, found)
    required, optional = _expected(model, resolved, config)
    _check_tensors(model, tensors, required, optional, config, strict, found.source)
    tensors = checked_values(tensors, found.source)  # read only now that every shape fits
    # every factor comes from the file: allocate, do not initialise (PiSSA/OLoRA also rewrite the base weight)
    fill_later = not set(required) - set(tensors) and not is_principal_init(config.init)
    with restored_on_failure(model):
        inject_resolved(model, resolved, config, adapter, fill_later=fill_later)
        try:
            _copy_in(model, tensors, {**optional, **required}, adapter, new_adapter=True)
        except BaseException:
            delete_adapter(model, adapter)
            raise


def _destination(model: nn.Module, target: tuple, adapter: str) -> torch.Tensor:
    kind = target[0]
    if kind == "factor":
        return target[1].factor(adapter, target[2])
    if kind == "tokens":
        return target[1].rows(adapter)
    if kind == "save":
        return model.get_submodule(target[1]).modules_to_save[adapter].state_dict(keep_vars=True)[target[2]]
    return target[2] if kind == "carried" else target[1]


def _copy_in(model: nn.Module, tensors: dict, targets: dict, adapter: str, new_adapter: bool = False) -> None:
    """Copy every tensor of the file into its place, all or nothing: dtypes are checked before any write, and a
    failure while writing puts back what was written (one destination's copy kept at a time as it goes; for a
    ``new_adapter``, which the caller deletes on failure, only what lives outside it: base weights, biases)."""
    writes = [(_destination(model, target, adapter), tensors[key]) for key, (_, target) in targets.items()
              if key in tensors]
    outside = [target[0] in ("carried", "tensor") or not new_adapter for key, (_, target) in targets.items()
               if key in tensors]
    odd = [str(value.dtype) for _, value in writes if not (value.is_floating_point() and not value.is_complex())]
    if odd:  # read_adapter refuses these already; a caller handing tensors in directly must not half-write
        raise AdapterFileError(f"tensors that are not floating point ({', '.join(sorted(set(odd)))}); nothing written.")
    kept: list[torch.Tensor | None] = []  # each destination's values, taken just before it is overwritten
    with torch.no_grad():
        try:
            for (param, value), backup in zip(writes, outside):
                kept.append(param.detach().clone() if backup else None)
                param.data.copy_(value)
        except BaseException:
            for (param, _), old in zip(writes, kept):
                if old is not None:
                    param.data.copy_(old)
            raise
    for key, (_, target) in targets.items():
        if key in tensors and target[0] == "carried":  # a full base weight in the file travels on when saved again
            carried_paths(model).add(target[1])


@changes_adapters
def load_adapter_weights(
    model: nn.Module, directory: str | os.PathLike, adapter: str = "default", *, strict: bool = True
) -> nn.Module:
    """Load the weights of an adapter folder into adapter ``adapter`` already injected in ``model``.

    For resuming training: the model keeps its wrappers and optimizer references stay valid.
    Checked first (keys, shapes) exactly as :func:`load_adapter`; nothing changes on error.
    For sharded (FSDP2) models use :func:`lora_inject.distributed.load_adapter_weights`.
    """
    check_not_sharded(model, "load adapter weights", SHARDED_LOAD)
    if has_optimizer_copies(model):
        raise DistributedError("Cannot load adapter weights: DeepSpeed's ZeRO optimizer keeps its own float32 copy "
                               "of the trained parameters, so writing the parameters alone would be undone by the "
                               f"next step. {SHARDED_LOAD}")
    given, model = model, unwrap(model)
    tensors, required, optional = checked_tensors_for_existing(model, directory, adapter, strict)
    _copy_in(model, tensors, {**optional, **required}, adapter)
    return given


def _check_same_math(model: nn.Module, adapter: str, config: LoraConfig, found) -> None:
    """The file's config must describe the adapter as injected: the factors are copied in and the model's own
    scales apply, so a file saved with other scales (alpha, rsLoRA, patterns) or another variant would load
    silently as something else."""
    problems = []
    for name in ("dora", "lora_bias"):
        if getattr(found.config, name) != getattr(config, name):
            problems.append(f"{name}: file {getattr(found.config, name)}, injected {getattr(config, name)}")
    for path, module in lora_layers(model):
        if adapter in module.r and not math.isclose(found.config.scale_for(path), module.scaling[adapter],
                                                    rel_tol=1e-6):
            problems.append(f"{path} scale: file {found.config.scale_for(path):g}, injected "
                            f"{module.scaling[adapter]:g}")
            break
    if problems:
        raise AdapterFileError(
            f"{found.source}: its config does not describe adapter {adapter!r} as injected ({'; '.join(problems)}). "
            "load_adapter_weights copies factors into the adapter as it is; load this file as a new adapter with "
            "load_adapter instead."
        )


def checked_tensors_for_existing(model: nn.Module, directory: str | os.PathLike, adapter: str, strict: bool):
    """Read an adapter folder and check it against adapter ``adapter`` as injected in ``model``.

    Returns ``(tensors, required, optional)`` as :func:`_expected` describes them.
    """
    _require_adapter(model, adapter)
    config = adapter_configs(model)[adapter]
    found = read_adapter(directory, values=False)
    _check_same_math(model, adapter, config, found)
    tensors = _principal_from_lora(model, adapter, found.tensors, found.source)
    resolved = Plan([], [], None, {})
    for path, module in lora_layers(model):
        if adapter in module.r:
            resolved.wrappers[path] = module
            resolved.layers.append(PlannedLayer(path, "", (), module.r[adapter], 0.0, 0.0, 0))
    tensors = convert(found.with_(tensors=tensors), "layout", resolved.wrappers).tensors
    resolved.modules_to_save = [
        p for p, m in model.named_modules() if isinstance(m, ModulesToSave) and adapter in m.adapter_names
    ]
    resolved.tokens = [
        TokenTarget(p, m.ids(adapter).tolist(), m, "", tuple(m.base_layer.weight.shape))
        for p, m in model.named_modules()
        if isinstance(m, TrainableTokens) and m.tied_to is None and adapter in m.adapter_names
    ]
    required, optional = _expected(model, resolved, config)
    _check_tensors(model, tensors, required, optional, config, strict, str(directory))
    return checked_values(tensors, str(directory)), required, optional
