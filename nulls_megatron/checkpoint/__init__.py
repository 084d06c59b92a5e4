"""Split checkpoints: atomic directories, the `latest` pointer, pruning and the sink-table files."""
