"""The scheduler in one process: the real ServerApp main over `InProcessGrid` (legacy messages to the real
ClientApp), with hand-built device profiles.

Oracles: a deadline run equals plain FedAvg over the clients fast enough for it; FedBuff with no
staleness and a buffer as large as the clients training at once equals synchronous FedAvg; an async run
stopped and resumed equals the uninterrupted one (simulated time fixes the arrival order); FedNova with
per-device step caps equals the hand formula with the steps the clients report.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.common import Context, RecordDict

from flower_app import client_app
from flower_app.config import AppConfig, ConfigError, parse_run_config
from flower_app.inprocess import InProcessGrid
from flower_app.options import work_plan
from flower_app.scheduler import STALENESS_METRIC, SchedulerState, scheduler_state
from flower_app.server_app import run_server, server_fn
from strategies import STRATEGIES
from strategies.aggregators import AGGREGATORS
from strategies.hooks import ClientUpdate, RoundRecord
from strategies.profiles import DeviceProfile, busy_seconds, write_trace
from strategies.wire import from_parameters

pytestmark = pytest.mark.slow  # each test trains small models in-process for a few rounds


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: a second thread only adds contention (10x slower steps measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(out: Path, n: int, **overrides: Any) -> dict[str, Any]:
    rc = AppConfig().to_run_config()
    rc.update({
        "num-server-rounds": 2, "output-dir": str(out), "run-name": "run", "model": "mlp", "hidden-size": 16,
        "local-epochs": 1, "fraction-evaluate": 0.0, "num-partitions": n, "min-fit-clients": n,
        "min-available-clients": n, "client-wait-timeout": 5.0, "seed": 3,
    })
    rc.update(overrides)
    return rc


def run(
    rc: dict[str, Any], node_configs: Sequence[Mapping[str, Any]] | None = None
) -> tuple[Any, list[list[tuple[int, Any]]]]:
    """One in-process run of the real ServerApp main; returns the strategy and, per aggregate_fit call,
    the (partition, FitRes) pairs it got."""
    n = int(rc["num-partitions"])
    nodes = node_configs or [{"partition-id": i, "num-partitions": n} for i in range(n)]
    grid = InProcessGrid(client_app.app, nodes, rc)
    seen: list[list[tuple[int, Any]]] = []

    def spying_server_fn(context: Context) -> Any:
        components = server_fn(context)
        strategy = components.strategy
        original = strategy.aggregate_fit

        def recording(server_round: int, results: list, failures: list) -> Any:
            seen.append([(int(res.metrics["data_partition"]), res) for _, res in results])
            return original(server_round, results, failures)

        strategy.aggregate_fit = recording
        return components

    return run_server(grid, Context(1, 0, {}, RecordDict(), rc), spying_server_fn), seen


def metrics(out: Path, name: str = "run") -> pd.DataFrame:
    return pd.read_csv(out / name / "metrics.csv")


def fast_and_slow_trace(path: Path, speeds: Sequence[float]) -> Path:
    """Devices that differ only in speed (bandwidth so high that bytes take microseconds)."""
    write_trace(path, {p: DeviceProfile(speed=s, upload_bandwidth=1e12, download_bandwidth=1e12)
                       for p, s in enumerate(speeds)})
    return path


# ---------------------------------------------------------------------------------------- deadlines
def test_a_deadline_drops_exactly_the_slow_clients_and_equals_fedavg_over_the_fast_ones(tmp_path: Path) -> None:
    trace = fast_and_slow_trace(tmp_path / "trace.csv", [1e4, 0.5, 1e4, 0.5])  # partitions 1 and 3 need > 60 s
    rc = config(tmp_path / "a", 4, **{"device-profiles": "trace", "device-trace": str(trace), "round-deadline": 10.0})
    strategy, seen = run(rc)
    assert [sorted(p for p, _ in results) for results in seen] == [[0, 2], [0, 2]]
    frame = metrics(tmp_path / "a")
    trained = frame[frame["round"] > 0]
    assert list(trained["late"]) == [2, 2] and list(trained["results"]) == [2, 2]
    assert list(trained["sim_seconds"]) == [10.0, 10.0]  # the round waits for the deadline: some are late
    assert list(trained["sim_time"]) == [10.0, 20.0]
    assert list(trained["clients_sampled"]) == [4, 4]

    # Oracle: plain FedAvg (Flower's legacy loop) with only the two fast nodes trains exactly the same model.
    fast_nodes = [{"partition-id": p, "num-partitions": 4} for p in (0, 2)]
    oracle, _ = run(config(tmp_path / "b", 4, **{"min-fit-clients": 2, "min-available-clients": 2}), fast_nodes)
    for a, b in zip(strategy.weights, oracle.weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_over_selection_aggregates_the_first_reports_and_the_round_ends_with_the_last_needed(tmp_path: Path) -> None:
    speeds = [200.0, 1.0, 50.0, 2.0]
    trace = fast_and_slow_trace(tmp_path / "trace.csv", speeds)
    rc = config(tmp_path / "a", 4, **{"device-profiles": "trace", "device-trace": str(trace), "fraction-fit": 0.5,
                                      "min-fit-clients": 2, "over-selection": 2.0, "num-server-rounds": 1})
    _, seen = run(rc)
    (results,) = seen
    assert sorted(p for p, _ in results) == [0, 2]  # the two fastest of the four sampled
    frame = metrics(tmp_path / "a")
    row = frame[frame["round"] == 1].iloc[0]
    assert row["clients_sampled"] == 4 and row["late"] == 2 and row["results"] == 2
    # The round closes when the second report arrives: partition 2's busy time (download, work, upload).
    _, res = next(r for r in results if r[0] == 2)
    down = row["bytes_sent"] / 4
    profile = DeviceProfile(speed=50.0, upload_bandwidth=1e12, download_bandwidth=1e12)
    up = sum(len(t) for t in res.parameters.tensors)
    assert row["sim_seconds"] == pytest.approx(busy_seconds(profile, res.metrics["num_examples_processed"], down, up))


def test_real_time_deadline_without_profiles_keeps_everyone_who_is_in_time(tmp_path: Path) -> None:
    rc = config(tmp_path / "a", 3, **{"round-deadline": 600.0})
    _, seen = run(rc)
    assert [len(r) for r in seen] == [3, 3]
    frame = metrics(tmp_path / "a")
    assert list(frame[frame["round"] > 0]["late"]) == [0, 0]
    assert "sim_time" not in frame  # real time: no simulated clock


def test_dropouts_are_counted_and_left_out(tmp_path: Path) -> None:
    rc = config(tmp_path / "a", 4, **{"device-profiles": "uniform", "device-dropout": 0.5, "num-server-rounds": 3})
    _, seen = run(rc)
    frame = metrics(tmp_path / "a")
    trained = frame[frame["round"] > 0]
    assert trained["dropped"].sum() > 0
    assert list(trained["results"] + trained["dropped"]) == [4, 4, 4]
    assert [len(r) for r in seen] == list(trained["results"])


# ------------------------------------------------------------------------------------ work per device
def test_fednova_normalizes_per_device_step_caps_from_node_config(tmp_path: Path) -> None:
    caps = {0: 1, 1: 4}
    nodes = [{"partition-id": p, "num-partitions": 2, "max-local-steps": caps[p], "batch-size": 8} for p in caps]
    rc = config(tmp_path / "a", 2, **{"strategy": "fednova", "num-server-rounds": 1, "local-epochs": 5})
    strategy, seen = run(rc, nodes)
    (results,) = seen
    steps = {p: res.metrics["local_steps"] for p, res in results}
    assert steps == caps
    assert {p: res.metrics["num_examples_processed"] for p, res in results} == {0: 8, 1: 32}
    # FedNova by hand (Wang et al. 2020): w + tau_eff sum_i p_i (w_i - w) / tau_i, tau_eff = sum_i p_i tau_i.
    w0 = _initial_weights(rc)
    n = np.array([res.num_examples for _, res in results], dtype=np.float64)
    p = n / n.sum()
    tau = np.array([steps[q] for q, _ in results], dtype=np.float64)
    tau_eff = float(p @ tau)
    for j, w in enumerate(w0):
        expected = w.astype(np.float64) + tau_eff * sum(
            p[i] * (from_parameters(res.parameters)[j].reshape(w.shape).astype(np.float64) - w) / tau[i]
            for i, (_, res) in enumerate(results))
        np.testing.assert_allclose(strategy.weights[j], expected, rtol=1e-5, atol=1e-6)


def _initial_weights(rc: dict[str, Any]) -> list[np.ndarray]:
    from flower_app.data import model_info, server_source
    from flower_app.task import build_model, get_weights, weight_spec

    cfg = parse_run_config(rc)
    model = build_model(cfg.model, model_info(server_source(cfg)), cfg.hidden_size, seed=cfg.seed)
    return get_weights(model, weight_spec(model))


def test_a_work_budget_caps_slow_devices_steps(tmp_path: Path) -> None:
    trace = fast_and_slow_trace(tmp_path / "trace.csv", [1000.0, 16.0])
    rc = config(tmp_path / "a", 2, **{"device-profiles": "trace", "device-trace": str(trace), "batch-size": 8,
                                      "device-work-budget": 1.0, "num-server-rounds": 1, "strategy": "fednova"})
    _, seen = run(rc)
    steps = {p: res.metrics["local_steps"] for p, res in seen[0]}
    assert steps[1] == 2  # 1 s x 16 examples/s = 16 examples = 2 batches of 8
    assert steps[0] > 2  # 1000 examples/s: the whole epoch


def test_node_config_work_keys_are_validated() -> None:
    cfg = parse_run_config({"local-epochs": 3, "batch-size": 16})
    plan = work_plan(cfg, {"batch-size": 4, "max-local-steps": 7}, 0)
    assert (plan.epochs, plan.max_steps, plan.batch_size, plan.source) == (3, 7, 4, "node config")
    for key, value in (("batch-size", 0), ("local-epochs", "2"), ("max-local-steps", -1), ("batch-size", True)):
        with pytest.raises(ConfigError, match=f"node-config key '{key}' must be an integer"):
            work_plan(cfg, {key: value}, 0)


def test_a_bad_node_config_is_that_clients_failure_with_the_reason(tmp_path: Path) -> None:
    nodes = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2, "batch-size": 0}]
    rc = config(tmp_path / "a", 2, **{"num-server-rounds": 1, "min-fit-clients": 2, "max-failure-fraction": 0.5})
    _, seen = run(rc, nodes)
    frame = metrics(tmp_path / "a")
    assert frame[frame["round"] == 1]["failures"].iloc[0] == 1
    assert [p for p, _ in seen[0]] == [0]


# ------------------------------------------------------------------------------------------- FedBuff
def test_staleness_weights_scale_the_updates_by_hand() -> None:
    state = SchedulerState(_scheduler_options(**{"mode": "async", "staleness-weighting": "polynomial"}))
    ones = [np.ones(3, dtype=np.float32)]
    updates = [ClientUpdate(str(i), list(ones), [], 10, {STALENESS_METRIC: tau}) for i, tau in enumerate((0, 3, 8))]
    record = RoundRecord(round=1)
    out = state.process_updates(record, updates)
    assert [float(u.update[0][0]) for u in out] == pytest.approx([1.0, 0.5, 1 / 3])
    assert all(STALENESS_METRIC not in u.metrics for u in out)
    assert record.extra["staleness_mean"] == pytest.approx(11 / 3) and record.extra["staleness_max"] == 8


def _scheduler_options(**overrides: Any) -> Any:
    from flower_app.options import scheduler_options

    return scheduler_options(parse_run_config(overrides))


def test_fedbuff_without_staleness_and_a_full_buffer_equals_synchronous_fedavg(tmp_path: Path) -> None:
    n, rounds = 3, 3
    sync, sync_seen = run(config(tmp_path / "sync", n, **{"num-server-rounds": rounds}))
    fedbuff, async_seen = run(config(tmp_path / "async", n, **{
        "num-server-rounds": rounds, "mode": "async", "async-concurrency": n, "async-buffer-size": n,
        "staleness-weighting": "constant"}))
    for a, b in zip(fedbuff.weights, sync.weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Every step aggregated the same clients' updates (one per client, staleness 0) as the round did.
    assert [sorted(p for p, _ in r) for r in async_seen] == [sorted(p for p, _ in r) for r in sync_seen]
    a, s = metrics(tmp_path / "async"), metrics(tmp_path / "sync")
    np.testing.assert_allclose(a["central_accuracy"], s["central_accuracy"], atol=1e-9)
    assert list(a[a["round"] > 0]["staleness_max"]) == [0.0] * rounds


def test_fedbuff_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    common = {"mode": "async", "device-profiles": "heavy", "async-concurrency": 3, "async-buffer-size": 2,
              "server-momentum": 0.9, "strategy": "fedavgm", "server-learning-rate": 1.0}
    whole, _ = run(config(tmp_path, 4, **{**common, "num-server-rounds": 6, "run-name": "whole"}))
    run(config(tmp_path, 4, **{**common, "num-server-rounds": 3, "run-name": "parts"}))
    state = _checkpoint_state(tmp_path / "parts")
    assert state["in_flight"], "the checkpoint must hold work in flight for this test to mean something"
    assert any(int(v["version"]) < 3 for v in state["versions"])  # and stale work: older weights kept
    resumed, _ = run(config(tmp_path, 4, **{**common, "num-server-rounds": 6, "run-name": "parts", "resume": True}))
    for a, b in zip(resumed.weights, whole.weights):
        np.testing.assert_array_equal(a, b)
    m_whole, m_parts = metrics(tmp_path, "whole"), metrics(tmp_path, "parts")
    for column in ("central_accuracy", "sim_time", "staleness_mean", "results"):
        np.testing.assert_array_equal(m_parts[column].to_numpy(), m_whole[column].to_numpy(), err_msg=column)
    assert m_whole["staleness_max"].max() > 0  # arrivals out of dispatch order happened


def _checkpoint_state(run_dir: Path) -> dict[str, Any]:
    from flower_app.checkpoint import read_checkpoint

    return dict(read_checkpoint(run_dir / "checkpoint.pt")["strategy"]["scheduler"])


def test_max_staleness_drops_old_updates(tmp_path: Path) -> None:
    trace = fast_and_slow_trace(tmp_path / "trace.csv", [1000.0, 1000.0, 1000.0, 5.0])
    rc = config(tmp_path / "a", 4, **{"mode": "async", "device-profiles": "trace", "device-trace": str(trace),
                                      "async-concurrency": 4, "async-buffer-size": 1, "max-staleness": 1,
                                      "num-server-rounds": 8})
    strategy, seen = run(rc)
    frame = metrics(tmp_path / "a")
    trained = frame[frame["round"] > 0]
    assert trained["stale"].sum() >= 1  # the slow device's update came back too old
    assert trained["staleness_max"].max() <= 1
    assert 3 not in {p for r in seen for p, _ in r}
    assert scheduler_state(strategy).dispatches >= 9


@pytest.mark.parametrize(
    ("rule", "aggregator"),
    [(r, "mean") for r, spec in STRATEGIES.items() if not spec.async_conflict]
    + [("fedavgm", a) for a in AGGREGATORS if a != "mean"],
)
def test_fedbuff_runs_every_rule_and_aggregator(tmp_path: Path, rule: str, aggregator: str) -> None:
    extra: dict[str, Any] = {"strategy": rule, "aggregator": aggregator}
    if rule in ("fedadam", "fedyogi", "fedadagrad"):
        extra["server-learning-rate"] = 0.03
    if aggregator in ("krum", "multi-krum"):
        extra["num-byzantine"] = 0
    if aggregator == "trimmed-mean":
        extra["trim-fraction"] = 0.34  # trims one update at each end of a step's 3 (0.2 trims none: refused)
    if not STRATEGIES[rule].local_training:
        extra["local-epochs"] = AppConfig().local_epochs  # a gradient rule reads no local-training key
    rc = config(tmp_path / "a", 4, **{"mode": "async", "device-profiles": "mild", "async-concurrency": 4,
                                      "async-buffer-size": 3, "num-server-rounds": 3, **extra})
    strategy, _seen = run(rc)
    frame = metrics(tmp_path / "a")
    trained = frame[frame["round"] > 0]
    assert list(trained["results"]) == [3, 3, 3] and trained["updated"].all(), frame
    assert trained["rejected"].sum() == 0 and trained["failures"].sum() == 0
    assert all(math.isfinite(float(np.abs(w).sum())) for w in strategy.weights)
    assert any(not np.array_equal(a, b) for a, b in zip(strategy.weights, _initial_weights(rc)))


def test_fedbuff_refuses_an_aggregator_that_its_buffer_can_never_satisfy(tmp_path: Path) -> None:
    # Whatever the federation's size, each server step aggregates async-buffer-size updates.
    rc = config(tmp_path, 20, **{"mode": "async", "device-profiles": "mild", "async-buffer-size": 3,
                                 "aggregator": "trimmed-mean", "trim-fraction": 0.2})
    with pytest.raises(ConfigError, match=r"every FedBuff server step aggregates async-buffer-size=3 updates, and "
                                          r"trim-fraction 0.2 of n=3 .*raise async-buffer-size, or change trim-fraction"):
        parse_run_config(rc)
    parse_run_config({**rc, "async-buffer-size": 5})  # floor(0.2 x 5) = 1 at each end


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "async", "secure-aggregation": True}, "mode 'async' cannot run with secure-aggregation: SecAgg\\+ masks"),
        ({"mode": "async", "dp-mode": "central-server"}, "mode 'async' cannot run with dp-mode 'central-server'"),
        ({"mode": "async", "strategy": "scaffold"}, "strategy 'scaffold' keeps a control variate c_i per client"),
        ({"mode": "async", "round-deadline": 5.0}, "round-deadline is set but this run \\(mode 'async'"),
        ({"async-buffer-size": 4}, "async-buffer-size is set but this run \\(mode 'sync'"),
        ({"device-speed": 5.0}, "device-speed is set but this run \\(mode 'sync', device-profiles 'none'\\)"),
        ({"device-profiles": "heavy", "device-speed-spread": 2.0}, "device-speed-spread is set"),
        ({"device-profiles": "trace"}, "device-profiles 'trace' needs device-trace"),
        ({"mode": "async", "staleness-weighting": "constant", "staleness-exponent": 1.0}, "staleness-exponent is set"),
        ({"mode": "async", "async-concurrency": 2, "async-buffer-size": 3}, "must be <= async-concurrency"),
        ({"secure-aggregation": True, "over-selection": 1.5}, "over-selection cannot apply to it"),
        ({"secure-aggregation": True, "device-profiles": "mild"}, "device-profiles cannot apply"),
    ],
)
def test_scheduling_settings_that_cannot_work_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(overrides)
