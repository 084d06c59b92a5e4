# Imported first by every test module, in pytest and in each spawned rank: `import nulls_megatron`
# installs the finder that imports megatron-core ~2 s faster on the CPU (nulls_megatron/megatron_import.py),
# before any test module imports megatron-core itself.
import nulls_megatron  # noqa: F401
