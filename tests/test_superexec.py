"""deploy/superexec.py (``flower-app-superexec``): ClientApp processes forked warm, everything else cold.

The executor is driven here through Flower's ``Executor`` protocol with stand-in targets
(tests/superexec_targets.py) in place of Flower's ``run_clientapp``: a ClientApp task runs in a new
process forked from the fork server, with the task's arguments, never in a process that ran a task
before, and without the app imported; other task types, ``--cold``, and a warm start that fails
go to Flower's cold path; a process that dies is reaped and the next task runs; a fork server that
dies is started again. The real thing (Flower's ClientApp runtime, TLS, SuperNode authentication)
runs in tests/test_deployment.py, whose executors are this one, and in
tests/test_superexec_deployment.py (crashes in a running deployment).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy import superexec
from deploy.local import wait_until
from deploy.superexec import WarmExecutor, launch_delay, min_task_age, parser, poll_interval
from tests import superexec_targets

PRELOAD = ("json",)  # small: the fork server starts in well under a second


class RecordingCold:
    """Flower's cold path, recorded instead of run."""

    def __init__(self) -> None:
        self.specs: list[ExecutionSpec] = []

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        self.specs.append(spec)
        return LaunchResult.accepted()


def spec(token: str, task_type: TaskType = TaskType.CLIENT_APP, task_id: int = 7) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9094", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=task_id)


def executor(target: Any = superexec_targets.record, **kwargs: Any) -> tuple[WarmExecutor, RecordingCold]:
    cold = RecordingCold()
    return WarmExecutor(preload=PRELOAD, target=target, cold=cold, **kwargs), cold  # type: ignore[arg-type]


def finish(ex: WarmExecutor, timeout: float = 60) -> None:
    """Reconcile until every started process has ended."""
    def done() -> bool:
        ex.reconcile()
        return not ex.children
    wait_until(done, timeout=timeout, interval=0.05, what="the warm processes to end")


def kill_and_wait(pid: int) -> None:
    """SIGKILL the fork server and wait until it is dead, without reaping it (its parent, this process's
    multiprocessing, does that)."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10, interval=0.02,
               what="the fork server to die")


def read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------ the warm path
def test_a_clientapp_task_runs_in_a_process_forked_from_the_warm_server(tmp_path: Path) -> None:
    ex, cold = executor()
    token = str(tmp_path / "task.json")
    assert ex.launch(spec(token)).status == "accepted"
    finish(ex)
    facts = read(Path(token))
    assert facts["kwargs"] == {"runtime_api_address": "127.0.0.1:9094", "token": token, "insecure": True,
                               "certificates": None, "parent_pid": os.getpid(),
                               "runtime_dependency_install": False}
    assert facts["pid"] != os.getpid() and facts["ppid"] == ex.server_pid  # forked by the fork server
    assert "json" in facts["modules"]  # preloaded ...
    assert "flwr.supercore.tls" in facts["modules"]  # ... with what the executor's own file imports
    assert not [m for m in facts["modules"] if m.startswith("flower_app")], "the executor must not import the app"
    assert (ex.warm_starts, ex.cold_starts, cold.specs) == (1, 0, [])


def test_every_task_gets_a_new_process_that_saw_no_task_before(tmp_path: Path) -> None:
    ex, _ = executor()
    tokens = [str(tmp_path / f"task-{i}.json") for i in range(3)]
    for i, token in enumerate(tokens):
        ex.launch(spec(token, task_id=i + 1))
    finish(ex)
    facts = [read(Path(t)) for t in tokens]
    assert [f["tasks_seen"] for f in facts] == [1, 1, 1]
    assert len({f["pid"] for f in facts}) == 3


def test_the_certificates_are_read_for_the_process(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n")
    ex, _ = executor()
    token = str(tmp_path / "task.json")
    ex.launch(ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="node:9094", token=token,
                            insecure=False, root_certificates_path=str(ca), runtime_dependency_install=False,
                            parent_pid=None, suppress_output=False, task_id=3))
    finish(ex)
    assert read(Path(token))["kwargs"]["certificates"] == ca.read_text()


# ------------------------------------------------------------------------------ the cold path
@pytest.mark.parametrize("task_type", sorted(set(TaskType) - {TaskType.CLIENT_APP}))
def test_other_task_types_start_cold(tmp_path: Path, task_type: TaskType) -> None:
    ex, cold = executor()
    one = spec(str(tmp_path / "x"), task_type=task_type)
    ex.launch(one)
    assert cold.specs == [one] and not ex.children and (ex.warm_starts, ex.cold_starts) == (0, 1)


def test_cold_starts_every_clientapp_cold(tmp_path: Path) -> None:
    ex, cold = executor(warm=False)
    one = spec(str(tmp_path / "x"))
    ex.launch(one)
    assert cold.specs == [one] and not ex.children


def test_a_warm_start_that_fails_starts_the_task_cold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ex, cold = executor(target=lambda **kwargs: None)  # a lambda cannot be sent to the fork server
    one = spec(str(tmp_path / "x"))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert ex.launch(one).status == "accepted"
    assert cold.specs == [one] and (ex.warm_starts, ex.cold_starts) == (0, 1)


def test_preloading_a_module_that_is_not_installed_is_refused() -> None:
    with pytest.raises(ValueError, match="not installed: no_such_module_xyz"):
        WarmExecutor(preload=("json", "no_such_module_xyz"))


# ------------------------------------------------------------------------------- crashes
def test_a_process_that_dies_is_reaped_and_the_next_task_runs(tmp_path: Path) -> None:
    ex, _ = executor(target=superexec_targets.crash)
    ex.launch(spec("unused"))
    (child,) = ex.children
    finish(ex)
    assert ex.children == [] and child.task_id == 7
    ex.target = superexec_targets.record
    token = str(tmp_path / "after.json")
    ex.launch(spec(token))
    finish(ex)
    assert read(Path(token))["tasks_seen"] == 1


def test_a_killed_fork_server_is_started_again_and_serves_the_next_task(tmp_path: Path) -> None:
    ex, cold = executor()
    old = ex.server_pid
    assert old is not None
    kill_and_wait(old)
    ex.reconcile()  # notices, starts a new one
    new = ex.server_pid
    assert new is not None and new != old
    token = str(tmp_path / "task.json")
    ex.launch(spec(token))
    finish(ex)
    assert read(Path(token))["ppid"] == new and not cold.specs


def test_a_task_launched_right_after_the_server_died_still_runs(tmp_path: Path) -> None:
    """No reconcile in between: the launch itself starts a new fork server (or falls back to cold)."""
    ex, cold = executor()
    pid = ex.server_pid
    assert pid is not None
    kill_and_wait(pid)
    token = str(tmp_path / "task.json")
    ex.launch(spec(token))
    finish(ex)
    assert read(Path(token))["ppid"] == ex.server_pid != pid and not cold.specs


# ------------------------------------------------------------------------ timing and flags
NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


@given(min_age=st.floats(0, 10), age=st.floats(-100, 100))
@settings(max_examples=300, deadline=None)
def test_launch_delay_waits_until_the_task_is_old_enough_and_never_longer(min_age: float, age: float) -> None:
    created = (NOW - timedelta(seconds=age)).isoformat()
    wait = launch_delay(created, min_age, now=NOW)
    assert 0.0 <= wait <= min_age
    if min_age == 0:
        assert wait == 0
    elif age >= 0:  # a task created `age` seconds ago waits the rest of min_age (microsecond timestamps)
        assert wait == pytest.approx(max(0.0, min_age - age), abs=1e-5)
    else:  # created "in the future": another clock; wait the whole min_age
        assert wait == min_age


@given(text=st.text(max_size=30))
def test_launch_delay_of_a_time_that_does_not_parse_is_the_whole_min_age(text: str) -> None:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        assert launch_delay(text, 0.3, now=NOW) == 0.3


def test_launch_delay_by_hand() -> None:
    assert launch_delay((NOW - timedelta(seconds=0.1)).isoformat(), 0.3, now=NOW) == pytest.approx(0.2)
    assert launch_delay((NOW - timedelta(seconds=1)).isoformat(), 0.3, now=NOW) == 0.0
    # Flower writes aware UTC times; a naive one is read as UTC.
    assert launch_delay("2026-11-30T11:59:59.950000", 0.3, now=NOW) == pytest.approx(0.25)


def test_poll_interval_flag_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(superexec.POLL_INTERVAL_ENV, raising=False)
    assert poll_interval(None) == superexec.DEFAULT_POLL_INTERVAL
    monkeypatch.setenv(superexec.POLL_INTERVAL_ENV, "0.5")
    assert poll_interval(None) == 0.5
    assert poll_interval(2.0) == 2.0


@pytest.mark.parametrize("value", ["abc", "0", "0.001", "61", "-1", "nan", "inf", ""])
def test_a_poll_interval_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(superexec.POLL_INTERVAL_ENV, value)
    with pytest.raises(ValueError, match=r"0\.01 to 60.*FLWR_SUPEREXEC_TASK_POLL_INTERVAL"):
        poll_interval(None)


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "61"])
def test_a_min_task_age_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"--min-task-age must be a number of seconds from 0 to 60"):
        min_task_age(parser().parse_args(["--runtime-api-address=a:1", f"--min-task-age={value}"]).min_task_age)
    assert min_task_age(0.0) == 0.0 and min_task_age(60.0) == 60.0


@pytest.mark.parametrize(("flag", "message"), [
    ("--min-task-age=inf", "--min-task-age must be a number of seconds from 0 to 60"),
    ("--poll-interval=0", "the task poll interval must be a number of seconds from 0.01 to 60"),
    ("--preload=json,no_such_module_xyz", "--preload names modules that are not installed: no_such_module_xyz"),
])
def test_the_command_refuses_a_bad_flag_with_its_reason(flag: str, message: str) -> None:
    """Before it starts anything: no fork server, no connection to the Runtime API."""
    proc = subprocess.run([sys.executable, str(Path(superexec.__file__)), "--insecure",
                           "--runtime-api-address=127.0.0.1:1", flag], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_flags_of_flower_superexec_that_compose_uses_parse_the_same() -> None:
    """What an executor service passes to flower-superexec, flower-app-superexec takes with the same meaning."""
    from flwr.supercore.cli.flower_superexec import _parse_args

    argv = ["--runtime-api-address=supernode-1:9094", "--root-certificates=/app/certificates/ca.crt",
            "--superexec-auth-secret-file=/app/certificates/superexec.secret", "--parent-pid=12",
            "--allow-runtime-dependency-installation"]
    theirs, ours = vars(_parse_args().parse_args(argv)), vars(parser().parse_args(argv))
    for key in ("runtime_api_address", "root_certificates", "superexec_auth_secret_file", "parent_pid",
                "runtime_dependency_install", "insecure"):
        assert ours[key] == theirs[key], key
    assert vars(parser().parse_args(["--runtime-api-address=a:1", "--insecure"]))["insecure"] is True
    assert math.isclose(parser().parse_args(["--runtime-api-address=a:1"]).min_task_age, superexec.DEFAULT_MIN_TASK_AGE)
