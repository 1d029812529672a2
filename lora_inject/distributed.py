"""``lora_inject.distributed``: the documented name of :mod:`lora_inject.integrations.distributed` (the same module)."""

import sys

from .integrations import distributed as _module

sys.modules[__name__] = _module
