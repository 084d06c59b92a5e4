"""Models leave the system: Hugging Face export (``nulls export``) and the import of the authors'
litgpt checkpoints. Works on checkpoint files alone: no training code, no training data."""
