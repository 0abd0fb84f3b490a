"""Time to accuracy on heterogeneous devices, in simulated seconds: synchronous rounds against FedBuff.

Run from the repository root (``--quick`` is a smoke check of a minute or two)::

    python -m benchmarks.bench_heterogeneous [--settings digits,synthetic] [--profiles heavy,mild] [--quick]

Every run drives the app's own scheduler (``flower_app.scheduler``: the strategy shell, the real ClientApp's
NumPyClients through `flower_app.inprocess.InProcessGrid`, legacy messages) with simulated devices
(``strategies.profiles``): time is *simulated*, so the figures do not depend on the machine's load (real
seconds are recorded too, with the load average). One torch thread.

Federation: 20 clients. Settings (as in ``bench_strategies``): ``digits`` (scikit-learn digits, Dirichlet
label skew alpha = 0.1, the ``mlp`` with two hidden layers of 64) and ``synthetic`` (Synthetic(1, 1) of
FedProx, 60 features, 4,000 examples over 20 devices of lognormal size, multinomial logistic regression).
Clients: SGD lr 0.1, batch 32, 2 local epochs. Devices: the ``heavy`` profiles (log-normal speeds and
bandwidths, sigma 1.5: the slowest of 20 devices is ~16x slower than the median) and the ``mild`` ones
(sigma 0.5), median 100 examples per simulated second, 1 MB/s up, 4 MB/s down.

Methods (a cohort of 10 of the 20 clients per round; FedBuff keeps 10 training at once):

* ``fedavg``: synchronous FedAvg; a round waits for its slowest client.
* ``fedavgm``: synchronous FedAvgM (server momentum 0.9, server lr from ``--fedavgm-lr``).
* ``deadline``: FedAvg with over-selection 1.3 (13 sampled, the first 10 reports aggregated) and a deadline
  (``--deadline-factor`` x the median device's time for its round), Bonawitz et al. 2019.
* ``fednova-budget``: FedNova with per-device budgets: each device computes for at most
  ``--budget-factor`` x the median device's round of compute (``device-work-budget``), so slow devices take
  fewer local steps and FedNova normalizes their updates by the steps they report.
* ``fedbuff``: FedBuff, concurrency 10, a server step every ``--buffer`` updates, staleness weight
  ``1/sqrt(1 + tau)``, server momentum 0.9 (lr ``--fedbuff-lr``).

Targets: digits to 95% if every method reaches it within the budget, else the highest accuracy every method
reaches (reported); Synthetic(1, 1) to the accuracy synchronous FedAvg has after 30 rounds. The budget of
simulated time per setting and profile is what synchronous FedAvg needs for ``--rounds`` rounds; every
method runs until then. Reported: simulated seconds to the target, accuracy at the budget (the last
evaluation), the best accuracy, server steps and client updates.

Outputs in ``--out`` (default ``benchmarks/results``): ``heterogeneous.csv`` (one row per setting, profile
and method), ``heterogeneous_curves.csv`` (accuracy against simulated time), ``heterogeneous.png``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.common import Scalar

from flower_app import client_app
from flower_app.config import parse_run_config
from flower_app.data import model_info, server_source
from flower_app.inprocess import InProcessGrid
from flower_app.options import profile_options, scheduler_options
from flower_app.scheduler import run_scheduled
from flower_app.server_app import make_strategy
from flower_app.task import build_model, evaluate, get_weights, make_loader, set_weights, weight_spec
from strategies.base import FederatedStrategy
from strategies.hooks import RoundRecord
from strategies.profiles import busy_seconds, profile_for

logger = logging.getLogger("bench_heterogeneous")
Value = bool | int | float | str

CLIENTS = 20
COHORT = 10
SETTINGS: dict[str, dict[str, Value]] = {
    "digits": {"dataset": "digits", "model": "mlp", "hidden-size": 64, "partitioner": "dirichlet",
               "dirichlet-alpha": 0.1},
    "synthetic": {"dataset": "synthetic", "partitioner": "natural", "num-features": 60, "num-samples": 4000,
                  "synthetic-alpha": 1.0, "synthetic-beta": 1.0, "model": "linear"},
}
COMMON: dict[str, Value] = {
    "learning-rate": 0.1, "local-epochs": 2, "batch-size": 32, "client-momentum": 0.0, "seed": 42,
    "num-partitions": CLIENTS, "min-available-clients": CLIENTS, "fraction-fit": COHORT / CLIENTS,
    "min-fit-clients": 2, "fraction-evaluate": 0.0, "client-wait-timeout": 1.0, "device": "cpu",
}
METHODS = ("fedavg", "fedavgm", "deadline", "fednova-budget", "fedbuff")


class BudgetReached(Exception):
    """Raised by the collector once a run has used its simulated time."""


@dataclass
class Curve:
    """A run's central test accuracy against simulated time."""

    sim_time: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)  # client updates aggregated so far
    late: int = 0
    dropped: int = 0
    stale: int = 0
    staleness_mean: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def time_to(self, target: float) -> float:
        for t, a in zip(self.sim_time, self.accuracy):
            if a >= target - 1e-12:
                return t
        return math.nan

    def at(self, budget: float) -> float:
        """Accuracy of the last evaluation at or before ``budget``."""
        last = math.nan
        for t, a in zip(self.sim_time, self.accuracy):
            if t > budget + 1e-9:
                break
            last = a
        return last

    def best(self, budget: float) -> float:
        values = [a for t, a in zip(self.sim_time, self.accuracy) if t <= budget + 1e-9]
        return max(values) if values else math.nan


class Collector:
    """Observer of finished rounds: the curve; stops the run once it is past its simulated budget."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.curve = Curve()

    def __call__(self, record: RoundRecord, strategy: FederatedStrategy) -> None:
        c = self.curve
        if record.round == 0:
            c.sim_time.append(0.0)
            c.accuracy.append(record.central_accuracy)
            c.steps.append(0)
            c.updates.append(0)
            return
        c.sim_time.append(float(record.extra.get("sim_time", math.nan)))
        c.accuracy.append(record.central_accuracy)
        c.steps.append(record.round)
        c.updates.append(c.updates[-1] + record.results)
        c.late += int(record.extra.get("late", 0))
        c.dropped += int(record.extra.get("dropped", 0))
        c.stale += int(record.extra.get("stale", 0))
        if "staleness_mean" in record.extra:
            c.staleness_mean.append(float(record.extra["staleness_mean"]))
        if c.sim_time[-1] >= self.budget:
            raise BudgetReached


def run_config(setting: str, profile: str, method: str, args: argparse.Namespace, extra: Mapping[str, Value]) -> dict:
    rc: dict[str, Value] = {**COMMON, **SETTINGS[setting], "device-profiles": profile, "num-server-rounds": 100000,
                            "output-dir": tempfile.gettempdir()}
    if method == "fedavg":
        rc["strategy"] = "fedavg"
    elif method == "fedavgm":
        rc.update({"strategy": "fedavgm", "server-momentum": 0.9, "server-learning-rate": args.fedavgm_lr})
    elif method == "deadline":
        rc.update({"strategy": "fedavg", "over-selection": 1.3})
    elif method == "fednova-budget":
        rc["strategy"] = "fednova"
    elif method == "fedbuff":
        server = ({"strategy": "fedavgm", "server-momentum": 0.9} if args.fedbuff_strategy == "fedavgm"
                  else {"strategy": args.fedbuff_strategy})
        rc.update({**server, "server-learning-rate": args.fedbuff_lr, "mode": "async", "async-concurrency": COHORT, "async-buffer-size": args.buffer,
                   "staleness-weighting": "polynomial", "staleness-exponent": 0.5})
    else:
        raise ValueError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    rc.update(extra)
    return rc


def median_round_seconds(rc: Mapping[str, Value]) -> tuple[float, float]:
    """The median device's simulated round (busy seconds) and its compute part, for deadlines and budgets."""
    from flower_app.data import client_data

    cfg = parse_run_config(dict(rc))
    options = profile_options(cfg)
    assert options is not None
    model = build_model(cfg.model, model_info(server_source(cfg)), cfg.hidden_size, seed=cfg.seed)
    nbytes = sum(4 * int(np.prod(s)) for s in weight_spec(model).shapes)
    rounds, computes = [], []
    for p in range(CLIENTS):
        data = client_data(cfg, {"partition-id": p, "num-partitions": CLIENTS})
        steps = cfg.local_epochs * math.ceil(len(data.train) / cfg.batch_size)
        work = steps * cfg.batch_size
        profile = profile_for(options, p)
        rounds.append(busy_seconds(profile, work, nbytes, nbytes))
        computes.append(work / profile.speed)
    return float(np.median(rounds)), float(np.median(computes))


def run_one(rc: Mapping[str, Value], budget: float) -> Curve:
    cfg = parse_run_config(dict(rc))
    source = server_source(cfg)
    info = model_info(source)
    model = build_model(cfg.model, info, cfg.hidden_size, seed=cfg.seed)
    spec = weight_spec(model)
    test = make_loader(source.test.x, source.test.y, batch_size=512, shuffle=False)
    device = torch.device("cpu")

    def evaluate_fn(weights: list[np.ndarray]) -> tuple[float, dict[str, Scalar]]:
        set_weights(model, spec, weights)
        loss, accuracy, _ = evaluate(model, test, info.task, device)
        return loss, {"accuracy": float(accuracy or 0.0)}

    collector = Collector(budget)
    strategy = make_strategy(cfg, get_weights(model, spec), spec.trainable, evaluate_fn, [collector])
    nodes = [{"partition-id": p, "num-partitions": CLIENTS} for p in range(CLIENTS)]
    grid = InProcessGrid(client_app.app, nodes, dict(rc))
    start = time.perf_counter()
    try:
        run_scheduled(grid, strategy, scheduler_options(cfg), profile_options(cfg), cfg.num_server_rounds)
    except BudgetReached:
        pass
    collector.curve.seconds = time.perf_counter() - start
    return collector.curve


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="digits,synthetic")
    parser.add_argument("--profiles", default="heavy,mild")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=60, help="the budget: sync FedAvg's simulated time for this many rounds")
    parser.add_argument("--target-rounds", type=int, default=30, help="synthetic: the target is sync FedAvg's accuracy then")
    parser.add_argument("--digits-target", type=float, default=0.95)
    parser.add_argument("--fedavgm-lr", type=float, default=1.0)
    parser.add_argument("--fedbuff-lr", type=float, default=0.5)
    parser.add_argument("--fedbuff-strategy", default="fedavgm", help="FedBuff's server rule (fedavgm: momentum 0.9)")
    parser.add_argument("--buffer", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the output files (heterogeneous<tag>.csv, ...)")
    parser.add_argument("--deadline-factor", type=float, default=2.0)
    parser.add_argument("--budget-factor", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="a smoke check: 4 rounds, digits and heavy only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.target_rounds, args.settings, args.profiles = 4, 2, "digits", "heavy"
    before = load_average()
    rows, curves = [], []
    for setting in args.settings.split(","):
        for profile in args.profiles.split(","):
            base = run_config(setting, profile, "fedavg", args, {})
            median_round, median_compute = median_round_seconds(base)
            # The budget: sync FedAvg's time for --rounds rounds (a first run to find it).
            reference = run_one({**base, "num-server-rounds": args.rounds}, math.inf)
            budget = reference.sim_time[-1]
            logger.info("%s / %s: median device round %.2fs (compute %.2fs); budget %.1f simulated s = %d rounds of "
                        "sync FedAvg", setting, profile, median_round, median_compute, budget, args.rounds)
            results: dict[str, Curve] = {"fedavg": reference}
            for method in args.methods.split(","):
                if method == "fedavg":
                    continue
                extra: dict[str, Value] = {}
                if method == "deadline":
                    extra["round-deadline"] = round(args.deadline_factor * median_round, 3)
                if method == "fednova-budget":
                    extra["device-work-budget"] = round(args.budget_factor * median_compute, 3)
                rc = run_config(setting, profile, method, args, extra)
                results[method] = run_one(rc, budget)
                logger.info("  %-15s %5d steps, %6d updates, acc at budget %.4f (best %.4f), %.0f real s", method,
                            results[method].steps[-1], results[method].updates[-1], results[method].at(budget),
                            results[method].best(budget), results[method].seconds)
            if setting == "synthetic":
                k = min(args.target_rounds, len(reference.accuracy) - 1)
                target, how = reference.accuracy[k], f"sync FedAvg's accuracy after {k} rounds"
                nominal = target
            else:
                reach = min(c.best(budget) for c in results.values())
                target = nominal = args.digits_target
                how = f"{args.digits_target:.0%}"
                if reach < target:
                    target = math.floor(reach * 200) / 200  # the highest common target, on a 0.5-point grid
                    how = (f"{target:.1%}, the highest accuracy every method reaches in the budget "
                           f"({args.digits_target:.0%} is out of reach for at least one)")
            for method, curve in results.items():
                rows.append({
                    "setting": setting, "profile": profile, "method": method, "target": target, "target_rule": how,
                    "time_to_target": curve.time_to(target), "time_to_nominal": curve.time_to(nominal),
                    "nominal_target": nominal, "budget": budget, "accuracy_at_budget": curve.at(budget),
                    "best_accuracy": curve.best(budget), "steps": curve.steps[-1], "updates": curve.updates[-1],
                    "late": curve.late, "dropped": curve.dropped, "stale": curve.stale,
                    "staleness_mean": float(np.mean(curve.staleness_mean)) if curve.staleness_mean else math.nan,
                    "real_seconds": curve.seconds, "median_device_round": median_round,
                    **{f"hp_{k}": v for k, v in vars(args).items() if k in ("fedavgm_lr", "fedbuff_lr", "fedbuff_strategy", "buffer",
                                                                            "deadline_factor", "budget_factor")},
                })
                curves += [{"setting": setting, "profile": profile, "method": method, "sim_time": t, "accuracy": a,
                            "step": s, "updates": u}
                           for t, a, s, u in zip(curve.sim_time, curve.accuracy, curve.steps, curve.updates)]
    after = load_average()
    frame = pd.DataFrame(rows)
    for (setting, profile), group in frame.groupby(["setting", "profile"], sort=False):
        sync = group.set_index("method")
        base_t = sync.loc["fedavg", "time_to_target"]
        base_m = sync.loc["fedavgm", "time_to_target"] if "fedavgm" in sync.index else math.nan
        frame.loc[group.index, "speedup_vs_fedavg"] = base_t / group["time_to_target"]
        frame.loc[group.index, "speedup_vs_fedavgm"] = base_m / group["time_to_target"]
    frame["load_before"], frame["load_after"] = before, after
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / f"heterogeneous{args.tag}.csv", index=False)
    pd.DataFrame(curves).to_csv(args.out / f"heterogeneous{args.tag}_curves.csv", index=False)
    plot(pd.DataFrame(curves), frame, args.out / f"heterogeneous{args.tag}.png")
    print_table(frame)
    print(f"\nload before: {before}\nload after:  {after}")


def print_table(frame: pd.DataFrame) -> None:
    for (setting, profile), group in frame.groupby(["setting", "profile"], sort=False):
        first = group.iloc[0]
        print(f"\n{setting}, {profile} profiles: target {first['target_rule']} = {first['target']:.4f}; "
              f"budget {first['budget']:.0f} simulated s")
        nominal = first["nominal_target"]
        print(f"| method | time to target (sim s) | vs sync FedAvg | vs sync FedAvgM | time to {nominal:.4g} | "
              "accuracy at budget | best | steps | client updates | late / dropped / stale |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for _, r in group.iterrows():
            t = "not reached" if math.isnan(r["time_to_target"]) else f"{r['time_to_target']:.0f}"
            n = "not reached" if math.isnan(r["time_to_nominal"]) else f"{r['time_to_nominal']:.0f}"
            print(f"| {r['method']} | {t} | {_ratio(r['speedup_vs_fedavg'])} | {_ratio(r['speedup_vs_fedavgm'])} | {n} | "
                  f"{r['accuracy_at_budget']:.4f} | {r['best_accuracy']:.4f} | {r['steps']} | {r['updates']} | "
                  f"{r['late']} / {r['dropped']} / {r['stale']} |")


def _ratio(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}x"


def plot(curves: pd.DataFrame, frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(frame.groupby(["setting", "profile"], sort=False).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (setting, profile) in zip(axes[0], panels):
        sub = curves[(curves["setting"] == setting) & (curves["profile"] == profile)]
        for method, group in sub.groupby("method", sort=False):
            ax.plot(group["sim_time"], group["accuracy"], label=method, linewidth=1.2)
        row = frame[(frame["setting"] == setting) & (frame["profile"] == profile)].iloc[0]
        ax.axhline(row["target"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, row["budget"])
        ax.set_ylim(max(0.0, row["target"] - 0.3), 1.0)
        ax.set_title(f"{setting}, {profile} devices")
        ax.set_xlabel("simulated seconds")
        ax.set_ylabel("central test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
