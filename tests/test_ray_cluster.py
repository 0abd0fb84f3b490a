"""Simulation on an existing Ray cluster: a two-node cluster on localhost, the app run on it through `flwr run`.

Flower 1.42's Ray backend calls ``ray.init(**init_args)``; the CLI forwards only ``num-cpus``,
``num-gpus``, ``logging-level`` and ``log-to-driver`` of a connection's ``options.backend.init-args``
(`flwr.cli.flower_config`), not ``address``. Ray reads ``RAY_ADDRESS`` when ``ray.init`` gets no address,
and Flower's simulation process inherits the environment of the simulation SuperLink, so that SuperLink
is started with ``RAY_ADDRESS=<head>`` (README "Simulation on a Ray cluster").

Every Ray process binds to 127.0.0.1 on ports chosen here, keeps its files in its own temporary folder,
and is stopped by its process group (``ray start --block`` in a session of its own); ``ray stop``, which
would stop every Ray on the machine, is never called. The run must end with the metrics of the same run
in the plain local simulation.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from deploy.local import Cluster, cluster, free_port, run_app, run_config_string, write_connection

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RAY_PORTS = ("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def ray_node(group: Cluster, name: str, head_port: int, head: bool) -> Path:
    """Start one Ray node on 127.0.0.1 (1 CPU, a small object store) in a short temporary folder of its own
    (Unix socket paths must stay under 108 bytes); returns the folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))
    argv = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={folder}",
            "--object-store-memory=100000000", "--disable-usage-stats",
            *(f"--{flag}={free_port()}" for flag in RAY_PORTS)]
    argv += ["--head", f"--port={head_port}", "--include-dashboard=false"] if head else [f"--address=127.0.0.1:{head_port}"]
    group.start(name, argv, env={"RAY_USAGE_STATS_ENABLED": "0"}).wait_for(r"Ray runtime started", timeout=180)
    return folder


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, int, list[Path]]]:
    folders: list[Path] = []
    with cluster(tmp_path) as group:
        port = free_port()
        try:
            folders.append(ray_node(group, "ray-head", port, head=True))
            folders.append(ray_node(group, "ray-worker", port, head=False))
            yield group, port, folders
        finally:
            for name in ("ray-worker", "ray-head"):
                if name in group.procs:
                    group.stop(name, grace=20)  # SIGTERM: ray start --block stops what it started
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def run_on(group: Cluster, name: str, out: Path, ray_address: str | None) -> pd.DataFrame:
    """The run through `flwr run` on a simulation SuperLink of its own (on the cluster when ``ray_address``)."""
    port = free_port()
    env = {"RAY_ADDRESS": ray_address} if ray_address else {}
    group.start(f"superlink-{name}", [
        "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ], env=env).wait_for(r"Uvicorn running", timeout=120)
    write_connection(group.home, name, f"127.0.0.1:{port}",
                     options={"num-supernodes": 2, "backend.client-resources.num-cpus": 1})
    config = run_config_string({
        "num-server-rounds": 2, "output-dir": str(out), "run-name": name, "model": "mlp", "hidden-size": 16,
        "local-epochs": 1, "fraction-evaluate": 0.0, "num-partitions": 2,
    })
    proc = run_app(group, name, config, timeout=600, name=f"flwr-run-{name}")
    path = out / name / "metrics.csv"
    assert path.exists(), proc.text()[-3000:] + group.logs()
    group.stop(f"superlink-{name}")
    return pd.read_csv(path)


def test_simulation_on_a_two_node_ray_cluster_matches_the_local_simulation(
    ray_cluster: tuple[Cluster, int, list[Path]], tmp_path: Path
) -> None:
    group, port, (head_dir, worker_dir) = ray_cluster
    on_cluster = run_on(group, "on-cluster", tmp_path / "out", f"127.0.0.1:{port}")
    # The simulation ran its ClientApp actors on the cluster, one on each node (each has one CPU, a client takes
    # one): both nodes' own folders hold the logs of a Ray worker process.
    for folder in (head_dir, worker_dir):
        assert list(folder.glob("session_*/logs/worker-*.out")), f"no Ray worker ran on the node in {folder}"
    local = run_on(group, "local", tmp_path / "out", None)
    trained = on_cluster[on_cluster["round"] > 0]
    assert list(trained["results"]) == [2, 2] and (trained["failures"] == 0).all()
    for column in ("central_loss", "central_accuracy", "train_loss"):
        assert on_cluster[column].tolist() == pytest.approx(local[column].tolist(), rel=1e-5, abs=1e-6, nan_ok=True), column
