"""Model surgery: inject adapters, switch them, merge them, take them out again."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import TASK_HEADS, LoraConfig, foreign_config, unknown_field_message
from .errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from .guards import check_not_distributed, unwrap, zero3_injection
from .layers import ADAPTER_MODULES, LoraLayer, ModulesToSave, TrainableTokens
from .layers.principal import is_principal_init
from .quantized.registry import logical_numel, prepare_quantized_layers
from .targeting.plan import Plan, resolve
from .threads import (
    LOCAL,
    changes_adapters,
    changing,
    hold_during_forwards,
    model_lock,
    opened,
    reads_adapters,
    release_forwards,
)

_STATE_ATTR = "_lora_inject_configs"  # {adapter name: LoraConfig} kept on the model
CARRIED_ATTR = "_lora_inject_carried"  # module paths whose full weight is saved with every adapter


def carried_paths(model: nn.Module) -> set[str]:
    """Module paths whose full base weight is saved with each adapter, as PEFT's ``save_embedding_layers``
    does: embeddings resized after inject, and any base weight an adapter file brought in."""
    return model.__dict__.setdefault(CARRIED_ATTR, set())


# Surgery never imports an edge. An edge that must act when surgery changes a model (transformers' methods set
# on an injected model, hooks it installed) registers a handler here; surgery calls it with the model.
MODEL_EVENTS = ("attached", "detached", "untied")  # first adapter in; last adapter out; a tied weight copied
_HANDLERS: dict[str, list[Callable[[nn.Module], None]]] = {event: [] for event in MODEL_EVENTS}


def on_model_event(event: str, handler: Callable[[nn.Module], None]) -> None:
    """Call ``handler(model)`` whenever ``event`` (one of :data:`MODEL_EVENTS`) happens to a model."""
    if handler not in _HANDLERS[event]:
        _HANDLERS[event].append(handler)


def model_event(event: str, model: nn.Module) -> None:
    for handler in _HANDLERS[event]:
        handler(model)


on_model_event("attached", hold_during_forwards)  # each forward holds the model's lock shared (threads.py)
on_model_event("detached", release_forwards)


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_adapter_name(name: object) -> None:
    """Adapter names become state-dict key parts and folder names: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(
            f"Adapter names may hold only letters, digits, '_' and '-' (1-128 characters), since they become "
            f"parts of parameter names and folder names; got {name!r}."
        )


def _config_from(model: nn.Module, config: Any, overrides: dict[str, Any]) -> LoraConfig:
    config = foreign_config(config)
    if config is not None and not isinstance(config, LoraConfig):
        raise ConfigError(
            f"The second argument must be a lora_inject.LoraConfig or a peft.LoraConfig; got "
            f"{type(config).__module__}.{type(config).__name__}."
        )
    unknown = [k for k in overrides if k not in LoraConfig.__dataclass_fields__]
    if unknown:
        raise ConfigError(unknown_field_message(unknown))
    config = config.replace(**overrides) if config is not None else LoraConfig(**overrides)
    if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        config = config.replace(base_model_name_or_path=str(model.name_or_path))
    return with_task_heads(model, config)


def with_task_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """PEFT's rule for ``task_type`` SEQ_CLS, TOKEN_CLS and QUESTION_ANS: the model's head (``classifier``,
    ``score``, ``qa_outputs``) is trained in full and saved with the adapter (``modules_to_save``), as PEFT's
    task models do; otherwise it would stay at its random init and PEFT could not load the file."""
    heads = TASK_HEADS.get(config.task_type or "", ())
    if not heads:
        return config
    saved = list(config.modules_to_save or ())
    present = {path.rsplit(".", 1)[-1] for path, _ in model.named_modules()}
    added = [h for h in heads if h in present and h not in saved]
    return config.replace(modules_to_save=saved + added) if added else config


def require_new_adapter(model: nn.Module, adapter: str) -> None:
    """Refuse a second inject or load under a name the model already has.

    Extending an adapter in place would leave one stored config describing layers injected with
    another (rank, alpha, targets): the saved files would reload to other outputs, or not at all.
    """
    known = getattr(model, _STATE_ATTR, {})
    if adapter in known:
        layers = sorted(p for p, layer in lora_layers(model) if adapter in layer.r)
        raise AdapterExistsError(
            f"The model already has an adapter named {adapter!r} (on {len(layers)} layer(s), e.g. "
            f"{layers[:2]}). One adapter has one config, so a second inject under the same name cannot be saved "
            "and reloaded faithfully. Inject every target in one call (targets=[...] with rank_pattern/"
            "alpha_pattern for per-module values), use another name (adapter='...'), or remove the old one "
            "first with lora_inject.delete_adapter(model, name)."
        )


def _resolve(model: nn.Module, config: LoraConfig, adapter: str) -> Plan:
    require_new_adapter(model, adapter)
    if config.targets is None and not config.target_parameters:  # a preset: not every member has every module
        from .targeting.presets import preset_targets

        return resolve(model, config.replace(targets=preset_targets(model)), adapter, every_target_must_match=False)
    return resolve(model, config, adapter)


def plan(model: nn.Module, config: LoraConfig | None = None, *, adapter: str = "default", **overrides: Any) -> Plan:
    """Dry run of :func:`inject`: what would be wrapped, with shapes and added parameters.

    Changes nothing. ``print(plan(...))`` gives a table.
    """
    model = unwrap(model)
    return _resolve(model, _config_from(model, config, overrides), adapter)


@changes_adapters
def inject(
    model: nn.Module, config: LoraConfig | None = None, *, adapter: str = "default", **overrides: Any
) -> nn.Module:
    """Wrap the targeted modules of ``model`` with LoRA adapter ``adapter``, in place; returns ``model``.

    ``overrides`` are :class:`LoraConfig` fields (``targets=[...]``, ``r=8``, ``alpha=16``, ...).
    Everything is validated before the model changes: a bad target or an unsupported
    module type raises and leaves the model as it was. Afterwards only the new adapter's
    parameters (plus biases and ``modules_to_save`` as configured) require grad, and the
    new adapter is the active one; a ``peft.LoraConfig(inference_mode=True)`` leaves it frozen, as in PEFT.
    """
    check_not_distributed(model, "inject adapters", zero3_ok=True)
    check_adapter_name(adapter)
    inner = unwrap(model)
    frozen = getattr(config, "inference_mode", False) is True  # PEFT's field; ours has no such field
    config = _config_from(inner, config, overrides)
    with zero3_injection(inner, reads_base=config.dora or is_principal_init(config.init),
                         copies_modules=bool(config.modules_to_save or config.trainable_tokens)):
        inject_resolved(inner, _resolve(inner, config, adapter), config, adapter)
    if frozen:
        inner.requires_grad_(False)
    return model


def inject_resolved(model: nn.Module, resolved: Plan, config: LoraConfig, adapter: str,
                    fill_later: bool = False) -> nn.Module:
    """Apply a plan made by :func:`lora_inject.plan.resolve` for this model, config and adapter. ``fill_later``:
    the factors are left as allocated, not initialised (a loader writes every one of them next)."""
    first_adapter = not getattr(model, _STATE_ATTR, None)
    touched = _apply(model, resolved, config, adapter, fill_later)
    model.requires_grad_(False)
    _config_record(model).update({adapter: config})
    if first_adapter:  # nothing else to deactivate: skip walking the whole model again
        for module in touched:
            module.set_active([adapter])
    else:
        set_adapter(model, adapter)
    _set_bias_trainable(model, config.bias)
    return model


def _inherit_training_flag(modules: Iterable[nn.Module]) -> None:
    """A module we create runs in the mode of the module it stands in for: a wrapper and its adapter parts
    (dropout) take the ``training`` flag of the layer they wrap, so an adapter added to a model in eval mode
    does not run dropout at inference (nn.Module starts every new module in training mode)."""
    for module in modules:
        base = module.base_layer
        if base.training and module.training:
            continue  # new modules start in training mode: nothing differs
        module.training = base.training
        for child in module.children():
            if child is not base:
                child.train(base.training)


def _apply(model: nn.Module, resolved: Plan, config: LoraConfig, adapter: str,
           fill_later: bool = False) -> list[nn.Module]:
    """Attach wrappers and create weights; on any failure undo what was done. Returns the modules extended."""
    attached: list[tuple[str, nn.Module]] = []  # (path, what was there before)
    extended: list[nn.Module] = []
    try:
        for layer in resolved.layers:
            wrapper = resolved.wrappers[layer.path]
            wrapper.add_adapter(
                adapter, layer.r, layer.alpha, layer.scale, config.dropout, None if fill_later else config.init,
                config.adapter_dtype,
                dora=config.dora, lora_bias=config.lora_bias,
            )
            extended.append(wrapper)
            previous = model.get_submodule(layer.path)
            if previous is not wrapper:
                _set_submodule(model, layer.path, wrapper)
                attached.append((layer.path, previous))
        _warn_tied_copies(model, resolved.modules_to_save)
        for path in resolved.modules_to_save:
            current = model.get_submodule(path)
            if not isinstance(current, ModulesToSave):
                current = ModulesToSave(current)
                _set_submodule(model, path, current)
                attached.append((path, current.original_module))
            current.add_adapter(adapter)
            extended.append(current)
        for token in resolved.tokens:
            wrapper = token.wrapper
            wrapper.add_adapter(adapter, token.ids, config.adapter_dtype)
            extended.append(wrapper)
            previous = model.get_submodule(token.path)
            if previous is not wrapper:
                _set_submodule(model, token.path, wrapper)
                attached.append((token.path, previous))
        _inherit_training_flag(extended)
        prepare_quantized_layers(model)
        model_event("attached", model)  # an edge that fails here undoes the whole injection too
        return extended
    except BaseException:
        for module in extended:
            if adapter in module.adapter_names:
                module.delete_adapter(adapter)
        for path, previous in reversed(attached):
            _set_submodule(model, path, previous)
        if not getattr(model, _STATE_ATTR, None):  # the edges that did attach (methods set on the model) let go
            with contextlib.suppress(Exception):  # the error being raised is the one to report
                model_event("detached", model)
        raise


def _warn_tied_copies(model: nn.Module, paths: list[str]) -> None:
    """A module trained in full whose weight another module shares (a tied embedding and head): the trained
    copy is not shared, so the two part ways (PEFT warns the same)."""
    if not paths:
        return
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path in paths:
        for param in model.get_submodule(path).parameters():
            others = [n for n in owners.get(id(param), ()) if not n.startswith(path + ".")]
            if others:
                warnings.warn(
                    f"modules_to_save trains a copy of {path!r}, whose weight {others[0]!r} shares (tied weights). "
                    "The copy is not shared: after training the two differ, and merge_and_unload unties them "
                    "(tie_word_embeddings=False). Train both, or use trainable_tokens to train rows of a tied "
                    "embedding.", stacklevel=4,
                )
                break


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def _config_record(model: nn.Module) -> dict[str, LoraConfig]:
    """The ``{adapter: LoraConfig}`` record kept on the model (created empty if missing)."""
    if not hasattr(model, _STATE_ATTR):
        object.__setattr__(model, _STATE_ATTR, {})
    return getattr(model, _STATE_ATTR)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """``{adapter name: LoraConfig}`` of every adapter injected into ``model``."""
    return dict(getattr(unwrap(model), _STATE_ATTR, {}))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(path, wrapper)`` for every LoRA wrapper in the model."""
    for path, module in unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave | TrainableTokens]]:
    """``(path, module)`` for every module that holds adapters (LoRA wrappers, trained copies, token rows)."""
    for path, module in model.named_modules():
        if isinstance(module, ADAPTER_MODULES):
            yield path, module


def innermost_first(modules) -> list[tuple[str, nn.Module]]:
    """Adapter modules in model order, except that nested parameter wrappers (``x.base_layer``) come before
    the wrapper around them: replacing the outer one first would leave the inner one's path dangling."""
    return sorted(modules, key=lambda item: -item[0].count(".base_layer"))


def _require_adapter(model: nn.Module, name: str) -> None:
    known = getattr(model, _STATE_ATTR, {})
    if name not in known:
        raise AdapterNotFoundError(
            f"No adapter named {name!r} in this model; it has {sorted(known) or 'none'}. "
            "Inject one with lora_inject.inject(model, ..., adapter=name) or load one with load_adapter."
        )


@changes_adapters
def set_adapter(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make ``names`` the active adapter(s): they run in forward and their parameters train."""
    model = unwrap(model)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _require_adapter(model, name)
    for _, module in _adapter_modules(model):
        module.set_active(names)


@contextlib.contextmanager
def using_adapter(model: nn.Module, names: str | Iterable[str] | None) -> Iterator[nn.Module]:
    """Inside the block ``names`` run instead of the active adapters (``None``: none, the base model).

    For the thread that entered it only: other threads' forwards keep their own adapters, so a server runs
    each request in its own block (a thread the block starts sees it through :func:`lora_inject.carry_blocks`).
    Which parameters require grad does not change, so an optimizer built for the active adapter is
    unaffected; on exit the thread sees the model's adapters again, also when the block raises. This is how a
    preference trainer runs a frozen reference adapter on the policy's own weights.
    """
    inner = unwrap(model)
    wanted = [] if names is None else ([names] if isinstance(names, str) else list(names))
    with locked_for_block(inner, lambda modules: needs_model_wide_block(inner)) as (modules, model_wide):
        for name in wanted:
            _require_adapter(inner, name)
        for module in modules:
            module.prepare_active(wanted)
        if model_wide:
            with _active_model_wide(modules, wanted):
                yield model
        else:
            with opened(inner, modules, active=tuple(wanted)):
                yield model


@contextlib.contextmanager
def locked_for_block(model: nn.Module, model_wide: Callable[[list], bool]) -> Iterator[tuple[list, bool]]:
    """``(adapter modules, whether the block changes the model itself)``, decided and held under the model's
    lock: shared for a block seen by its thread only, alone for a model-wide one (``model_wide(modules)``).
    Decided again under the lock, so a change landing between the first look and the lock is seen."""
    state = LOCAL.__dict__  # this thread's: counted down where the block ends, whichever thread that is
    while True:
        wide = model_wide([m for _, m in _adapter_modules(model)])
        with changing(model) if wide else model_lock(model).shared():
            modules = [m for _, m in _adapter_modules(model)]
            if model_wide(modules) == wide:
                state["blocks"] += 1  # what carry_blocks takes along, model-wide blocks included
                try:
                    yield modules, wide
                finally:
                    state["blocks"] -= 1
                return


@contextlib.contextmanager
def _active_model_wide(modules: list[nn.Module], names: list[str]) -> Iterator[None]:
    """The block's adapters made the model's own; on exit the previous ones again, except on modules where the
    block's thread changed them meanwhile (``set_adapter`` inside a block lasts, as with a per-thread block)."""
    before, during = [m.active_adapters for m in modules], None
    try:
        for module in modules:
            module.set_active(names, trainable=False)
        during = [m.active_adapters for m in modules]
        yield
    finally:
        for i, module in enumerate(modules):
            if during is None or module.active_adapters == during[i]:  # a failed start: put every one back
                module.set_active(before[i], trainable=False)


def needs_model_wide_block(model: nn.Module) -> bool:
    """Whether a block entered now must change the model itself rather than this thread's view: with grad on, a
    model in training mode (or with transformers' checkpointing flag) may run its forwards again during
    backward (activation checkpointing of any kind), on GPUs in autograd's own threads, which see the model's
    state, not this thread's. Such a block holds the model alone for its length; inference never does."""
    if not torch.is_grad_enabled():
        return False
    return model.training or any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """If the block raises, put back which parameters required grad and which adapters were active: a failed
    call leaves the model as it was (taking its own new adapter out is the block's job)."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    active = [(module, list(module.active_adapters)) for _, module in _adapter_modules(model)]
    try:
        yield
    except BaseException:
        for module, names in active:  # a wrapper the block took out again is no longer in the model: harmless
            module.set_active([n for n in names if n in module.adapter_names], trainable=False)
        for param, flag in flags:
            param.requires_grad_(flag)
        raise


@changes_adapters
def copy_adapter(model: nn.Module, source: str, target: str) -> nn.Module:
    """Add adapter ``target``, a frozen copy of adapter ``source`` (same layers, config and values); the
    active adapters stay as they were. For a reference policy in preference training, or a snapshot."""
    inner = unwrap(model)
    check_adapter_name(target)
    _require_adapter(inner, source)
    require_new_adapter(inner, target)
    config = getattr(inner, _STATE_ATTR)[source]
    copy_config = config.replace(init=True)  # the values are copied: a PiSSA/OLoRA init must not run again
    active = active_adapters(inner)
    inject_resolved(inner, resolve(inner, copy_config, target, every_target_must_match=False), copy_config, target)
    try:
        _copy_values(inner, source, target)
    except BaseException:
        delete_adapter(inner, target)
        raise
    finally:
        for _, module in _adapter_modules(inner):
            module.set_active(active)
    return model


def _copy_values(model: nn.Module, source: str, target: str) -> None:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for key, value in adapter_state(model, source).items():
            parts = key.split(".")
            if source not in parts:
                continue  # a trained base bias (bias="lora_only"/"all") is one tensor for all adapters
            parts[len(parts) - 1 - parts[::-1].index(source)] = target
            tensors[".".join(parts)].copy_(value)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that run (and train) now, in the order they were added."""
    inner = unwrap(model)
    running = {n for _, m in _adapter_modules(inner) for n in m.active_adapters}
    return [name for name in getattr(inner, _STATE_ATTR, {}) if name in running]


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as the base model, for the thread that entered it.

    Merged adapters must leave the weights for that: then the block unmerges them (and merges them again on
    exit) holding the model alone, so other threads' forwards wait for it instead of seeing the base model.
    """
    inner = unwrap(model)

    def model_wide(modules: list) -> bool:
        return any(m.merged_adapters for m in modules) or needs_model_wide_block(inner)

    with locked_for_block(inner, model_wide) as (modules, wide):
        if any(m._routing is not None for m in modules):
            raise ConfigError("disabled_adapters inside batch_adapters: the per-row names would be ignored. Leave "
                              "the batch_adapters block first, or give the rows that should run the base model None.")
        if wide:
            with _disabled_model_wide(modules):
                yield model
        else:
            with opened(inner, modules, disabled=True):
                yield model


@contextlib.contextmanager
def _disabled_model_wide(modules: list[nn.Module]) -> Iterator[None]:
    merged = {id(m): list(m.merged_adapters) for m in modules}
    for module in modules:
        module.unmerge()
        module.set_disabled(True)
    try:
        yield
    finally:
        for module in modules:
            module.set_disabled(False)
            if merged.get(id(module)):
                module.merge(merged[id(module)])


@changes_adapters
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; wrappers left with no adapter are replaced by their base."""
    model = unwrap(model)
    _require_adapter(model, name)
    for path, module in innermost_first(_adapter_modules(model)):
        if name in module.adapter_names:
            module.delete_adapter(name)
        if not module.adapter_names:
            _set_submodule(model, path, module.base_layer)
    del getattr(model, _STATE_ATTR)[name]
    if not getattr(model, _STATE_ATTR):
        model_event("detached", model)


@changes_adapters
def reset_adapters(model: nn.Module, adapter: str | None = None) -> None:
    """Re-draw adapter weights with their configured init (B zero, so output equals the base).

    Use after building on the meta device: ``inject`` on meta allocates nothing; after
    ``model.to_empty(device=...)`` and loading the base weights, call this so the
    adapter starts from the proper init instead of uninitialised memory.
    """
    model = unwrap(model)
    configs = getattr(model, _STATE_ATTR, {})
    names = [adapter] if adapter else list(configs)
    for name in names:
        _require_adapter(model, name)
        for _, layer in lora_layers(model):
            if name in layer.r:
                layer.reset_adapter(name, configs[name].init)
        for _, module in _adapter_modules(model):
            if isinstance(module, TrainableTokens) and name in module.adapter_names:
                module.reset_adapter(name)


def _set_bias_trainable(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


class ParamCount(NamedTuple):
    """``(trainable, total)`` parameter counts; ``str()`` gives a one-line summary."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}"


def trainable_parameters(model: nn.Module) -> ParamCount:
    """How many parameters train, of how many in all (shared parameters counted once; a packed 4-bit
    weight counts as the weights it holds, as PEFT counts it)."""
    trainable = total = 0
    for param in model.parameters():
        numel = logical_numel(param)
        total += numel
        trainable += numel if param.requires_grad else 0
    return ParamCount(trainable, total)


@reads_adapters
def lora_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s tensors, keyed as in ``model.state_dict()``.

    Includes LoRA factors, ``modules_to_save`` copies and, with ``bias="lora_only"``/``"all"``,
    the trained biases, so ``model.load_state_dict(sd, strict=False)`` restores the adapter.
    A compiled or DDP-wrapped model gives the keys of the model inside. On a sharded (FSDP2)
    model the values are DTensors (``.full_tensor()`` gathers one; for files use
    :func:`lora_inject.distributed.save_adapter`).
    """
    return adapter_state(unwrap(model), adapter)


@reads_adapters
def adapter_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """:func:`lora_state_dict` of a model that is not wrapped."""
    _require_adapter(model, adapter)
    config = getattr(model, _STATE_ATTR)[adapter]
    out: dict[str, torch.Tensor] = {}
    for path, module in _adapter_modules(model):
        if adapter not in module.adapter_names:
            continue
        for container in module.containers(adapter):
            prefix = f"{path}.{container}.{adapter}"
            item = module.get_submodule(container)[adapter]
            if isinstance(item, torch.Tensor):
                out[prefix] = item.detach()
            else:
                out.update({f"{prefix}.{k}": v for k, v in item.state_dict().items()})
        if config.bias == "lora_only" and isinstance(module, LoraLayer):
            bias = getattr(module.base_layer, "bias", None)
            if bias is not None:
                out[f"{path}.base_layer.bias"] = bias.detach()
    if config.bias == "all":
        out.update({k: v.detach() for k, v in model.state_dict().items() if k == "bias" or k.endswith(".bias")})
    return out
