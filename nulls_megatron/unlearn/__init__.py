"""Unlearning on checkpoint files alone: resolve a deletion request, show its collateral, zero the
sources' sink rows in a new checkpoint version, write a receipt, verify. Imports no training code,
no Megatron and no torch.distributed (docs/unlearning.md)."""
