"""SecAgg+ with client-side DP in a real deployment on localhost: a SuperLink, three SuperNodes,
each ClientApp message in a fresh process (the SecAgg+ state lives in the node's context)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from deploy.local import cluster, free_port, run_app, run_config_string, write_connection
from strategies.privacy import AccountingSpec, PrivacyAccountant

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_secure_aggregation_with_dp_in_deployment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    port = free_port()
    with cluster(tmp_path) as group:
        group.start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]).wait_for(r"Uvicorn running", timeout=120)
        for i in range(3):
            group.start(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions=3",
            ])
        for i in range(3):
            group.procs[f"supernode-{i}"].wait_for(r"SuperNode ID", timeout=180)
        write_connection(group.home, "local-deploy", f"127.0.0.1:{port}")
        config = run_config_string({
            "num-server-rounds": 1, "output-dir": str(out), "run-name": "run", "secure-aggregation": True, "dp-mode": "central-client",
            "model": "mlp", "send-delta": True, "dp-noise-multiplier": 1.0, "fraction-evaluate": 0.0,
            "local-epochs": 1, "min-fit-clients": 3, "min-available-clients": 3, "client-wait-timeout": 120.0,
        })
        proc = run_app(group, "local-deploy", config, timeout=600)
        logs = proc.text() + group.logs()
    assert (out / "run" / "metrics.csv").exists(), logs[-5000:]
    assert "Secure aggregation completed." in logs
    frame = pd.read_csv(out / "run" / "metrics.csv")
    last = frame.iloc[-1]
    assert last["round"] == 1 and last["results"] == 3 and bool(last["updated"]) and last["rejected"] == 0
    reference = PrivacyAccountant(AccountingSpec("central", 1.0, 1e-5), 3)
    reference.record_round(3)
    assert last["epsilon"] == pytest.approx(reference.epsilon(), rel=1e-9)
