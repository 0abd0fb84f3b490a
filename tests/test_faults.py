"""Faults in a real deployment on localhost: a SuperNode killed mid-round, malformed updates, a
node whose data file is missing, and SuperNodes that each train on their own file.

One deployment, as README's "On one machine" starts it (insecure, `flower-superlink`,
`flower-supernode`, `flwr run`), with six SuperNodes on a tabular CSV task:

    node   node-config                          what it does
    ok-a   data-path="a.csv"                    trains on its own file
    ok-b   data-path="b.csv"                    trains on its own file
    nan    data-path="a.csv" fault="nan"        sends an update holding a NaN (tests/fault_injection.py)
    shape  data-path="b.csv" fault="shape"      sends an array of the wrong shape (tests/fault_injection.py)
    gone   data-path="missing.csv"              its file does not exist
    killed data-path="c.csv"                    SIGKILLed (with its children) mid-round 1

The run must go on without hanging: round 1 ends when the SuperLink declares the killed node
unavailable (two missed heartbeats), round 2 waits `client-wait-timeout` for the sixth node and
goes on with five. Rejected and failed clients must not touch the model: it must equal the
model of the same run with only ok-a and ok-b, replayed in this process. The run ships a copy of
the app whose ClientApp is `tests.fault_injection.app` (the app's client, corrupting the replies
of nodes with a `fault`); the ServerApp and everything else are the app's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deploy.local import Process, cluster, free_port, run_config_string, write_connection
from tests.deploy_utils import max_weight_difference, replay
from tests.fault_injection import fault_app_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_FEATURES = 5
NUM_CLASSES = 3
ROWS = {"a.csv": 150, "b.csv": 100, "c.csv": 120, "server.csv": 200}


def write_csv(path: Path, rows: int, seed: int) -> None:
    """Three Gaussian classes in 5 features (every file holds every class, so the models agree)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % NUM_CLASSES
    centers = np.eye(NUM_CLASSES, NUM_FEATURES) * 3.0
    x = centers[labels] + rng.normal(size=(rows, NUM_FEATURES))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(NUM_FEATURES)])
    frame["label"] = labels
    frame.sample(frac=1.0, random_state=seed).to_csv(path, index=False)


@dataclass
class FaultyRun:
    metrics: pd.DataFrame
    log: str
    out: Path
    expected: Path
    data: Path
    run: Process


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyRun]:
    work = tmp_path_factory.mktemp("faults")
    data = work / "data"
    data.mkdir()
    for seed, (name, rows) in enumerate(ROWS.items()):
        write_csv(data / name, rows, seed)
    nodes = {
        "ok-a": f'data-path="{data / "a.csv"}"',
        "ok-b": f'data-path="{data / "b.csv"}"',
        "nan": f'data-path="{data / "a.csv"}" fault="nan"',
        "shape": f'data-path="{data / "b.csv"}" fault="shape"',
        "gone": f'data-path="{data / "missing.csv"}"',
        "killed": f'data-path="{data / "c.csv"}"',
    }
    out = work / "out"
    config: dict[str, bool | int | float | str] = {
        "num-server-rounds": 2,
        "dataset": "csv",
        "data-path": str(data / "server.csv"),
        "min-fit-clients": 2,
        "min-available-clients": len(nodes),
        "client-wait-timeout": 3.0,
        "fraction-evaluate": 0.0,
        # Round 1 has 2 failures and 2 rejected updates out of 6: let it still update the model.
        "max-failure-fraction": 0.8,
    }
    with cluster(work) as group:
        port = free_port()
        superlink = group.start("superlink", [
            "flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={port}",
            "--disable-runtime-dependency-installation",
        ])
        superlink.wait_for(r"Uvicorn running", timeout=120)
        write_connection(group.home, "local-deploy", f"127.0.0.1:{port}")
        for name, node_config in nodes.items():
            group.start(name, [
                "flower-supernode", "--insecure", f"--superlink=127.0.0.1:{port}", f"--port={free_port()}",
                f"--node-config={node_config}",
            ])
        for name in nodes:
            group.procs[name].wait_for(r"SuperNode ID", timeout=180)
        run = group.start("flwr-run", ["flwr", "run", str(fault_app_dir(work / "app")), "local-deploy",
                                       "-c", run_config_string({**config, "output-dir": str(out.parent), "run-name": out.name}),
                                       "--stream"])
        # Kill the node (and the executor and ClientApp it started) once it holds round 1's message.
        group.procs["killed"].wait_for(r"Receiving: train message", timeout=300)
        group.signal("killed")
        run.wait(timeout=600)
        assert (out / "metrics.csv").exists(), group.logs()
        expected = replay(config, [{"data-path": str(data / "a.csv")}, {"data-path": str(data / "b.csv")}],
                          work / "replay")
        yield FaultyRun(pd.read_csv(out / "metrics.csv"), run.text(), out, expected, data, run)


def test_the_run_completes_every_round_with_the_survivors(faulty_run: FaultyRun) -> None:
    frame = faulty_run.metrics.set_index("round")
    assert list(frame.index) == [0, 1, 2], faulty_run.log[-3000:]
    # Round 1: six sampled; ok-a, ok-b, nan, shape reply; gone and killed fail; nan and shape are rejected.
    assert frame.loc[1, ["clients_sampled", "results", "failures", "rejected"]].tolist() == [6, 4, 2, 2]
    # Round 2: the killed node is gone; after the bounded wait the round goes on with five.
    assert frame.loc[2, ["clients_sampled", "results", "failures", "rejected"]].tolist() == [5, 4, 1, 2]
    assert frame.loc[1:, "updated"].all()
    assert "Node Unavailable" in faulty_run.log
    assert "only 5 of min-available-clients 6 connected after waiting 3s; going on with them" in faulty_run.log
    # Bounded by the SuperLink's heartbeat timeout (2 x 30 s), not by anything of ours.
    assert frame.loc[1, "seconds"] < 150 and frame.loc[2, "seconds"] < 120


def test_a_missing_data_file_fails_that_client_with_the_reason(faulty_run: FaultyRun) -> None:
    missing = str(faulty_run.data / "missing.csv")
    failures = [line for line in faulty_run.log.splitlines() if "client failure" in line and "NodeDataError" in line]
    assert len(failures) == 2, faulty_run.log[-3000:]  # once per round
    assert all(missing in line and "does not exist" in line for line in failures)


def test_malformed_updates_are_rejected_and_leave_the_model_unharmed(faulty_run: FaultyRun) -> None:
    rejected = [line for line in faulty_run.log.splitlines() if "rejected update" in line]
    assert len(rejected) == 4, rejected  # nan and shape, in each of the two rounds
    assert sum("NaN" in line for line in rejected) == 2, rejected
    assert sum("array 0 has" in line for line in rejected) == 2, rejected  # "... has shape/values ..., expected ..."
    # The global model is the one ok-a and ok-b alone produce.
    assert max_weight_difference(faulty_run.out / "model.pt", faulty_run.expected / "model.pt") < 1e-4
    expected = pd.read_csv(faulty_run.expected / "metrics.csv")
    assert faulty_run.metrics["central_loss"].to_numpy() == pytest.approx(expected["central_loss"].to_numpy(), rel=1e-4)
    assert faulty_run.metrics["central_accuracy"].iloc[-1] > 0.8


def test_each_supernode_trains_on_its_own_file(faulty_run: FaultyRun) -> None:
    summary = pd.read_csv(faulty_run.out / "partitions.csv")
    # Only accepted clients are summarised: ok-a and ok-b, with their files' train splits
    # (test-fraction 0.2 of 150 and of 100 rows).
    assert sorted(summary["num_examples"]) == [80, 120]
    assert (summary["partition"] == -1).all()  # own files, not partitions of a shared source
