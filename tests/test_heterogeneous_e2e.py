"""FedBuff and simulated devices end to end: through `flwr run` (Ray simulation) and a real local deployment.

Flower reports client failures as a completed run with exit code 0, so the assertions are on
metrics.csv, never on the exit code alone.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from deploy.local import cluster, free_port, run_app, run_config_string, write_connection
from tests.flwr_utils import run_simulation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_fedbuff_with_simulated_devices_through_flwr_run(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = run_config_string({
        "num-server-rounds": 3, "output-dir": str(out), "run-name": "fedbuff", "mode": "async",
        "device-profiles": "heavy", "async-concurrency": 3, "async-buffer-size": 2, "model": "mlp",
        "hidden-size": 32, "local-epochs": 1, "min-fit-clients": 2, "min-available-clients": 4,
        "fraction-evaluate": 0.5, "min-evaluate-clients": 2,
    })
    proc = run_simulation(flwr_home, config, num_supernodes=4)
    logs = proc.stdout + proc.stderr
    path = out / "fedbuff" / "metrics.csv"
    assert path.exists(), logs[-6000:]
    frame = pd.read_csv(path)
    assert list(frame["round"]) == [0, 1, 2, 3], logs[-4000:]
    steps = frame[frame["round"] > 0]
    assert list(steps["results"]) == [2, 2, 2] and steps["updated"].all()
    assert (steps["failures"] == 0).all() and (steps["rejected"] == 0).all()
    assert steps["sim_time"].is_monotonic_increasing and (steps["sim_seconds"] > 0).all()
    assert steps["staleness_mean"].notna().all()
    assert steps["federated_accuracy"].notna().iloc[-1]  # federated evaluation after the last step
    assert "fedbuff: 3 clients training at once, a server step every 2 updates" in logs
    assert (out / "fedbuff" / "model.pt").exists()


def test_fedbuff_in_a_local_deployment_with_per_node_work(tmp_path: Path) -> None:
    """Two SuperNodes, each ClientApp message in a fresh process, real arrival order; one node fits its work
    to a weak device with node-config keys."""
    out = tmp_path / "out"
    port = free_port()
    nodes = ["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2 max-local-steps=2 batch-size=8"]
    with cluster(tmp_path) as group:
        group.start("superlink", [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ]).wait_for(r"Uvicorn running", timeout=120)
        for i, node_config in enumerate(nodes):
            group.start(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                "--node-config", node_config,
            ])
        for i in range(len(nodes)):
            group.procs[f"supernode-{i}"].wait_for(r"SuperNode ID", timeout=180)
        write_connection(group.home, "local-deploy", f"127.0.0.1:{port}")
        config = run_config_string({
            "num-server-rounds": 3, "output-dir": str(out), "run-name": "run", "mode": "async",
            "async-concurrency": 2, "async-buffer-size": 1, "model": "mlp", "hidden-size": 16, "local-epochs": 1,
            "fraction-evaluate": 0.0, "min-fit-clients": 2, "min-available-clients": 2, "client-wait-timeout": 120.0,
        })
        proc = run_app(group, "local-deploy", config, timeout=600)
        logs = proc.text() + group.logs()
    path = out / "run" / "metrics.csv"
    assert path.exists(), logs[-5000:]
    frame = pd.read_csv(path)
    steps = frame[frame["round"] > 0]
    assert list(steps["round"]) == [1, 2, 3], logs[-4000:]
    assert list(steps["results"]) == [1, 1, 1] and steps["updated"].all() and (steps["failures"] == 0).all()
    assert "sim_time" not in frame  # real time in a deployment without device profiles
    # The weak node (capped at 2 steps of 8) finishes first and is in a step: its node config reached training.
    assert 2.0 in set(steps["fit_local_steps"]), steps
    assert 16.0 in set(steps["fit_num_examples_processed"]), steps
