"""flower-app-superexec in a running deployment: a ClientApp process killed mid-message.

README's one-machine deployment with ``--isolation process``: a SuperLink, two SuperNodes, each
beside a ``flower-app-superexec``. In round 2 the first node's ClientApp process is killed (SIGKILL,
as the kernel kills a process out of memory) while it works. The SuperNode reports the message as
failed, as it does for any ClientApp process that dies (Flower's task heartbeat: about 60 s
later, most of this test's time); the round ends with the other node's update; the executor goes
on, and round 3 has both nodes again, each message in a new warm process. (TLS, SuperNode
and executor authentication with this executor: tests/test_deployment.py.)
"""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import psutil
import pytest

from deploy.local import cluster, run_app, run_config_string, start_local_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN_CONFIG: dict[str, bool | int | float | str] = {
    "num-server-rounds": 3,
    "local-epochs": 1,
    "min-fit-clients": 1,  # round 2 goes on with the node that is left
    "min-available-clients": 2,
    "fraction-evaluate": 0.0,
    "max-failure-fraction": 0.5,
}


def _kill_a_clientapp_in_round_2(executor_pid: int, metrics: Path, cache: Path, killed: list[int],
                                  stop: threading.Event) -> None:
    """Once round 1 is in metrics.csv, SIGKILL node 1's next ClientApp process while it works on its message.

    "While it works": the process has mapped the node's data cache, which the app's client does only
    after Flower handed it the message (a process killed before it took the message would leave the
    message unanswered, a different failure).
    """
    executor = psutil.Process(executor_pid)
    while not stop.is_set():
        if metrics.exists() and (pd.read_csv(metrics)["round"] >= 1).any():
            break
        stop.wait(0.05)
    while not stop.is_set() and not killed:
        for server in executor.children():  # the fork server; each of its children runs one message
            for child in server.children():
                try:
                    if str(cache) in Path(f"/proc/{child.pid}/maps").read_text():
                        child.kill()
                        killed.append(child.pid)
                        return
                except (OSError, psutil.Error):  # ended meanwhile
                    continue
        stop.wait(0.02)


def test_a_killed_clientapp_process_fails_its_message_and_the_next_round_has_both_nodes(tmp_path: Path) -> None:
    out = tmp_path / "out" / "run"
    config = {**RUN_CONFIG, "output-dir": str(out.parent), "run-name": out.name,
              "data-cache-dir": str(tmp_path / "cache")}
    with cluster(tmp_path) as group:
        connection = start_local_deployment(group, 2, warm=True)
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_a_clientapp_in_round_2,
                                  args=(group.procs["clientapp-1"].pid, out / "metrics.csv", tmp_path / "cache",
                                        killed, stop))
        killer.start()
        try:
            run_app(group, connection, run_config_string(config), timeout=400)
        finally:
            stop.set()
            killer.join()
        executor = group.procs["clientapp-1"]
        assert killed, group.logs()
        assert executor.find(rf"ClientApp process {killed[0]} ended with exit code -9"), executor.text()[-3000:]
        assert executor.returncode is None, "the executor went on"
        frame = pd.read_csv(out / "metrics.csv").set_index("round")
        assert list(frame.index) == [0, 1, 2, 3], group.logs()
        assert (frame.loc[1, "results"], frame.loc[1, "failures"]) == (2, 0)
        assert (frame.loc[2, "results"], frame.loc[2, "failures"]) == (1, 1), frame.to_string()
        assert (frame.loc[3, "results"], frame.loc[3, "failures"]) == (2, 0), frame.to_string()
        warm = executor.find(r"Warm ClientApp process \d+: .* s CPU")
        assert len(warm) >= 2  # rounds 1 and 3, each message in its own warm process
