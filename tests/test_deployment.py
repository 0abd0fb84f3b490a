"""The secure deployment end to end on localhost: the commands of compose.yaml, nginx included, as processes.

nginx in front of the SuperLink with two listeners (fleet-proxy for the data owners, operator-proxy
for the operator), TLS on every connection, SuperNode authentication, executor authentication with
the shared secret, SuperLink state in a database, the ServerApp and ClientApps in their own
executors (`--isolation process`), three SuperNodes, each on its own partition; the third is added
with deploy/add_node.sh. One deployment serves every check of this module:

- who reaches which API through which listener (`ACCESS`, the endpoint x caller table of the
  README): the data owners' listener passes the Fleet API only, the operator's the Control API
  only, the Runtime API neither; `flwr ls` / `flwr run` / `flwr supernode register` are refused
  on the public listener and work on the operator's;
- an executor without the secret (or with a wrong one) is refused by the SuperLink;
- a SuperNode whose key was never registered, and one without TLS, are refused;
- every ClientApp runs warm (``flower-app-superexec``, the image's entrypoint), and a node's
  executor whose fork server was killed starts a new one and serves the next run;
- a run through the proxies survives a crash of the whole server side (SuperLink and ServerApp
  executor killed after round 1's checkpoint): after a restart on the same database the
  registrations and node IDs are still there, the SuperNodes reconnect by themselves, the stale run
  can be stopped, and a new run with `resume=true` ends where the same run uninterrupted ends. The
  uninterrupted run is the app's own strategy and client code replayed in this process
  (`deploy_utils.replay`).

Flower reports client failures as a completed run with exit code 0, and `flwr ... --format json`
exits 0 when refused, so the assertions are on metrics.csv, model.pt, the JSON and the logs.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

from deploy.local import (
    EXIT_CONNECTION_ERROR,
    OPERATOR,
    ROOT,
    LocalDeployment,
    cluster,
    flwr,
    free_port,
    json_output,
    nginx_executable,
    register_supernode,
    run_app,
    run_config_string,
    run_id_of,
    start_compose_deployment,
    wait_until,
    write_connection,
)
from deploy.make_certs import make_auth_keypair
from tests.deploy_utils import max_weight_difference, replay

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_NODES = 3
NODES = [f"supernode-{i}" for i in range(1, NUM_NODES + 1)]
PUBLIC = "public"  # a flwr CLI connection through fleet-proxy: anyone who holds ca.crt
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

# Endpoint x caller, through each listener, with no credentials but ca.crt (a raw HTTPS request; the
# path is sent as written, not normalized). "proxy" = 403 from nginx, the request never reaches the
# SuperLink; "auth" = passed on, and the SuperLink refuses it (401: no SuperNode signature);
# "ok" = passed on and answered.
ACCESS = [
    ("fleet-proxy", "POST", "/v1/fleet/pull-messages", "auth"),
    ("fleet-proxy", "POST", "/v1/control/list-runs", "proxy"),
    ("fleet-proxy", "POST", "/v1/control/start-run", "proxy"),
    ("fleet-proxy", "POST", "/v1/control/register-node", "proxy"),
    ("fleet-proxy", "POST", "/v1/runtime/acquire-task", "proxy"),
    ("fleet-proxy", "POST", "/v1/runtime/pull-task-input", "proxy"),
    ("fleet-proxy", "GET", "/health", "proxy"),
    ("fleet-proxy", "GET", "/docs", "proxy"),
    ("fleet-proxy", "GET", "/openapi.json", "proxy"),
    ("fleet-proxy", "GET", "/v1/fleet/pull-messages", "proxy"),
    ("fleet-proxy", "POST", "/v1/fleet/../control/list-runs", "proxy"),
    ("fleet-proxy", "POST", "/v1/fleet/%2e%2e/control/list-runs", "proxy"),
    ("fleet-proxy", "POST", "/v1/fleet/..%2Fruntime%2Facquire-task", "proxy"),
    ("fleet-proxy", "POST", "//v1/runtime/acquire-task", "proxy"),
    ("operator-proxy", "POST", "/v1/control/list-runs", "ok"),
    ("operator-proxy", "POST", "/v1/fleet/pull-messages", "proxy"),
    ("operator-proxy", "POST", "/v1/runtime/acquire-task", "proxy"),
    ("operator-proxy", "POST", "/v1/control/../runtime/acquire-task", "proxy"),
    ("operator-proxy", "GET", "/docs", "proxy"),
]


def replace_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with `flag=...` set to `value` (appended when absent), or removed when value is None."""
    kept = [a for a in argv if a != flag and not a.startswith(flag + "=")]
    return kept if value is None else [*kept, f"{flag}={value}"]


def _add_node_with_the_script(fed: LocalDeployment, node: str) -> str:
    """deploy/add_node.sh as the README runs it (files owned by whoever runs the tests)."""
    env = {"CERTS": str(fed.certs), "SECRETS_DIR": str(fed.secrets), "OWNER": f"{os.geteuid()}:{os.getegid()}",
           "PYTHON": sys.executable, "SUDO": ""}
    proc = fed.group.start(f"add-{node}", ["bash", str(ROOT / "deploy" / "add_node.sh"), node, OPERATOR], env=env)
    code = proc.wait(timeout=120)
    match = re.search(r"SuperNode (\d+) registered", proc.text())
    assert code == 0 and match, proc.text()[-3000:]
    return match.group(1)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    try:
        nginx_executable()
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            raise  # .ci/run installs nginx: a missing one is a broken CI, not a reason to skip
        pytest.skip(str(err))
    work = tmp_path_factory.mktemp("secure")
    with cluster(work) as group:
        def register(fed: LocalDeployment, node: str) -> str:
            if node == NODES[-1]:
                return _add_node_with_the_script(fed, node)
            return register_supernode(group, fed.certs / "auth" / f"{node}.pub", OPERATOR, node)

        fed = start_compose_deployment(group, work, NUM_NODES, register=register)
        write_connection(group.home, PUBLIC, fed.address("fleet-proxy"), fed.certs / "ca.crt", default=False)
        yield fed


def test_compose_commands_are_the_secure_ones(federation: LocalDeployment) -> None:
    services = federation.services
    superlink = services["superlink"].argv
    assert "--enable-supernode-auth" in superlink and not any("--insecure" in a for a in superlink)
    assert f"--superexec-auth-secret-file={federation.secrets / 'superexec.secret'}" in superlink
    assert f"--superexec-auth-secret-file={federation.secrets / 'superexec.secret'}" in services["serverapp"].argv
    for node in NODES:
        argv = services[node].argv
        assert f"--superlink={federation.address('fleet-proxy')}" in argv  # through the proxy, never direct
        assert any(a.startswith("--root-certificates=") for a in argv)
        assert f"--auth-supernode-private-key={federation.secrets / 'auth' / node}" in argv
        assert not any("--insecure" in a for a in argv)
    assert not (federation.secrets / "ca.key").exists()
    assert {p.name for p in federation.secrets.rglob("*") if p.is_file()} == {
        "ca.crt", "superlink.crt", "superlink.key", "superexec.secret", *(f"{n}.crt" for n in NODES),
        *(f"{n}.key" for n in NODES), *NODES}


def _request(fed: LocalDeployment, listener: str, method: str, path: str) -> tuple[int, str]:
    host, port = fed.address(listener).split(":")
    context = ssl.create_default_context(cafile=str(fed.certs / "ca.crt"))
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


@pytest.mark.parametrize(("listener", "method", "path", "expected"), ACCESS)
def test_each_listener_passes_its_api_only(
    federation: LocalDeployment, listener: str, method: str, path: str, expected: str
) -> None:
    status, body = _request(federation, listener, method, path)
    if expected == "proxy":
        assert status == 403 and "<center>nginx</center>" in body, (status, body[:300])
    elif expected == "auth":
        assert status == 401 and "Invalid SuperNode authentication" in body, (status, body[:300])
    else:
        assert status == 200, (status, body[:300])


def test_the_superlink_listens_on_loopback_and_refuses_runtime_calls_without_the_secret(
    federation: LocalDeployment,
) -> None:
    """On the server host (or compose's internal network) the Runtime API is reachable, and
    the executors' entry point refuses a caller without the secret."""
    assert federation.address("superlink").startswith("127.0.0.1:")
    status, body = _request(federation, "superlink", "POST", "/v1/runtime/acquire-task")
    assert status == 401 and '"code":1008' in body.replace(" ", ""), (status, body[:300])


def test_the_cli_is_refused_on_the_public_listener_and_works_on_the_operators(
    federation: LocalDeployment, tmp_path: Path
) -> None:
    group = federation.group
    refused = json_output(flwr(group, "ls-public", ["ls", PUBLIC, "--format", "json"], timeout=120))
    assert refused["success"] is False and "403 Forbidden" in refused["error-message"], refused
    allowed = json_output(flwr(group, "ls-operator", ["ls", OPERATOR, "--format", "json"], timeout=120))
    assert allowed["success"] is True and "runs" in allowed, allowed

    run = run_app(group, PUBLIC, run_config_string({**RUN_CONFIG, "output-dir": str(tmp_path / "out")}),
                  timeout=120, name="run-public")
    assert run.returncode != 0 and "403 Forbidden" in run.text() and "/v1/control/start-run" in run.text()
    assert not run.find(r"started run \d+")
    _private, public = make_auth_keypair("intruder")
    (tmp_path / "intruder.pub").write_bytes(public)
    register = flwr(group, "register-public", ["supernode", "register", str(tmp_path / "intruder.pub"), PUBLIC,
                                               "--format", "json"], timeout=120)
    assert json_output(register)["success"] is False, register.text()
    nodes = json_output(flwr(group, "nodes-operator", ["supernode", "ls", OPERATOR, "--format", "json"], timeout=120))
    assert {str(n["node-id"]) for n in nodes["nodes"]} == set(federation.node_ids.values())


@pytest.mark.parametrize("secret", [None, b"not the secret"], ids=["no-secret", "wrong-secret"])
def test_an_executor_without_the_secret_is_refused(
    federation: LocalDeployment, tmp_path: Path, secret: bytes | None
) -> None:
    argv = replace_flag(federation.services["serverapp"].argv, "--superexec-auth-secret-file", None)
    if secret is not None:
        (tmp_path / "wrong.secret").write_bytes(secret)
        argv = replace_flag(argv, "--superexec-auth-secret-file", str(tmp_path / "wrong.secret"))
    superlink = federation.group.procs["superlink"]
    before = len(superlink.find(r"SuperExec authentication failed"))
    proc = federation.group.start(f"executor-{'none' if secret is None else 'wrong'}", argv)
    # Refused with 401, the executor shuts itself down: it never takes a task.
    proc.wait(timeout=120)
    superlink.wait_for(r"SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask", timeout=30,
                       count=before + 1)
    assert not proc.find(r"Start `flwr-serverapp` process|Starting .*ServerApp")


def test_a_supernode_with_an_unregistered_key_is_refused(federation: LocalDeployment, tmp_path: Path) -> None:
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


def test_a_supernode_without_tls_is_refused(federation: LocalDeployment) -> None:
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


def _runs(fed: LocalDeployment) -> dict[int, str]:
    data = json_output(flwr(fed.group, "flwr-ls", ["ls", OPERATOR, "--format", "json"], timeout=60))
    return {int(r["run-id"]): r["status"] for r in data["runs"]}


def _nodes(fed: LocalDeployment) -> dict[str, str]:
    data = json_output(flwr(fed.group, "flwr-supernode-ls", ["supernode", "ls", OPERATOR, "--format", "json"],
                            timeout=60))
    return {str(n["node-id"]): n["status"] for n in data["nodes"]}


def test_a_run_survives_a_server_crash_and_resumes_to_the_uninterrupted_result(federation: LocalDeployment) -> None:
    fed, group = federation, federation.group
    out = fed.work / "outputs" / "run"  # output-dir/<run-name>
    config = {**RUN_CONFIG, "output-dir": str(out.parent), "run-name": out.name}

    first = group.start("flwr-run-1", ["flwr", "run", str(ROOT), OPERATOR, "-c", run_config_string(config), "--stream"])
    wait_until(lambda: (out / "checkpoint.pt").exists(), timeout=400, what=f"round 1's checkpoint\n{group.logs()}")
    crashed_run = run_id_of(first)
    # The server machine dies: SuperLink and the ServerApp executor (with its flwr-serverapp) at once.
    group.signal("superlink")
    group.signal("serverapp")
    for name in ("superlink", "serverapp", "flwr-run-1"):
        group.stop(name, grace=0)
    assert pd.read_csv(out / "metrics.csv")["round"].max() == 1, "the crash came too late: round 2 had finished"

    # Same commands, same database: registrations and node IDs are kept, SuperNodes reconnect.
    fed.start_ready("superlink")
    fed.start("serverapp")
    nodes = wait_until(
        lambda: (n := _nodes(fed)) and all(n.get(i) == "online" for i in fed.node_ids.values()) and n,
        timeout=120, interval=2.0, what="the registered SuperNodes to be online again",
    )
    assert set(nodes) == set(fed.node_ids.values())
    # The crashed run's ServerApp is gone but the restored state still calls it running: stop it.
    assert _runs(fed)[crashed_run] == "running"
    stop = flwr(group, "flwr-stop", ["stop", str(crashed_run), OPERATOR], timeout=60)
    assert stop.returncode == 0, stop.text()
    assert _runs(fed)[crashed_run].startswith("finished:stopped")

    # The first node's warm ClientApp executor loses its fork server too: it starts a new one.
    (fork_server,) = [p for p in psutil.Process(group.procs["clientapp-1"].pid).children()
                      if "forkserver" in " ".join(p.cmdline())]
    fork_server.kill()

    resumed = run_app(group, OPERATOR, run_config_string({**config, "resume": True}), timeout=600, name="flwr-run-2")
    assert "resume: run 'run' from round 1 of 2" in resumed.text(), resumed.text()[-3000:]
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["round"]) == [0, 1, 2], group.logs()
    trained = frame[frame["round"] > 0]
    assert (trained["results"] == NUM_NODES).all() and (trained["failures"] == 0).all()
    assert group.procs["clientapp-1"].find(rf"The fork server {fork_server.pid} ended; started fork server \d+")
    for i in range(1, NUM_NODES + 1):  # every ClientApp ran warm, over the Runtime API's TLS
        assert group.procs[f"clientapp-{i}"].find(r"Warm ClientApp process \d+: .* s CPU"), group.logs()
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
