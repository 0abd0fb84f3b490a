"""Oracles for the deployment tests: the same run replayed in this process, and model comparison.

Starting processes, connections and compose.yaml's commands live in `deploy/local.py`, which the
benchmarks use too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


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
