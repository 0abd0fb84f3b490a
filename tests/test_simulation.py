"""End to end through `flwr run` in simulation: training, outputs, resume, config errors.

Flower reports client failures as a completed run with exit code 0, so every assertion here is on
metrics.csv and the files the run wrote, never on the exit code alone.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.flwr_utils import run_simulation

pytestmark = pytest.mark.slow


def test_simulation_trains_writes_outputs_and_resumes(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = f"output-dir='{out}' dirichlet-alpha=1.0 min-partition-size=20 local-epochs=2"
    proc = run_simulation(flwr_home, f"num-server-rounds=3 {common}")
    metrics_path = out / "metrics.csv"
    assert metrics_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    frame = pd.read_csv(metrics_path)
    assert list(frame["round"]) == [0, 1, 2, 3]
    trained = frame[frame["round"] > 0]
    assert (trained["results"] == 3).all() and (trained["failures"] == 0).all() and (trained["rejected"] == 0).all()
    assert (trained["bytes_sent"] > 0).all() and (trained["bytes_received"] > 0).all()
    # Learning happened: accuracy well above chance (10 classes) and loss down from the initial model.
    assert trained["central_accuracy"].iloc[-1] > 0.6
    assert trained["central_loss"].iloc[-1] < frame["central_loss"].iloc[0]
    assert trained["federated_accuracy"].notna().all()
    for name in ("learning_curves.png", "checkpoint.pt", "model.pt", "run_config.json", "partitions.csv"):
        assert (out / name).exists(), name
    assert len(pd.read_csv(out / "partitions.csv")) == 3
    final_round3 = torch.load(out / "model.pt", weights_only=True)

    # Resume for one more round: round numbers go on and the history is kept.
    proc = run_simulation(flwr_home, f"num-server-rounds=4 resume=true {common}")
    frame = pd.read_csv(metrics_path)
    assert list(frame["round"]) == [0, 1, 2, 3, 4], proc.stdout[-3000:]
    assert frame["results"].iloc[-1] == 3
    final_round4 = torch.load(out / "model.pt", weights_only=True)
    assert any(not torch.equal(final_round3[k], final_round4[k]) for k in final_round3)


def test_a_bad_run_config_stops_the_run_with_the_key_and_choices(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_simulation(flwr_home, f"num-server-rounds=1 strategy='fedadm' output-dir='{out}'")
    logs = proc.stdout + proc.stderr
    assert "run-config key 'strategy': unknown value 'fedadm'; choose one of:" in logs
    assert not (out / "metrics.csv").exists()
