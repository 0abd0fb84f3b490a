#!/usr/bin/env python3
"""Check an environment built for the executor image: every dependency a run config can ask for imports.

Run by the Dockerfile as the build's last step (a failed import fails the build) and by
tests/test_image_env.py in a virtual environment built from the same requirement lines. It imports

- every distribution the image promises (pyproject.toml's dependencies with the chosen extras, and
  the extras of the base image's Flower, e.g. ray for simulation and dp-accounting for DP), by its
  top-level module, and
- the modules the app's features reach for at run time (``FEATURES``),

checks that Flower is the pinned version, that ``pip check`` found nothing (the Dockerfile runs it
before), and that PyTorch is the build asked for: ``--torch cpu`` (no CUDA, no nvidia-* wheels),
``--torch cu130`` (built for CUDA 13.0), or ``any``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from requirements import distribution, lines_for  # next to this file, in the image and in the repo

# Feature -> modules its code imports at run time (beyond each distribution's top-level module).
FEATURES: dict[str, tuple[str, ...]] = {
    "core": ("torch.nn", "torch.optim", "numpy", "flwr.serverapp", "flwr.clientapp", "flwr.server.strategy",
             "flwr.client.mod"),
    "datasets": ("sklearn.datasets", "torchvision.datasets", "torchvision.transforms", "pandas"),
    "plots": ("matplotlib.pyplot",),
    "simulation": ("ray", "flwr.simulation"),
    "dp": ("dp_accounting", "dp_accounting.rdp"),
    "secure-aggregation": ("flwr.server.workflow", "flwr.client.mod.secure_aggregation"),
}
EXTRA_FEATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "llm": {"llm": ("transformers", "peft", "safetensors.torch", "transformers.models.bert.modeling_bert")},
}


def top_level_modules(dist: str) -> list[str]:
    """The module to import for a distribution: the one named like it, else all its top-level ones."""
    tops = sorted(m for m, ds in md.packages_distributions().items()
                  if any(distribution(d) == dist for d in ds) and not m.startswith("_"))
    same = [m for m in tops if distribution(m) == dist]
    return same or tops


def check_torch(variant: str) -> str:
    import torch

    cuda = torch.version.cuda
    nvidia = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
    if variant == "cpu" and (cuda is not None or nvidia):
        raise SystemExit(f"--torch cpu, but torch {torch.__version__} is built for CUDA {cuda}; nvidia wheels: {nvidia}")
    if match := re.fullmatch(r"cu(\d+)(\d)", variant):
        expected = f"{match.group(1)}.{match.group(2)}"
        if cuda != expected:
            raise SystemExit(f"--torch {variant}: torch {torch.__version__} is built for CUDA {cuda}, not {expected}")
    elif variant not in ("cpu", "any"):
        raise SystemExit(f"--torch {variant!r}: give cpu, cu<version> (e.g. cu130) or any")
    return f"torch {torch.__version__} (CUDA {cuda})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--extra", action="append", default=[], help="the image's extras (as for requirements.py)")
    parser.add_argument("--provided", nargs="+", default=["flwr"], help="what the base image provides (default flwr)")
    parser.add_argument("--torch", default="cpu", help="cpu, cu<version> (e.g. cu130) or any")
    args = parser.parse_args(argv)
    with args.pyproject.open("rb") as f:
        pyproject = tomllib.load(f)
    extras = [e for value in args.extra for e in re.split(r"[\s,]+", value) if e]
    lines = lines_for(pyproject, extras, None, [], args.provided)
    features = dict(FEATURES)
    for extra in extras:
        features.update(EXTRA_FEATURES.get(extra, {}))

    failures: list[str] = []
    report: list[str] = []

    def try_import(module: str, why: str) -> None:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - every failure is reported, the build then fails
            failures.append(f"{module} ({why}): {type(err).__name__}: {err}")

    for line in lines:
        dist = distribution(line)
        modules = top_level_modules(dist)
        if not modules:
            failures.append(f"{line}: no installed distribution {dist}")
        for module in modules:
            try_import(module, line)
        report.append(f"{line:40s} {', '.join(modules)}")
    for feature, feature_modules in features.items():
        for module in feature_modules:
            try_import(module, f"feature {feature}")
        report.append(f"{'feature ' + feature:40s} {', '.join(feature_modules)}")
    pin = next(line for line in lines if line.startswith("flwr=="))
    import flwr

    if f"flwr=={flwr.__version__}" != pin:
        failures.append(f"flwr {flwr.__version__} is installed, {pin} is required")
    report.append(check_torch(args.torch))
    sys.stdout.write("\n".join(report) + "\n")
    if failures:
        sys.stderr.write("image check failed:\n" + "\n".join(f"  {f}" for f in failures) + "\n")
        return 1
    sys.stdout.write(f"image check passed: {len(lines)} requirements, {len(features)} features\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
