"""Guards on the shape of the code: no import circles, imports flow one way, pure modules stay Flower-free.

The layers, bottom up: `datasets` and the pure modules of `strategies` (numpy, torch, pandas) know
nothing of Flower or of each other; the strategy shell (`strategies.base`, `strategies.hooks`) adds
Flower's legacy Strategy API; `flower_app` is the app and may use everything below it; `deploy`,
`benchmarks` and `tests` sit on top. Every import counts, also those inside functions (they were
used to dodge circles), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flower_app", "strategies", "datasets", "deploy", "benchmarks")
SHELL = {"strategies.base", "strategies.hooks", "strategies.wire"}  # the Flower shell around the pure rules
# Flower imports a pure module may make, with the reason: the RDP accountant is Flower's (dp-accounting).
ALLOWED_FLWR = {("strategies.privacy", "flwr.serverapp")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports at run time."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            # `from pkg import submodule` imports the submodule; `from module import name`, the module.
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if _is_module(f"{target}.{alias.name}") else target)
    return found


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


MODULES = _project_modules()


def _graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (a package import counts as its __init__)."""
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_guards_see_the_real_code() -> None:
    graph = _graph()
    assert "flower_app.client_app" in graph and "strategies.base" in graph and "datasets.core" in graph
    assert "strategies" in graph["strategies.base"] or any(m.startswith("strategies.") for m in graph["strategies.base"])
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector works


def test_no_import_circle() -> None:
    assert _cycles(_graph()) == []


@pytest.mark.parametrize(
    ("lower", "upper"),
    [("strategies", "flower_app"), ("datasets", "flower_app"), ("strategies", "datasets"), ("datasets", "strategies"),
     ("flower_app", "deploy"), ("flower_app", "benchmarks"), ("strategies", "deploy"), ("datasets", "deploy")],
)
def test_imports_flow_one_way(lower: str, upper: str) -> None:
    """Modules of ``lower`` never import modules of ``upper``."""
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if name.split(".")[0] == lower
        for target in targets
        if target.split(".")[0] == upper
    )
    assert wrong == []


def test_nothing_but_tests_imports_tests() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in MODULES.items()
        for target in _imports(path)
        if target == "tests" or target.startswith("tests.")
    )
    assert wrong == []


def _flwr_imports(name: str) -> set[str]:
    return {m for m in _imports(MODULES[name]) if m == "flwr" or m.startswith("flwr.")}


def test_pure_modules_do_not_import_flower() -> None:
    pure = [n for n in MODULES if n.startswith(("datasets", "strategies")) and n not in SHELL] + ["flower_app.task"]
    wrong = sorted(
        f"{name} imports {target}"
        for name in pure
        for target in _flwr_imports(name)
        if not any(name == allowed and target.startswith(prefix) for allowed, prefix in ALLOWED_FLWR)
    )
    assert wrong == []
