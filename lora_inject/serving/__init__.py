"""Serving many adapters: per-row adapters in one batch, weighted combinations, hot swap."""
