"""Run the app through the real `flwr` CLI in simulation, and clean up what it starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def flwr_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def flwr_executable() -> str:
    local = Path(sys.executable).parent / "flwr"
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
    return subprocess.run(cmd, env=flwr_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
