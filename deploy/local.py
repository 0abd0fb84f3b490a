"""Run the app's deployment on localhost: processes, ports, connections, and compose.yaml's commands.

Used by the deployment tests and by ``benchmarks/bench_deployment.py``; nothing here is imported by
the app itself (the FAB ships only ``flower_app``, ``strategies`` and ``datasets``).

Every process is started in its own session, so stopping it by its PID (``os.killpg(pid)``) also
stops the children Flower starts under it (superexec, flwr-clientapp, flwr-serverapp) and nothing
else. Each output line is time-stamped as it arrives (for the benchmarks' round breakdown).

``compose_commands`` turns the services of ``compose.yaml`` into the same commands, with the same
flags, for plain processes: container host names become 127.0.0.1, container ports free local
ports, and paths under the containers' volumes the matching local paths. The nginx services get
their configuration rendered from the same template the official image renders at start-up, with
the same translation applied to their environment. ``start_compose_deployment`` starts all of it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
EXIT_CONNECTION_ERROR = 305  # flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR
OPERATOR = "operator"  # the flwr CLI connection through operator-proxy

T = TypeVar("T")


# ----------------------------------------------------------------------------- environment
def flwr_env(home: Path) -> dict[str, str]:
    """This process's environment for a Flower process: private FLWR_HOME, no network calls, no runtime installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    return env


def flwr_executable() -> str:
    local = BIN / "flwr"
    return str(local) if local.exists() else (shutil.which("flwr") or "flwr")


def run_simulation(
    home: Path, run_config: str, num_supernodes: int = 3, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """`flwr run . --stream` with a run-config override; returns the finished process (logs in stdout)."""
    cmd = [
        flwr_executable(), "run", str(ROOT), "--stream",
        "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        "-c", run_config,
    ]
    return subprocess.run(cmd, env=flwr_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def stop_processes_of(home: Path) -> None:
    """Kill every process started with FLWR_HOME=home (the detached local SuperLink and its children)."""
    victims = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("FLWR_HOME") == str(home) and proc.pid != os.getpid():
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


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


def run_config_string(config: Mapping[str, bool | int | float | str]) -> str:
    """{'num-server-rounds': 2, 'strategy': 'fedavg'} -> "num-server-rounds=2 strategy='fedavg'" (for `flwr run -c`)."""
    def fmt(value: bool | float | str) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return "'" + value.replace("'", "\\'") + "'"
        return repr(value)

    return " ".join(f"{key}={fmt(value)}" for key, value in config.items())


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------- processes
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
        return bool(libc.prctl(36, 1 if on else 0, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class Cluster:
    """Starts processes and stops every one of them (and their children) by PID on close."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.procs: dict[str, Process] = {}
        self._members: dict[str, set[int]] = {}  # per process: the PIDs seen in its process group
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
        # Everything seen in the group so far: children that die of a SIGTERM are re-parented here (the
        # subreaper) and must be reaped after the SIGKILL, though the process that started them is gone.
        members = self._members.setdefault(name, set())
        members.update(_descendants(proc.pid), _group_members(proc.pid))
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            _reap(sorted(members - {proc.pid}))

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


def _group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (Ray's raylet and workers stay in the group of `ray start`)."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


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
    group: Cluster, connection: str, run_config: str, timeout: float, name: str = "flwr-run", stream: bool = True,
    project: Path = ROOT,
) -> Process:
    """`flwr run <project> <connection> --stream -c <run_config>`; the logs are the process's lines.

    ``project`` is the app folder `flwr run` ships (this repository by default; a benchmark may run
    another tree of the app, e.g. a baseline commit, against the same SuperLink).
    """
    args = ["run", str(project), connection, "-c", run_config]
    return flwr(group, name, [*args, "--stream"] if stream else args, timeout)


def run_id_of(proc: Process) -> int:
    hits = proc.find(r"started run \d+")
    match = re.search(r"started run (\d+)", hits[0][1]) if hits else None
    if match is None:
        raise AssertionError(f"no run ID in the output of {proc.name}:\n{proc.text()[-2000:]}")
    return int(match.group(1))


def json_output(proc: Process) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (it exits 0 even on failure)."""
    text = proc.text()
    start = text.find("{")
    if start < 0:
        raise AssertionError(f"no JSON in the output of {proc.name} (exit {proc.returncode}):\n{text[-2000:]}")
    return dict(json.loads(text[start : text.rfind("}") + 1]))


def start_local_deployment(group: Cluster, nodes: int, warm: bool = False, connection: str = "local-deploy") -> str:
    """README's insecure one-machine deployment: a SuperLink and ``nodes`` SuperNodes on partitions 0..nodes-1.

    ``warm``: each SuperNode in ``--isolation process`` beside a ``flower-app-superexec``
    (deploy/superexec.py); otherwise Flower's default, a ``flwr-clientapp`` process a message. Returns
    once every SuperNode has its node ID (and every executor its fork server); the CLI connection
    ``connection`` is written to the group's FLWR_HOME.
    """
    port = free_port()
    group.start("superlink", ["flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={port}",
                              "--disable-runtime-dependency-installation"]).wait_for("Uvicorn running", 120)
    write_connection(group.home, connection, f"127.0.0.1:{port}")
    for i in range(1, nodes + 1):
        runtime = free_port()
        group.start(f"supernode-{i}", ["flower-supernode", "--insecure", f"--superlink=127.0.0.1:{port}",
                                       *(["--isolation=process"] if warm else []), f"--port={runtime}",
                                       f"--node-config=partition-id={i - 1} num-partitions={nodes}"])
        if warm:
            group.start(f"clientapp-{i}", [*IMAGE_COMMANDS["flower-app-superexec"], "--insecure",
                                           f"--runtime-api-address=127.0.0.1:{runtime}"])
    for i in range(1, nodes + 1):
        group.procs[f"supernode-{i}"].wait_for("SuperNode ID", 300)
        if warm:
            group.procs[f"clientapp-{i}"].wait_for("Starting Flower SuperExec", 300)
    return connection


def register_supernode(group: Cluster, public_key: Path, connection: str, name: str) -> str:
    """`flwr supernode register`; returns the node ID Flower assigned."""
    proc = flwr(group, f"register-{name}", ["supernode", "register", str(public_key), connection, "--name", name,
                                            "--format", "json"], timeout=60)
    data = json_output(proc)
    if proc.returncode != 0 or not data.get("success", True):
        raise AssertionError(f"registering {public_key} failed (exit {proc.returncode}):\n{proc.text()[-2000:]}")
    return str(data.get("node-id", data.get("node_id", "")))


# --------------------------------------------------------------------------- compose.yaml
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
FLOWER_ENTRYPOINTS = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
                      "flwr/superexec": "flower-superexec"}
# Commands the Dockerfile installs from this repository (COPY ... /usr/local/bin/<name>) -> how to run them here.
IMAGE_COMMANDS = {"flower-app-superexec": [sys.executable, str(ROOT / "deploy" / "superexec.py")]}
NGINX_IMAGE = "nginx"
NGINX_TEMPLATES = "/etc/nginx/templates/"  # the official image renders *.template from here into conf.d/


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def image_name(service: Mapping[str, Any]) -> str:
    return str(service.get("image", "")).rsplit(":", 1)[0]


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
    image = image_name(service)
    if image == NGINX_IMAGE:
        return ["nginx"]
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


def service_environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    environment = service.get("environment", {}) or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): interpolate(str(v), env) for k, v in environment.items()}


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
    env: dict[str, str]  # the service's `environment`, translated like its flags
    listen: int | None  # the local port the service listens on, if it does
    ready: str  # a log line that says it serves


def nginx_executable() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).exists()), None)
    if found is None:
        raise FileNotFoundError("nginx is not installed: `apt-get install -y nginx` (Debian; .ci/run does it)")
    return found


def render_template(text: str, env: Mapping[str, str]) -> str:
    """What the official nginx image's envsubst does with a template: `${NAME}` of a defined variable
    becomes its value, everything else (nginx's own `$uri`, ...) stays. A bare `$NAME` of a defined
    variable would also be replaced there; it is refused here so both renderings agree."""
    for name in env:
        if re.search(rf"\${re.escape(name)}(?![A-Za-z0-9_])", text):
            raise ValueError(f"write ${{{name}}}, not ${name}, in an nginx template")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), m.group(0)), text)


def _nginx_files(name: str, mounts: Mapping[str, Path], env: Mapping[str, str], volumes_dir: Path) -> list[str]:
    """Render the service's templates as the official image does and write a main config like the
    image's (one worker, logs to the terminal); returns nginx's argv."""
    prefix = volumes_dir / name
    (prefix / "conf.d").mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    templates = [(t, s) for t, s in mounts.items() if t.startswith(NGINX_TEMPLATES) and t.endswith(".template")]
    if not templates:
        raise ValueError(f"{name}: no template mounted under {NGINX_TEMPLATES}")
    for target, source in templates:
        rendered = render_template(source.read_text(), env)
        (prefix / "conf.d" / Path(target).name.removesuffix(".template")).write_text(rendered)
    temp = " ".join(f"{kind}_temp_path {prefix / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log stderr notice;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    access_log /dev/stdout;\n    {temp}\n    include {prefix / 'conf.d'}/*.conf;\n}}\n"
    )
    return [nginx_executable(), "-e", "stderr", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]


def compose_commands(
    compose: Mapping[str, Any],
    env: Mapping[str, str],
    project_dir: Path,
    volumes_dir: Path,
    ports: dict[tuple[str, int], int] | None = None,
) -> dict[str, LocalService]:
    """The command of every service as a local process.

    `env` plays the shell environment of `docker compose` (for `${VAR:-default}`), `project_dir`
    the directory relative bind mounts start from, `volumes_dir` holds the named volumes (and the
    rendered nginx configurations). `ports` maps (service, container port) to a local port and is
    filled with free ports as needed. Flags and environment values are translated alike: `--host` /
    `LISTEN_HOST` become 127.0.0.1, `--port` / `LISTEN_PORT` a free port, `<service>:<port>` that
    service's local address, and a path under a volume the local path.
    """
    ports = {} if ports is None else ports
    services: Mapping[str, Mapping[str, Any]] = compose["services"]

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
        listen: list[int] = []

        def translate(key: str, value: str, *, _name: str = name, _mounts: dict[str, Path] = mounts,
                      _listen: list[int] = listen) -> str:
            if key in ("--host", "LISTEN_HOST"):
                return "127.0.0.1"
            if key in ("--port", "LISTEN_PORT"):
                _listen.append(int(local(_name, int(value)).rsplit(":", 1)[1]))
                return str(_listen[-1])
            address = re.fullmatch(r"([A-Za-z0-9_.-]+):(\d+)", value)
            if address and address.group(1) in services:
                return local(address.group(1), int(address.group(2)))
            for target, source in sorted(_mounts.items(), key=lambda kv: -len(kv[0])):
                if value == target or value.startswith(target.rstrip("/") + "/"):
                    return str(source) + value[len(target.rstrip("/")):]
            return value

        environment = {k: translate(k, v) for k, v in service_environment(service, env).items()}
        if image_name(service) == NGINX_IMAGE:
            argv = _nginx_files(name, mounts, environment, volumes_dir)
            ready = r"start worker process"
        else:
            raw = service.get("command", []) or []
            command = [interpolate(str(c), env) for c in (raw if isinstance(raw, list) else shlex.split(str(raw)))]
            entry = list(service_entrypoint(service))
            argv = IMAGE_COMMANDS.get(entry[0], entry[:1]) + entry[1:]
            for flag, value in split_flags(command):
                argv.append(flag if value is None else f"{flag}={translate(flag, value)}")
            ready = {"flower-superlink": r"Uvicorn running", "flower-supernode": r"SuperNode ID"}.get(
                argv[0], r"Starting Flower SuperExec")
        out[name] = LocalService(name, argv, environment, listen[0] if listen else None, ready)
    return out


def clone_service(compose: dict[str, Any], source: str, target: str, renames: Mapping[str, str]) -> None:
    """Add service `target` as a copy of `source` with the strings in `renames` replaced."""
    text = yaml.safe_dump(compose["services"][source])
    for old, new in renames.items():
        text = text.replace(old, new)
    compose["services"][target] = yaml.safe_load(text)


def add_compose_node(compose: dict[str, Any], number: int) -> None:
    """Add SuperNode `number` to compose (as README says: copy node 2's services and network)."""
    renames = {"supernode-2": f"supernode-{number}", "SUPERNODE_2": f"SUPERNODE_{number}",
               "NODE_2": f"NODE_{number}", "node-2": f"node-{number}"}
    clone_service(compose, "supernode-2", f"supernode-{number}", renames)
    clone_service(compose, "clientapp-2", f"clientapp-{number}", renames)
    compose.setdefault("networks", {})[f"node-{number}"] = dict(compose["networks"]["node-2"] or {})


# ------------------------------------------------------------------- the whole deployment
@dataclass
class LocalDeployment:
    """compose.yaml's deployment as local processes (started by `start_compose_deployment`)."""

    group: Cluster
    services: dict[str, LocalService]
    certs: Path  # the administrator's (make_certs.py), with ca.key
    secrets: Path  # what the services mount (prepare_host.py), never ca.key
    work: Path
    nodes: list[str]
    node_ids: dict[str, str] = field(default_factory=dict)

    def start(self, name: str) -> Process:
        service = self.services[name]
        return self.group.start(name, service.argv, env=service.env)

    def start_ready(self, name: str, timeout: float = 180) -> Process:
        proc = self.start(name)
        proc.wait_for(self.services[name].ready, timeout=timeout)
        return proc

    def address(self, name: str) -> str:
        """Where service `name` listens locally."""
        port = self.services[name].listen
        if port is None:
            raise ValueError(f"{name} listens on no port")
        return f"127.0.0.1:{port}"


def start_compose_deployment(
    group: Cluster, work: Path, num_nodes: int, node_configs: Sequence[str] | None = None,
    register: Callable[[LocalDeployment, str], str] | None = None,
) -> LocalDeployment:
    """Start compose.yaml's services as local processes, in the README's order, and return once every
    SuperNode has its node ID: certificates (make_certs.py) and the mounted files (prepare_host.py,
    owned by whoever runs this), the SuperLink, both proxies, the ServerApp executor, the operator's
    connection (`OPERATOR`, through operator-proxy; the default), each SuperNode's key registered
    through it, the SuperNodes (through fleet-proxy) and their executors. Nodes past compose.yaml's
    two are added as README says. `register(deployment, node)` replaces the registration step."""
    from deploy.make_certs import DEFAULT_HOSTS, generate
    from deploy.prepare_host import prepare

    nodes = [f"supernode-{i}" for i in range(1, num_nodes + 1)]
    certs, secrets = work / "certs", work / "secrets"
    generate(certs, list(DEFAULT_HOSTS), nodes)
    owner = (os.geteuid(), os.getegid())
    prepare(certs, secrets, work / "state", work / "outputs", nodes, server=True, owner=owner)
    compose = load_compose()
    for i in range(3, num_nodes + 1):
        add_compose_node(compose, i)
    env = {"SECRETS_DIR": str(secrets), "STATE_DIR": str(work / "state"), "OUTPUTS_DIR": str(work / "outputs"),
           "SERVER_DATA": str(work / "server-data")}
    for i in range(1, num_nodes + 1):
        env[f"SUPERNODE_{i}_NODE_CONFIG"] = (node_configs[i - 1] if node_configs
                                             else f"partition-id={i - 1} num-partitions={num_nodes}")
        env[f"NODE_{i}_DATA"] = str(work / f"data-{i}")
    services = compose_commands(compose, env, ROOT, work / "volumes")
    deployment = LocalDeployment(group, services, certs, secrets, work, nodes)
    deployment.start_ready("superlink")
    deployment.start_ready("fleet-proxy", timeout=60)
    deployment.start_ready("operator-proxy", timeout=60)
    write_connection(group.home, OPERATOR, deployment.address("operator-proxy"), certs / "ca.crt")
    deployment.start("serverapp")
    for node in nodes:
        deployment.node_ids[node] = (register(deployment, node) if register is not None
                                     else register_supernode(group, certs / "auth" / f"{node}.pub", OPERATOR, node))
    for i in range(1, num_nodes + 1):
        deployment.start(f"supernode-{i}")
        deployment.start(f"clientapp-{i}")
    for node in nodes:
        group.procs[node].wait_for(services[node].ready, timeout=300)
    return deployment
