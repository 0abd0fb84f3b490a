#!/usr/bin/env python
"""``flower-app-superexec``: Flower's SuperExec with ClientApp processes forked warm.

Flower 1.42's ``flower-superexec`` starts a new ``flwr-clientapp`` process for every message a
SuperNode receives. On a small machine that costs seconds a message (Python, Flower's imports,
torch) and, with several SuperNodes on one host, most of a round.

This executor does the same job, with the same flags, for a SuperNode in ``--isolation process``:
it acquires tasks from the SuperNode's Runtime API and starts one process per task. A ClientApp
task's process is forked from a long-lived *fork server* (``multiprocessing``'s ``forkserver``)
that imported torch and Flower's ClientApp runtime once, when the executor started. The child runs
Flower's own ``run_clientapp`` (the body of ``flwr-clientapp``) with the task's token, so

- every message still runs in a fresh process: the fork server never runs app code, and no state
  passes from one message to the next (the ClientApp's code comes with each run's FAB, as before);
- the SuperNode's side is untouched: its TLS to the SuperLink, SuperNode authentication, the TLS
  of its Runtime API (``--root-certificates``) and SuperExec authentication
  (``--superexec-auth-secret-file``) work as with ``flower-superexec``;
- a crash is contained: a ClientApp process that dies is reported by the SuperNode like any failed
  message; a fork server that dies is started again (a task launched meanwhile waits for its
  imports); a warm start that fails for any reason starts the task the cold way, as
  ``flower-superexec`` does;
- other task types (``flwr-serverapp`` and the rest) start the cold way.

Run it where ``flower-superexec`` would run (``compose.yaml``'s ``clientapp-N`` services, or next to
``flower-supernode --isolation process``)::

    flower-supernode --insecure --superlink 127.0.0.1:8000 --isolation process --port 9094 ...
    python deploy/superexec.py --insecure --runtime-api-address 127.0.0.1:9094

The executor imports nothing of the app (only Flower, and what ``--preload`` names), so it never
shadows the code a run ships.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging import ERROR, INFO, WARNING
from multiprocessing.process import BaseProcess
from typing import Any

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates

# What the fork server imports before it forks anything: torch (most of a cold ClientApp's start),
# NumPy, and Flower's ClientApp runtime with the legacy client API the app's NumPyClient uses.
DEFAULT_PRELOAD = ("numpy", "torch", "flwr.supernode.runtime.run_clientapp", "flwr.client", "flwr.clientapp",
                   "flwr.common")
# Seconds between AcquireTask calls (flower-superexec: 1.0). No slower to start a task than a shorter
# interval, as long as it is at most DEFAULT_MIN_TASK_AGE; an idle node's executor and SuperNode
# then spend about 1.8% of a core on polling, measured (0.2 s: 2.3%, 1.0 s: 0.65%).
DEFAULT_POLL_INTERVAL = 0.3
# A SuperNode creates a message's task before it has pulled the message's arrays from the SuperLink
# (flwr/supernode/start_client_internal.py); a ClientApp that asks for them too early waits out
# Flower's pull back-off (1 s, then 2, 4, ...). A cold flwr-clientapp never asks that early (its
# start takes seconds); a warm one would, half the time. So a warm start waits until the task is this
# old: the default job's messages were complete 0.15-0.3 s after the SuperNode logged "Receiving".
DEFAULT_MIN_TASK_AGE = 0.3
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # the same variable flower-superexec reads
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # what SuperExec auth signs (as flower-superexec)
WARM_TASK_TYPES = frozenset({TaskType.CLIENT_APP})
# The modules this file imports. multiprocessing runs the main script's top level again in every
# process it starts (Python 3.11's fork server does not preload ``__main__``); with these preloaded,
# that costs nothing.
OWN_IMPORTS = tuple(sorted({module for obj in list(globals().values())
                            if (module := getattr(obj, "__module__", None) or "").startswith("flwr")}))


def run_clientapp_task(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None,
                       parent_pid: int | None, runtime_dependency_install: bool) -> None:
    """The body of a warm ClientApp process: exactly what ``flwr-clientapp --token ...`` runs.

    Logs the process's wall-clock and CPU seconds when it ends (Flower's ``run_clientapp`` ends the
    process with ``sys.exit``).
    """
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    started, cpu = time.monotonic(), time.process_time()
    try:
        run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=insecure,
                      certificates=certificates, parent_pid=parent_pid,
                      runtime_dependency_install=runtime_dependency_install)
    finally:
        log(INFO, "Warm ClientApp process %d: %.2f s, %.2f s CPU", os.getpid(), time.monotonic() - started,
            time.process_time() - cpu)


def _ready() -> None:
    """The fork server's first child: forked once its imports are done."""


@dataclass
class _Child:
    process: BaseProcess
    task_id: int
    started: float


@dataclass
class WarmExecutor:
    """Flower's ``Executor`` protocol: ClientApp tasks forked from a warm fork server, the rest cold.

    ``warm=False`` starts every task as ``flower-superexec`` does (a new ``flwr-clientapp`` process).
    """

    preload: Sequence[str] = DEFAULT_PRELOAD
    warm: bool = True
    target: Callable[..., None] = run_clientapp_task  # what a warm process runs (tests give their own)
    cold: SubprocessExecutor = field(default_factory=SubprocessExecutor)
    children: list[_Child] = field(default_factory=list)
    warm_starts: int = 0
    cold_starts: int = 0

    def __post_init__(self) -> None:
        missing = [name for name in self.preload if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"--preload names modules that are not installed: {', '.join(missing)}")
        self._context: Any = None
        if self.warm:
            if "forkserver" not in multiprocessing.get_all_start_methods():
                log(WARNING, "This platform has no fork server: every ClientApp process starts cold")
                self.warm = False
            else:
                self._context = multiprocessing.get_context("forkserver")
                self._context.set_forkserver_preload([*self.preload, *OWN_IMPORTS])
                self.ensure_server(wait=True)

    # -- Flower's Executor protocol -------------------------------------------------------------
    # Capacity is Flower's subprocess executor's: no gate, a warm start is a process like a cold one.
    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        return self.cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                               root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        self.cold.wait_for_capacity(task_type, fab_hash=fab_hash, insecure=insecure,
                                    root_certificates_path=root_certificates_path)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if self.warm and spec.task_type in WARM_TASK_TYPES:
            try:
                self._launch_warm(spec)
                self.warm_starts += 1
                return LaunchResult.accepted()
            except Exception as err:  # noqa: BLE001 - any failure of the warm path falls back to a cold start
                log(WARNING, "Warm start of task %d failed (%s: %s); starting it cold", spec.task_id,
                    type(err).__name__, err)
        self.cold_starts += 1
        return self.cold.launch(spec)

    def reconcile(self) -> None:
        """Reap finished ClientApp processes; start the fork server again if it died."""
        still = []
        for child in self.children:
            code = child.process.exitcode
            if code is None:
                still.append(child)
                continue
            level = INFO if code == 0 else WARNING
            log(level, "Task %d: ClientApp process %d ended with exit code %d after %.2f s", child.task_id,
                child.process.pid or -1, code, time.monotonic() - child.started)
            child.process.close()
        self.children = still
        if self.warm:
            try:
                self.ensure_server()
            except Exception as err:  # noqa: BLE001 - the next launch falls back to a cold start
                log(ERROR, "Cannot start the fork server (%s: %s)", type(err).__name__, err)

    def close(self) -> None:
        """Nothing to release: ClientApp processes end with their task, the fork server with this process."""

    # -- the warm path -----------------------------------------------------------------------------
    def ensure_server(self, wait: bool = False) -> None:
        """Start the fork server, or start it again if it died (it then imports ``preload`` anew).

        ``wait``: return once a new server has finished its imports (it forks a first, empty process).
        """
        before = self.server_pid
        started = time.monotonic()
        multiprocessing.forkserver.ensure_running()
        if self.server_pid == before:
            return
        if before is not None:
            log(WARNING, "The fork server %d ended; started fork server %d", before, self.server_pid)
        if wait:
            probe = self._context.Process(target=_ready, name="flower-app-superexec-ready")
            probe.start()
            probe.join()
            log(INFO, "Fork server %d ready: imported %s in %.1f s", self.server_pid, ", ".join(self.preload),
                time.monotonic() - started)

    @property
    def server_pid(self) -> int | None:
        return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]

    def _launch_warm(self, spec: ExecutionSpec) -> None:
        certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
        process = self._context.Process(
            target=self.target, name=f"flwr-clientapp-task-{spec.task_id}",
            kwargs={"runtime_api_address": spec.runtime_api_address, "token": spec.token,
                    "insecure": spec.insecure, "certificates": certificates, "parent_pid": spec.parent_pid,
                    "runtime_dependency_install": spec.runtime_dependency_install})
        process.start()
        self.children.append(_Child(process, spec.task_id, time.monotonic()))


def launch_delay(pending_at: str, min_age: float, now: datetime | None = None) -> float:
    """Seconds to wait before starting a task created at ``pending_at`` (ISO 8601) so it is ``min_age`` old.

    Never more than ``min_age`` (a clock ahead of this one, or a time that does not parse, waits exactly
    ``min_age``), never less than 0.
    """
    if min_age <= 0:
        return 0.0
    try:
        created = datetime.fromisoformat(pending_at)
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        age = ((now or datetime.now(UTC)) - created).total_seconds()
    except (TypeError, ValueError):
        return min_age
    if not math.isfinite(age) or age < 0:
        return min_age
    return max(0.0, min_age - age)


def poll_interval(value: float | None) -> float:
    """The flag, else ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, else DEFAULT_POLL_INTERVAL; within flower-superexec's 0.01-60 s."""
    raw: Any = value if value is not None else os.environ.get(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL)
    try:
        interval = float(raw)
    except (TypeError, ValueError):
        interval = math.nan
    if not (math.isfinite(interval) and 0.01 <= interval <= 60.0):
        raise ValueError(f"the task poll interval must be a number of seconds from 0.01 to 60, got {raw!r} "
                         f"(--poll-interval or {POLL_INTERVAL_ENV})")
    return interval


def min_task_age(value: float) -> float:
    """``--min-task-age``: a number of seconds from 0 to 60."""
    if not (math.isfinite(value) and 0.0 <= value <= 60.0):
        raise ValueError(f"--min-task-age must be a number of seconds from 0 to 60, got {value!r}")
    return value


def run(args: argparse.Namespace) -> None:
    """The SuperExec loop (as ``flower-superexec``'s): acquire a task, launch it, sleep, again."""
    try:
        interval = poll_interval(args.poll_interval)
        min_age = min_task_age(args.min_task_age)
        executor = WarmExecutor(preload=[m for m in args.preload.split(",") if m], warm=not args.cold)
        secret = (load_superexec_auth_secret(secret_file=args.superexec_auth_secret_file)
                  if args.superexec_auth_secret_file else None)
    except ValueError as err:
        flwr_exit(ExitCode.SUPEREXEC_INVALID_PLUGIN_CONFIG, f"flower-app-superexec: {err}")
    interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=AUTH_METHODS))
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())
    register_signal_handlers(event_type=EventType.RUN_SUPEREXEC_LEAVE, exit_message="SuperExec terminated gracefully.",
                             exit_handlers=[client.close, executor.close])
    plugin = AutoExecPlugin(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                            root_certificates_path=args.root_certificates,
                            runtime_dependency_install=args.runtime_dependency_install, executor=executor)
    log(INFO, "Starting Flower SuperExec (flower-app-superexec: ClientApp processes %s, polling every %.2f s)",
        "forked from a warm fork server" if executor.warm else "started cold", interval)
    due: list[tuple[float, str, Any]] = []  # (monotonic time, token, task) of acquired, not yet started tasks

    def start(token: str, task: Any) -> None:
        result = plugin.launch_task(token=token, task=task)
        if result.status != "accepted":
            log(ERROR, "Task %d was not launched (%s): %s", task.task_id, result.status,
                result.message or "no reason given")

    try:
        while True:
            executor.reconcile()
            now = time.monotonic()
            for entry in [e for e in due if e[0] <= now]:
                due.remove(entry)
                start(entry[1], entry[2])
            types, fab_hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            response = client.AcquireTask(AcquireTaskRequest(supported_task_types=types,
                                                             agentapp_fab_hashes=fab_hashes))
            if response.HasField("task") and response.token:
                task = response.task
                wait = (launch_delay(task.pending_at, min_age)
                        if executor.warm and task.type in WARM_TASK_TYPES else 0.0)
                if wait > 0:
                    due.append((time.monotonic() + wait, response.token, task))
                else:
                    start(response.token, task)
            next_due = min((e[0] for e in due), default=math.inf) - time.monotonic()
            time.sleep(max(0.0, min(interval, next_due)))
    finally:
        client.close()
        executor.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flower-app-superexec",
        description="Flower's SuperExec for a SuperNode in --isolation process, with every ClientApp process "
                    "forked from a warm fork server (same flags as flower-superexec, plus --preload, --cold, "
                    "--poll-interval).")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's (or SuperLink's) Runtime API")
    p.add_argument("--insecure", action="store_true", help="connect to the Runtime API without TLS")
    p.add_argument("--root-certificates", metavar="ROOT_CERT", help="CA certificate of the Runtime API's TLS")
    p.add_argument("--superexec-auth-secret-file", help="the secret for SuperExec authentication")
    p.add_argument("--parent-pid", type=int, help="exit when this process exits")
    p.add_argument("--allow-runtime-dependency-installation", dest="runtime_dependency_install",
                   action="store_true", help="let ClientApps install the app's dependencies (off by default)")
    p.add_argument("--preload", default=",".join(DEFAULT_PRELOAD),
                   help="comma-separated modules the fork server imports once (default: %(default)s)")
    p.add_argument("--cold", action="store_true", help="start every ClientApp cold, as flower-superexec does")
    p.add_argument("--min-task-age", type=float, default=DEFAULT_MIN_TASK_AGE,
                   help="seconds a ClientApp task must have waited before it starts warm, so that its SuperNode "
                        "has pulled the message (default: %(default)s; 0: start at once)")
    p.add_argument("--poll-interval", type=float, default=None,
                   help=f"seconds between task polls (default: ${POLL_INTERVAL_ENV}, else {DEFAULT_POLL_INTERVAL})")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
