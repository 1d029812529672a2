"""What to adapt: target specs and their matching, the resolved plan (modules, parameters, tokens), presets."""
