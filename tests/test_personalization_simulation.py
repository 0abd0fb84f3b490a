"""Personalization through `flwr run` in simulation: node state in Flower's `context.state`, per-client columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.flwr_utils import run_simulation

pytestmark = pytest.mark.slow


def test_fedrep_through_flwr_run_keeps_heads_and_reports_per_client_figures(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_simulation(flwr_home, f"num-server-rounds=3 output-dir='{out}' run-name='rep' partitioner='shards' "
                                     "classes-per-partition=4 min-partition-size=20 local-epochs=1 "
                                     "personalization='fedrep' personal-epochs=2")
    logs = proc.stdout + proc.stderr
    frame = pd.read_csv(out / "rep" / "metrics.csv")
    assert list(frame["round"]) == [1, 2, 3], logs[-4000:]  # no centralized round 0: the server's model has no head
    assert (frame["results"] == 3).all() and (frame["failures"] == 0).all(), logs[-4000:]
    assert frame["central_accuracy"].isna().all()
    for column in ("clients_accuracy_mean", "clients_accuracy_p10", "clients_accuracy_worst",
                   "clients_personal_accuracy_mean", "clients_evaluated"):
        assert frame[column].notna().all(), column
    assert (frame["clients_evaluated"] == 3).all()
    # The heads stay on the nodes and keep learning: each node's model gets better at its own classes.
    assert frame["clients_personal_accuracy_mean"].iloc[-1] > max(0.5, frame["clients_personal_accuracy_mean"].iloc[0])
    assert "per client acc mean/p10/worst" in logs
