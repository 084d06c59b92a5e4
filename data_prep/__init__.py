"""Data preparation: read Wikipedia/WikiText/books inputs, clean them and write token shards (knows nothing of training)."""
