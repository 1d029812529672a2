"""The streaming merge of an adapter into a checkpoint on disk, its verification, and building a model on meta."""
