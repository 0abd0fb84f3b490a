"""Packaging: the Python floor is Flower's, and the FAB that `flwr run` ships holds code and config only.

`flwr run` packs the app folder into a FAB and sends it to the SuperLink and every SuperNode. Files of
the types Flower accepts (.py, .toml, .md, .yaml, .yml, .json, .jsonl) travel unless
`[tool.flwr.app] fab-include` narrows them: data a data owner left in the folder, outputs, benchmark
results or notebooks must not. The FAB here is built by the real `flwr build` from a copy of this
project with such folders planted in it.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from deploy.local import ROOT, flwr_env

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
APP_PACKAGES = ("flower_app", "strategies", "datasets")  # the components' packages and what they import

# What an owner, an operator or a developer may leave in the app folder; none of it may travel.
PLANTED = {
    "data/node-1/train.csv": "x,label\n1,0\n",
    "data/node-1/records.jsonl": '{"text": "private sentence", "label": 1}\n',
    "data/server/meta.json": '{"rows": 10}\n',
    "data/deep/a/b/c/d/e/notes.md": "owner notes\n",
    "outputs/metrics.json": "{}\n",
    "outputs/run/config.yaml": "a: 1\n",
    "results/summary.json": "{}\n",
    "benchmarks/results/extra.json": "{}\n",
    "certs/ca.key": "-----BEGIN PRIVATE KEY-----\n",
    "certs/auth/supernode-1": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "secrets/superexec.secret": "00" * 32,
    "state/state.db": "SQLite format 3\x00",
    "notebooks/explore.ipynb": "{}\n",
    "notebooks/helpers.py": "print('notebook helper')\n",
    "scratch.py": "print('a local script')\n",
    "flower_app/cache.json": "{}\n",
    "datasets/NOTES.md": "notes\n",
}


def test_requires_python_is_flowers_floor() -> None:
    """The project accepts exactly the Python versions flwr (pinned) accepts, and the linters target its floor."""
    flower = SpecifierSet(md.metadata("flwr")["Requires-Python"])
    ours = SpecifierSet(PYPROJECT["project"]["requires-python"])
    candidates = [Version(f"3.{minor}") for minor in range(6, 20)]
    assert [v for v in candidates if v in ours] == [v for v in candidates if v in flower], (str(ours), str(flower))
    floor = min(v for v in candidates if v in flower)
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{floor.major}{floor.minor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"{floor.major}.{floor.minor}"


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The file list of a FAB that `flwr build` made from this project plus the planted files."""
    work = tmp_path_factory.mktemp("fab")
    app = work / "flower-app"  # flwr build requires a valid project name as the folder's name
    # A copy of the project as it is (its own data/, outputs/, ... left out: the planted ones stand in).
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "__pycache__", ".*_cache", "*.egg-info", "*.fab", "data", "outputs", "results",
        "certs", "secrets", "state", "notebooks"))
    for name, text in PLANTED.items():
        path = app / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    flwr = Path(sys.executable).parent / "flwr"
    proc = subprocess.run([str(flwr if flwr.exists() else "flwr"), "build", "--app", str(app)], cwd=work,
                          env=flwr_env(work / "home"), capture_output=True, text=True, timeout=300, check=False)
    fabs = list(work.glob("*.fab"))
    assert proc.returncode == 0 and len(fabs) == 1, proc.stdout + proc.stderr
    with zipfile.ZipFile(fabs[0]) as archive:
        return archive.namelist()


def test_the_fab_holds_the_apps_code_and_config_only(fab: list[str]) -> None:
    code = {
        path.relative_to(ROOT).as_posix()
        for package in APP_PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts and not path.name.startswith("test_")
    }
    assert code, "no code found"
    assert sorted(fab) == sorted({"pyproject.toml", ".info/CONTENT"} | code)
    assert not set(fab) & set(PLANTED)


def test_the_fab_imports_nothing_of_this_repository_it_does_not_hold(fab: list[str]) -> None:
    """Every import in the shipped code of a top-level name that is a folder or module of this repository
    names one the FAB holds: a new package the app needs must be added to fab-include."""
    shipped_tops = {name.split("/")[0].removesuffix(".py") for name in fab if name.endswith(".py")}
    local_tops = {p.name.removesuffix(".py") for p in ROOT.iterdir() if (p.is_dir() and (p / "__init__.py").exists())
                  or p.suffix == ".py"}
    missing = []
    for name in fab:
        if not name.endswith(".py"):
            continue
        tree = ast.parse((ROOT / name).read_text(), filename=name)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                       else [])
            for module in modules:
                top = module.split(".")[0]
                if top in local_tops and top not in shipped_tops:
                    missing.append(f"{name}:{node.lineno} imports {module}")
    assert not missing, missing
