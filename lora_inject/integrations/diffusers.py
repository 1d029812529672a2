"""``lora_inject.diffusers``: diffusion LoRA files on diffusers pipelines (SD 1.x/2.x, SDXL, Flux).

One file holds the adapters of several components (the UNet or transformer, one or two text encoders); this
module splits it by the components' prefixes, places each part exactly (``formats/diffusion.py``), checks all of
them before changing anything, then loads each into its component under one adapter name. Loading another
file under another name adds it: the adapters run together, each at the weight it was loaded with (what
diffusers' ``set_adapters(names, weights)`` does).

    import lora_inject as li
    li.diffusers.load_lora(pipe, "style.safetensors", adapter="style", weight=0.7)
    li.diffusers.load_lora(pipe, "subject.safetensors", adapter="subject")
    li.diffusers.merge(pipe)      # per component, in float32, cast once; unmerge(pipe), unload(pipe)

diffusers itself is not imported: a pipeline is anything with ``unet``/``transformer`` and ``text_encoder``
attributes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping

from torch import nn

from ..errors import AdapterFileError, ConfigError, preview
from ..formats.diffusion import key_kind, kohya_tensors, place
from ..formats.diffusion_names import role_of, split_role
from ..formats.folder import safetensors_writer, write_atomically
from ..formats.hub import adapter_folder
from ..formats.load import load_read_adapter, refuse_or_warn_unplaced
from ..formats.registry import read_adapter
from ..guards import unwrap
from ..inject import active_adapters, adapter_configs, delete_adapter, lora_layers, set_adapter
from ..merging import merge as _merge
from ..merging import unload as _unload
from ..merging import unmerge as _unmerge
from ..threads import changing_all

ATTRIBUTES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def components(pipe) -> dict[str, tuple[str, nn.Module]]:
    """``{role: (attribute, module)}`` for the pipeline's parts a LoRA file can address; a text encoder's role
    follows its class (SDXL's ``text_encoder_2`` is CLIP-G, Flux's is T5: their files name them differently)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for attribute in ATTRIBUTES:
        module = getattr(pipe, attribute, None)
        if isinstance(module, nn.Module):
            role = "denoiser" if attribute in ("unet", "transformer") else role_of(module)
            found.setdefault(role, (attribute, unwrap(module)))
    return found


def _split(read, present: dict) -> tuple[dict, dict]:
    """The file's keys by component, and the keys for components the pipeline lacks (key -> why)."""

    parts: dict[str, dict] = {}
    orphans = {}
    for key, tensor in read.tensors.items():
        role = split_role(key_kind(key)[0])[0]
        if role in present:
            parts.setdefault(role, {})[key] = tensor
        else:
            orphans[key] = f"for a {role.replace('_', ' ')}, which this pipeline does not have"
    return parts, orphans


def load_lora(pipe, path: str | os.PathLike, adapter: str = "default", weight: float = 1.0, *,
              strict: bool = True, **hub_kwargs):
    """Load a diffusion LoRA file into every component of ``pipe`` it addresses, as adapter ``adapter`` scaled
    by ``weight``; previously loaded adapters stay active alongside it. Every key is placed or refused by name
    before anything changes (``strict=False``: load what fits, warn with the rest). ``path`` may be a hub id
    with ``weight_name=`` (and ``revision``, ``subfolder``, ``cache_dir``, ``token``, ``local_files_only``).
    Returns ``pipe``."""
    read = read_adapter(adapter_folder(path, **hub_kwargs), values=False)  # load_read_adapter checks them
    if read.format != "kohya":
        raise AdapterFileError(f"{path} is {read.format!r} adapter of one model, not a diffusion LoRA file: load it "
                               "into its component, e.g. li.load_adapter(pipe.unet, path).")
    present = components(pipe)
    parts, orphans = _split(read, present)
    placed = {}
    _check_weight(weight)
    for role, tensors in parts.items():
        notes = {**read.notes, "role": role}
        placed[role] = place(read.with_(tensors=tensors, notes=notes), present[role][1])
        orphans.update(placed[role].notes["unplaced"])
    everything = read.with_(tensors={k: v for p in placed.values() for k, v in p.tensors.items()},
                            notes={"unplaced": orphans})
    refuse_or_warn_unplaced(everything, strict)
    _load_all(placed, present, adapter, weight)
    return pipe


def _check_weight(weight: float) -> None:
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
        raise ConfigError(f"weight must be a finite number (negative inverts the adapter); got {weight!r}.")


def set_weights(pipe, weights: Mapping[str, float]) -> None:
    """Run each named adapter at ``weight`` times its own scale (diffusers' ``set_adapters(names, weights)``;
    0 switches it off, negative inverts it). A runtime setting: saved files keep the adapter's own alphas.
    Refused for an adapter that is merged (unmerge first)."""
    for weight in weights.values():
        _check_weight(weight)
    models = [model for _, model in components(pipe).values()]
    with changing_all(models):  # forwards in flight finish with the old weights; new ones wait
        for model in models:
            merged = [(p, n) for p, layer in lora_layers(model) for n in weights if n in layer.merged_adapters]
            if merged:
                raise ConfigError(f"Adapter {merged[0][1]!r} is merged into {merged[0][0]}; unmerge before changing "
                                  "its weight.")
        for model in models:
            _apply_weights(model, weights)


def _apply_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    configs = adapter_configs(model)
    for path, layer in lora_layers(model):
        for name, weight in weights.items():
            if name in layer.scaling:
                layer.scaling[name] = configs[name].scale_for(path) * float(weight)
        layer._refresh_running()  # the forward's precomputed (factors, scale) per running adapter


def _load_all(placed: dict, present: dict, adapter: str, weight: float) -> None:
    """Each component in turn; a failure removes what the earlier ones got (all or nothing). Every component is
    held alone for the whole load and its weight (forwards see the pipeline before or after, never between)."""
    done: list = []
    models = [present[role][1] for role, found in placed.items() if found.tensors]
    with changing_all(models):
        _load_each(placed, present, adapter, done)
        if weight != 1.0:
            for model in models:
                _apply_weights(model, {adapter: weight})


def _load_each(placed: dict, present: dict, adapter: str, done: list) -> None:
    try:
        for role, found in placed.items():
            if not found.tensors:
                continue
            model = present[role][1]
            before = [n for n in active_adapters(model) if n in adapter_configs(model)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what did not fit was reported once, for the whole file
                load_read_adapter(model, found.with_(notes={**found.notes, "unplaced": {}}), adapter, strict=True)
            done.append((model, before))
            set_adapter(model, [*before, adapter])
    except BaseException:
        for model, before in done:
            delete_adapter(model, adapter)
            if before:
                set_adapter(model, before)
        raise


def _with_adapters(pipe) -> list[nn.Module]:
    return [m for _, m in components(pipe).values() if adapter_configs(m)]


def merge(pipe) -> None:
    """Fold the active adapters into every component's weights (float32 arithmetic, cast once)."""
    for model in _with_adapters(pipe):
        _merge(model)


def unmerge(pipe) -> None:
    for model in _with_adapters(pipe):
        _unmerge(model)


def unload(pipe) -> None:
    """Remove every adapter from every component: plain modules again, merged updates kept."""
    for model in _with_adapters(pipe):
        _unload(model)


def save_lora(pipe, path: str | os.PathLike, adapter: str = "default", *, dtype=None) -> str:
    """Write ``adapter`` of every component as one kohya file (``lora_unet_``, ``lora_te1_``/``lora_te_``,
    ``lora_te2_``, ``lora_te3_``), each module with its real alpha; ``dtype=torch.float16`` halves the file.
    ``pipe`` may also be one model (a UNet, a Flux transformer, a text encoder)."""
    from ..formats.adapter import Adapter
    from ..formats.save import adapter_tensors

    present = {role_of(pipe): ("", unwrap(pipe))} if isinstance(pipe, nn.Module) else components(pipe)
    tensors = {}
    for role, (_, model) in present.items():
        if adapter not in adapter_configs(model):
            continue
        found = Adapter(adapter_configs(model)[adapter], adapter_tensors(model, adapter), f"{role} adapter", "kohya")
        part = kohya_tensors(found, model, role, dtype)
        if role == "text_encoder" and sum(r.startswith("text_encoder") for r in present) > 1:  # SDXL, Flux: te1
            part = {"lora_te1_" + k.removeprefix("lora_te_"): v for k, v in part.items()}
        tensors.update(part)
    if not tensors:
        raise AdapterFileError(f"No component of the pipeline has an adapter {adapter!r}; found "
                               f"{preview({n for _, m in present.values() for n in adapter_configs(m)}) or 'none'}.")
    path = os.fspath(path)
    folder, name = os.path.split(path) if path.endswith(".safetensors") else (path, "pytorch_lora_weights.safetensors")
    write_atomically(folder or ".", {name: safetensors_writer(tensors, {"format": "pt"})})
    return os.path.join(folder, name)
