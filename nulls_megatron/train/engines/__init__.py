"""Data-parallel engines: Megatron DDP + optimizer, or DeepSpeed ZeRO 1/2 (see base.py)."""
