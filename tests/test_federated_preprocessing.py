"""Federated preprocessing through the strategy: the statistics round, the agreed transform, resume, refusals.

Oracles: the merged statistics equal the pooled raw training data's (plain: exactly as float64 allows; SecAgg+:
within its quantization), a federated run equals a fixed run given the federated transform bit for bit, and a
raw value becomes the same input on every node and on the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasets import FeatureStats, FeatureTransform, TensorData, transform_data
from flower_app import client_app
from flower_app.config import AppConfig, ConfigError, parse_run_config
from flower_app.data import (
    STATS_REQUEST_KEY,
    ClientData,
    client_data,
    prepared_data,
    statistics_reply,
    transform_config,
)
from flower_app.inprocess import InProcessGrid
from flower_app.server_app import run_server, server_fn
from flower_app.server_preprocessing import FederatedStatistics, StatisticsOptions
from flower_app.task import ModelInfo

NUM_CLIENTS = 3


def config(out: Path, **overrides: Any) -> dict[str, Any]:
    rc = AppConfig().to_run_config()
    rc.update({
        "num-server-rounds": 1, "output-dir": str(out), "run-name": "run", "model": "mlp", "hidden-size": 8,
        "local-epochs": 1, "num-partitions": NUM_CLIENTS, "min-fit-clients": NUM_CLIENTS,
        "min-available-clients": NUM_CLIENTS, "dataset": "breast-cancer", "partitioner": "sorted",
        "preprocessing": "federated", "data-cache": False, "fraction-evaluate": 0.0,
    })
    rc.update(overrides)
    return rc


def run(rc: dict[str, Any], watch: Callable[[Message], None] | None = None) -> Any:
    """One in-process run through `run_server` (the real loop or SecAgg+ workflow); returns its strategy."""
    n = int(rc["num-partitions"])

    def drop(message: Message) -> bool:
        if watch is not None:
            watch(message)
        return False

    grid = InProcessGrid(client_app.app, [{"partition-id": i, "num-partitions": n} for i in range(n)], rc, drop=drop)
    return run_server(grid, Context(1, 0, {}, RecordDict(), rc))


def pooled(rc: dict[str, Any]) -> FeatureStats:
    """The oracle: statistics of every node's raw train split stacked together (two passes, float64)."""
    cfg = parse_run_config(rc)
    n = int(rc["num-partitions"])
    x = torch.cat([client_data(cfg, {"partition-id": i, "num-partitions": n}).train.x for i in range(n)])
    values = x.to(torch.float64).numpy()
    mean = values.mean(axis=0)
    return FeatureStats(len(values), mean, ((values - mean) ** 2).sum(axis=0), values.min(axis=0), values.max(axis=0))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Any]:
    rc = config(tmp_path_factory.mktemp("plain"), **{"num-server-rounds": 2})
    return rc, run(rc)


def test_federated_statistics_equal_the_pooled_statistics_on_a_non_iid_split(plain_run: tuple) -> None:
    rc, strategy = plain_run
    oracle = pooled(rc)
    transform = strategy.statistics.transform
    # "sorted" gives each node one range of the label: the nodes' own means differ a lot from the pooled one.
    own = [client_data(parse_run_config(rc), {"partition-id": i, "num-partitions": 3}).train.x.double().mean(0)
           for i in range(3)]
    assert max(float((m.numpy() - oracle.mean).__abs__().max() / oracle.std().max()) for m in own) > 0.05
    np.testing.assert_allclose(transform.offset, oracle.mean, rtol=1e-12)
    np.testing.assert_allclose(transform.scale, oracle.std(), rtol=1e-10)
    assert strategy.statistics.summary["clients"] == 3 and strategy.statistics.summary["examples"] == oracle.count


def test_min_max_statistics_equal_the_pooled_range(tmp_path: Path) -> None:
    rc = config(tmp_path, **{"preprocessing-kind": "min-max"})
    transform = run(rc).statistics.transform
    oracle = pooled(rc)
    assert transform.kind == "min-max"
    np.testing.assert_array_equal(transform.offset, oracle.minimum)
    np.testing.assert_allclose(transform.scale, oracle.maximum - oracle.minimum, rtol=1e-15)


@pytest.mark.slow
def test_secure_aggregation_statistics_equal_the_pooled_within_quantization(tmp_path: Path) -> None:
    rc = config(tmp_path, **{"secure-aggregation": True, "send-delta": True})
    strategy = run(rc)
    oracle = pooled(rc)
    assert strategy.preaggregated
    # SecAgg+ quantizes each value to 16 / 2^22 in units of the reference scale (about a std): errors ~1e-6 std.
    assert np.all(np.abs(np.array(strategy.statistics.transform.offset) - oracle.mean) <= 1e-4 * oracle.std())
    np.testing.assert_allclose(strategy.statistics.transform.scale, oracle.std(), rtol=1e-4)


def test_secagg_weighting_of_per_observation_sums_gives_the_pooled_statistics() -> None:
    """The SecAgg+ arithmetic without the protocol: sum_i (n_i / W) v_i / sum_i (n_i / W), v_i = [1, mean z, mean z^2]."""
    rng = np.random.default_rng(0)
    parts = [torch.from_numpy(rng.normal(loc, scale, size=(n, 4)).astype(np.float32))
             for loc, scale, n in ((100.0, 5.0, 40), (130.0, 20.0, 90), (90.0, 1.0, 7))]
    reference = FeatureTransform.standardize([110.0] * 4, [15.0] * 4)
    info = ModelInfo("regression", (4,), 1, "dense")
    request = {STATS_REQUEST_KEY: "sums", "preprocessing-reference-offset": reference.to_strings()[1],
               "preprocessing-reference-scale": reference.to_strings()[2]}
    vectors, weights = [], []
    for x in parts:
        data = ClientData(TensorData(x, torch.zeros(len(x))), TensorData(x[:1], torch.zeros(1)), info, 0, None)
        arrays, n, _ = statistics_reply(data, request, clipping_range=8.0, max_weight=1000.0)
        vectors.append(arrays[0])
        weights.append(n / 1000.0)
    aggregate = sum(w * v for w, v in zip(weights, vectors)) / sum(weights)
    step = FederatedStatistics(StatisticsOptions("standardize", secure=True, num_features=4, reference=reference,
                                                 min_replies=3))
    step.aggregate([(str(i), [aggregate], len(x), {}) for i, x in enumerate(parts)], 0, preaggregated=True)
    everything = torch.cat(parts).double().numpy()
    np.testing.assert_allclose(step.transform.offset, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(step.transform.scale, everything.std(0), rtol=1e-9)


def test_a_raw_value_becomes_the_same_input_on_every_node_and_on_the_server(plain_run: tuple) -> None:
    rc, strategy = plain_run
    transform = strategy.statistics.transform
    cfg = parse_run_config(rc)
    row = torch.tensor([[15.0 + i for i in range(30)]], dtype=torch.float32)
    inputs = []
    for i in range(3):
        raw = client_data(cfg, {"partition-id": i, "num-partitions": 3})
        with_row = ClientData(TensorData(torch.cat([raw.train.x, row]), torch.cat([raw.train.y, torch.zeros(1, dtype=torch.int64)])),
                              raw.val, raw.info, i, raw.num_classes, raw.class_names)
        inputs.append(prepared_data(with_row, transform).train.x[-1])
    assert all(torch.equal(inputs[0], x) for x in inputs[1:])
    assert torch.equal(inputs[0], transform.apply(row)[0])
    # The server's held-out split goes through the same transform: central evaluation of the agreed model.
    from flower_app.data import server_source

    source = server_source(cfg)
    assert source.feature_transform is None  # raw, as the nodes' partitions
    assert torch.equal(transform_data(source.test, transform).x, transform.apply(source.test.x))


def test_a_federated_run_equals_a_fixed_run_given_its_transform_bit_for_bit(plain_run: tuple, tmp_path: Path) -> None:
    rc, federated = plain_run
    kind, offset, scale = federated.statistics.transform.to_strings()
    fixed = run({**rc, "output-dir": str(tmp_path), "preprocessing": "fixed", "preprocessing-kind": kind,
                 "preprocessing-offset": offset, "preprocessing-scale": scale})
    # Two in-process runs of one config already differ by a float32 ulp or two (seen with preprocessing 'local'
    # too: 6e-8 after two rounds), so the models are compared to 1e-6; the inputs themselves are bit-identical
    # (test_a_raw_value_becomes_the_same_input_on_every_node_and_on_the_server).
    for a, b in zip(federated.weights, fixed.weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    saved = json.loads((Path(rc["output-dir"]) / "run" / "preprocessing.json").read_text())
    assert saved["offset"] == list(federated.statistics.transform.offset) and saved["kind"] == kind
    assert json.loads((Path(rc["output-dir"]) / "run" / "best_model.json").read_text())["preprocessing"] == "preprocessing.json"


def test_resume_restores_the_transform_bit_for_bit_and_does_not_redo_the_step(plain_run: tuple, tmp_path: Path) -> None:
    rc, first = plain_run
    asked: list[str] = []

    def watch(message: Message) -> None:
        if message.metadata.message_type == "train":
            config = message.content.config_records.get("fitins.config", {})
            if STATS_REQUEST_KEY in config:
                asked.append(str(message.metadata.dst_node_id))

    resumed = run({**rc, "num-server-rounds": 3, "resume": True}, watch)
    assert asked == []
    assert resumed.statistics.transform == first.statistics.transform  # floats compared exactly
    assert resumed.start_round == 2 and resumed.current_round == 3
    # ... and the first run did ask every node once.
    fresh: list[str] = []

    def watch_fresh(message: Message) -> None:
        if message.metadata.message_type == "train" and STATS_REQUEST_KEY in message.content.config_records.get(
                "fitins.config", {}):
            fresh.append(str(message.metadata.dst_node_id))

    run({**rc, "output-dir": str(tmp_path)}, watch_fresh)
    assert sorted(fresh) == ["101", "102", "103"]


# ------------------------------------------------------------------------------------ hostile replies
GOOD = FeatureStats(10, np.array([1.0, 2.0]), np.array([4.0, 9.0]), np.array([0.0, 0.5]), np.array([2.5, 4.0]))


def plain_step(**overrides: Any) -> FederatedStatistics:
    return FederatedStatistics(StatisticsOptions(**{"kind": "standardize", "secure": False, "num_features": 2,
                                                    "min_replies": 2, **overrides}))


@pytest.mark.parametrize(
    ("arrays", "count", "reason"),
    [
        ([GOOD.to_array()[:-1]], 10, "hold 9 values"),
        ([np.where(np.arange(9) == 2, np.nan, GOOD.to_array())], 10, "NaN"),
        ([GOOD.to_array(), GOOD.to_array()], 10, "one array"),
        ([GOOD.to_array()], 11, "count 10 observations"),
        ([GOOD.to_array().astype(np.int64)], 10, "flat float array"),
        ([np.concatenate([[10.0], [9.0, 2.0], [4.0, 9.0], [0.0, 0.5], [2.5, 4.0]])], 10, "outside its feature's min"),
        ([np.concatenate([[10.0], [1.0, 2.0], [400.0, 9.0], [0.0, 0.5], [2.5, 4.0]])], 10, "variance exceeds"),
        ([GOOD.to_array()], -1, ""),
    ],
)
def test_a_malformed_statistics_reply_is_rejected_with_the_reason(
    arrays: list, count: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    step = plain_step()
    replies = [("good-1", [GOOD.to_array()], 10, {}), ("good-2", [GOOD.to_array()], 10, {}), ("bad", arrays, count, {})]
    with caplog.at_level("WARNING", logger="flwr"):
        step.aggregate(replies, 0, preaggregated=False)
    assert step.done and step.summary["rejected"] == 1
    line = next(r.getMessage() for r in caplog.records if "client bad" in r.getMessage())
    assert "statistics round" in line and reason in line


def test_too_few_usable_replies_stop_the_run_with_the_reason(tmp_path: Path) -> None:
    step = plain_step(min_replies=3)
    step.aggregate([("a", [GOOD.to_array()], 10, {}), ("b", [np.zeros(3)], 10, {})], 1, preaggregated=False)
    assert not step.done and "1 usable statistics of 3 clients" in step.failure

    def broken(message: Message) -> bool:  # one of three nodes cannot send statistics
        return message.metadata.dst_node_id == 102

    rc = config(tmp_path)
    grid = InProcessGrid(client_app.app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], rc, drop=broken)
    with pytest.raises(RuntimeError, match="statistics round did not complete: 2 usable statistics of 3"):
        run_server(grid, Context(1, 0, {}, RecordDict(), rc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=12),
    count=st.one_of(st.integers(-5, 10**20), st.floats(allow_nan=True), st.text(max_size=3), st.none()),
    dtype=st.sampled_from(["float64", "float32", "float16", "int32", "bool"]),
    labels=st.one_of(st.none(), st.text(max_size=20), st.integers()),
)
def test_hostile_statistics_never_crash_the_server(values: list, count: Any, dtype: str, labels: Any) -> None:
    step = plain_step(labels=("a", "b"), min_replies=1)
    metrics = {} if labels is None else {"preprocessing_labels": labels}
    hostile = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        hostile = hostile.astype(dtype)
    good = ("good", [GOOD.to_array()], 10, {"preprocessing_labels": json.dumps(["a"])})
    step.aggregate([good, ("hostile", [hostile], count, metrics)], 0, preaggregated=False)
    assert step.done  # the good reply alone is enough here (max-failure-fraction 0.5)
    assert all(np.isfinite(step.transform.offset)) and all(s > 0 for s in step.transform.scale)
    assert step.class_names == ("a", "b")


# ------------------------------------------------------------------------------------ run-config refusals
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secure-aggregation": True, "preprocessing-kind": "min-max"}, "min-max scaling needs each feature's min"),
        ({"mode": "async"}, "FedBuff"),
        ({"dataset": "text", "hf-model": "x"}, "token ids"),
        ({"preprocessing": "fixed"}, "applies the transform of preprocessing-offset"),
        ({"preprocessing": "fixed", "preprocessing-offset": "1,2", "preprocessing-scale": "1"}, "one offset and one scale"),
        ({"preprocessing": "fixed", "preprocessing-offset": "1", "preprocessing-scale": "0"}, "scales must be > 0"),
        ({"preprocessing": "local", "preprocessing-kind": "min-max"}, "preprocessing is 'local'"),
        ({"preprocessing-offset": "1", "preprocessing-scale": "1"}, "only with secure-aggregation"),
        ({"preprocessing-offset": "1"}, "go together"),
        ({"dataset": "csv", "data-path": "x.csv", "secure-aggregation": True}, "set class-names to the full list"),
    ],
)
def test_settings_that_cannot_work_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AppConfig(**{k.replace("-", "_"): v for k, v in {"preprocessing": "federated", **overrides}.items()})


def test_secure_aggregation_without_a_reference_or_server_data_is_refused(tmp_path: Path) -> None:
    rc = config(tmp_path, **{"secure-aggregation": True, "server-data": "none", "input-shape": "30", "num-outputs": 2,
                               "fraction-evaluate": 1.0})
    with pytest.raises(ConfigError, match="set preprocessing-offset and preprocessing-scale"):
        server_fn(Context(1, 0, {}, RecordDict(), rc))


def test_a_fixed_transform_of_the_wrong_length_is_refused_before_any_round(tmp_path: Path) -> None:
    rc = config(tmp_path, **{"preprocessing": "fixed", "preprocessing-offset": "0,0", "preprocessing-scale": "1,1"})
    with pytest.raises(ConfigError, match="give 2 values, but the data has 30 features"):
        server_fn(Context(1, 0, {}, RecordDict(), rc))


def test_images_get_one_statistic_per_channel_and_the_sums_reply_stays_in_secagg_range() -> None:
    x = torch.rand(20, 3, 4, 4)
    info = ModelInfo("classification", (3, 4, 4), 2, "dense")
    data = ClientData(TensorData(x, torch.zeros(20, dtype=torch.int64)), TensorData(x[:2], torch.zeros(2, dtype=torch.int64)),
                      info, 0, 2, ("0", "1"))
    (array,), n, _ = statistics_reply(data, {STATS_REQUEST_KEY: "features"}, 8.0, 1000.0)
    stats = FeatureStats.from_array(array)
    assert n == 20 and stats.count == 20 * 16 and stats.num_features == 3
    np.testing.assert_allclose(stats.mean, x.double().mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    far = FeatureTransform.standardize([100.0] * 3, [0.001] * 3)
    request = {STATS_REQUEST_KEY: "sums", "preprocessing-reference-offset": far.to_strings()[1],
               "preprocessing-reference-scale": far.to_strings()[2]}
    with pytest.raises(ValueError, match="beyond secagg-clipping-range 8"):
        statistics_reply(data, request, 8.0, 1000.0)
    assert transform_config(far)["agreed-transform-kind"] == "standardize"


def test_the_statistics_round_runs_through_the_scheduler_with_over_selection(tmp_path: Path) -> None:
    rc = config(tmp_path, **{"over-selection": 1.5, "min-fit-clients": 2, "min-available-clients": 3,
                             "num-server-rounds": 2})
    strategy = run(rc)
    oracle = pooled(rc)  # every available node reports in the statistics round, whatever a training round samples
    np.testing.assert_allclose(strategy.statistics.transform.offset, oracle.mean, rtol=1e-12)
    assert strategy.current_round == 2


@pytest.mark.slow
def test_secure_aggregation_statistics_round_through_flwr_run(flwr_home: Path, tmp_path: Path) -> None:
    """One real SecAgg+ run in simulation (3 nodes, 1 round): the statistics round, then training."""
    from tests.flwr_utils import run_simulation

    out = tmp_path / "out"
    proc = run_simulation(flwr_home, (
        f"output-dir='{out}' run-name='run' dataset='breast-cancer' partitioner='sorted' preprocessing='federated' "
        "secure-aggregation=true send-delta=true model='mlp' hidden-size=8 num-server-rounds=1 local-epochs=1 "
        "fraction-evaluate=0.0 num-partitions=3 min-fit-clients=3 min-available-clients=3"
    ))
    logs = proc.stdout + proc.stderr
    saved = out / "run" / "preprocessing.json"
    assert saved.exists(), logs[-4000:]
    assert "statistics round: 3 clients" in logs and "Secure aggregation completed." in logs
    oracle = pooled(config(tmp_path))
    # SecAgg+ quantizes each value to 16 / 2^22 in units of the reference scale (about a std): errors ~1e-6 std.
    assert np.all(np.abs(np.array(json.loads(saved.read_text())["offset"]) - oracle.mean) <= 1e-4 * oracle.std())
    frame = pd.read_csv(out / "run" / "metrics.csv")
    assert list(frame["round"]) == [0, 1] and bool(frame["updated"].iloc[-1])
