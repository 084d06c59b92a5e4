"""Nearest-source routing: which source's sinks a prompt should use when its true source is unknown
or forgotten (METHOD.md section 2). Reads checkpoint files only; imports no training code and no Megatron."""
