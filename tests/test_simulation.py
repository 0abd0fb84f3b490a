"""End to end through `flwr run` in simulation: training, outputs, resume, config errors.

Flower reports client failures as a completed run with exit code 0, so every assertion here is on
metrics.csv and the files the run wrote, never on the exit code alone.
"""

from __future__ import annotations

import json
import re
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
    logs = proc.stdout + proc.stderr
    runs = sorted(out.iterdir()) if out.exists() else []
    assert len(runs) == 1, logs[-6000:]
    run = runs[0]  # a generated name: YYYYmmdd-HHMMSS-<strategy>-<dataset>
    assert re.fullmatch(r"\d{8}-\d{6}-fedavg-digits", run.name), run.name
    assert f"run '{run.name}': outputs in {run}" in logs  # our log lines reach `flwr run --stream`
    frame = pd.read_csv(run / "metrics.csv")
    assert list(frame["round"]) == [0, 1, 2, 3]
    trained = frame[frame["round"] > 0]
    assert (trained["results"] == 3).all() and (trained["failures"] == 0).all() and (trained["rejected"] == 0).all()
    assert (trained["bytes_sent"] > 0).all() and (trained["bytes_received"] > 0).all()
    # Learning happened: accuracy well above chance (10 classes) and loss down from the initial model.
    assert trained["central_accuracy"].iloc[-1] > 0.6
    assert trained["central_loss"].iloc[-1] < frame["central_loss"].iloc[0]
    assert trained["federated_accuracy"].notna().all()
    for name in ("learning_curves.png", "checkpoint.pt", "model.pt", "run_config.json", "partitions.csv"):
        assert (run / name).exists(), name
    assert not (run / "run.lock").exists()  # released at the end
    assert len(pd.read_csv(run / "partitions.csv")) == 3
    final_round3 = torch.load(run / "model.pt", weights_only=True)

    # Resume for one more round (run-name empty: the run with the newest checkpoint): round numbers
    # go on, the history is kept, the change is recorded.
    proc = run_simulation(flwr_home, f"num-server-rounds=4 resume=true {common}")
    logs = proc.stdout + proc.stderr
    assert f"continuing run '{run.name}', the newest checkpoint" in logs, logs[-3000:]
    frame = pd.read_csv(run / "metrics.csv")
    assert list(frame["round"]) == [0, 1, 2, 3, 4], logs[-3000:]
    assert frame["results"].iloc[-1] == 3
    final_round4 = torch.load(run / "model.pt", weights_only=True)
    assert any(not torch.equal(final_round3[k], final_round4[k]) for k in final_round3)
    (history,) = [json.loads(line) for line in (run / "resume_history.jsonl").read_text().splitlines()]
    assert history["changed"] == {"num-server-rounds": [3, 4]} and history["from_round"] == 3
    assert isinstance(history["flower_run_id"], int)  # the resuming Flower run

    # The same command once more, without resume: a new folder; the first run is untouched.
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = run_simulation(flwr_home, f"num-server-rounds=1 {common}")
    runs = sorted(out.iterdir())
    assert len(runs) == 2 and runs[0] == run, (proc.stdout + proc.stderr)[-3000:]
    assert list(pd.read_csv(runs[1] / "metrics.csv")["round"]) == [0, 1]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_bad_run_config_stops_the_run_with_the_key_and_choices(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_simulation(flwr_home, f"num-server-rounds=1 strategy='fedadm' output-dir='{out}'")
    logs = proc.stdout + proc.stderr
    assert "run-config key 'strategy': unknown value 'fedadm'; choose one of:" in logs
    assert not out.exists()  # refused before any folder was made
