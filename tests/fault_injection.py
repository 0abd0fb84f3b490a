"""A ClientApp for the deployment fault tests: the app's own client, with malformed updates on request.

A SuperNode started with `--node-config "... fault=nan"` (or `fault=shape`) sends a malformed
update from every fit, so the tests can check that the server rejects it and the global model is
unharmed; nodes without `fault` run the app's client unchanged. The app lives here, not in
`flower_app`: `fault_app_dir` writes a copy of the project whose pyproject names this module's
`app` as the ClientApp, and the tests `flwr run` that copy against real SuperNodes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, Scalar

from flower_app.client_app import ArrayClient, FlowerClient, build_client
from flower_app.client_privacy import client_mods

NDArrays = list[np.ndarray]
FAULTS = ("nan", "shape")
ROOT = Path(__file__).resolve().parents[1]


def corrupt_update(kind: str, arrays: NDArrays) -> NDArrays:
    """A malformed copy of a fit reply: a NaN in its first float array, or its first array one element short."""
    bad = [np.array(a, copy=True) for a in arrays]
    if kind == "nan":
        target = next(i for i, a in enumerate(bad) if np.issubdtype(a.dtype, np.floating))
        bad[target].reshape(-1)[0] = np.nan
    elif kind == "shape":
        bad[0] = bad[0].reshape(-1)[:-1]
    else:
        raise ValueError(f"node-config fault: unknown value {kind!r}; choose one of: {', '.join(FAULTS)}")
    return bad


class FaultInjectingClient(NumPyClient):
    """The app's `FlowerClient`, whose fit replies are corrupted by `corrupt_update`."""

    def __init__(self, inner: FlowerClient, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"node-config fault: unknown value {fault!r}; choose one of: {', '.join(FAULTS)}")
        self.inner = inner
        self.fault = fault

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self.inner.get_parameters(config)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        arrays, num_examples, metrics = self.inner.fit(parameters, config)
        return corrupt_update(self.fault, arrays), num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return self.inner.evaluate(parameters, config)


def client_fn(context: Context) -> Client:
    client = build_client(context)
    fault = str(context.node_config.get("fault", ""))
    # ArrayClient, as the app's own ClientApp: it reads the server's packed arrays (pack-arrays), which
    # Flower's NumPyClient.to_client() would not
    return ArrayClient(FaultInjectingClient(client, fault) if fault else client)


app = ClientApp(client_fn=client_fn, mods=client_mods())


def fault_app_dir(dest: Path) -> Path:
    """A copy of the project (what `flwr run` ships) whose ClientApp is this module's `app`."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("flower_app", "strategies", "datasets"):
        shutil.copytree(ROOT / package, dest / package, ignore=ignore, dirs_exist_ok=True)
    (dest / "tests").mkdir(exist_ok=True)
    for name in ("__init__.py", "fault_injection.py"):
        shutil.copy2(ROOT / "tests" / name, dest / "tests" / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject, count = re.subn(r'(?m)^clientapp = ".*"$', 'clientapp = "tests.fault_injection:app"', pyproject)
    if count != 1:
        raise AssertionError("pyproject.toml: no [tool.flwr.app.components] clientapp line to replace")
    # The FAB ships only what fab-include lists: add this module (and its package) to it.
    pyproject, count = re.subn(
        r'(?m)^(fab-include = \[)(.*)\]$', r'\1\2, "tests/__init__.py", "tests/fault_injection.py"]', pyproject
    )
    if count != 1:
        raise AssertionError("pyproject.toml: no [tool.flwr.app] fab-include line to extend")
    (dest / "pyproject.toml").write_text(pyproject)
    return dest
