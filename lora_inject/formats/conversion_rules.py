"""transformers' own rules for names saved under transformers 4, applied to adapter paths and checkpoint keys.

transformers 5 renamed modules in several families (ViT ``attention.attention.query`` ->
``attention.q_proj``, LLaVA prefixes, GPT-NeoX ``embed_out`` -> ``lm_head``) and fused per-expert
Linear layers into 3-D parameters (``experts.{e}.w1/w3`` -> ``experts.gate_up_proj``). It loads old
checkpoints with the rules in ``transformers/conversion_mapping.py`` (renamings, and converters that
stack experts and concatenate projections) and saves new ones back through them. This module
asks those rules, for one tensor name, where that tensor lands in the transformers-5 model: which
key, which expert, which part of a concatenation. Nothing here is a copy of the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from ..errors import AdapterFileError


@dataclass(frozen=True)
class Landing:
    """Where a transformers-4 tensor lands in the transformers-5 model.

    ``key``: the new key. For a converted tensor also: ``expert`` (its index along the stacked
    dimension, or None), ``part`` of ``parts`` (its place among the concatenated sources, in the
    rule's order) and ``concat_dim`` (the dimension of the stacked tensor they concatenate along).
    """

    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1
    concat_dim: int | None = None

    @property
    def converted(self) -> bool:
        return self.expert is not None or self.parts > 1


class Rules:
    """The conversion rules of one transformers model (its class and every sub-model's)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @cached_property
    def _transforms(self):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(self.model) or []
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        return renamings, converters

    @property
    def empty(self) -> bool:
        renamings, converters = self._transforms
        return not renamings and not converters

    def land(self, key: str) -> Landing | None:
        """Where the tensor saved as ``key`` lands; None where the rules leave it as it is."""
        from transformers.core_model_loading import rename_source_key

        renamings, converters = self._transforms
        new_key, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            return None if new_key == key else Landing(new_key)
        converter = next(c for c in converters if pattern in c.source_patterns)
        return Landing(new_key, _expert_index(key, pattern), converter.source_patterns.index(pattern),
                       len(converter.source_patterns), _concat_dim(converter, key))


def rules_for(model: nn.Module) -> Rules | None:
    """The conversion rules of a transformers 5 model, or None (not a transformers model, or transformers 4)."""
    if not hasattr(getattr(model, "config", None), "model_type"):
        return None
    try:
        import transformers.conversion_mapping  # noqa: F401
    except ImportError:
        return None
    return Rules(model)


def _expert_index(key: str, pattern: str) -> int | None:
    """The number that the pattern's ``*`` stands for in ``key`` (MergeModulelist stacks by it)."""
    if "*" not in pattern:
        return None
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, key)
    return int(found.group(1)) if found else None


def _concat_dim(converter, key: str) -> int | None:
    """Check that the converter only stacks experts and concatenates (what an adapter can follow exactly);
    the Concatenate's dim, or None."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    concat = None
    for op in converter.operations:
        if isinstance(op, MergeModulelist) and op.dim == 0:
            continue
        if isinstance(op, Concatenate) and concat is None:
            concat = op.dim
            continue
        raise AdapterFileError(
            f"{key}: transformers converts this tensor with {type(op).__name__}, which a LoRA adapter cannot be "
            "carried through exactly (only stacking experts and concatenating projections can). Load the adapter "
            "with transformers 4, merge it there, and load the merged model instead."
        )
    return concat
