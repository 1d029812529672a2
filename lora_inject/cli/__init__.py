"""The ``lora-inject`` command (``commands``) and its demo (``demo``)."""

from .commands import main

__all__ = ["main"]
