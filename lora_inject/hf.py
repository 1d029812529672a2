"""``lora_inject.hf``: the documented name of :mod:`lora_inject.integrations.hf` (the same module)."""

import sys

from .integrations import hf as _module

sys.modules[__name__] = _module
