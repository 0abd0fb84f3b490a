"""End to end through `flwr run` in simulation: SecAgg+ with client-side DP, epsilon, resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from strategies.privacy import AccountingSpec, PrivacyAccountant
from tests.flwr_utils import run_simulation

pytestmark = pytest.mark.slow


def test_secure_aggregation_with_dp_runs_accounts_and_resumes(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "run"
    common = (
        f"output-dir='{out.parent}' run-name='run' secure-aggregation=true dp-mode='central-client' model='mlp' send-delta=true "
        "dp-noise-multiplier=1.0 dp-clipping-norm=1.0 fraction-evaluate=0.0 local-epochs=1"
    )
    proc = run_simulation(flwr_home, f"num-server-rounds=2 {common}")
    logs = proc.stdout + proc.stderr
    frame = pd.read_csv(out / "metrics.csv") if (out / "metrics.csv").exists() else None
    assert frame is not None, logs[-4000:]
    assert "Secure aggregation completed." in logs
    assert list(frame["round"]) == [0, 1, 2]
    trained = frame[frame["round"] > 0]
    assert (trained["results"] == 3).all() and trained["updated"].all() and (trained["rejected"] == 0).all()
    # 3 of 3 clients a round with z = 1: the accountant's epsilon, round by round.
    reference = PrivacyAccountant(AccountingSpec("central", 1.0, 1e-5), 3)
    for eps in trained["epsilon"]:
        reference.record_round(3)
        assert eps == pytest.approx(reference.epsilon(), rel=1e-9)
    assert trained["train_loss"].isna().all()  # no per-client training metrics under privacy

    proc = run_simulation(flwr_home, f"num-server-rounds=3 resume=true {common}")
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["round"]) == [0, 1, 2, 3], (proc.stdout + proc.stderr)[-4000:]
    reference.record_round(3)
    assert frame["epsilon"].iloc[-1] == pytest.approx(reference.epsilon(), rel=1e-9)
    assert (out / "model.pt").exists()
