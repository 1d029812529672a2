"""The edges: transformers (loading, the model's own methods, Trainer), TRL, diffusers pipelines, torch.distributed.

Each module imports its library at module level, so nothing here is imported by ``import lora_inject``
except ``transformers_methods`` (which imports no transformers) through the hooks it registers.
"""
