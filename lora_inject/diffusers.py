"""``lora_inject.diffusers``: the documented name of :mod:`lora_inject.integrations.diffusers` (the same module)."""

import sys

from .integrations import diffusers as _module

sys.modules[__name__] = _module
