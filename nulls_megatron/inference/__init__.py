"""Serving a checkpoint: load it in one process (any training layout) and generate in a deployment mode."""
