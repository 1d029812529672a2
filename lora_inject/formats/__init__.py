"""Adapter files: one module per format, each a reader (file -> config + tensors in the library's names) and a
writer (the reverse), registered by name; checking, the transactional copy into a model and the atomic write are
shared by every format."""
