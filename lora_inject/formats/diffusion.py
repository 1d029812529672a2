"""Diffusion LoRA files: one ``.safetensors`` file from kohya sd-scripts / A1111, ComfyUI (BFL Flux names),
OneTrainer, ai-toolkit or diffusers, read and written.

Reading is two steps, because the names need the model: :func:`read` takes the file as it is (keys, metadata);
:func:`place` (a ``names`` dialect, run by ``load_adapter`` once the model is known) puts each (down, up, alpha)
group on the model's modules through :mod:`diffusion_names`, scale ``alpha / rank`` per module (1 without an
alpha; a diffusers file's ``lora_adapter_metadata`` config where it has one). Every key is placed or refused by
name with its reason (``notes["unplaced"]``): ``load_adapter`` refuses the file unless ``strict=False``
(``load.refuse_or_warn_unplaced``).

Writing (``format="kohya"``): one file with kohya's names, ``lora_down``/``lora_up`` and the real alpha of each
module, which kohya, A1111, ComfyUI and diffusers read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig, exact_config
from ..errors import AdapterFileError, ExportError, preview
from ..targeting.matching import first_pattern_match
from ..version import __version__
from .adapter import Adapter
from .diffusion_names import (
    AMBIGUOUS,
    Placement,
    adaptable_modules,
    bfl_names,
    flat,
    is_clip_text,
    name_table,
    role_of,
    split_role,
)
from .folder import read_safetensors, safetensors_writer, write_atomically
from .registry import AdapterFormat, Dialect, register_dialect, register_format

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file in a folder
DESCRIPTION = "a diffusion LoRA file (one .safetensors: kohya/A1111, ComfyUI, OneTrainer, diffusers)"

_FACTORS = {".lora_down.weight": "A", ".lora_up.weight": "B", ".lora_A.weight": "A", ".lora_B.weight": "B",
            ".alpha": "alpha"}
_REFUSED = {  # suffix -> why this library does not load it
    ".dora_scale": "DoRA (dora_scale) from kohya files is not supported",
    ".lora_magnitude_vector": "DoRA magnitudes in a diffusion file are not supported",
    ".lora_mid.weight": "a Tucker-decomposed convolution (lora_mid) is not LoRA's B @ A",
    ".diff": "a full weight delta (.diff), not a LoRA pair",
    ".diff_b": "a full bias delta (.diff_b), not a LoRA pair",
    ".lora_A.bias": "a lora_bias term: not supported in diffusion files",
    ".lora_B.bias": "a lora_bias term: not supported in diffusion files",
}
_LYCORIS = (".hada_", ".lokr_")


def _file_of(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    peft_folder = (path / "adapter_config.json").exists() or (path / "adapter_model.safetensors").exists()
    if path.is_dir() and not peft_folder:
        files = sorted(path.glob("*.safetensors"))
        return files[0] if len(files) == 1 else None
    return None


def claims(path: Path) -> bool:
    return _file_of(path) is not None


def read(path: Path) -> Adapter:
    """The file as it is: keys unchanged, ``notes["metadata"]`` the diffusers config per component (if any)."""
    file = _file_of(path)
    tensors, metadata = read_safetensors(file, with_metadata=True)
    return Adapter(LoraConfig(), tensors, str(file), "kohya", notes={"metadata": _component_configs(metadata)})


def read_config(path: Path) -> LoraConfig:
    raise AdapterFileError(f"{path} is a diffusion LoRA file: which module each key names depends on the model. "
                           "Load it into the model (li.load_adapter(model, path)) and read li.adapter_configs.")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read(path).tensors


def _component_configs(metadata: dict) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata``: ``{"unet.r": 4, "unet.lora_alpha": 8, ...}`` -> per component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdapterFileError("The file's lora_adapter_metadata is not valid JSON; the file is damaged.") from None
    if not isinstance(packed, dict):
        raise AdapterFileError("The file's lora_adapter_metadata is not a JSON object; the file is damaged.")
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field = str(key).partition(".")
        configs.setdefault({"unet": "denoiser", "transformer": "denoiser"}.get(component, component), {})[field] = value
    return configs


def key_kind(key: str) -> tuple[str, str]:
    """``(module name as in the file, "A" | "B" | "alpha" | why it is refused)``."""
    if key.startswith("base_model.model."):
        return key, "PEFT adapter weights without their adapter_config.json (which holds the scale): load the folder"
    for suffix, kind in _FACTORS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    for suffix, why in _REFUSED.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], why
    if any(marker in key for marker in _LYCORIS):
        return key.split(".")[0], "LyCORIS LoHa/LoKr (hada_*/lokr_*) is not LoRA's B @ A; not supported"
    return key, "not a LoRA factor name this library reads (XLabs, control LoRAs and full weights are not)"


def _scale(group: dict, rank: int, paths: list[str], config: dict | None) -> float:
    """``alpha / rank`` (NaN where the alpha is not one positive finite number); ``paths``: the module's path
    and the other names a config's patterns may use for it (transformers 4's ``text_model.`` level)."""
    if "alpha" in group:
        alpha = group["alpha"][1]
        value = float(alpha.reshape(-1)[0]) if alpha.numel() == 1 else math.nan
        return value / rank if math.isfinite(value) and value > 0 else math.nan
    if config:
        patterns = config.get("alpha_pattern") or {}
        path = next((p for p in paths if first_pattern_match(patterns, p) is not None), paths[0])
        pattern_config = LoraConfig(r=rank, alpha=float(config.get("lora_alpha", rank)), alpha_pattern=patterns)
        alpha = pattern_config.alpha_for(path)
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return 1.0


def _fitted(a: torch.Tensor, b: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str:
    """A and B in the module's layout (2-D for Linear, 4-D for convolutions), or why they do not fit."""
    if isinstance(module, nn.Embedding):  # its LoRA is laid out otherwise (lora_embedding_A/B)
        return "an embedding: embedding LoRAs in diffusion files are not read"
    weight = module.weight
    if weight.dim() == 2 and a.dim() == 4 and a.shape[2:] == (1, 1) and b.dim() == 4:
        a, b = a.flatten(1), b.flatten(1)
    elif weight.dim() == 4 and a.dim() == 2 and weight.shape[2:] == (1, 1):
        a, b = a[:, :, None, None], b[:, :, None, None]
    expected_a = (a.shape[0], weight.shape[1], *weight.shape[2:])
    expected_b = (weight.shape[0], a.shape[0], *([1] * (weight.dim() - 2)))
    if a.dim() != weight.dim() or tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        return (f"factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the module's weight {tuple(weight.shape)} "
                "(a file for another model?)")
    return a, b


def _placed(placement: Placement, down: torch.Tensor, up: torch.Tensor, module: nn.Module):
    b = up if placement.rows is None else up[placement.rows[0]:placement.rows[1]]
    if placement.swap_halves:
        shift, scale = b.chunk(2, dim=0)
        b = torch.cat([scale, shift], dim=0)
    return _fitted(down, b, module)


def place(adapter: Adapter, model: nn.Module) -> Adapter:
    """The ``names`` dialect: a diffusion file's keys put on ``model``'s modules, canonical names and an exact
    config (each module its rank and scale); what cannot be placed goes to ``notes["unplaced"]`` with its reason."""
    if adapter.format != "kohya" or adapter.notes.get("placed"):
        return adapter
    role = adapter.notes.get("role") or role_of(model)
    table, modules = name_table(model), adaptable_modules(model)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unplaced: dict[str, str] = {}
    for key, tensor in adapter.tensors.items():
        name, kind = key_kind(key)
        if kind in ("A", "B", "alpha"):
            groups.setdefault(name, {})[kind] = (key, tensor)
        else:
            unplaced[key] = kind
    tensors, ranks, scales, owner = {}, {}, {}, {}
    clip_text = is_clip_text(model)
    for name, group in groups.items():
        keys = [key for key, _ in group.values()]
        key_role, rest = split_role(name)
        placements = table.get(flat(rest))
        why = _why_not(role, key_role, placements, group, rest)
        if why:
            unplaced.update(dict.fromkeys(keys, why))
            continue
        down, up = group["A"][1], group["B"][1]
        fitted = [(p, _placed(p, down, up, modules[p.path])) for p in placements]
        bad = next((f for _, f in fitted if isinstance(f, str)), None)
        if bad is None and placements[0].rows is not None and placements[-1].rows[1] != up.shape[0]:
            bad = f"its up factor has {up.shape[0]} rows; the modules it stands for have {placements[-1].rows[1]}"
        taken = next((owner[p.path] for p, _ in fitted if p.path in owner), None)
        if bad or taken:
            unplaced.update(dict.fromkeys(keys, bad or f"a second entry for a module that {taken!r} already sets"))
            continue
        for p, (a, b) in fitted:
            tensors[f"{p.path}.lora_A.weight"], tensors[f"{p.path}.lora_B.weight"] = a, b
            ranks[p.path] = a.shape[0]
            names = [p.path, *([f"text_model.{p.path}"] if clip_text else [])]
            scales[p.path] = _scale(group, a.shape[0], names, adapter.notes["metadata"].get(key_role))
            owner[p.path] = name
    nan = [owner[k] + ".alpha" for k, s in scales.items() if not math.isfinite(s)]
    if nan:
        raise AdapterFileError(f"{adapter.source}: alphas that are not one positive finite number: "
                               f"{preview(set(nan))}. The file is damaged or was written for other software.")
    config = exact_config(LoraConfig(), ranks, scales) if ranks else LoraConfig(targets=[])
    return adapter.with_(config=config, tensors=tensors, notes={**adapter.notes, "unplaced": unplaced, "placed": True})


def _why_not(role: str, key_role: str, placements, group: dict, rest: str) -> str | None:
    if key_role != role:
        return (f"belongs to the {key_role.replace('_', ' ')}, not this model (the {role.replace('_', ' ')}): load "
                "the file into a pipeline with lora_inject.diffusers.load_lora, or into that component")
    if placements is None:
        return f"no module of this model goes by {rest!r}"
    if placements is AMBIGUOUS:
        return f"{rest!r} names two different modules of this model"
    if "A" not in group or "B" not in group:
        return f"has no {'lora_up' if 'A' in group else 'lora_down'} partner"
    return None


def kohya_name(path: str, model: nn.Module, role: str) -> str:
    """The kohya name of a module: the component's prefix and the (transformers-4) path with underscores."""
    prefix = {"denoiser": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
              "text_encoder_t5": "lora_te3_"}[role]
    if is_clip_text(model):
        path = path if path.startswith("text_model.") else "text_model." + path
    return prefix + flat(path)


def kohya_tensors(adapter: Adapter, model: nn.Module, role: str | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{kohya name.lora_down.weight | .lora_up.weight | .alpha: tensor}``, alpha = this module's scale * rank.

    A Flux transformer is written in BFL's names, as kohya sd-scripts, ComfyUI and diffusers read Flux files:
    modules that BFL fuses (q/k/v, and q/k/v/mlp in single blocks) become one pair, down the stacked downs and up
    block-diagonal with each module's scale folded in (alpha = the pair's rank), which is exact.
    """
    config, role = adapter.config, role or role_of(model)
    odd = [k for k in adapter.tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd or config.dora or config.lora_bias:
        raise ExportError(f"{adapter.source}: a kohya file holds lora_down/lora_up pairs and an alpha per module; "
                          f"this adapter also has {preview(odd) or 'DoRA or lora_bias'}. Save it with "
                          "format='peft' instead.")
    pairs = {k.removesuffix(".lora_A.weight"): (a, adapter.tensors[k.removesuffix("A.weight") + "B.weight"])
             for k, a in adapter.tensors.items() if k.endswith(".lora_A.weight")}
    out: dict[str, torch.Tensor] = {}
    if role == "denoiser" and bfl_names(model):
        _put_bfl_pairs(pairs, model, config, out)
        pairs = {}  # every pair is written in BFL's names (or refused)
    for path, (a, b) in pairs.items():
        _put(out, kohya_name(path, model, role), a, b, config.scale_for(path) * a.shape[0])
    return {k: v.to(dtype) if dtype is not None else v for k, v in out.items()}


def _put(out: dict, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    out[name + ".lora_down.weight"] = down.contiguous()
    out[name + ".lora_up.weight"] = up.contiguous()
    out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)


def _put_bfl_pairs(pairs: dict, model: nn.Module, config: LoraConfig, out: dict) -> None:
    """Write every pair into ``out`` under its BFL name; refuse a module that has none."""
    left = dict(pairs)
    for name, placements in bfl_names(model).items():
        present = [p for p in placements if p.path in left]
        if not present:
            continue
        if len(placements) == 1 and not placements[0].swap_halves:
            a, b = left.pop(present[0].path)
            _put(out, "lora_unet_" + flat(name), a, b, config.scale_for(present[0].path) * a.shape[0])
            continue
        rank = sum(left[p.path][0].shape[0] for p in present)
        rows = placements[-1].rows[1] if placements[-1].rows else left[present[0].path][1].shape[0]
        downs, up, column = [], None, 0
        for p in present:
            a, b = left.pop(p.path)
            up = b.new_zeros(rows, rank) if up is None else up
            start, end = p.rows or (0, rows)
            up[start:end, column:column + a.shape[0]] = b * config.scale_for(p.path)
            downs.append(a)
            column += a.shape[0]
        if placements[0].swap_halves:  # diffusers holds (scale, shift); the file, (shift, scale)
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        _put(out, "lora_unet_" + flat(name), torch.cat(downs), up, rank)
    if left:
        raise ExportError(f"{preview(left)} have no name in kohya's Flux files; save with format='peft' instead.")


def write(adapter: Adapter, destination: Path, model: nn.Module) -> Path:
    """One kohya file: ``destination`` itself when it ends in ``.safetensors``, else ``destination/``
    ``pytorch_lora_weights.safetensors`` (written whole or not at all)."""
    tensors = kohya_tensors(adapter, model, dtype=adapter.notes.get("dtype"))
    folder, name = (destination.parent, destination.name) if destination.suffix == ".safetensors" else (
        destination, WEIGHTS_NAME)
    metadata = {"format": "pt", "lora_inject_version": __version__, "ss_network_module": "networks.lora"}
    write_atomically(folder, {name: safetensors_writer(tensors, metadata)})
    return folder / name


register_format(AdapterFormat("kohya", DESCRIPTION, claims, read_config, read_tensors, read, write))
register_dialect(Dialect("diffusion", "names", place))
