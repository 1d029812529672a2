"""Adapter files: one module per format, each a reader (file -> config + tensors in the library's names) and a
writer (the reverse), registered by name in ``registry``; checking and the transactional copy into a model
(``load``) and the atomic write (``folder``) are shared by every format.

Formats: ``peft`` (PEFT's adapter folder; ``peft_config`` translates its fields), ``kohya`` (diffusion LoRA
files, placed on the model's modules by ``diffusion_names``), ``gguf`` (llama.cpp's LoRA
file, written only; ``gguf_file`` is the binary writer). Dialects, converted after
reading: ``transformers4`` (names saved under transformers 4, by transformers' own rules in
``conversion_rules``), ``expert_layout`` (PEFT <= 0.19.0's expert factors). ``hub`` fetches hub ids.
Importing this package registers them all.
"""

from . import diffusion, expert_layout, gguf, peft, transformers4  # noqa: F401 (each registers itself)
