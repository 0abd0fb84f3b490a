#!/usr/bin/env python3
"""Print the app's dependencies from pyproject.toml as pip requirement lines (for the Dockerfile).

The Docker image installs PyTorch from its CPU-only index and everything else from PyPI, so the
dependency list is split by distribution name; the versions stay written once, in pyproject.toml.

    python deploy/requirements.py --only torch torchvision      # torch>=2.4,<2.15 ...
    python deploy/requirements.py --exclude flwr torch torchvision
    python deploy/requirements.py --extra "llm" --exclude flwr torch torchvision
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement (PEP 503): 'Flwr[simulation]==1' -> 'flwr'."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict[str, Any], extras: Sequence[str] = ()) -> list[str]:
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; choose one of: {', '.join(sorted(optional))}")
        reqs += optional[extra]
    return reqs


def select(reqs: Sequence[str], only: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
    keep_only = {distribution(n) for n in only} if only is not None else None
    drop = {distribution(n) for n in exclude}
    chosen = [r for r in reqs if (keep_only is None or distribution(r) in keep_only) and distribution(r) not in drop]
    if keep_only is not None:
        missing = keep_only - {distribution(r) for r in chosen}
        if missing:
            raise SystemExit(f"not in the dependencies: {', '.join(sorted(missing))}")
    return list(dict.fromkeys(chosen))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument(
        "--extra", action="append", default=[],
        help="also list these optional-dependency groups (comma or space separated; repeat; '' = none)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="list only these distributions")
    parser.add_argument("--exclude", nargs="+", default=[], help="leave these distributions out")
    args = parser.parse_args(argv)
    if not args.pyproject.is_file():
        parser.error(f"--pyproject {args.pyproject}: no such file")
    with args.pyproject.open("rb") as f:
        reqs = requirements(tomllib.load(f), [e for value in args.extra for e in re.split(r"[\s,]+", value) if e])
    sys.stdout.write("".join(f"{r}\n" for r in select(reqs, args.only, args.exclude)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
