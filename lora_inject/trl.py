"""``lora_inject.trl``: the documented name of :mod:`lora_inject.integrations.trl` (the same module)."""

import sys

from .integrations import trl as _module

sys.modules[__name__] = _module
