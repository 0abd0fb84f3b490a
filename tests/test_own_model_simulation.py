"""Your own model and a server without data through the real `flwr run`, in simulation.

The two ways a factory's module reaches every process (README "Your own model"):

* installed: a package outside the app, on ``PYTHONPATH`` of the `flwr run` that starts the local
  simulation SuperLink; Flower's Ray backend passes the driver's ``sys.path`` and ``PYTHONPATH`` on to
  its workers (``flwr/server/superlink/fleet/vce/backend/raybackend.py``);
* shipped in the FAB: a package in the app folder, added to ``[tool.flwr.app] fab-include``; Flower puts
  the installed FAB first on ``sys.path`` of the ServerApp and of every ClientApp.

The second run is also a server without data: its metrics and best model come from federated evaluation.
Each test has its own FLWR_HOME and stops what it started; assertions are on the files the run wrote
(Flower ends a run whose clients failed with exit code 0).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from deploy.local import ROOT, flwr_env, flwr_executable, stop_processes_of

pytestmark = pytest.mark.slow

FACTORY = """
import math
from torch import nn

def build(info):
    features = math.prod(info.input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 24), nn.ReLU(), nn.Linear(24, info.num_outputs))

class Factories:
    @staticmethod
    def wide(info):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(info.input_shape), 48), nn.ReLU(),
                             nn.Linear(48, info.num_outputs))
"""
COMMON = ("num-server-rounds=2 local-epochs=1 min-fit-clients=2 min-available-clients=2 min-evaluate-clients=2 "
          "dirichlet-alpha=10.0 min-partition-size=20 learning-rate=0.1")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A FLWR_HOME of this test only: the local SuperLink it starts (with this test's environment) is stopped after."""
    path = tmp_path / "flwr-home"
    path.mkdir()
    yield path
    stop_processes_of(path)


def flwr_run(app: Path, home: Path, run_config: str, pythonpath: str | None = None) -> str:
    env = flwr_env(home)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [flwr_executable(), "run", str(app), "--stream", "--federation-config",
           "num-supernodes=2 client-resources-num-cpus=1", "-c", run_config]
    proc = subprocess.run(cmd, env=env, cwd=app, capture_output=True, text=True, timeout=400, check=False)
    return proc.stdout + proc.stderr


def the_run(out: Path, logs: str) -> Path:
    runs = sorted(out.iterdir()) if out.exists() else []
    assert len(runs) == 1, logs[-6000:]
    return runs[0]


def test_a_factory_installed_outside_the_app_reaches_the_server_and_every_ray_worker(home: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "outside_models").mkdir(parents=True)
    (site / "outside_models" / "__init__.py").write_text("")
    (site / "outside_models" / "nets.py").write_text(FACTORY)
    out = tmp_path / "out"
    logs = flwr_run(ROOT, home, f"{COMMON} output-dir='{out}' model='outside_models.nets:Factories.wide'",
                    pythonpath=str(site))
    run = the_run(out, logs)
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2], logs[-4000:]
    assert (metrics["results"].iloc[1:] == 2).all() and (metrics["failures"].iloc[1:] == 0).all(), logs[-4000:]
    assert metrics["central_loss"].iloc[-1] < metrics["central_loss"].iloc[0]
    model = torch.load(run / "model.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in model.items()} == {
        "1.weight": (48, 64), "1.bias": (48,), "3.weight": (10, 48), "3.bias": (10,)}
    assert json.loads((run / "best_model.json").read_text())["metric"] == "central_loss"


def test_a_factory_shipped_in_the_fab_trains_with_a_server_without_data(home: Path, tmp_path: Path) -> None:
    app = tmp_path / "flower-app"  # flwr requires a valid project name as the folder's name
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".*_cache", "*.egg-info", "outputs", "tests", "benchmarks", "deploy"))
    (app / "fab_models").mkdir()
    (app / "fab_models" / "__init__.py").write_text("")
    (app / "fab_models" / "nets.py").write_text(FACTORY)
    pyproject = (app / "pyproject.toml").read_text()
    include = 'fab-include = ["flower_app/**/*.py", "strategies/**/*.py", "datasets/**/*.py"'
    assert include in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace(include, include + ', "fab_models/**/*.py"'))
    out = tmp_path / "out"
    logs = flwr_run(app, home, f"{COMMON} output-dir='{out}' model='fab_models.nets:build' server-data='none' "
                               "input-shape='1,8,8' num-outputs=10")
    assert "fab_models" not in os.environ.get("PYTHONPATH", "")
    run = the_run(out, logs)
    assert "server-data 'none': the server loads no data" in logs, logs[-4000:]
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["round"]) == [1, 2], logs[-4000:]
    assert (metrics["results"] == 2).all() and (metrics["failures"] == 0).all(), logs[-4000:]
    assert metrics["central_loss"].isna().all() and metrics["federated_loss"].notna().all()
    best = json.loads((run / "best_model.json").read_text())
    assert best["metric"] == "federated_loss" and best["round"] == int(metrics.loc[metrics["federated_loss"].idxmin(), "round"])
    model = torch.load(run / "best_model.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in model.items()} == {
        "1.weight": (24, 64), "1.bias": (24,), "3.weight": (10, 24), "3.bias": (10,)}
