"""The shape of the datasets package: no private name crosses a module, no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "datasets"


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module imported from inside the package, name) for every ``from .x import y`` of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("datasets")):
            module = (node.module or "").removeprefix("datasets.").removeprefix("datasets")
            for alias in node.names:
                if module:
                    found.append((module, alias.name))
                else:  # from . import text
                    found.append((alias.name, "*"))
    return found


def test_no_private_name_crosses_a_module() -> None:
    crossing = [
        f"{path.name} imports {name} from {module}"
        for path in PACKAGE.glob("*.py")
        for module, name in _imports(path)
        if name.startswith("_") and name != "*"
    ]
    assert not crossing, crossing


def test_no_two_modules_import_each_other() -> None:
    graph = {path.stem: {module.split(".")[0] for module, _ in _imports(path)} for path in PACKAGE.glob("*.py")}
    assert "core" in graph and "registry" in graph  # the guard looks at the real package
    cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, set())})
    assert not cycles, cycles
    # The core module is the bottom layer: it imports nothing of the package.
    assert graph["core"] == set(), graph["core"]
