"""nulls-megatron: natively unlearnable language models on Megatron-core (README.md, docs/)."""
from .megatron_import import install as _install_megatron_import

_install_megatron_import()  # megatron-core starts ~2 s faster on the CPU (megatron_import.py)
