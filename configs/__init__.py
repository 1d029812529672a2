"""Target presets per model family, installed as ``lora_inject.configs`` (TOML files, one per family)."""
