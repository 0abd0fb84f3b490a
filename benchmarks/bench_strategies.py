"""Compare every server update rule on non-IID data, with centralized training as the ceiling.

Run from the repository root (8-10 minutes on one CPU thread of a quiet machine, 26 minutes measured at load
average 10-14 on the shared 2-core one; ``--quick`` is a smoke check of about 10 s)::

    python -m benchmarks.bench_strategies [--rounds 30 --clients 20] [--quick] [--out benchmarks/results]

Every run drives the real strategy shell (``flower_app.server_app.build_strategy``) and the real
``FlowerClient`` NumPyClients in one process through ``flower_app.inprocess.run_rounds`` (Flower's
array serialization, no Ray), with full participation and one CPU thread.

Settings (20 clients, 30 rounds by default; each client keeps 10% of its partition for local validation):

* ``a-digits-dir0.1``: scikit-learn digits, Dirichlet label skew with alpha = 0.1.
* ``b-digits-shards2``: digits, two classes per client (``shards`` partitioner).
* ``c-synthetic(1,1)``: Synthetic(1, 1) of FedProx (Li et al. 2020), 60 features, one natural device per
  client, 4,000 examples over 20 devices with lognormal sizes, multinomial logistic regression (``linear``
  model with a cross-entropy loss), as in the paper.
* ``d-digits-dir0.5/<attack>``: robustness. Digits with a moderate Dirichlet(0.5) label skew; 20% of the
  clients (4 of 20, seeded choice) are corrupted by :class:`CorruptedClient`, which transforms the update
  ``u = w_i - w`` it would have sent: ``scale`` sends ``1e6 * u``, ``sign-flip`` sends ``-u``, ``random``
  sends ``N(0, 1)`` noise per coordinate. ``none`` is the same federation without attackers (the price of
  robustness). Every aggregator (mean, median, trimmed-mean, krum, multi-krum) runs with the FedAvg server
  step and with FedAvgM's server momentum. The shell's update-norm bound is off in this setting
  (``max-update-norm-ratio=inf``): on, it rejects the ``scale`` attack before any aggregator sees it.

Model: digits use the ``mlp`` (two hidden layers of 64): one round of the 8x8 ``cnn`` with 20 clients took
about 1 s of CPU against about 0.1 s for the MLP, too slow for the ~100 runs here on a shared 2-core machine.

Hyper-parameters. Client: SGD, learning rate 0.1, batch 32, 2 local epochs, no momentum, for every rule.
Server: FedAvg, SCAFFOLD and FedNova use server learning rate 1 (plain averaging of updates). The rules
with a server or proximal knob are quick-tuned per setting over a small grid (:data:`TUNING_GRIDS`) for
``--tune-rounds`` rounds (10), choosing the value with the best mean *federated* validation accuracy (the
clients' own held-out 10%) over the last three tuning rounds, so the central test set is never used for
tuning; a choice at the edge of its grid is logged. ``fedavg(server-lr)`` is FedAvg with a tuned server
learning rate, a control for the momentum and adaptive rules. Fixed: FedAvgM momentum 0.9; FedAdam/FedYogi/FedAdagrad beta1 0.9, beta2 0.99, tau 1e-3, no bias
correction (Reddi et al. 2021); trimmed mean cuts 20% at each end; Krum assumes f = 4 Byzantine clients and
Multi-Krum averages n - f of them. In setting (d) FedAvgM reuses the server learning rate tuned for (a).

Centralized ceiling: the same model (same initialisation) trained with the same SGD settings on the pooled
training data of all clients for ``rounds x local epochs`` epochs, evaluated after every ``local epochs``
epochs on the same held-out test set.

Outputs in ``--out``: ``strategies.csv`` (one row per setting and rule: final and best centralized test
accuracy and the hyper-parameters used; hyper-parameters a rule does not read are left empty),
``strategies.curves.csv`` (accuracy per round), ``strategies.tuning.csv`` (every tuning run),
``strategies.md`` (the summary table) and ``strategies.png`` (accuracy curves, one panel per setting).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.client import NumPyClient
from flwr.common import RecordDict, Scalar

from flower_app.client_app import FlowerClient
from flower_app.config import AGGREGATOR_KEYS, RULE_KEYS, AppConfig, aggregator_keys, parse_run_config, rule_keys
from flower_app.data import client_data, model_info, server_source
from flower_app.inprocess import run_rounds
from flower_app.options import train_options
from flower_app.server_app import build_strategy
from flower_app.task import build_model, evaluate, make_loader, resolve_device, train
from strategies.compression import CODECS, decompress
from strategies.hooks import RoundRecord

logger = logging.getLogger("bench_strategies")

NDArrays = list[np.ndarray]
Value = bool | int | float | str  # a run-config value (flwr's Scalar also allows bytes)

ATTACKS = ("none", "scale", "sign-flip", "random")
SCALE_FACTOR = 1e6  # the "scale" attack multiplies its update by this
RANDOM_STD = 1.0  # the "random" attack sends N(0, RANDOM_STD^2) per coordinate
CORRUPTED_FRACTION = 0.2

# Same for every setting and rule: what the clients do.
CLIENT_DEFAULTS: dict[str, Value] = {
    "learning-rate": 0.1,
    "local-epochs": 2,
    "batch-size": 32,
    "client-momentum": 0.0,
    "seed": 42,
}
# Fixed server hyper-parameters (literature defaults); the tuned ones override per setting.
SERVER_DEFAULTS: dict[str, Value] = {
    "server-learning-rate": 1.0,
    "server-momentum": 0.9,
    "server-beta1": 0.9,
    "server-beta2": 0.99,
    "server-tau": 1e-3,
    "server-bias-correction": False,
    "proximal-mu": 0.01,
    "trim-fraction": 0.2,
}

# variant label -> (run-config key, grid), tuned per setting on the clients' validation splits.
# "fedavg(server-lr)" is FedAvg with a tuned server learning rate (FedOpt's SGD, Reddi et al. 2021): it
# separates what the adaptive and momentum rules gain from larger steps from what they gain from adaptivity.
TUNING_GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "fedavg(server-lr)": ("server-learning-rate", (1.0, 2.0, 4.0, 8.0)),
    "fedsgd": ("server-learning-rate", (0.1, 0.3, 1.0, 3.0)),
    "fedavgm": ("server-learning-rate", (0.1, 0.3, 1.0, 3.0)),
    "fedprox": ("proximal-mu", (0.01, 0.1, 1.0)),
    "fedadam": ("server-learning-rate", (0.01, 0.03, 0.1)),
    "fedyogi": ("server-learning-rate", (0.01, 0.03, 0.1)),
    "fedadagrad": ("server-learning-rate", (0.03, 0.1, 0.3, 1.0)),
}

RULES = ("fedavg", "fedsgd", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")

HPARAM_COLUMNS = (
    "learning-rate", "local-epochs", "batch-size", "server-learning-rate", "server-momentum", "server-beta1",
    "server-beta2", "server-tau", "proximal-mu", "trim-fraction", "num-byzantine", "num-selected",
)


@dataclass(frozen=True)
class Setting:
    """A federation: data, split and model (run-config overrides), and who is corrupted how."""

    name: str
    overrides: Mapping[str, Value]
    attack: str = "none"
    tune: bool = True  # tune the rules of TUNING_GRIDS on this setting
    tuned_from: str = ""  # reuse another setting's tuned values instead


@dataclass(frozen=True)
class Variant:
    """One rule to run in a setting: a label and its run-config overrides."""

    label: str
    overrides: Mapping[str, Value]


@dataclass
class RunResult:
    accuracy: list[float] = field(default_factory=list)  # central test accuracy, rounds 0..R
    loss: list[float] = field(default_factory=list)
    federated_accuracy: list[float] = field(default_factory=list)
    rejected: int = 0
    failures: int = 0
    skipped_rounds: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ corrupted clients
def corrupt_update(update: NDArrays, attack: str, rng: np.random.Generator) -> NDArrays:
    """The update a corrupted client sends in place of its honest ``update``.

    ``scale``: ``SCALE_FACTOR * u``; ``sign-flip``: ``-u``; ``random``: ``N(0, RANDOM_STD^2)`` per coordinate,
    independent of ``u``. All finite, so they pass the shell's validation and reach the aggregator.
    """
    if attack == "scale":
        return [(SCALE_FACTOR * u).astype(np.float32) for u in update]
    if attack == "sign-flip":
        return [(-u).astype(np.float32) for u in update]
    if attack == "random":
        return [rng.normal(0.0, RANDOM_STD, size=u.shape).astype(np.float32) for u in update]
    raise ValueError(f"unknown attack '{attack}'; choose one of: {', '.join(a for a in ATTACKS if a != 'none')}")


class CorruptedClient(NumPyClient):
    """A Byzantine client: runs the honest ``FlowerClient``, then corrupts the update it returns.

    The model part of the reply is decoded with the client's own codec (``strategies.compression``), read
    by its kind (``FlowerClient.kind``): weights ``w_i`` become ``w + corrupt(w_i - w)``, updates
    and gradients are corrupted directly; the result is encoded again. Arrays after the model part
    (SCAFFOLD's control deltas) pass through unchanged.
    """

    def __init__(self, inner: FlowerClient, attack: str, seed: int) -> None:
        if attack not in ATTACKS or attack == "none":
            corrupt_update([], attack, np.random.default_rng(0))  # raises with the valid choices
        self.inner = inner
        self.attack = attack
        self.kind = inner.kind
        self.rng = np.random.default_rng(seed)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        wire, num_examples, metrics = self.inner.fit(parameters, config)
        shapes = list(self.inner.spec.shapes)
        codec = CODECS[self.inner.codec.codec]
        k = getattr(codec, "arrays_per_tensor", 1) * len(shapes)
        model = decompress(wire[:k], shapes, self.inner.codec)
        if self.kind == "weights":
            start = [np.asarray(g, dtype=np.float32) for g in parameters[: len(shapes)]]
            update = corrupt_update([w - g for w, g in zip(model, start)], self.attack, self.rng)
            corrupted = [g + u for g, u in zip(start, update)]
        else:
            corrupted = corrupt_update(model, self.attack, self.rng)
        return codec.encode(corrupted, self.inner.codec) + list(wire[k:]), num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return self.inner.evaluate(parameters, config)


def corrupted_ids(num_clients: int, fraction: float, seed: int) -> list[int]:
    """A seeded choice of ``round(fraction * num_clients)`` client ids."""
    count = round(fraction * num_clients)
    return sorted(int(i) for i in np.random.default_rng([seed, 7]).choice(num_clients, size=count, replace=False))


# -------------------------------------------------------------------------------------------------- runners
def keys_read(run_config: Mapping[str, Value]) -> set[str]:
    """The rule- and aggregator-specific keys this run's rule and aggregator read (`flower_app.config`)."""
    return {*rule_keys(str(run_config.get("strategy", "fedavg"))), *aggregator_keys(str(run_config.get("aggregator", "mean")))}


def make_config(run_config: Mapping[str, Value], output_dir: str) -> AppConfig:
    # The shared defaults set every rule's keys; the app refuses those this rule does not read.
    unread = set(RULE_KEYS + AGGREGATOR_KEYS) - keys_read(run_config)
    return parse_run_config({**{k: v for k, v in run_config.items() if k not in unread}, "output-dir": output_dir})


def make_clients(cfg: AppConfig, num_clients: int, attack: str, bad: Sequence[int]) -> list[NumPyClient]:
    clients: list[NumPyClient] = []
    for i in range(num_clients):
        honest = FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": num_clients}), RecordDict())
        if attack != "none" and i in bad:
            clients.append(CorruptedClient(honest, attack, seed=zlib.crc32(f"{cfg.seed}:{i}".encode())))
        else:
            clients.append(honest)
    return clients


def run_federated(run_config: Mapping[str, Value], num_clients: int, rounds: int, attack: str = "none",
                  bad: Sequence[int] = ()) -> RunResult:
    """Run one rule through the app's own strategy shell and clients; collect the per-round records."""
    result = RunResult()

    def observe(record: RoundRecord, strategy: Any) -> None:
        result.accuracy.append(record.central_accuracy)
        result.loss.append(record.central_loss)
        result.federated_accuracy.append(record.federated_accuracy)
        if record.round > 0:
            result.rejected += record.rejected
            result.failures += record.failures
            result.skipped_rounds += 0 if record.updated else 1

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(run_config, tmp)
        strategy, _ = build_strategy(cfg)
        strategy.observers = [observe]  # the app's RunRecorder redraws a PNG every round: not needed here
        run_rounds(strategy, make_clients(cfg, num_clients, attack, bad), rounds)
    result.seconds = time.perf_counter() - start
    return result


def run_centralized(run_config: Mapping[str, Value], num_clients: int, rounds: int) -> RunResult:
    """The ceiling: the same model trained on the pooled client training data, rounds x local-epochs epochs."""
    start = time.perf_counter()
    cfg = make_config(run_config, "unused")  # nothing is written: no strategy shell here
    parts = [client_data(cfg, {"partition-id": i, "num-partitions": num_clients}) for i in range(num_clients)]
    x = torch.cat([p.train.x for p in parts])
    y = torch.cat([p.train.y for p in parts])
    source = server_source(cfg)
    info = model_info(source)
    model = build_model(cfg.model, info, cfg.hidden_size, seed=cfg.seed)
    device = resolve_device("cpu")
    test_loader = make_loader(source.test.x, source.test.y, batch_size=256, shuffle=False)
    options = train_options(cfg)
    result = RunResult()
    for rnd in range(rounds + 1):
        if rnd > 0:
            loader = make_loader(x, y, cfg.batch_size, shuffle=True, seed=zlib.crc32(f"{cfg.seed}:{rnd}".encode()))
            train(model, loader, info.task, options, device)
        loss, accuracy, _ = evaluate(model, test_loader, info.task, device)
        result.accuracy.append(float(accuracy if accuracy is not None else math.nan))
        result.loss.append(loss)
        result.federated_accuracy.append(math.nan)
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------ the experiment
def base_config(setting: Setting, num_clients: int, rounds: int) -> dict[str, Value]:
    return {
        **CLIENT_DEFAULTS,
        **SERVER_DEFAULTS,
        "num-server-rounds": rounds,
        "fraction-fit": 1.0,
        "min-fit-clients": num_clients,
        "min-available-clients": num_clients,
        "num-partitions": num_clients,  # the synthetic source needs it on the server too
        "fraction-evaluate": 0.0,
        "client-wait-timeout": 1.0,
        "num-byzantine": max(1, round(CORRUPTED_FRACTION * num_clients)),
        "num-selected": 0,
        "device": "cpu",
        **setting.overrides,
    }


def settings(quick: bool) -> list[Setting]:
    digits: dict[str, Value] = {"dataset": "digits", "model": "mlp", "hidden-size": 64}
    synthetic: dict[str, Value] = {"dataset": "synthetic", "partitioner": "natural", "num-features": 60, "num-samples": 4000,
                 "synthetic-alpha": 1.0, "synthetic-beta": 1.0, "model": "linear"}
    main = [
        Setting("a-digits-dir0.1", {**digits, "partitioner": "dirichlet", "dirichlet-alpha": 0.1}),
        Setting("b-digits-shards2", {**digits, "partitioner": "shards", "classes-per-partition": 2}),
        Setting("c-synthetic(1,1)", synthetic),
    ]
    # The shell's own norm bound (max-update-norm-ratio, README "What the server refuses") rejects the 1e6 x scale
    # attack before any aggregator sees it; it is off here so that the aggregators themselves are compared.
    robust_data: dict[str, Value] = {**digits, "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
                                     "max-update-norm-ratio": math.inf}
    attacks = ("none", "scale") if quick else ATTACKS
    robust = [
        Setting(f"d-digits-dir0.5/{attack}", robust_data, attack=attack, tune=False, tuned_from="a-digits-dir0.1")
        for attack in attacks
    ]
    return main + robust


def variants(setting: Setting, quick: bool) -> list[Variant]:
    if setting.name.startswith("d-"):
        servers = ("fedavg",) if quick else ("fedavg", "fedavgm")
        aggregators = ("mean", "median") if quick else ROBUST_AGGREGATORS
        return [Variant(f"{s}+{a}", {"strategy": s, "aggregator": a}) for s in servers for a in aggregators]
    rules = ("fedavg", "fedprox", "fedadam", "scaffold", "fednova") if quick else RULES
    extra = [] if quick else [Variant("fedavg(server-lr)", {"strategy": "fedavg"})]
    return [Variant(r, {"strategy": r}) for r in rules] + extra


def tune(setting: Setting, config: Mapping[str, Value], num_clients: int, tune_rounds: int,
         variant_list: Sequence[Variant]) -> tuple[dict[str, dict[str, Value]], list[dict[str, Any]]]:
    """Pick each variant's value from TUNING_GRIDS by its mean federated validation accuracy in the last rounds."""
    chosen: dict[str, dict[str, Value]] = {}
    rows: list[dict[str, Any]] = []
    for variant in variant_list:
        rule = variant.label
        if rule not in TUNING_GRIDS:
            continue
        key, grid = TUNING_GRIDS[rule]
        best: tuple[float, float] | None = None
        for value in grid:
            run_config = {**config, **variant.overrides, key: value, "fraction-evaluate": 1.0, "min-evaluate-clients": 1,
                          "num-server-rounds": tune_rounds}
            res = run_federated(run_config, num_clients, tune_rounds)
            tail = [a for a in res.federated_accuracy[-3:] if math.isfinite(a)]
            score = float(np.mean(tail)) if tail else -1.0
            rows.append({"setting": setting.name, "rule": rule, "param": key, "value": value,
                         "tune_rounds": tune_rounds, "federated_val_accuracy": score, "seconds": res.seconds})
            logger.info("  tune %-17s %s=%-6g federated val acc %.4f (%.1fs)", rule, key, value, score, res.seconds)
            if best is None or score > best[0]:
                best = (score, value)
        assert best is not None
        chosen[rule] = {key: best[1]}
        for row in rows:
            if row["setting"] == setting.name and row["rule"] == rule:
                row["chosen"] = row["value"] == best[1]
        if best[1] in (grid[0], grid[-1]):
            logger.warning("  tune %s: best %s=%g is at the edge of the grid %s", rule, key, best[1], grid)
    return chosen, rows


def hparams_row(run_config: Mapping[str, Value]) -> dict[str, Any]:
    """The hyper-parameters this rule reads; the others are left empty."""
    used = keys_read(run_config) | {"batch-size"}
    return {k.replace("-", "_"): (run_config[k] if k in used else None) for k in HPARAM_COLUMNS}


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """Final accuracy, best accuracy over rounds 1..R, and the round of the best."""
    after = np.asarray(values[1:], dtype=np.float64)
    final = float(after[-1]) if after.size else math.nan
    if after.size == 0 or not np.isfinite(after).any():
        return final, math.nan, 0
    best_idx = int(np.nanargmax(after))
    return final, float(after[best_idx]), best_idx + 1


def run(rounds: int, num_clients: int, quick: bool, tune_rounds: int, out: Path,
        only: Sequence[str] = ()) -> pd.DataFrame:
    """Run every setting and rule; write the CSVs, the markdown table and the PNG under ``out``."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    tuning_rows: list[dict[str, Any]] = []
    tuned: dict[str, dict[str, dict[str, Value]]] = {}
    bad = corrupted_ids(num_clients, CORRUPTED_FRACTION, int(CLIENT_DEFAULTS["seed"]))
    for setting in settings(quick):
        if only and not any(setting.name.startswith(o) for o in only):
            continue
        config = base_config(setting, num_clients, rounds)
        variant_list = variants(setting, quick)
        logger.info("setting %s (%s)", setting.name, ", ".join(v.label for v in variant_list))
        if setting.tune and tune_rounds > 0:
            tuned[setting.name], new_rows = tune(
                setting, config, num_clients, tune_rounds, variant_list
            )
            tuning_rows += new_rows
        chosen = tuned.get(setting.name) or tuned.get(setting.tuned_from, {})
        num_bad = len(bad) if setting.attack != "none" else 0
        common = {"setting": setting.name, "attack": setting.attack, "num_corrupted": num_bad,
                  "corrupted_ids": ";".join(map(str, bad)) if num_bad else "", "rounds": rounds,
                  "clients": num_clients, "dataset": config["dataset"], "partitioner": config["partitioner"],
                  "model": config["model"], "hidden_size": config.get("hidden-size") if config["model"] == "mlp" else None}
        runs: list[tuple[str, dict[str, Value], RunResult, str]] = []
        if setting.attack == "none":
            ceiling = run_centralized(config, num_clients, rounds)
            runs.append(("centralized", {**config, "strategy": "fedavg"}, ceiling, ""))
        for variant in variant_list:
            strategy = str(variant.overrides["strategy"])
            # By label; the robust variants of (d) ("fedavgm+median") take their server rule's tuned values.
            picked = chosen.get(variant.label, chosen.get(strategy, {}))
            run_config = {**config, **variant.overrides, **picked}
            result = run_federated(run_config, num_clients, rounds, setting.attack, bad)
            note = ", ".join(f"{k} tuned on {setting.tuned_from or setting.name}" for k in picked)
            runs.append((variant.label, run_config, result, note))
        for label, run_config, result, note in runs:
            final, best, best_round = summarize(result.accuracy)
            is_ceiling = label == "centralized"
            hp = hparams_row(run_config)
            if is_ceiling:
                hp = {k: (v if k in ("learning_rate", "local_epochs", "batch_size") else None) for k, v in hp.items()}
            rows.append({
                **common, "rule": label,
                "strategy": "" if is_ceiling else run_config["strategy"],
                "aggregator": "" if is_ceiling else run_config.get("aggregator", "mean"),
                "final_accuracy": final, "best_accuracy": best, "best_round": best_round,
                "final_loss": result.loss[-1] if result.loss else math.nan,
                **hp, "tuned": note, "rejected_updates": result.rejected,
                "client_failures": result.failures,
                "skipped_rounds": result.skipped_rounds, "seconds": round(result.seconds, 2),
            })
            curves += [{"setting": setting.name, "rule": label, "round": r, "central_accuracy": a, "central_loss": lo}
                       for r, (a, lo) in enumerate(zip(result.accuracy, result.loss))]
            logger.info("  %-22s final %.4f best %.4f (round %d) rejected %d failures %d  %.1fs", label, final,
                        best, best_round, result.rejected, result.failures, result.seconds)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "strategies.csv", index=False)
    pd.DataFrame(curves).to_csv(out / "strategies.curves.csv", index=False)
    if tuning_rows:
        pd.DataFrame(tuning_rows).to_csv(out / "strategies.tuning.csv", index=False)
    (out / "strategies.md").write_text(markdown_table(frame) + "\n")
    plot(pd.DataFrame(curves), out / "strategies.png")
    return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """Rules as rows, settings as columns; cells are 'final / best' centralized test accuracy."""
    if frame.empty:
        return ""
    order = list(dict.fromkeys(frame["rule"]))
    columns = list(dict.fromkeys(frame["setting"]))
    lines = ["| rule | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for rule in order:
        cells = []
        for setting in columns:
            hit = frame[(frame["rule"] == rule) & (frame["setting"] == setting)]
            cells.append(f"{hit['final_accuracy'].iloc[0]:.3f} / {hit['best_accuracy'].iloc[0]:.3f}" if len(hit) else "")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _line_style(rule: str) -> dict[str, Any]:
    """Same rule, same look in every panel: robust variants are coloured by aggregator, dashed with momentum."""
    import matplotlib.pyplot as plt

    if rule == "centralized":
        return {"color": "black", "linestyle": ":", "linewidth": 1.8}
    if "+" in rule:
        server, aggregator = rule.split("+", 1)
        index = ROBUST_AGGREGATORS.index(aggregator) if aggregator in ROBUST_AGGREGATORS else 0
        return {"color": plt.get_cmap("tab10")(index), "linestyle": "-" if server == "fedavg" else "--", "linewidth": 1.3}
    names = [*RULES, "fedavg(server-lr)"]
    index = names.index(rule) if rule in names else len(names)
    return {"color": plt.get_cmap("tab10")(index % 10), "linewidth": 1.3}


def plot(curves: pd.DataFrame, path: Path) -> None:
    """Centralized test accuracy per round, one panel per setting: the rule comparisons on the top row,
    the robustness settings (d) below, each row with its legend in the last column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(curves["setting"]))
    rows = [r for r in ([n for n in names if not n.startswith("d-")], [n for n in names if n.startswith("d-")]) if r]
    cols = max(len(r) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.2 * cols, 3.6 * len(rows)), squeeze=False)
    for row, row_names in zip(axes, rows):
        handles: dict[str, Any] = {}
        for ax, name in zip(row, row_names):
            sub = curves[curves["setting"] == name]
            for rule, group in sub.groupby("rule", sort=False):
                (line,) = ax.plot(group["round"], group["central_accuracy"], label=rule, **_line_style(str(rule)))
                handles.setdefault(str(rule), line)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("round")
            ax.set_ylabel("central test accuracy")
            ax.set_ylim(0.0, 1.0)
            ax.grid(alpha=0.3)
        for ax in row[len(row_names):]:
            ax.axis("off")
        row[len(row_names)].legend(list(handles.values()), list(handles.keys()), loc="center left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default 30; 2 with --quick)")
    parser.add_argument("--clients", type=int, default=None, help="clients, all sampled each round (default 20; 5 with --quick)")
    parser.add_argument("--tune-rounds", type=int, default=None, help="rounds per tuning run, 0 = no tuning (default 10; 0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke check: few rounds, clients and rules, no tuning")
    parser.add_argument("--only", default="", help="comma-separated setting-name prefixes to run (e.g. 'a-,d-')")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # per-round INFO and per-rejection WARNING lines
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 30)
    clients = args.clients if args.clients is not None else (5 if args.quick else 20)
    tune_rounds = args.tune_rounds if args.tune_rounds is not None else (0 if args.quick else 10)
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    start = time.perf_counter()
    frame = run(rounds, clients, args.quick, tune_rounds, args.out, only)
    logger.info("\nfinal / best centralized test accuracy (%d rounds, %d clients, %.0fs):\n%s", rounds, clients,
                time.perf_counter() - start, markdown_table(frame))
    logger.info("wrote %s", ", ".join(str(args.out / n) for n in ("strategies.csv", "strategies.curves.csv", "strategies.png")))
    return frame


if __name__ == "__main__":
    main()
