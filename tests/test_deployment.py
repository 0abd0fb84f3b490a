"""The secure deployment end to end on localhost: the commands of compose.yaml, run as processes.

TLS on every connection, SuperNode authentication, SuperLink state in a database, the ServerApp
and ClientApps in their own executors (`--isolation process`), three SuperNodes, each on its own
partition. Checked here:

- a SuperNode whose key was never registered, and one without TLS, are refused (Flower's exit
  code 305), and the SuperLink says why;
- a run survives a crash of the whole server side (SuperLink and ServerApp executor killed after
  round 1's checkpoint): after a restart on the same database the registrations and node IDs are
  still there, the SuperNodes reconnect by themselves, the stale run can be stopped, and a new run
  with `resume=true` ends where the same run uninterrupted ends. The uninterrupted run is the app's
  own strategy and client code replayed in this process (`deploy_utils.replay`).

Flower reports client failures as a completed run with exit code 0, so the assertions are on
metrics.csv, model.pt and the logs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from deploy.make_certs import generate, make_auth_keypair
from tests.deploy_utils import (
    EXIT_CONNECTION_ERROR,
    ROOT,
    Cluster,
    LocalService,
    clone_service,
    cluster,
    compose_commands,
    flwr,
    free_port,
    load_compose,
    max_weight_difference,
    register_supernode,
    replay,
    run_app,
    run_config_string,
    run_id_of,
    wait_until,
    write_connection,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_NODES = 3
NODES = [f"supernode-{i}" for i in range(1, NUM_NODES + 1)]
CONNECTION = "secure"
# A short run of the default job (digits, CNN, FedAvg). One client evaluates per round: the
# federated-evaluation path runs, at a third of the cost (each message is a new process).
RUN_CONFIG: dict[str, bool | int | float | str] = {
    "num-server-rounds": 2,
    "local-epochs": 1,
    "min-fit-clients": NUM_NODES,
    "fraction-evaluate": 0.1,
    "min-evaluate-clients": 1,
    "min-available-clients": NUM_NODES,
    "client-wait-timeout": 90.0,
}


@dataclass
class Federation:
    group: Cluster
    services: dict[str, LocalService]
    certs: Path
    work: Path
    node_ids: dict[str, str]

    def start(self, name: str):  # type: ignore[no-untyped-def]
        service = self.services[name]
        return self.group.start(name, service.argv, env=service.env)


def replace_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with `flag=...` set to `value` (appended when absent), or removed when value is None."""
    kept = [a for a in argv if a != flag and not a.startswith(flag + "=")]
    return kept if value is None else [*kept, f"{flag}={value}"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    work = tmp_path_factory.mktemp("secure")
    certs = work / "certs"
    generate(certs, ["superlink"], NODES)
    compose = load_compose()
    for i in range(3, NUM_NODES + 1):  # compose.yaml has two SuperNodes; add more like the second
        renames = {"supernode-2": f"supernode-{i}", "SUPERNODE_2": f"SUPERNODE_{i}", "NODE_2": f"NODE_{i}",
                   "node-2": f"node-{i}"}
        clone_service(compose, "supernode-2", f"supernode-{i}", renames)
        clone_service(compose, "clientapp-2", f"clientapp-{i}", renames)
    env = {"CERTS_DIR": str(certs), "OUTPUTS_DIR": str(work / "outputs"), "SERVER_DATA": str(work / "server-data")}
    for i in range(1, NUM_NODES + 1):
        env[f"SUPERNODE_{i}_NODE_CONFIG"] = f"partition-id={i - 1} num-partitions={NUM_NODES}"
        env[f"NODE_{i}_DATA"] = str(work / f"data-{i}")
    services = compose_commands(compose, env, ROOT, work / "volumes")
    with cluster(work) as group:
        fed = Federation(group, services, certs, work, {})
        fed.start("superlink").wait_for(r"Uvicorn running", timeout=120)
        write_connection(group.home, CONNECTION, f"127.0.0.1:{services['superlink'].listen}", certs / "ca.crt")
        fed.start("serverapp")
        for node in NODES:
            fed.node_ids[node] = register_supernode(group, certs / "auth" / f"{node}.pub", CONNECTION, node)
        for i in range(1, NUM_NODES + 1):
            fed.start(f"supernode-{i}")
            fed.start(f"clientapp-{i}")
        for node in NODES:
            group.procs[node].wait_for(r"SuperNode ID", timeout=180)
        yield fed


def test_compose_commands_are_the_secure_ones(federation: Federation) -> None:
    superlink = federation.services["superlink"].argv
    assert "--enable-supernode-auth" in superlink and not any("--insecure" in a for a in superlink)
    for node in NODES:
        argv = federation.services[node].argv
        assert any(a.startswith("--root-certificates=") for a in argv)
        assert f"--auth-supernode-private-key={federation.certs / 'auth' / node}" in argv
        assert not any("--insecure" in a for a in argv)


def test_a_supernode_with_an_unregistered_key_is_refused(federation: Federation, tmp_path: Path) -> None:
    private, _public = make_auth_keypair("intruder")
    key = tmp_path / "intruder"
    key.write_bytes(private)
    os.chmod(key, 0o600)
    argv = replace_flag(federation.services["supernode-1"].argv, "--auth-supernode-private-key", str(key))
    argv = replace_flag(argv, "--port", str(free_port()))
    proc = federation.group.start("intruder", argv)
    code = proc.wait(timeout=120)
    text = proc.text()
    assert code != 0 and f"Exit Code: {EXIT_CONNECTION_ERROR}" in text, text[-2000:]
    assert "Failed to activate SuperNode" in text
    federation.group.procs["superlink"].wait_for(r"No SuperNode found with the given public key", timeout=30)


def test_a_supernode_without_tls_is_refused(federation: Federation) -> None:
    argv = federation.services["supernode-2"].argv
    for flag in ("--root-certificates", "--auth-supernode-private-key"):
        argv = replace_flag(argv, flag, None)
    argv = replace_flag(argv, "--port", str(free_port()))
    # Without --max-retries a SuperNode retries forever; with it, it gives up and says why.
    proc = federation.group.start("plaintext", [*argv, "--insecure", "--max-retries=2"])
    code = proc.wait(timeout=120)
    text = proc.text()
    assert code != 0 and f"Exit Code: {EXIT_CONNECTION_ERROR}" in text, text[-2000:]
    assert "SuperNode ID" not in text  # it never got a node ID


def _runs(fed: Federation) -> dict[int, str]:
    proc = flwr(fed.group, "flwr-ls", ["ls", CONNECTION, "--format", "json"], timeout=60)
    text = proc.text()
    data = json.loads(text[text.find("{") : text.rfind("}") + 1])
    return {int(r["run-id"]): r["status"] for r in data["runs"]}


def _nodes(fed: Federation) -> dict[str, str]:
    proc = flwr(fed.group, "flwr-supernode-ls", ["supernode", "ls", CONNECTION, "--format", "json"], timeout=60)
    text = proc.text()
    data = json.loads(text[text.find("{") : text.rfind("}") + 1])
    return {str(n["node-id"]): n["status"] for n in data["nodes"]}


def test_a_run_survives_a_server_crash_and_resumes_to_the_uninterrupted_result(federation: Federation) -> None:
    fed, group = federation, federation.group
    out = fed.work / "outputs" / "run"  # output-dir/<run-name>
    config = {**RUN_CONFIG, "output-dir": str(out.parent), "run-name": out.name}

    first = group.start("flwr-run-1", ["flwr", "run", str(ROOT), CONNECTION, "-c", run_config_string(config), "--stream"])
    wait_until(lambda: (out / "checkpoint.pt").exists(), timeout=400, what=f"round 1's checkpoint\n{group.logs()}")
    crashed_run = run_id_of(first)
    # The server machine dies: SuperLink and the ServerApp executor (with its flwr-serverapp) at once.
    group.signal("superlink")
    group.signal("serverapp")
    for name in ("superlink", "serverapp", "flwr-run-1"):
        group.stop(name, grace=0)
    assert pd.read_csv(out / "metrics.csv")["round"].max() == 1, "the crash came too late: round 2 had finished"

    # Same commands, same database: registrations and node IDs are kept, SuperNodes reconnect.
    fed.start("superlink").wait_for(r"Uvicorn running", timeout=120)
    fed.start("serverapp")
    nodes = wait_until(
        lambda: (n := _nodes(fed)) and all(n.get(i) == "online" for i in fed.node_ids.values()) and n,
        timeout=120, interval=2.0, what="the registered SuperNodes to be online again",
    )
    assert set(nodes) == set(fed.node_ids.values())
    # The crashed run's ServerApp is gone but the restored state still calls it running: stop it.
    assert _runs(fed)[crashed_run] == "running"
    stop = flwr(group, "flwr-stop", ["stop", str(crashed_run), CONNECTION], timeout=60)
    assert stop.returncode == 0, stop.text()
    assert _runs(fed)[crashed_run].startswith("finished:stopped")

    resumed = run_app(group, CONNECTION, run_config_string({**config, "resume": True}), timeout=600, name="flwr-run-2")
    assert "resume: run 'run' from round 1 of 2" in resumed.text(), resumed.text()[-3000:]
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["round"]) == [0, 1, 2], group.logs()
    trained = frame[frame["round"] > 0]
    assert (trained["results"] == NUM_NODES).all() and (trained["failures"] == 0).all()
    assert (trained["rejected"] == 0).all() and trained["updated"].all()

    # The oracle: the same run, uninterrupted, in this process.
    expected_dir = replay(
        RUN_CONFIG, [{"partition-id": i, "num-partitions": NUM_NODES} for i in range(NUM_NODES)], fed.work / "replay"
    )
    expected = pd.read_csv(expected_dir / "metrics.csv")
    for column in ("central_loss", "central_accuracy", "train_loss"):
        assert frame[column].to_numpy() == pytest.approx(expected[column].to_numpy(), rel=1e-3, nan_ok=True), column
    # Which client evaluates is drawn from the node IDs, which the replay does not share.
    assert trained["federated_loss"].between(0.0, 5.0).all() and trained["federated_accuracy"].between(0.0, 1.0).all()
    # Float sums in another order (replies arrive in any order) and another process's threads
    # differ in the last bits; a wrong resume (restart from scratch, a lost round) moves weights
    # by orders of magnitude more.
    assert max_weight_difference(out / "model.pt", expected_dir / "model.pt") < 1e-3
    assert frame["central_accuracy"].iloc[-1] > frame["central_accuracy"].iloc[0] + 0.3
