"""Imports point one way (ARCHITECTURE.md): every rule below is checked on the source files' import
statements, absolute and relative, at module level and inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("nulls_megatron", "data_prep", "launch", "kernels", "yaml_config")

# (the files, the imported modules they must not use, why)
RULES = [
    ("kernels", tuple(pkg for pkg in OURS if pkg != "kernels"), "kernels/ is a leaf (its modules use each other only)"),
    ("yaml_config", OURS, "the config loader is a leaf both data_prep and nulls_megatron use"),
    ("data_prep", ("nulls_megatron", "launch", "kernels"), "data preparation knows nothing of training"),
    ("nulls_megatron/sinks", ("megatron", "launch", "data_prep", "nulls_megatron.model", "nulls_megatron.train",
                              "nulls_megatron.checkpoint"),
     "the sink core is pure torch: no Megatron, no training loop"),
    ("nulls_megatron/model", ("launch", "data_prep", "nulls_megatron.train", "nulls_megatron.checkpoint",
                              "nulls_megatron.unlearn", "nulls_megatron.export", "nulls_megatron.eval"),
     "the model definition is apart from how it is launched, trained and stored"),
    ("nulls_megatron/unlearn", ("nulls_megatron.train",), "unlearning needs no training code"),
    ("nulls_megatron/export", ("nulls_megatron.train",), "export needs no training code"),
]


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every module ``path`` imports, relative imports resolved against its package, with line numbers."""
    package = list(path.relative_to(root).parts[:-1])  # a module's and an __init__'s package alike
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                module, names = node.module or "", []
            found += [(module, node.lineno)] + [(name, node.lineno) for name in names]
    return sorted(found, key=lambda item: item[1])


def violations(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        for module, line in imported_modules(path, root):
            if any(module == bad or module.startswith(bad + ".") for bad in forbidden):
                out.append(f"{path.relative_to(root)}:{line}: imports {module}")
    return out


@pytest.mark.parametrize("folder,forbidden,why", RULES, ids=[rule[0] for rule in RULES])
def test_imports_point_one_way(folder, forbidden, why):
    assert (ROOT / folder).is_dir(), folder
    found = violations(folder, forbidden)
    assert not found, f"{why}:\n" + "\n".join(found)


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path):
    pkg = tmp_path / "nulls_megatron" / "model"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from ..train import loop\n"
                              "def f():\n    from launch.env import find_free_port\n"
                              "from .. import checkpoint\n")
    found = violations("nulls_megatron/model", ("launch", "nulls_megatron.train", "nulls_megatron.checkpoint"),
                       root=tmp_path)
    assert found == ["nulls_megatron/model/a.py:1: imports nulls_megatron.train",
                     "nulls_megatron/model/a.py:3: imports launch.env",
                     "nulls_megatron/model/a.py:4: imports nulls_megatron.checkpoint"]
