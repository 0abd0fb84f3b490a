"""Learning: the default federated job against the same model trained centrally.

Federated: digits, 10 clients, Dirichlet(alpha=0.5) label skew, FedAvg, 20 rounds x 2 local
epochs (the default run config), driven in-process by `flower_app.inprocess.run_rounds` through the
real strategy shell and NumPyClients. Central: the same model, initialisation, optimizer, learning
rate and batch size, trained on the pooled training data of all clients for the same number of
epochs (rounds x local epochs), evaluated on the same held-out test set.

With ``--flwr`` it also runs the default job for real (``flwr run . --stream`` with 10 simulated
SuperNodes) and reports its wall time and final accuracy.

Run: ``python -m benchmarks.bench_learning [--rounds 20] [--clients 10] [--alpha 0.5] [--flwr]``.
Writes ``benchmarks/results/learning.csv`` and ``learning.png``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from flwr.common import RecordDict

from flower_app.client_app import FlowerClient
from flower_app.config import parse_run_config
from flower_app.data import client_data, model_info, server_source
from flower_app.inprocess import run_rounds
from flower_app.server_app import build_strategy
from flower_app.task import TrainOptions, build_model, evaluate, make_loader, train

RESULTS = Path(__file__).resolve().parent / "results"


def federated(rounds: int, clients: int, alpha: float, out: Path) -> tuple[pd.DataFrame, float]:
    cfg = parse_run_config({
        "num-server-rounds": rounds, "dirichlet-alpha": alpha, "output-dir": str(out), "run-name": "federated",
        "min-available-clients": clients, "min-fit-clients": clients, "min-evaluate-clients": clients,
    })
    strategy, _ = build_strategy(cfg)
    fleet = [FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": clients}), RecordDict()) for i in range(clients)]
    start = time.perf_counter()
    run_rounds(strategy, fleet, rounds)
    seconds = time.perf_counter() - start
    pooled = sum(len(c.data.train) for c in fleet)
    frame = pd.read_csv(out / "federated" / "metrics.csv")
    frame["pooled_train_examples"] = pooled
    return frame, seconds


def central(rounds: int, clients: int, alpha: float) -> tuple[list[float], float]:
    """Centralized ceiling: the pooled client training data, same model and hyper-parameters."""
    cfg = parse_run_config({"dirichlet-alpha": alpha})
    source = server_source(cfg)
    parts = [client_data(cfg, {"partition-id": i, "num-partitions": clients}) for i in range(clients)]
    x = torch.cat([p.train.x for p in parts])
    y = torch.cat([p.train.y for p in parts])
    info = model_info(source)
    model = build_model(cfg.model, info, cfg.hidden_size, seed=cfg.seed)
    test = make_loader(source.test.x, source.test.y, 256, shuffle=False)
    accuracies = []
    start = time.perf_counter()
    for epoch in range(rounds * cfg.local_epochs):
        loader = make_loader(x, y, cfg.batch_size, shuffle=True, seed=epoch)
        train(model, loader, info.task, TrainOptions(epochs=1, learning_rate=cfg.learning_rate), torch.device("cpu"))
        accuracies.append(evaluate(model, test, info.task, torch.device("cpu"))[1] or 0.0)
    return accuracies, time.perf_counter() - start


def flwr_default_job(clients: int) -> tuple[float, float]:
    """Wall time and final centralized accuracy of the README's default job through `flwr run`."""
    from deploy.local import run_simulation, stop_processes_of

    with tempfile.TemporaryDirectory() as tmp:
        home, out = Path(tmp) / "home", Path(tmp) / "out"
        home.mkdir()
        start = time.perf_counter()
        proc = run_simulation(home, f"output-dir='{out}' run-name='default'", num_supernodes=clients, timeout=1800)
        seconds = time.perf_counter() - start
        stop_processes_of(home)
        metrics = out / "default" / "metrics.csv"
        if not metrics.exists():
            raise RuntimeError(f"the default job wrote no metrics:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return seconds, float(pd.read_csv(metrics)["central_accuracy"].iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--flwr", action="store_true", help="also time the default job through flwr run")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fed, fed_seconds = federated(args.rounds, args.clients, args.alpha, Path(tmp))
    cen, cen_seconds = central(args.rounds, args.clients, args.alpha)
    fed_final = float(fed["central_accuracy"].iloc[-1])
    cen_final = cen[-1]
    rows = [
        {"setting": "federated (in-process)", "rounds": args.rounds, "clients": args.clients, "alpha": args.alpha,
         "final_accuracy": fed_final, "best_accuracy": float(fed["central_accuracy"].max()), "seconds": fed_seconds},
        {"setting": "central (pooled data)", "rounds": args.rounds, "clients": args.clients, "alpha": args.alpha,
         "final_accuracy": cen_final, "best_accuracy": max(cen), "seconds": cen_seconds},
    ]
    if args.flwr:
        seconds, accuracy = flwr_default_job(args.clients)
        rows.append({"setting": "federated (flwr run, default job)", "rounds": 20, "clients": args.clients, "alpha": 0.5,
                     "final_accuracy": accuracy, "best_accuracy": float("nan"), "seconds": seconds})
    table = pd.DataFrame(rows)
    table["gap_to_central_points"] = 100 * (cen_final - table["final_accuracy"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    table.to_csv(RESULTS / "learning.csv", index=False)
    fed.to_csv(RESULTS / "learning_rounds.csv", index=False)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(fed["round"], fed["central_accuracy"], marker=".", label="federated (FedAvg, test set)")
    epochs_per_round = parse_run_config({}).local_epochs
    ax.plot([(e + 1) / epochs_per_round for e in range(len(cen))], cen, label="central, same epochs")
    ax.set_xlabel("round (central: epochs / local epochs)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {args.clients} clients, Dirichlet {args.alpha}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "learning.png", dpi=100)
    print(f"wrote {RESULTS / 'learning.csv'} and learning.png")


if __name__ == "__main__":
    main()
