"""Run a real Flower deployment on localhost: processes, ports, connections, compose commands.

Every process is started in its own session, so stopping it by its PID (`os.killpg(pid)`) also
stops the children Flower starts under it (superexec, flwr-clientapp, flwr-serverapp) and nothing
else. Each output line is time-stamped as it arrives (for the benchmarks' round breakdown).

`compose_commands` turns the services of `compose.yaml` into the same commands, with the same
flags, for plain processes: container host names become 127.0.0.1, container ports free local
ports, and paths under the containers' volumes the matching local paths.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.flwr_utils import flwr_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
EXIT_CONNECTION_ERROR = 305  # flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deploy_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: private FLWR_HOME, no network calls, unbuffered logs."""
    return {**flwr_env(home), **(extra or {})}


def write_connection(
    home: Path,
    name: str,
    address: str,
    root_certificates: Path | None = None,
    default: bool = True,
    options: Mapping[str, int | float | str] | None = None,
) -> None:
    """Add `[superlink.<name>]` to `$FLWR_HOME/config.toml` (insecure when no root certificate).

    `options` (e.g. {"num-supernodes": 10}) make it a simulation connection to a SuperLink
    started with `--simulation` at `address`.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    text = path.read_text() if path.exists() else ""
    if default and "[superlink]\n" not in text:
        text = f'[superlink]\ndefault = "{name}"\n\n' + text
    text += f'\n[superlink.{name}]\naddress = "{address}"\n'
    text += f'root-certificates = "{root_certificates.resolve()}"\n' if root_certificates else "insecure = true\n"
    for key, value in (options or {}).items():
        text += f"options.{key} = {json.dumps(value)}\n"
    path.write_text(text)


@dataclass
class Process:
    """A started process whose merged stdout/stderr is collected line by line with arrival times."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[str]
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    _reader: threading.Thread | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.log_path.open("a") as log:
            for line in self.popen.stdout:
                stamp = time.time()
                log.write(f"{stamp:.3f} {line}")
                log.flush()
                with self._cond:
                    self.lines.append((stamp, line.rstrip("\n")))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def find(self, pattern: str, start: int = 0) -> list[tuple[float, str]]:
        regex = re.compile(pattern)
        with self._cond:
            return [(t, line) for t, line in self.lines[start:] if regex.search(line)]

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> tuple[float, str]:
        """Block until `count` lines match `pattern`; raises TimeoutError (with the log tail) otherwise."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout
        with self._cond:
            while True:
                hits = [(t, line) for t, line in self.lines if regex.search(line)]
                if len(hits) >= count:
                    return hits[count - 1]
                exited = self.popen.poll() is not None and not (self._reader and self._reader.is_alive())
                left = deadline - time.time()
                if exited or left <= 0:
                    tail = "\n".join(line for _, line in self.lines[-40:])
                    state = f"exited with {self.popen.poll()}" if exited else f"no match after {timeout:.0f}s"
                    raise TimeoutError(f"{self.name}: {state} waiting for {pattern!r}; last lines:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and its output to be read; returns the exit code."""
        code = self.popen.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code


def _set_child_subreaper(on: bool) -> bool:
    """Linux: adopt orphaned descendants, so the children of a killed process can be reaped here
    instead of lingering as zombies where PID 1 does not reap (some sandboxes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1 if on else 0, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class Cluster:
    """Starts processes and stops every one of them (and their children) by PID on close."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.procs: dict[str, Process] = {}
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._reaper = _set_child_subreaper(True)

    @property
    def home(self) -> Path:
        """The FLWR_HOME every process of this cluster shares (config.toml, installed FABs)."""
        return Path(self.env["FLWR_HOME"])

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Process:
        if name in self.procs and self.procs[name].returncode is None:
            raise RuntimeError(f"process {name} is already running")
        argv = [str(a) for a in argv]
        exe = BIN / argv[0]
        if exe.exists():
            argv[0] = str(exe)
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**self.env, **(env or {})},
            cwd=str(cwd or ROOT),
            start_new_session=True,  # own process group: killpg(pid) reaches its children only
        )
        log_path = self.workdir / "logs" / f"{name}.log"
        with log_path.open("a") as log:  # a restarted process appends to its log
            log.write(f"$ {shlex.join(argv)}\n")
        proc = Process(name, argv, popen, log_path)
        proc._reader = threading.Thread(target=proc._read, name=f"read-{name}", daemon=True)
        proc._reader.start()
        self.procs[name] = proc
        return proc

    def signal(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process group of `name` (the process and everything it started)."""
        proc = self.procs[name]
        descendants = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            _reap(descendants)

    def stop(self, name: str, grace: float = 5.0) -> int | None:
        """SIGTERM the group, then SIGKILL what is left after `grace` seconds."""
        proc = self.procs[name]
        if proc.returncode is None:
            self.signal(name, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.signal(name, signal.SIGKILL)  # children may outlive a parent that exited on SIGTERM
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def close(self, grace: float = 3.0) -> None:
        """SIGTERM every process group at once, SIGKILL what is left after `grace` seconds."""
        running = [name for name, proc in self.procs.items() if proc.returncode is None]
        for name in running:
            self.signal(name, signal.SIGTERM)
        deadline = time.time() + grace
        for name in running:
            try:
                self.procs[name].popen.wait(timeout=max(deadline - time.time(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        for name in self.procs:
            self.signal(name, signal.SIGKILL)
            try:
                self.procs[name].wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._reaper:
            _set_child_subreaper(False)

    def logs(self) -> str:
        """Every process's last lines, for assertion messages."""
        parts = []
        for name, proc in self.procs.items():
            tail = "\n".join(line for _, line in proc.lines[-25:])
            parts.append(f"----- {name} (pid {proc.pid}, exit {proc.returncode}) -----\n{tail}")
        return "\n".join(parts)


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _reap(pids: Sequence[int], timeout: float = 5.0) -> None:
    """Collect the exit status of killed descendants that were re-parented to this process."""
    deadline = time.time() + timeout
    pending = set(pids)
    while pending and time.time() < deadline:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (its parent reaps it) or already gone
                pending.discard(pid)
                continue
            if done:
                pending.discard(pid)
        if pending:
            time.sleep(0.05)


@contextmanager
def cluster(workdir: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[Cluster]:
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    group = Cluster(workdir, deploy_env(home, extra_env))
    try:
        yield group
    finally:
        group.close()


def run_config_string(config: Mapping[str, bool | int | float | str]) -> str:
    """{'num-server-rounds': 2, 'strategy': 'fedavg'} -> "num-server-rounds=2 strategy='fedavg'" (for `flwr run -c`)."""
    def fmt(value: bool | float | str) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return "'" + value.replace("'", "\\'") + "'"
        return repr(value)

    return " ".join(f"{key}={fmt(value)}" for key, value in config.items())


# ------------------------------------------------------------------------------ flwr CLI
def flwr(group: Cluster, name: str, args: Sequence[str], timeout: float) -> Process:
    """Run a `flwr` CLI command to completion as a managed process."""
    proc = group.start(name, ["flwr", *args])
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        group.stop(name)
        raise TimeoutError(f"`flwr {' '.join(args)}` did not finish in {timeout:.0f}s:\n{proc.text()[-3000:]}") from None
    return proc


def run_app(
    group: Cluster, connection: str, run_config: str, timeout: float, name: str = "flwr-run", stream: bool = True
) -> Process:
    """`flwr run <project> <connection> --stream -c <run_config>`; the logs are the process's lines."""
    args = ["run", str(ROOT), connection, "-c", run_config]
    return flwr(group, name, [*args, "--stream"] if stream else args, timeout)


def run_id_of(proc: Process) -> int:
    hits = proc.find(r"started run \d+")
    if not hits:
        raise AssertionError(f"no run ID in the output of {proc.name}:\n{proc.text()[-2000:]}")
    return int(re.search(r"started run (\d+)", hits[0][1]).group(1))  # type: ignore[union-attr]


def register_supernode(group: Cluster, public_key: Path, connection: str, name: str) -> str:
    """`flwr supernode register`; returns the node ID Flower assigned."""
    proc = flwr(group, f"register-{name}", ["supernode", "register", str(public_key), connection, "--name", name,
                                            "--format", "json"], timeout=60)
    text = proc.text()
    start = text.find("{")
    if proc.returncode != 0 or start < 0:
        raise AssertionError(f"registering {public_key} failed (exit {proc.returncode}):\n{text[-2000:]}")
    data = json.loads(text[start : text.rfind("}") + 1])
    if not data.get("success", True):
        raise AssertionError(f"registering {public_key} failed:\n{text[-2000:]}")
    return str(data.get("node-id", data.get("node_id", "")))


# --------------------------------------------------------------------------- compose.yaml
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
FLOWER_ENTRYPOINTS = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
                      "flwr/superexec": "flower-superexec"}


def load_compose(path: Path = COMPOSE_FILE) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(path.read_text())


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def dockerfile_entrypoint(path: Path = DOCKERFILE) -> list[str]:
    """The exec-form ENTRYPOINT of the Dockerfile (the last one wins, as in Docker)."""
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", path.read_text(), flags=re.MULTILINE)
    if not found:
        raise ValueError(f"{path} has no exec-form ENTRYPOINT")
    return list(json.loads(found[-1]))


def service_entrypoint(service: Mapping[str, Any]) -> list[str]:
    if "entrypoint" in service:
        entry = service["entrypoint"]
        return list(entry) if isinstance(entry, list) else shlex.split(str(entry))
    if "build" in service:
        return dockerfile_entrypoint()
    image = str(service.get("image", "")).split(":")[0]
    if image not in FLOWER_ENTRYPOINTS:
        raise ValueError(f"unknown image {service.get('image')!r}: cannot tell its entrypoint")
    return [FLOWER_ENTRYPOINTS[image]]


def split_flags(command: Sequence[str]) -> list[tuple[str, str | None]]:
    """['--a=1', '--b', '2', '--c'] -> [('--a', '1'), ('--b', '2'), ('--c', None)]."""
    out: list[tuple[str, str | None]] = []
    items = list(command)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ValueError(f"positional argument {item!r} in a compose command: use --flag=value")
        if "=" in item:
            flag, value = item.split("=", 1)
            out.append((flag, value))
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            out.append((item, items[i + 1]))
            i += 1
        else:
            out.append((item, None))
        i += 1
    return out


def volume_map(
    service: Mapping[str, Any], env: Mapping[str, str], project_dir: Path, volumes_dir: Path
) -> dict[str, Path]:
    """container path -> local path of the service's volumes.

    Bind mounts start from `project_dir` when relative; a named volume becomes `volumes_dir/<name>`.
    """
    mounts: dict[str, Path] = {}
    for entry in service.get("volumes", []) or []:
        source, target = interpolate(str(entry), env).split(":")[:2]
        if source.startswith((".", "/", "~")):
            mounts[target] = (project_dir / Path(source).expanduser()).resolve()
        else:
            mounts[target] = volumes_dir / source
            mounts[target].mkdir(parents=True, exist_ok=True)
    return mounts


@dataclass
class LocalService:
    name: str
    argv: list[str]
    env: dict[str, str]  # the service's `environment`
    listen: int | None  # the local port the service listens on, if it does


def compose_commands(
    compose: Mapping[str, object],
    env: Mapping[str, str],
    project_dir: Path,
    volumes_dir: Path,
    ports: dict[tuple[str, int], int] | None = None,
) -> dict[str, LocalService]:
    """The command of every service as a local process.

    `env` plays the shell environment of `docker compose` (for `${VAR:-default}`), `project_dir`
    the directory relative bind mounts start from, `volumes_dir` holds the named volumes. `ports`
    maps (service, container port) to a local port and is filled with free ports as needed.
    """
    ports = {} if ports is None else ports
    services: Mapping[str, Mapping[str, Any]] = compose["services"]  # type: ignore[assignment]

    def local(host: str, port: int) -> str:
        if host not in services:
            raise ValueError(f"address {host}:{port} names no compose service")
        key = (host, port)
        if key not in ports:
            ports[key] = free_port()
        return f"127.0.0.1:{ports[key]}"

    out: dict[str, LocalService] = {}
    for name, service in services.items():
        mounts = volume_map(service, env, project_dir, volumes_dir)
        raw = service.get("command", []) or []
        command = [interpolate(str(c), env) for c in (raw if isinstance(raw, list) else shlex.split(str(raw)))]
        argv = list(service_entrypoint(service))
        listen: int | None = None
        for flag, value in split_flags(command):
            if value is None:
                argv.append(flag)
                continue
            if flag == "--host":
                value = "127.0.0.1"
            elif flag == "--port":
                listen = int(local(name, int(value)).rsplit(":", 1)[1])
                value = str(listen)
            elif flag in ("--superlink", "--runtime-api-address"):
                host, port = value.rsplit(":", 1)
                value = local(host, int(port))
            else:
                for target, source in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                    if value == target or value.startswith(target.rstrip("/") + "/"):
                        value = str(source) + value[len(target.rstrip("/")):]
                        break
            argv.append(f"{flag}={value}")
        environment = service.get("environment", {}) or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        out[name] = LocalService(name, argv, {k: str(v) for k, v in environment.items()}, listen)
    return out


def clone_service(compose: dict, source: str, target: str, renames: Mapping[str, str]) -> None:  # type: ignore[type-arg]
    """Add service `target` as a copy of `source` with the strings in `renames` replaced."""
    text = yaml.safe_dump(compose["services"][source])
    for old, new in renames.items():
        text = text.replace(old, new)
    compose["services"][target] = yaml.safe_load(text)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------ the oracle
def replay(run_config: Mapping[str, bool | int | float | str], node_configs: Sequence[Mapping[str, object]],
           output_dir: Path) -> Path:
    """The same run, uninterrupted and in this process: the app's own strategy and client code
    driven by `flower_app.inprocess.run_rounds`, no SuperLink, no network. Writes its outputs
    (metrics.csv, model.pt) to `output_dir`/<run-name> (default "replay") and returns that folder; a deployment
    must end where this does.
    """
    from flwr.common import RecordDict

    from flower_app.client_app import FlowerClient
    from flower_app.config import parse_run_config
    from flower_app.data import client_data
    from flower_app.inprocess import run_rounds
    from flower_app.server_app import build_strategy

    cfg = parse_run_config({"run-name": "replay", **run_config, "output-dir": str(output_dir)})
    strategy, rounds = build_strategy(cfg)
    clients = [FlowerClient(cfg, client_data(cfg, dict(nc)), RecordDict()) for nc in node_configs]
    run_rounds(strategy, clients, rounds)
    return output_dir / cfg.run_name


def max_weight_difference(model_a: Path, model_b: Path) -> float:
    """Largest absolute difference between two saved state_dicts (which must hold the same keys)."""
    import torch

    a = torch.load(model_a, map_location="cpu", weights_only=True)
    b = torch.load(model_b, map_location="cpu", weights_only=True)
    if set(a) != set(b):
        raise AssertionError(f"different parameters: {sorted(set(a) ^ set(b))}")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
