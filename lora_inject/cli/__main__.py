"""``python -m lora_inject.cli``: the ``lora-inject`` command."""

import sys

from .commands import main

sys.exit(main())
