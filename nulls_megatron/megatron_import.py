"""megatron-core imported without TorchDynamo and Inductor on the CPU (``compat.deferred_torch_compile``).

``import nulls_megatron`` installs a finder that acts once, on the first import of ``megatron.core`` in
the process, whichever module asks for it (ours, a test's, a spawned rank's): the package's module
runs inside ``deferred_torch_compile()`` when CUDA is absent, as it is, otherwise. The finder imports
nothing but the standard library until then, so commands that never touch Megatron (``nulls prep``,
``nulls unlearn``) start as fast as before; a process that imported megatron-core before us is left
as it is.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_TARGET = "megatron.core"


class _DeferCompileLoader(importlib.abc.Loader):
    """The package's own loader, its module executed with ``torch.compile`` deferred on the CPU."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Restored before the module runs: importlib.resources and reloads see the real loader.
        module.__loader__ = module.__spec__.loader = self._loader
        import torch

        if torch.cuda.is_available():
            self._loader.exec_module(module)
            return
        from .compat import deferred_torch_compile

        with deferred_torch_compile():
            self._loader.exec_module(module)


class _MegatronCoreFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[override]
        if name != _TARGET:
            return None
        uninstall()  # once: the lookup below and every later import take the usual way
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferCompileLoader(spec.loader)
        return spec


_FINDER = _MegatronCoreFinder()


def install() -> None:
    """Idempotent; a no-op when megatron-core is already imported."""
    if _TARGET not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
