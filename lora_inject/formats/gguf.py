"""GGUF LoRA adapters for llama.cpp, Ollama and LM Studio (export only).

What llama.cpp reads (``src/llama-adapter.cpp``): one GGUF file with ``general.type = "adapter"``,
``general.architecture`` equal to the base's, ``adapter.type = "lora"`` and one file-wide ``adapter.lora.alpha``;
tensors ``<base tensor>.lora_a`` (r, in) and ``.lora_b`` (out, r), except ``token_embd``, whose A is stored
transposed, (n_vocab, r). Each tensor is scaled by ``alpha / rank`` with rank read from B's shape (``alpha = 0``:
by 1). Names follow llama.cpp's tensor map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``); for
the Llama family the rows of q_proj's and k_proj's B are permuted for llama.cpp's rope exactly as
``convert_hf_to_gguf.py`` permutes the base weights (k with the number of key/value heads).

One alpha per file cannot say rsLoRA, ``alpha_pattern`` or per-module alphas: where a module's scale differs from
``alpha / rank``, the difference is folded into its B, so llama.cpp computes exactly this library's ``s * B @ A``.
For plain adapters the tensors equal llama.cpp's ``convert_lora_to_gguf.py`` output one for one.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFileError, ExportError, preview
from ..layers.principal import is_principal_init
from ..threads import reads_adapters
from .adapter import Adapter
from .gguf_file import GGML_TYPES, write_gguf
from .registry import AdapterFormat, read_adapter, register_format

ROUTE = ("merge it into the base instead (`lora-inject merge BASE ADAPTER MERGED`, or `li.merge_and_unload` then "
         "`save_pretrained`) and convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp's converter names one Hugging Face architecture."""

    name: str  # general.architecture
    rope_permuted: bool  # the converter permutes q/k rows (Llama's interleaved rope); NeoX-rope models do not


ARCHITECTURES: dict[str, GGUFArchitecture] = {  # keyed by config.json's model_type
    "llama": GGUFArchitecture("llama", rope_permuted=True),
    "mistral": GGUFArchitecture("llama", rope_permuted=True),
    "qwen2": GGUFArchitecture("qwen2", rope_permuted=False),
    "qwen3": GGUFArchitecture("qwen3", rope_permuted=False),
}

_BLOCK_TENSORS = {  # module inside a decoder layer -> llama.cpp's tensor in block N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_BLOCK_PATH = re.compile(r"(?:model\.)?layers\.(\d+)\.(" + "|".join(map(re.escape, _BLOCK_TENSORS)) + r")")
_TOP_TENSORS = {"model.embed_tokens": "token_embd", "embed_tokens": "token_embd", "lm_head": "output"}

_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
_REFUSED_KINDS = {  # suffix -> what it is, for the message
    ".lora_magnitude_vector": "DoRA magnitudes (llama.cpp adds s*B@A; DoRA rescales every output)",
    ".lora_B.bias": "lora_bias terms (llama.cpp's LoRA has no bias)",
    ".trainable_tokens_delta": "trainable token rows (llama.cpp's LoRA cannot replace rows)",
}


@dataclass(frozen=True)
class BaseShapes:
    """What the base's config.json says about the tensors an adapter may touch."""

    architecture: GGUFArchitecture
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_head: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> BaseShapes:
        model_type = config.get("model_type")
        arch = ARCHITECTURES.get(model_type)
        if arch is None:
            raise ExportError(
                f"{where}: model_type {model_type!r} is not one the GGUF export knows; it knows "
                f"{', '.join(sorted(ARCHITECTURES))} (llama.cpp's tensor names and rope layout differ per "
                f"architecture). For this base, {ROUTE}."
            )
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            shapes = cls(
                arch, model_type, int(config["num_hidden_layers"]), hidden, int(config["intermediate_size"]),
                heads, int(config.get("num_key_value_heads") or heads),
                int(config.get("head_dim") or hidden // heads), int(config["vocab_size"]),
                bool(config.get("tie_word_embeddings", False)),
            )
            if min(shapes.layers, shapes.hidden, shapes.heads, shapes.kv_heads, shapes.head_dim, shapes.vocab) <= 0:
                raise ValueError("sizes")
            return shapes
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ExportError(f"{where}: a {model_type} config.json needs {exc} as a positive integer; the base "
                              "folder is damaged or is not the model the adapter was trained on.") from None

    def shape_of(self, gguf_name: str) -> tuple[int, int]:
        """(out, in) of the base weight, as the Hugging Face Linear stores it (embedding: (vocab, hidden))."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        table = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
                 "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i),
                 "token_embd": (self.vocab, h), "output": (self.vocab, h)}
        return table[gguf_name.split(".")[-2]]


def _gguf_name(module: str, shapes: BaseShapes) -> str | None:
    """llama.cpp's name for the base weight of ``module`` (``blk.0.attn_q.weight``), None where it has none."""
    if module in _TOP_TENSORS:
        return f"{_TOP_TENSORS[module]}.weight"
    match = _BLOCK_PATH.fullmatch(module)
    if match and int(match[1]) < shapes.layers:
        return f"blk.{match[1]}.{_BLOCK_TENSORS[match[2]]}.weight"
    return None


def _rope_permuted(b: torch.Tensor, heads: int) -> torch.Tensor:
    """B's rows (out, r) in the order convert_hf_to_gguf.py gives the base's rows (``LlamaModel.permute``)."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _refuse_what_gguf_cannot_say(adapter: Adapter) -> None:
    config, where = adapter.config, adapter.source
    found = []
    if is_principal_init(config.init):
        found.append(f"a PiSSA/OLoRA residual form (init={config.init!r}: right only on its residual base; save "
                     "it with principal_as_lora=True)")
    if config.dora:
        found.append("DoRA (use_dora)")
    if config.lora_bias:
        found.append("lora_bias")
    if config.trainable_tokens:
        found.append("trainable tokens (trainable_token_indices)")
    if config.target_parameters:
        found.append(f"adapters on parameters ({preview(config.target_parameters)}; llama.cpp's LoRA is per weight)")
    for suffix, what in _REFUSED_KINDS.items():
        keys = [k for k in adapter.tensors if k.endswith(suffix)]
        if keys:
            found.append(f"{what}: {preview(keys, 2)}")
    factors = _LINEAR + _EMBEDDING + tuple(_REFUSED_KINDS)
    full = [k for k in adapter.tensors if not k.endswith(factors)]
    if full or config.modules_to_save:
        found.append("full weights that travel with the adapter (modules_to_save, trained biases, embedding "
                     "weights saved with an embedding adapter or resized embeddings): "
                     f"{preview(full or config.modules_to_save, 3)} (if those are the base's own embedding weights, "
                     "as PEFT saves them, load the adapter and re-save it with save_embedding_layers=False)")
    if found:
        raise ExportError(f"{where}: a GGUF LoRA file holds only W + (alpha/r)*B@A per weight; this adapter also "
                          f"has {'; '.join(dict.fromkeys(found))}. To run it in llama.cpp, {ROUTE}.")


def _factor_pairs(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """``{module: (A, B, is_embedding)}`` as stored in memory: A (r, in) or (r, vocab), B (out, r)."""
    pairs = {}
    for (a_suffix, b_suffix), embedding in ((_LINEAR, False), (_EMBEDDING, True)):
        for key in adapter.tensors:
            if key.endswith(a_suffix):
                module = key.removesuffix(a_suffix)
                b = adapter.tensors.get(module + b_suffix)
                if b is None:
                    raise AdapterFileError(f"{adapter.source}: {key} has no {module + b_suffix}; re-save the adapter.")
                pairs[module] = (adapter.tensors[key], b, embedding)
    return pairs


def _checked_placement(module: str, a: torch.Tensor, b: torch.Tensor, embedding: bool, shapes: BaseShapes,
                       where: str) -> str:
    name = _gguf_name(module, shapes)
    if name is None or (embedding != (name == "token_embd.weight")):
        raise ExportError(f"{where}: {module!r} has no tensor in llama.cpp's {shapes.architecture.name} model "
                          f"(it names the attention and MLP projections of each layer, token_embd and output). "
                          f"For this adapter, {ROUTE}.")
    if a.dim() != 2:
        raise ExportError(f"{where}: {module!r} is a convolution ({a.dim()}-D factors); GGUF LoRA is for Linear "
                          f"weights. {ROUTE[0].upper() + ROUTE[1:]}.")
    out_features, in_features = shapes.shape_of(name)
    found = (b.shape[0], a.shape[1])
    expected = (shapes.hidden, shapes.vocab) if embedding else (out_features, in_features)
    if found != expected:
        raise ExportError(f"{where}: {module!r} updates a ({found[0]}, {found[1]}) weight, but the base's config "
                          f"gives {name} the shape {expected}. Is --base the model this adapter was trained on?")
    if name == "output.weight" and shapes.tied_head:
        raise ExportError(f"{where}: the adapter trains lm_head, but the base ties lm_head to the input embedding "
                          "(tie_word_embeddings), so llama.cpp's file has no output tensor to put it on and refuses "
                          f"the adapter. {ROUTE[0].upper() + ROUTE[1:]}.")
    if name == "token_embd.weight" and shapes.tied_head:
        raise ExportError(f"{where}: the adapter trains the input embedding of a base that ties lm_head to it "
                          "(tie_word_embeddings). llama.cpp computes the output with token_embd too and would apply "
                          "the embedding's adapter there as well (llama.cpp 0.3.36 aborts on it); here it changes "
                          f"the input only. {ROUTE[0].upper() + ROUTE[1:]}.")
    return name


def gguf_tensors(adapter: Adapter, shapes: BaseShapes, outtype: str = "f32") -> dict[str, torch.Tensor]:
    """The GGUF tensors of ``adapter`` (checked against the base's shapes), B carrying what ``alpha/rank`` does not.

    Returns ``{"blk.0.attn_q.weight.lora_a": (r, in), ...lora_b: (out, r)}``, token_embd's A as (vocab, r),
    in ``outtype``'s dtype. Raises :class:`ExportError` for anything llama.cpp would compute differently.
    """
    _refuse_what_gguf_cannot_say(adapter)
    config, where = adapter.config, adapter.source
    dtype = GGML_TYPES[outtype][1]
    out: dict[str, torch.Tensor] = {}
    for module, (a, b, embedding) in sorted(_factor_pairs(adapter).items()):
        name = _checked_placement(module, a, b, embedding, shapes, where)
        rank = b.shape[1]
        if config.rank_for(module) != rank:
            raise AdapterFileError(f"{where}: {module!r} has rank-{rank} factors but the config gives it rank "
                                   f"{config.rank_for(module)}; the config and the weights disagree (re-save it).")
        b = b.to(torch.float64)
        file_scale = config.alpha / rank if config.alpha else 1.0  # what llama.cpp will multiply by
        scale = config.scale_for(module)
        if not math.isclose(scale, file_scale, rel_tol=1e-12, abs_tol=0.0):
            b = b * (scale / file_scale)
        if shapes.architecture.rope_permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            b = _rope_permuted(b, shapes.heads if "attn_q" in name else shapes.kv_heads)
        out[name + ".lora_a"] = (a.T if embedding else a).to(dtype).contiguous()
        out[name + ".lora_b"] = b.to(dtype).contiguous()
    if not out:
        raise ExportError(f"{where}: the adapter has no LoRA factors to export.")
    overflow = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
    if overflow:
        raise ExportError(f"{where}: {preview(overflow)} do not fit in {outtype} (inf or NaN once scaled and cast); "
                          "export with --outtype f32.")
    return out


def _metadata(adapter: Adapter, shapes: BaseShapes) -> dict[str, object]:
    return {
        "general.architecture": shapes.architecture.name,
        "general.type": "adapter",
        "general.name": Path(adapter.source).name or "adapter",
        "general.quantization_version": 2,  # as llama.cpp's converter writes (GGML_QNT_VERSION)
        "adapter.type": "lora",
        "adapter.lora.alpha": float(adapter.config.alpha),
    }


def _write_atomically(out: Path, metadata: dict, tensors: dict) -> Path:
    """The file appears whole or not at all: written beside its place, fsynced, renamed in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_gguf(handle, metadata, tensors)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_adapter_gguf(adapter: Adapter, out: str | os.PathLike, base_config: Mapping[str, Any],
                       outtype: str = "f32") -> Path:
    """Check everything, then write ``out`` atomically (nothing is left behind on refusal)."""
    if outtype not in GGML_TYPES:
        raise ExportError(f"outtype must be one of {', '.join(GGML_TYPES)}; got {outtype!r}.")
    shapes = BaseShapes.from_config(base_config, adapter.source)
    tensors = gguf_tensors(adapter, shapes, outtype)
    return _write_atomically(Path(out), _metadata(adapter, shapes), tensors)


def read_base_config(base: str | os.PathLike | Mapping[str, Any] | Any) -> dict[str, Any]:
    """config.json of the base as a dict: from a folder, a config.json path, a dict or a transformers config."""
    if isinstance(base, Mapping):
        return dict(base)
    if hasattr(base, "to_dict"):
        return base.to_dict()
    path = Path(base)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ExportError(f"No config.json at {str(base)!r}: --base must be the base model's folder (only its "
                          "config.json is read) or the config.json itself.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ExportError(f"{path} is not a readable JSON config ({str(exc)[:120]}).") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} holds {type(config).__name__}, not a JSON object.")
    return config


@reads_adapters
def export_gguf(
    adapter: str | os.PathLike | nn.Module, out: str | os.PathLike, base: Any = None, *,
    outtype: str = "f32", adapter_name: str = "default",
) -> Path:
    """Write an adapter as a llama.cpp GGUF LoRA file (``llama-server --lora``, Ollama's ``ADAPTER``).

    ``adapter``: an adapter folder or file in any format this library reads, or a model holding the adapter
    ``adapter_name``. ``base``: the base model's folder or config.json (only the config is read; a model's own
    ``config`` is used when ``adapter`` is a model). ``outtype``: ``"f32"``, ``"f16"`` or ``"bf16"``.
    Scales the single file-wide alpha cannot express (rsLoRA, alpha/rank patterns) are folded into B.
    Raises :class:`ExportError`, writing nothing, for what llama.cpp cannot compute (DoRA, lora_bias,
    modules_to_save, trainable tokens, lm_head on a tied base) and for unknown architectures.
    """
    if isinstance(adapter, nn.Module):
        collected = _adapter_of_model(adapter, adapter_name)
        if base is None:
            base = getattr(adapter, "config", None)
    else:
        collected = read_adapter(adapter)
    if base is None:
        raise ExportError(f"{collected.source}: no base given. Pass base= (CLI: --base), the base model's folder "
                          "or config.json: the GGUF names and the rope layout depend on its architecture.")
    return write_adapter_gguf(collected, out, read_base_config(base), outtype)


def _adapter_of_model(model: nn.Module, name: str) -> Adapter:
    from ..guards import unwrap
    from ..inject import _require_adapter, adapter_configs
    from .save import adapter_tensors, principal_as_lora_config

    model = unwrap(model)
    _require_adapter(model, name)
    config = adapter_configs(model)[name]
    if is_principal_init(config.init):  # written as plain LoRA for the original base, as save_adapter does
        config = principal_as_lora_config(config)
    return Adapter(config, adapter_tensors(model, name), f"adapter {name!r}", "gguf", name=name)


def _write(adapter: Adapter, destination: Path, model: nn.Module) -> Path:
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError("save_adapter(format='gguf') needs a model with a Hugging Face config; for others use "
                          "li.export_gguf(adapter_dir, out, base=<the base's config.json>).")
    return write_adapter_gguf(adapter, destination, read_base_config(config))


def _not_readable(path: Path):
    raise AdapterFileError(f"{path} is a GGUF LoRA file: this library writes GGUF (export_gguf) but does not read "
                           "it back. Load the PEFT folder it was exported from.")


def _claims(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


GGUF = register_format(AdapterFormat(
    "gguf", "a GGUF LoRA file for llama.cpp (written by export_gguf; not read back)", _claims,
    _not_readable, _not_readable, _not_readable, _write, reads=False,
))
