"""Federated preprocessing: accuracy with each node's own statistics vs merged statistics vs pooled training,
and the cost of the statistics round.

Part 1 (accuracy). breast-cancer split non-IID among 3 nodes (`sorted`: each node holds one range of the
label, so its feature statistics differ from the pooled ones). The same FedAvg (an MLP, plain SGD, the
library's transforms: `datasets.preprocessing`) runs with:

* ``local``: each node standardizes with its own statistics; the server standardizes its held-out split with
  its own (what owners with their own files do without an agreement);
* ``federated``: every node and the server apply the transform of the merged statistics (`feature_stats`,
  `merge_stats`, `transform_from_stats`: what the statistics round computes);
* ``central``: one model trained on the pooled, pooled-standardized training data (the same number of
  epochs as a node trains in all rounds).

Part 2 (cost). The statistics round of the app itself, in-process (`flower_app.inprocess.InProcessGrid` and
`server_app.run_server`): seconds and bytes received, with plain aggregation and with SecAgg+, against one
training round of the same run.

    python -m benchmarks.bench_preprocessing [--seeds 5] [--rounds 20]

Prints tables and writes benchmarks/results/preprocessing.csv and preprocessing_cost.csv.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from datasets import PartitionOptions, SourceOptions, feature_stats, load_partition, load_source, merge_stats
from datasets.preprocessing import transform_from_stats

RESULTS = Path(__file__).resolve().parent / "results"


def _mlp(features: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 2))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _standardized(x: torch.Tensor, stats: Any) -> torch.Tensor:
    return transform_from_stats(stats, "standardize").apply(x)


def accuracy_run(seed: int, rounds: int, epochs: int, nodes: int = 3) -> dict[str, float]:
    """Held-out accuracy of local, federated and central preprocessing for one seed."""
    source = load_source("breast-cancer", SourceOptions(normalization="none", seed=seed))
    parts = [load_partition(source, "sorted", PartitionOptions(num_partitions=nodes, seed=seed), i)[0]
             for i in range(nodes)]
    own = [feature_stats(p.x) for p in parts]
    merged = merge_stats(own)
    test = source.test
    inputs = {
        "local": ([_standardized(p.x, s) for p, s in zip(parts, own)], _standardized(test.x, feature_stats(test.x))),
        "federated": ([_standardized(p.x, merged) for p in parts], _standardized(test.x, merged)),
    }
    out: dict[str, float] = {}
    for mode, (xs, test_x) in inputs.items():
        model = _mlp(test.x.shape[1], seed)
        for rnd in range(rounds):
            start = [p.detach().clone() for p in model.parameters()]
            new, weights = [], []
            for i, (x, p) in enumerate(zip(xs, parts)):
                for w, s in zip(model.parameters(), start):
                    w.data.copy_(s)
                _train(model, x, p.y, epochs, seed * 1000 + rnd * 10 + i)
                new.append([w.detach().clone() for w in model.parameters()])
                weights.append(len(p))
            total = sum(weights)
            for j, w in enumerate(model.parameters()):
                w.data.copy_(sum(n * ws[j] for n, ws in zip(weights, new)) / total)
        out[mode] = _accuracy(model, test_x, test.y)
    pooled_x = torch.cat([p.x for p in parts])
    pooled_y = torch.cat([p.y for p in parts])
    model = _mlp(test.x.shape[1], seed)
    _train(model, _standardized(pooled_x, merged), pooled_y, rounds * epochs, seed)
    out["central"] = _accuracy(model, _standardized(test.x, merged), test.y)
    return out


def cost_run(secure: bool, out: Path) -> dict[str, float]:
    """The app's statistics round in-process: its seconds and bytes, and one training round's, of the same run."""
    from flwr.app import Context, RecordDict

    from flower_app import client_app
    from flower_app.config import AppConfig
    from flower_app.inprocess import InProcessGrid
    from flower_app.server_app import run_server

    rc = AppConfig().to_run_config()
    rc.update({
        "num-server-rounds": 1, "output-dir": str(out), "run-name": "secure" if secure else "plain", "model": "mlp",
        "hidden-size": 32, "local-epochs": 1, "num-partitions": 3, "min-fit-clients": 3, "min-available-clients": 3,
        "dataset": "breast-cancer", "partitioner": "sorted", "preprocessing": "federated", "data-cache": False,
        "fraction-evaluate": 0.0, "secure-aggregation": secure, "send-delta": secure,
    })
    grid = InProcessGrid(client_app.app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], rc)
    strategy = run_server(grid, Context(1, 0, {}, RecordDict(), rc))
    summary = strategy.statistics.summary  # type: ignore[union-attr]
    metrics = pd.read_csv(out / str(rc["run-name"]) / "metrics.csv")
    last = metrics.iloc[-1]
    return {
        "secure_aggregation": secure, "stats_seconds": summary["seconds"], "stats_bytes_received": summary["bytes_received"],
        "train_round_seconds": float(last["seconds"]), "train_round_bytes_received": float(last["bytes_received"]),
        "train_round_bytes_sent": float(last["bytes_sent"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"uptime: {load}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        result = accuracy_run(seed, args.rounds, args.epochs)
        rows.append({"seed": seed, "rounds": args.rounds, "local_epochs": args.epochs, **result})
    frame = pd.DataFrame(rows)
    frame.to_csv(RESULTS / "preprocessing.csv", index=False)
    summary = frame[["local", "federated", "central"]].agg(["mean", "std", "min"]).T
    print(f"\nbreast-cancer, 3 nodes, sorted split, FedAvg {args.rounds} rounds x {args.epochs} epoch(s), "
          f"{args.seeds} seeds: held-out accuracy")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"federated - local: {(frame['federated'] - frame['local']).mean():+.4f} (mean over seeds); "
          f"central - federated: {(frame['central'] - frame['federated']).mean():+.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        cost = pd.DataFrame([cost_run(False, Path(tmp)), cost_run(True, Path(tmp))])
    cost["uptime"] = load
    cost.to_csv(RESULTS / "preprocessing_cost.csv", index=False)
    print("\nthe statistics round vs one training round (in-process, 3 nodes, MLP 32 hidden)")
    print(cost.drop(columns=["uptime"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\n{time.perf_counter() - start:.0f} s; uptime after: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}")


if __name__ == "__main__":
    main()
