"""Fold an adapter into a safetensors checkpoint on disk, tensor by tensor, without building the model.

Peak memory is about one row chunk of the largest tensor plus the adapter: the merged
weight ``W + scale * B @ A`` is computed in float32 (float64 for float64 tensors) per chunk
of rows and streamed to the output file. Values are bit-identical to loading the model in the
same dtype, ``merge_and_unload`` and ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError, MergeError, preview
from ..formats.folder import put_back_leftovers
from ..formats.registry import read_adapter
from ..formats.validate import checked_values
from ..layers.base import merge_dtype
from ..targeting.matching import NameTarget, is_hf_conv1d, pattern_budget
from .parameters import model_on_meta, onto_saved_names, parameter_edits
from .stream import DTYPES, ShardReader, StreamWriter

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHUNK_ELEMENTS = 1 << 22  # 4M elements per row chunk: 16 MiB in float32, a few chunks in flight at most
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

@dataclass
class Edit:
    """What happens to one checkpoint tensor: replaced (modules_to_save, bias) and/or a LoRA delta added.

    ``kind`` says how ``scale * B @ A`` maps onto the stored weight: "linear" (out, in),
    "transposed" (Conv1D's (in, out), Embedding's (num_embeddings, dim)) or "conv" (out, in, *k).
    """

    replacement: torch.Tensor | None = None
    kind: str | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0
    is_embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: one entry per output feature (B's rows)
    addend: torch.Tensor | None = None  # lora_bias: B's bias, added to the stored bias times ``scale``
    row_ids: torch.Tensor | None = None  # trainable tokens: these rows (n,) become ``row_values`` (n, D)
    row_values: torch.Tensor | None = None
    experts: int = 0  # kind "experts": a 3-D parameter of this many experts (see layers/parameter.py)
    transposed: bool = False  # kind "experts": A acts on the stored dim 1 (update A_e.T @ B_e.T per expert)

    def expert_factors(self, i: int, j: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [i, j)'s ``(L, R)``, ``scale * L @ R`` their update as stored (the factors merge uses)."""
        from ..layers.parameter import expert_factors

        left, right = expert_factors(self.a.to(dtype), self.b.to(dtype), self.experts, self.transposed)
        return left[i:j], right[i:j]

    def replace_rows(self, rows: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Rows [i, j) of the output with the trained token rows that fall among them written in."""
        inside = (self.row_ids >= i) & (self.row_ids < j)
        if bool(inside.any()):
            rows = rows.clone() if rows._base is not None or not rows.is_contiguous() else rows
            rows[self.row_ids[inside] - i] = self.row_values[inside].to(rows.dtype)
        return rows

    @property
    def needs_whole_tensor(self) -> bool:
        """DoRA on a transposed layout normalises columns: its row scale needs every stored row at once."""
        return self.magnitude is not None and self.kind == "transposed"

    def fit(self, key: str, shape: tuple[int, ...]) -> bool:
        """Check the factors against the stored weight's shape; settle Linear vs Conv1D layout by shape.

        Returns whether the shape decided the layout (a square weight cannot).
        """
        if self.kind == "experts":
            return False  # checked when the edit was made (parameter_merge.py)
        out_features, in_features = self.b.shape[0], self.a.shape[1]
        if self.kind == "conv" and self.b.shape[1] != self.a.shape[0]:
            raise MergeError(
                f"{key}: the adapter's B is grouped ({self.a.shape[0]} // {self.b.shape[1]} groups): a LoRA on a "
                "grouped conv makes a dense update that the grouped weight cannot hold, so it cannot be merged "
                "(PEFT cannot either). Serve the adapter unmerged."
            )
        if self.kind == "conv":
            expected = {(out_features, in_features, *self.a.shape[2:])}
        elif self.is_embedding:
            expected = {(in_features, out_features)}
        else:
            expected = {(out_features, in_features), (in_features, out_features)}
        if self.magnitude is not None and self.magnitude.numel() != out_features:
            raise MergeError(
                f"{key}: the DoRA magnitude has {self.magnitude.numel()} entries, the adapter's B has {out_features} "
                "rows. The adapter file is inconsistent."
            )
        if shape not in expected:
            raise MergeError(
                f"{key}: the checkpoint stores shape {shape}, but the adapter's factors make "
                f"{' or '.join(map(str, sorted(expected)))}. The adapter was trained on another model."
            )
        if self.kind in ("linear", "transposed") and not self.is_embedding and len(expected) == 2:
            self.kind = "linear" if shape == (out_features, in_features) else "transposed"
            return True
        return False

    def add_to_rows(self, rows: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """``rows`` (float32 or float64, rows [i, j) of the stored weight, contiguous, updated in place)
        plus ``scale * delta``, as one GEMM accumulating into them in rows' dtype: the arithmetic
        ``merge_and_unload`` uses, so both write the same bits."""
        if self.kind == "experts":  # rows are experts: (j - i, d1, d2) += s * L @ R, one batched GEMM
            left, right = self.expert_factors(i, j, rows.dtype)
            return rows.baddbmm_(left, right, alpha=self.scale)
        a, b = self.a.to(rows.dtype), self.b.to(rows.dtype)
        if self.kind == "transposed":  # Conv1D (in, out), Embedding (num_embeddings, dim)
            left, right = a[:, i:j].t(), b.t()
        else:  # linear (out, in), conv (out, in, *kernel) seen as (out, in * prod(kernel))
            left, right = b.flatten(1)[i:j], a.flatten(1)
        rows.view(j - i, -1).addmm_(left, right, alpha=self.scale)
        if self.magnitude is not None:  # DoRA: W' = g * (W + s dW), g = m / ||W + s dW|| per output feature
            view = rows.t() if self.kind == "transposed" else rows.view(j - i, -1)
            magnitude = self.magnitude.reshape(-1).to(rows.dtype)
            g = (magnitude if self.kind == "transposed" else magnitude[i:j]) / torch.linalg.vector_norm(view, dim=1)
            view.mul_(g[:, None])
        return rows


TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"


def token_ids_for(config: LoraConfig, path: str) -> list[int]:
    """The token ids of the trained rows saved for ``path``: the list (input embedding), or the entry of the
    ``{name: ids}`` form whose name matches ``path`` as targets do."""
    tokens = config.trainable_tokens
    if not isinstance(tokens, dict):
        if tokens is None:
            raise AdapterFileError(f"The adapter holds trainable token rows for {path!r} but its config gives no ids.")
        return tokens
    for name, ids in tokens.items():
        if NameTarget(name).matches(path, None):
            return ids
    raise AdapterFileError(f"The adapter holds trainable token rows for {path!r}, but no trainable_token_indices "
                           f"entry names it ({sorted(tokens)}).")


def plan_edits(config: LoraConfig, tensors: dict[str, torch.Tensor], fan_in_fan_out: bool) -> dict[str, Edit]:
    """``{checkpoint key: Edit}`` from an adapter's tensors (keys without ``base_model.model.``)."""
    edits: dict[str, Edit] = {}
    handled = set()
    pairs = ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True))
    for key in tensors:
        for a_suffix, b_suffix, is_embedding in pairs:
            if not key.endswith(a_suffix):
                continue
            path = key.removesuffix(a_suffix)
            a, b = tensors[key], tensors.get(path + b_suffix)
            if b is None:
                raise AdapterFileError(f"{key} has no matching {path + b_suffix} in the adapter.")
            if is_embedding or (fan_in_fan_out and a.dim() == 2):
                kind = "transposed"
            else:
                kind = "conv" if a.dim() > 2 else "linear"
            edit = edits.setdefault(f"{path}.weight", Edit())
            edit.kind, edit.a, edit.b, edit.is_embedding = kind, a, b, is_embedding
            edit.scale = config.scale_for(path)
            handled.update({key, path + b_suffix})
    for key, tensor in tensors.items():
        if key.endswith(".lora_B.bias"):  # lora_bias: the base bias gains scale * b_B
            path = key.removesuffix(".lora_B.bias")
            edit = edits.setdefault(f"{path}.bias", Edit())
            edit.addend, edit.scale = tensor, config.scale_for(path)
            handled.add(key)
    for key, tensor in tensors.items():
        if key.endswith(".lora_magnitude_vector"):
            path = key.removesuffix(".lora_magnitude_vector")
            if f"{path}.weight" not in edits:
                raise AdapterFileError(f"{key}: a DoRA magnitude without the LoRA factors of {path!r}.")
            edits[f"{path}.weight"].magnitude = tensor
            handled.add(key)
    for key, tensor in tensors.items():
        if key.endswith(TOKEN_SUFFIX):
            path = key.removesuffix(TOKEN_SUFFIX)
            edit = edits.setdefault(f"{path}.weight", Edit())
            if edit.kind is not None:
                raise AdapterFileError(f"{key}: {path!r} has both LoRA factors and trainable token rows.")
            ids = token_ids_for(config, path)
            if tensor.dim() != 2 or tensor.shape[0] != len(ids):
                raise AdapterFileError(
                    f"{key} holds {tuple(tensor.shape)}, but the config gives {len(ids)} token ids for {path!r}."
                )
            edit.row_ids, edit.row_values = torch.tensor(ids, dtype=torch.long), tensor
            handled.add(key)
    for key, tensor in tensors.items():
        if ".modules_to_save." in key or ".original_module." in key:
            continue  # PEFT's bias="all" copies: the trained copy's bias is also under its plain key
        if key not in handled:
            # lora_only biases and PEFT's saved embedding weight live under base_layer
            edits.setdefault(key.replace(".base_layer.", "."), Edit()).replacement = tensor
    return edits


@dataclass
class Shard:
    name: str
    keys: list[str]


def _shards(base: Path) -> tuple[list[Shard], dict | None]:
    index_path = base / INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        names: dict[str, list[str]] = {}
        for key, name in index["weight_map"].items():
            names.setdefault(name, []).append(key)
        return [Shard(n, sorted(k)) for n, k in sorted(names.items())], index
    if (base / SINGLE_NAME).is_file():
        with safe_open(str(base / SINGLE_NAME), "pt") as handle:
            return [Shard(SINGLE_NAME, sorted(handle.keys()))], None
    found = preview(p.name for p in base.iterdir()) if base.is_dir() else "no such folder"
    raise ConfigError(
        f"{base} holds no {SINGLE_NAME} or {INDEX_NAME} (found: {found}). The streaming merge reads "
        "safetensors checkpoints only; convert .bin checkpoints with save_pretrained first."
    )


def _match_keys(edits: dict[str, Edit], all_keys: set[str]) -> dict[str, Edit]:
    """Map adapter paths onto checkpoint keys, allowing for a base-model prefix on either side."""
    matched, missing = {}, []
    for key, edit in edits.items():
        candidates = [key, key.split(".", 1)[-1]] + [f"{p}.{key}" for p in {k.split(".", 1)[0] for k in all_keys}]
        hit = next((c for c in candidates if c in all_keys), None)
        if hit is None:
            missing.append(key)
        else:
            matched[hit] = edit
    if missing:
        raise MergeError(
            f"The adapter changes tensors the checkpoint does not hold: {preview(missing)}. If this is a tied "
            "lm_head/embedding (stored once), the file merge cannot untie it: use lora_inject.merge_and_unload "
            "on the loaded model, which unties deliberately. Otherwise the adapter is for another model."
        )
    return matched


def _check_shapes(base: Path, shards: list[Shard], matched: dict[str, Edit]) -> None:
    """Every edit against its stored tensor's shape, before anything is written.

    Linear-like weights whose shape cannot tell (square) follow the layout the other weights
    showed (all GPT-2 projections are Conv1D); else the checkpoint's architecture decides (transformers'
    ``Conv1D`` stores its weight transposed, ``nn.Linear`` does not: PEFT ignores ``fan_in_fan_out`` on a Linear
    too); only without a ``config.json`` does the adapter config's ``fan_in_fan_out`` decide.
    """
    square, decided = [], set()
    for shard in shards:
        keys = [k for k in shard.keys if k in matched]
        if not keys:
            continue
        with safe_open(str(base / shard.name), "pt") as handle:
            for key in keys:
                shape = tuple(handle.get_slice(key).get_shape())
                edit = matched[key]
                if edit.kind is not None:
                    kind_before = edit.kind
                    if edit.fit(key, shape):
                        decided.add(edit.kind)
                    elif kind_before in ("linear", "transposed") and not edit.is_embedding:
                        square.append((key, edit))
                elif edit.row_ids is not None:
                    _check_rows(key, edit, shape)
                elif edit.addend is not None:
                    if tuple(edit.addend.shape) != shape:
                        raise MergeError(f"{key}: B's bias is {tuple(edit.addend.shape)}, the checkpoint {shape}.")
                elif tuple(edit.replacement.shape) != shape:
                    raise MergeError(
                        f"{key}: the adapter replaces it with shape {tuple(edit.replacement.shape)}, "
                        f"the checkpoint stores {shape}."
                    )
    if not square:
        return
    if len(decided) == 1:
        for _, edit in square:
            edit.kind = next(iter(decided))
    elif (base / "config.json").is_file():
        try:
            modules = dict(model_on_meta(str(base)).named_modules())
        except Exception:  # custom code, a config transformers cannot read: the adapter's fan_in_fan_out decides
            return
        for key, edit in square:
            path = key.rpartition(".")[0]
            module = modules.get(path) or next((m for p, m in modules.items() if p.endswith("." + path)), None)
            if module is not None:  # (checkpoints saved without the base model's prefix match by suffix)
                edit.kind = "transposed" if is_hf_conv1d(module) else "linear"


def _check_rows(key: str, edit: Edit, shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or edit.row_values.shape[1] != shape[1] or int(edit.row_ids.max()) >= shape[0]:
        raise MergeError(
            f"{key}: the checkpoint stores {shape}, but the adapter writes rows of width "
            f"{edit.row_values.shape[1]} up to token id {int(edit.row_ids.max())}. Resize the model's vocabulary "
            "(and save it) first, or the adapter is for another model."
        )
    if edit.replacement is not None and tuple(edit.replacement.shape) != shape:
        raise MergeError(f"{key}: the adapter replaces it with {tuple(edit.replacement.shape)}, the file {shape}.")


def _check_tied(base: Path, matched: dict[str, Edit]) -> None:
    """Refuse to merge into an input embedding that a language-model head shares (stored once)."""
    config_path = base / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    lm = any(("LM" in a or "Generation" in a) for a in config.get("architectures") or ())
    if not (lm and config.get("tie_word_embeddings", True)):
        return
    for key, edit in matched.items():
        if edit.kind is not None and edit.is_embedding:
            raise MergeError(
                f"{key} is tied to the output head (tie_word_embeddings is true), and the checkpoint stores it "
                "once: merging it in the file would change both. Load the model and use "
                "lora_inject.merge_and_unload, which unties them deliberately."
            )


def merged_tensor_rows(tensor_slice, edit: Edit | None, out_dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    """The output tensor in row chunks: base rows cast to the output dtype, plus the delta in float32
    (float64 where the output or the adapter is float64, as ``merge_and_unload`` does)."""
    shape = tuple(tensor_slice.get_shape())
    dtype = _out_dtype(tensor_slice, out_dtype)
    if edit is not None and edit.replacement is not None:
        full_slice = edit.replacement.to(dtype)
    else:
        full_slice = None
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]))
    whole = edit is not None and edit.needs_whole_tensor
    step = rows if whole else max(1, CHUNK_ELEMENTS // per_row)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        if full_slice is not None:
            base = full_slice[i:j]
        else:
            base = (tensor_slice[i:j] if shape else tensor_slice[:]).to(dtype)
        if edit is not None and edit.addend is not None:  # the arithmetic LoraLayer._add_delta uses for lora_bias
            target = base.to(merge_dtype(dtype, edit.addend.dtype))
            target = target.clone() if target is base else target
            base = target.add_(edit.addend.to(target.dtype), alpha=edit.scale).to(dtype)
        if edit is not None and edit.kind is not None:
            chunk = base.to(merge_dtype(dtype, edit.a.dtype, edit.b.dtype))
            if full_slice is not None and chunk is base:  # a view of the replacement: never write into it
                chunk = chunk.clone()
            base = edit.add_to_rows(chunk, i, j).to(dtype)
        if edit is not None and edit.row_ids is not None:
            base = edit.replace_rows(base, i, j)
        yield base


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``out``: the checkpoint ``base`` with ``adapter`` folded in, shard for shard."""
    base, adapter, out = Path(base).resolve(), Path(adapter), Path(out).resolve()
    if out == base or base in out.parents or out in base.parents:
        raise ConfigError(f"OUT ({out}) must not be BASE ({base}), inside it, or contain it: BASE is never written.")
    if out.parent.is_dir():
        put_back_leftovers(out)  # a previous output hidden by a killed merge comes back before OUT is checked
    if out.exists() and not force:
        raise ConfigError(f"{out} exists. Pass --force (force=True) to replace it.")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(OUT_DTYPES)}; got {dtype!r}.")
    model_on_meta.cache_clear()  # built at most once per merge, never kept from another one
    found = read_adapter(adapter, values=False)  # values are read once every shape fits the checkpoint
    config, tensors = found.config, found.tensors
    fan_in_fan_out = found.notes.get("fan_in_fan_out", False)
    shards, index = _shards(base)
    with pattern_budget():
        matched = _matched_edits(base, found.notes.get("peft_version"), shards, config, tensors, fan_in_fan_out)
    _check_tied(base, matched)
    _check_shapes(base, shards, matched)
    checked_values(tensors, found.source)
    out_dtype = OUT_DTYPES.get(dtype) if dtype else None

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # the output is a checkpoint for others to read, not mkdtemp's 0700
    try:
        sizes = _write_shards(base, shards, matched, out_dtype, staging, progress)
        _copy_side_files(base, staging, dtype)
        if index is not None:
            index = dict(index, metadata=dict(index.get("metadata", {}), total_size=sum(sizes.values())))
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if verify:
            from .verify import verify_merge

            verify_merge(base, staging, matched, out_dtype)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _matched_edits(base: Path, peft_version: str | None, shards: list[Shard], config: LoraConfig, tensors: dict,
                   fan_in_fan_out: bool) -> dict[str, Edit]:
    """``{checkpoint key: Edit}``: module edits (:func:`plan_edits`) and parameter edits (``target_parameters``),
    in the model's names, moved onto the checkpoint's names where it was saved under transformers 4 names."""
    all_keys = {k for s in shards for k in s.keys}
    if not config.target_parameters:
        edits = plan_edits(config, tensors, fan_in_fan_out)
        if not _unmatched(edits, all_keys) or not (base / "config.json").is_file():
            return _match_keys(edits, all_keys)
    from ..formats.expert_layout import is_legacy_layout
    shapes = {}
    for shard in shards:
        with safe_open(str(base / shard.name), "pt") as handle:
            shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in shard.keys})
    model_shapes = dict(shapes)
    if config.target_parameters and (base / "config.json").is_file():
        model_shapes.update({k: tuple(p.shape) for k, p in model_on_meta(str(base)).named_parameters()})
    legacy = is_legacy_layout(peft_version)
    edits, consumed = parameter_edits(base, config, tensors, model_shapes, Edit, legacy)
    edits = {**plan_edits(config, {k: v for k, v in tensors.items() if k not in consumed}, fan_in_fan_out), **edits}
    if _unmatched(edits, all_keys) and (base / "config.json").is_file():
        edits = onto_saved_names(base, edits, shapes, Edit)
    return _match_keys(edits, all_keys)


def _unmatched(edits: dict, all_keys: set[str]) -> bool:
    try:
        _match_keys(edits, all_keys)
    except MergeError:
        return True
    return False


def _write_shards(base, shards, matched, out_dtype, staging, progress) -> dict[str, int]:
    from tqdm.auto import tqdm

    total = sum((base / s.name).stat().st_size for s in shards)
    sizes = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
        for shard in shards:
            with ShardReader(base / shard.name) as handle:  # pread, not mmap: RSS holds only rows in flight
                metadata = handle.metadata() or {"format": "pt"}
                slices = {k: handle.get_slice(k) for k in shard.keys}
                specs = []
                for key in sorted(shard.keys, key=lambda k: (-_out_dtype(slices[k], out_dtype).itemsize, k)):
                    specs.append((key, _out_dtype(slices[key], out_dtype), tuple(slices[key].get_shape())))
                with open(staging / shard.name, "wb") as file:
                    writer = StreamWriter(file, specs, metadata)
                    for key, _, _ in specs:
                        for chunk in merged_tensor_rows(slices[key], matched.get(key), out_dtype):
                            bar.update(writer.write(chunk))
                    writer.close()
                    file.flush()
                    os.fsync(file.fileno())
                sizes[shard.name] = writer.total_bytes
    return sizes


def _out_dtype(tensor_slice, out_dtype: torch.dtype | None) -> torch.dtype:
    dtype = DTYPES[tensor_slice.get_dtype()]
    return out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype


def _copy_side_files(base: Path, staging: Path, dtype: str | None) -> None:
    """Config, tokenizer and generation files come along; weights were rewritten above."""
    for entry in base.iterdir():
        if entry.suffix in (".safetensors", ".bin", ".pt", ".pth") or entry.name == INDEX_NAME or entry.is_dir():
            continue
        shutil.copy2(entry, staging / entry.name)
    config_path = staging / "config.json"
    if dtype and config_path.is_file():
        config = json.loads(config_path.read_text())
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _swap_into_place(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; a previous ``out`` is moved aside first and put back if the swap fails."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

