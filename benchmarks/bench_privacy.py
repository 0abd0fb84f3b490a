"""Privacy figures: accuracy against epsilon under DP, and the cost of SecAgg+ per round.

Run from the repository root::

    python -m benchmarks.bench_privacy                  # both parts
    python -m benchmarks.bench_privacy --part accuracy  # digits, 20 clients, several noise multipliers
    python -m benchmarks.bench_privacy --part secagg    # seconds per round, 1M and 10M parameters

Both parts run the real ServerApp and ClientApp code (`flower_app.server_app.run_server`, the
project's strategy, `FlowerClient` with its mods) through `InProcessGrid`, which hands every
message to the clients one at a time in this process: no Ray, no SuperLink, so the numbers
measure the app and the protocol rather than the runtime's polling.

accuracy: digits, 20 clients (Dirichlet 0.5), an MLP, central DP (``dp-mode=central-server``,
fixed clipping) for each noise multiplier, and the same run without DP. Writes
``results/privacy_accuracy_epsilon.csv`` (one row per run and round: epsilon at delta 1e-5,
centralized accuracy) and ``results/privacy_accuracy_epsilon.png``.

secagg: an MLP on digits widened to about 1M and 10M parameters, 3 clients, with and without
``secure-aggregation``; seconds per round are the strategy's own round timer (sampling to the
end of the round, centralized evaluation included, federated evaluation off), rounds after the
first. Writes ``results/privacy_secagg_seconds.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from flwr.app import Context, RecordDict

from flower_app import client_app
from flower_app.config import AppConfig
from flower_app.inprocess import InProcessGrid
from flower_app.server_app import run_server, server_fn

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_privacy")


def run_app(run_config: dict[str, Any], num_clients: int) -> pd.DataFrame:
    """One in-process run of the app; returns its metrics.csv."""
    nodes = [{"partition-id": i, "num-partitions": num_clients} for i in range(num_clients)]
    grid = InProcessGrid(client_app.app, nodes, run_config)
    run_server(grid, Context(1, 0, {}, RecordDict(), run_config), server_fn)
    return pd.read_csv(Path(str(run_config["output-dir"])) / str(run_config["run-name"]) / "metrics.csv")


def config(out: Path, **overrides: Any) -> dict[str, Any]:
    rc = AppConfig().to_run_config()
    rc.update({"output-dir": str(out), "run-name": "run", "fraction-evaluate": 0.0, "checkpoint-every": 1000})
    rc.update(overrides)
    return rc


# ------------------------------------------------------------------------ accuracy vs epsilon
def accuracy_vs_epsilon(noise_multipliers: list[float], rounds: int, work: Path) -> pd.DataFrame:
    common = {
        "num-server-rounds": rounds, "num-partitions": 20, "min-fit-clients": 10, "min-available-clients": 20,
        "fraction-fit": 0.5, "model": "mlp", "hidden-size": 16, "local-epochs": 2, "batch-size": 16,
        "learning-rate": 0.1, "dp-clipping-norm": 1.0, "dp-delta": 1e-5,
    }
    frames = []
    for z in [0.0, *noise_multipliers]:
        label = "no DP" if z == 0 else f"z={z:g}"
        dp = {} if z == 0 else {"dp-mode": "central-server", "dp-noise-multiplier": z}
        start = time.perf_counter()
        frame = run_app(config(work / label.replace("=", ""), **common, **dp), num_clients=20)
        frame = frame[frame["round"] > 0].assign(run=label, noise_multiplier=z)
        if "epsilon" not in frame:
            frame["epsilon"] = float("inf")
        frames.append(frame[["run", "noise_multiplier", "round", "epsilon", "central_accuracy", "central_loss"]])
        logger.info("%s: final accuracy %.4f, epsilon %.3f (%.0fs)", label, frame["central_accuracy"].iloc[-1],
                    frame["epsilon"].iloc[-1], time.perf_counter() - start)
    return pd.concat(frames, ignore_index=True)


def plot_accuracy(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in frame.groupby("run", sort=False):
        if runs["noise_multiplier"].iloc[0] == 0:
            ax.axhline(runs["central_accuracy"].iloc[-1], color="black", linestyle="--",
                       label=f"no DP (final, {len(runs)} rounds)")
            continue
        ax.plot(runs["epsilon"], runs["central_accuracy"], marker=".", label=str(label))
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("centralized accuracy")
    ax.set_title("digits, 20 clients, 10 a round, central DP-FedAvg (C = 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- SecAgg+ seconds/round
def hidden_for(params: int) -> int:
    """MLP width whose 64 -> h -> h -> 10 network has about ``params`` parameters."""
    h = 1
    while 64 * h + h + h * h + h + 10 * h + 10 < params:
        h += 1
    return h


def secagg_seconds(sizes: list[int], rounds: int, work: Path) -> pd.DataFrame:
    rows = []
    for size in sizes:
        hidden = hidden_for(size)
        for secure in (False, True):
            rc = config(
                work / f"{size}-{secure}", **{
                    "num-server-rounds": rounds, "num-partitions": 3, "min-fit-clients": 3, "min-available-clients": 3,
                    "model": "mlp", "hidden-size": hidden, "local-epochs": 1, "send-delta": True,
                    "secure-aggregation": secure,
                },
            )
            frame = run_app(rc, num_clients=3)
            trained = frame[frame["round"] > 1]  # the first round pays for imports and first-touch
            params = 64 * hidden + hidden + hidden * hidden + hidden + 10 * hidden + 10
            rows.append({
                "parameters": params, "secure_aggregation": secure, "clients": 3, "rounds": len(trained),
                "seconds_per_round": float(trained["seconds"].mean()), "updated": bool(trained["updated"].all()),
            })
            logger.info("%d params, secagg=%s: %.2f s/round", params, secure, rows[-1]["seconds_per_round"])
    table = pd.DataFrame(rows)
    base = table[~table["secure_aggregation"]].set_index("parameters")["seconds_per_round"]
    table["overhead_x"] = [r.seconds_per_round / base[r.parameters] for r in table.itertuples()]
    return table


def plot_secagg(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(table["parameters"].unique())
    width = 0.35
    for offset, secure in ((-width / 2, False), (width / 2, True)):
        values = [float(table[(table["parameters"] == s) & (table["secure_aggregation"] == secure)]["seconds_per_round"].iloc[0])
                  for s in sizes]
        ax.bar([i + offset for i in range(len(sizes))], values, width, label="SecAgg+" if secure else "plain")
    ax.set_xticks(range(len(sizes)), [f"{s / 1e6:.1f}M params" for s in sizes])
    ax.set_ylabel("seconds per round (3 clients, in-process)")
    ax.set_title("cost of secure aggregation")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "accuracy", "secagg"), default="all")
    parser.add_argument("--noise-multipliers", default="0.3,0.6,1.0,2.0", help="comma-separated z values")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the accuracy runs")
    parser.add_argument("--secagg-rounds", type=int, default=3, help="rounds per SecAgg+ measurement (first excluded)")
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated parameter counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("flwr",):
        logging.getLogger(name).setLevel(logging.WARNING)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.part in ("all", "accuracy"):
            zs = [float(z) for z in args.noise_multipliers.split(",")]
            frame = accuracy_vs_epsilon(zs, args.rounds, work / "accuracy")
            frame.to_csv(RESULTS / "privacy_accuracy_epsilon.csv", index=False)
            plot_accuracy(frame, RESULTS / "privacy_accuracy_epsilon.png")
            summary = frame.groupby("run", sort=False).tail(1)[["run", "round", "epsilon", "central_accuracy"]]
            print(summary.to_string(index=False))
        if args.part in ("all", "secagg"):
            table = secagg_seconds([int(s) for s in args.sizes.split(",")], args.secagg_rounds, work / "secagg")
            table.to_csv(RESULTS / "privacy_secagg_seconds.csv", index=False)
            plot_secagg(table, RESULTS / "privacy_secagg_seconds.png")
            print(table.to_string(index=False))


if __name__ == "__main__":
    main()
