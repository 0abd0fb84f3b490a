#!/usr/bin/env python3
"""Print the app's dependencies from pyproject.toml as pip requirement lines (for the Dockerfile).

The Docker image installs PyTorch from its own index (CPU-only by default) and everything else from
PyPI, so the dependency list is split by distribution name; the versions stay written once, in
pyproject.toml. Flower itself comes with the base image (``flwr/superexec``): ``--provided flwr``
checks that the installed Flower is the one pyproject.toml pins and prints, instead of the flwr
line, the requirements of the extras pyproject asks for (``flwr[simulation,dp]`` -> ray,
dp-accounting, at the versions the installed Flower declares) plus ``flwr==<installed>``, so pip
can never replace the base image's Flower.

    python deploy/requirements.py --only torch torchvision      # torch>=2.4,<2.15 ...
    python deploy/requirements.py --provided flwr --exclude torch torchvision
    python deploy/requirements.py --extra "llm" --provided flwr --exclude torch torchvision
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def provided(requirement: str) -> list[str]:
    """For a distribution the environment already has: check its version against ``requirement`` and
    return ``name==<installed>`` plus the requirements of the extras ``requirement`` names, read from
    the installed distribution's metadata (markers evaluated for this interpreter)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement  # a dependency of flwr, so in every image

    req = Requirement(requirement)
    try:
        installed = md.version(req.name)
    except md.PackageNotFoundError:
        raise SystemExit(f"{req.name} is not installed, but --provided says the base image has it") from None
    if not req.specifier.contains(installed, prereleases=True):
        raise SystemExit(f"{req.name} {installed} is installed; pyproject.toml asks for {req.name}{req.specifier}")
    lines = [f"{req.name}=={installed}"]
    for line in md.requires(req.name) or []:
        dep = Requirement(line)
        if dep.marker is None or dep.marker.evaluate({"extra": ""}):
            continue  # a core dependency: installed with the distribution
        if any(dep.marker.evaluate({"extra": extra}) for extra in req.extras):
            extras = f"[{','.join(sorted(dep.extras))}]" if dep.extras else ""
            lines.append(f"{dep.name}{extras}{dep.specifier}")
    return lines


def lines_for(
    pyproject: dict[str, Any], extras: Sequence[str], only: Sequence[str] | None, exclude: Sequence[str],
    provided_names: Sequence[str],
) -> list[str]:
    """The requirement lines to install: pyproject's, with every `provided_names` line expanded by `provided`."""
    chosen = select(requirements(pyproject, extras), only, exclude)
    names = {distribution(n) for n in provided_names}
    missing = names - {distribution(r) for r in chosen}
    if missing:
        raise SystemExit(f"--provided {', '.join(sorted(missing))}: not among the selected dependencies")
    out: list[str] = []
    for req in chosen:
        out += provided(req) if distribution(req) in names else [req]
    return list(dict.fromkeys(out))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument(
        "--extra", action="append", default=[],
        help="also list these optional-dependency groups (comma or space separated; repeat; '' = none)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="list only these distributions")
    parser.add_argument("--exclude", nargs="+", default=[], help="leave these distributions out")
    parser.add_argument("--provided", nargs="+", default=[],
                        help="installed already (the base image's Flower): check the version, list only its extras")
    args = parser.parse_args(argv)
    if not args.pyproject.is_file():
        parser.error(f"--pyproject {args.pyproject}: no such file")
    with args.pyproject.open("rb") as f:
        pyproject = tomllib.load(f)
    extras = [e for value in args.extra for e in re.split(r"[\s,]+", value) if e]
    sys.stdout.write("".join(f"{r}\n" for r in lines_for(pyproject, extras, args.only, args.exclude, args.provided)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
