"""Run the app through the real `flwr` CLI in simulation, and clean up what it starts (from deploy/local.py)."""

from deploy.local import flwr_env, flwr_executable, run_simulation, stop_processes_of

__all__ = ["flwr_env", "flwr_executable", "run_simulation", "stop_processes_of"]
