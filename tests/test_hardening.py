"""Regression tests for issue 10, one per example class, through the real strategy shell and config parser.

1. one client cannot crash the server; 2. the numbers clients report are bounded; 3. the server step is atomic
and one huge update cannot poison the optimizer; 4. the run config refuses what cannot work, naming the key.
The property-based suite over the same classes is `tests/test_hardening_fuzz.py`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status, ndarrays_to_parameters

from datasets import PartitionOptions, SourceOptions, example_keys, load_source, partition
from flower_app.config import FIELDS, AppConfig, ConfigError, parse_run_config
from flower_app.options import strategy_options
from strategies import base
from strategies.aggregators import AggregatorParams
from strategies.base import FederatedStrategy, StrategyOptions
from strategies.compression import CompressionConfig, compress
from strategies.optimizers import ServerOptHParams
from strategies.serde import ndarray_view
from strategies.streaming import StreamingMean, finite_weighted_mean
from strategies.tensors import l2_norm
from strategies.validation import cap_counts, clean_metrics, lower_median, norm_bound
from tests.strategy_utils import FakeProxy, client_manager

SHAPES = [(3, 2), (2,), (2,)]
TRAINABLE = [True, True, False]


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def make(rule: str = "fedavg", aggregator: str = "mean", **kw: Any) -> FederatedStrategy:
    params = AggregatorParams(trim_fraction=kw.pop("trim", 0.2), num_byzantine=kw.pop("f", 1))
    lr = kw.pop("lr", 0.1 if rule in ("fedadam", "fedyogi", "fedadagrad") else 1.0)
    settings: dict[str, Any] = {"min_fit_clients": 1, "min_evaluate_clients": 1, "min_available_clients": 1,
                                "client_wait_timeout": 0.01, **kw}
    options = StrategyOptions(rule=rule, aggregator=aggregator, aggregator_params=params,
                              optimizer=ServerOptHParams(learning_rate=lr), **settings)
    return FederatedStrategy(options, initial_weights(), TRAINABLE)


def begin(strategy: FederatedStrategy, n: int, rnd: int = 1) -> None:
    manager, _ = client_manager(n)
    strategy.configure_fit(rnd, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]


def reply(strategy: FederatedStrategy, local: list[np.ndarray], n: int, control: float = 0.01, **metrics: Any) -> FitRes:
    payload = local
    if strategy.kind == "delta":
        payload = [a - w for a, w in zip(local, strategy.weights)]
    wire, _ = compress(payload, strategy.options.compression)
    if strategy.rule.scaffold:
        wire = wire + [np.full(s, control, np.float32) for s, t in zip(SHAPES, TRAINABLE) if t]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(wire), n, {"train_loss": 1.0, "local_steps": 4, **metrics})


def honest(strategy: FederatedStrategy, k: int, seed: int = 1, n: int = 50, **metrics: Any) -> list[tuple[FakeProxy, FitRes]]:
    rng = np.random.default_rng(seed)
    return [(FakeProxy(f"h{i}"), reply(strategy, [w + 0.01 * rng.normal(size=w.shape).astype(np.float32) for w in strategy.weights], n, **metrics))
            for i in range(k)]


def fit(strategy: FederatedStrategy, results: list, rnd: int = 1) -> tuple[Any, dict]:
    return strategy.aggregate_fit(rnd, results, [])


def evil(strategy: FederatedStrategy, tensors: list[bytes] | None = None, n: int = 50, **metrics: Any) -> tuple[FakeProxy, FitRes]:
    res = honest(strategy, 1, seed=9)[0][1]
    if tensors is not None:
        res = FitRes(res.status, Parameters(tensors=tensors, tensor_type=""), n, res.metrics)
    res.num_examples = n
    res.metrics.update(metrics)
    return FakeProxy("evil"), res


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -------------------------------------------------------------------------- 1. one client cannot crash the server
def test_an_absurd_npy_shape_is_a_value_error_not_an_overflow() -> None:
    with pytest.raises(ValueError, match="does not hold"):
        ndarray_view(npy_header((2**70,)))
    with pytest.raises(ValueError, match="does not hold"):
        ndarray_view(npy_header((2**40, 2**40)))  # int64 product wraps to 0: must not pass as an empty array
    with pytest.raises(ValueError, match="negative dimension"):
        ndarray_view(npy_header((-1,)))


@pytest.mark.parametrize("error", [OverflowError, MemoryError, TypeError, KeyError, RuntimeError])
def test_any_exception_while_one_reply_is_handled_rejects_that_reply_only(caplog: pytest.LogCaptureFixture, error: type) -> None:
    class Exploding(list):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            raise error("boom")

    strategy = make()
    begin(strategy, 4)
    results = honest(strategy, 3)
    proxy, res = evil(strategy)
    res.parameters = Parameters(tensors=Exploding(res.parameters.tensors), tensor_type="")
    with caplog.at_level(logging.WARNING):
        params, _ = fit(strategy, [*results, (proxy, res)])
    assert params is not None and strategy._record is not None and strategy._record.rejected == 1
    assert f"round 1: rejected update from client evil: {error.__name__}: {error('boom')}" in warnings_of(caplog)


def test_krum_with_one_of_five_replies_rejected_keeps_the_model_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make(aggregator="krum", f=1)
    begin(strategy, 5)
    before = [w.copy() for w in strategy.weights]
    results = [*honest(strategy, 4), evil(strategy, tensors=[npy_header((2**70,))])]
    with caplog.at_level(logging.WARNING):
        params, _ = fit(strategy, results)
    assert params is None and same(strategy.weights, before)
    record = strategy._record
    assert record is not None and record.rejected == 1 and record.step_refused == 1 and not record.updated
    assert "aggregator 'krum' cannot aggregate 4 replies: Krum needs n >= 2f + 3 replies: n=4 with f=1" in warnings_of(caplog)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aggregator": "krum", "num-byzantine": 5, "num-partitions": 2}, "a round has at most 2 clients"),
        ({"aggregator": "multi-krum", "num-byzantine": 1, "num-selected": 5, "num-partitions": 5,
          "min-fit-clients": 5, "min-available-clients": 5}, "only n - f = 4 of n=5"),
        ({"aggregator": "trimmed-mean", "trim-fraction": 0.2, "num-partitions": 4}, "trims floor(0.2 x 4) = 0"),
        ({"aggregator": "median", "num-partitions": 2}, "the median of 2 replies is their mean"),
        ({"aggregator": "krum", "num-partitions": 10, "fraction-fit": 0.2}, "n=2 with f=1"),
        ({"min-available-clients": 5, "min-fit-clients": 3, "num-partitions": 4}, "min-available-clients (5) can never connect"),
    ],
)
def test_aggregator_preconditions_no_round_can_meet_are_refused_at_parse_time(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="can never") as err:
        parse_run_config(overrides)
    assert message in str(err.value)


def test_preconditions_that_more_clients_could_meet_are_left_to_the_rounds() -> None:
    # num-partitions=0: the federation's size is not bounded by the config, so more clients may connect.
    assert parse_run_config({"aggregator": "krum", "num-byzantine": 5}).num_byzantine == 5
    assert parse_run_config({"aggregator": "krum", "num-partitions": 10, "fraction-fit": 0.5}).aggregator == "krum"
    assert parse_run_config({"aggregator": "trimmed-mean", "num-partitions": 5}).trim_fraction == 0.2


def test_metrics_of_the_wrong_type_are_ignored_with_a_warning_and_the_round_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make()
    begin(strategy, 4)
    results = honest(strategy, 3, data_label_0=5, data_partition=-1)  # -1: a node with its own data file
    results.append(evil(strategy, train_loss="low", data_client="h0", data_label_0=b"x", epsilon=math.nan,
                        train_accuracy=True, odd=[1, 2], none=None))
    with caplog.at_level(logging.WARNING):
        params, _ = fit(strategy, results)
    record = strategy._record
    assert params is not None and record is not None and record.updated and record.rejected == 0
    assert record.train_loss == 1.0 and math.isnan(record.train_accuracy)  # the other clients' numbers only
    assert "fit_epsilon" not in record.extra
    assert {cid: e["client"] for cid, e in strategy.data_summary.items()} == {"h0": "h0", "h1": "h1", "h2": "h2"}
    assert strategy.data_summary["h0"] == {"client": "h0", "label_0": 5, "partition": -1}
    assert not any(k.startswith("fit_data_") for k in record.extra)  # partitions.csv material, not figures
    logged = warnings_of(caplog)
    for name in ("train_loss (not a number: str", "data_client (reserved", "epsilon (nan)", "train_accuracy (not a number: bool",
                 "odd (not a number: list"):
        assert "client evil: metrics ignored:" in logged and name in logged, name


def test_mixed_metric_types_across_clients_aggregate_the_numbers() -> None:
    out = base.aggregate_metrics([(1, {"loss": 1.0, "acc": "x"}), (3, {"loss": "3", "acc": 0.5}), (2**70, {"num_x": 10**400})])
    assert out == {"loss": 1.0, "acc": 0.5}  # 10^400 is beyond float: "num_x" is left out, not a crash


def test_nothing_is_stepped_before_the_rounds_metrics_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    strategy = make()
    begin(strategy, 2)
    before = [w.copy() for w in strategy.weights]

    def broken(replies: Any) -> dict:
        raise RuntimeError("metric aggregation failed")

    monkeypatch.setattr(base, "aggregate_metrics", broken)
    with pytest.raises(RuntimeError):
        fit(strategy, honest(strategy, 2))
    assert same(strategy.weights, before)


@pytest.mark.parametrize("codec", ["int8", "int8-block"])
def test_compressed_updates_times_large_counts_cannot_overflow_the_mean(codec: str) -> None:
    strategy = make("fedadam", compression=CompressionConfig(codec, block_size=2), send_delta=True, max_count_ratio=math.inf)
    begin(strategy, 3)
    update = [np.full(s, 3e36, np.float32) for s in SHAPES]
    results = [(FakeProxy(f"c{i}"), reply(strategy, [w + u for w, u in zip(strategy.weights, update)], 10**6 + i)) for i in range(3)]
    mean_before = strategy._streaming_mean_of  # the compressed path
    assert mean_before is not None
    params, _ = fit(strategy, results)
    # The mean of 3e36 is 3e36; Adam's v = 0.01 * (3e36)^2 overflows float32, so the step is refused, not frozen.
    assert params is None and strategy._record is not None and strategy._record.step_refused == 1
    assert all(np.isfinite(a).all() for a in strategy.opt_state.m + strategy.opt_state.v)  # type: ignore[operator]
    mean = StreamingMean()
    for i in range(3):
        mean.add([np.full(4, 3e38, np.float32)], 10**6 + i)
    np.testing.assert_allclose(mean.result()[0], 3e38, rtol=1e-6)


# -------------------------------------------------------------------------- 2. numbers clients report are bounded
def test_a_count_of_2_to_63_is_rejected_and_one_beyond_the_cap_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make()
    begin(strategy, 5)
    with caplog.at_level(logging.WARNING):
        fit(strategy, [*honest(strategy, 3), evil(strategy, n=2**63 - 1)])
    assert strategy._record is not None and strategy._record.rejected == 1
    assert "num_examples must be a positive integer <= 2^53, got 9223372036854775807" in warnings_of(caplog)

    shifted = make(max_count_ratio=10.0)
    begin(shifted, 4)
    results = honest(shifted, 3, n=50)
    proxy, res = evil(shifted, n=10**12)
    res.parameters = ndarrays_to_parameters([w + 0.2 for w in shifted.weights])
    with caplog.at_level(logging.WARNING):
        fit(shifted, [*results, (proxy, res)])
    assert shifted._record is not None and shifted._record.weights_capped == 1
    assert "client evil reported 1000000000000 examples, more than max-count-ratio 10 x the round's lower median 50; " \
           "its weight is capped at 500" in warnings_of(caplog)
    # Its share is 500 / (500 + 3 x 50) of the mean: the model moved by 0.2 x 500/650 towards it, not by 0.2.
    reference = make()
    begin(reference, 3)
    fit(reference, honest(reference, 3, n=50))
    shift = np.mean(np.concatenate([(a - b).ravel() for a, b in zip(shifted.weights, reference.weights)]))
    assert shift == pytest.approx(0.2 * 500 / 650, rel=0.02)


@pytest.mark.parametrize(("name", "options"), [
    ("dirichlet", {"dirichlet_alpha": 0.5}), ("dirichlet", {"dirichlet_alpha": 0.1}),
    ("quantity-skew", {"quantity_alpha": 1.0}), ("quantity-skew", {"quantity_alpha": 0.5}), ("shards", {}),
])
def test_the_default_count_cap_never_touches_honest_clients_of_the_projects_partitioners(name: str, options: dict) -> None:
    # The largest honest ratio measured (quantity-skew 0.5, two clients, 40 seeds) was 718: below 1000 (README).
    default_ratio = AppConfig().max_count_ratio
    source = load_source("digits", SourceOptions(seed=0))
    labels, keys = source.train.y.numpy(), example_keys(source.train.x, source.train.y)
    for n in (2, 3, 5, 10, 20):
        for seed in range(8):
            try:
                parts = partition(name, labels, keys, PartitionOptions(num_partitions=n, seed=seed, **options))
            except ValueError:
                continue  # e.g. shards with more classes per client than there are
            assert cap_counts([len(p) for p in parts], default_ratio)[1] == [], (n, seed)


def test_trimmed_mean_over_three_replies_warns_that_it_trims_nobody(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make(aggregator="trimmed-mean", trim=0.2)
    begin(strategy, 3)
    with caplog.at_level(logging.WARNING):
        params, _ = fit(strategy, honest(strategy, 3))
    assert params is not None
    assert ("aggregator 'trimmed-mean' cannot do its job with 3 replies: trim-fraction 0.2 of n=3 replies trims "
            "floor(0.2 x 3) = 0 at each end, so it is a plain mean; it trims one from each end from n=5 on") in warnings_of(caplog)


def test_fednova_refuses_a_local_step_count_of_10_to_12(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make("fednova")
    begin(strategy, 4)
    reference = make("fednova")
    begin(reference, 3)
    fit(reference, honest(reference, 3))
    with caplog.at_level(logging.WARNING):
        fit(strategy, [*honest(strategy, 3), evil(strategy, local_steps=10**12)])
    assert "local_steps 1000000000000 is more than max-count-ratio 1000 x the round's lower median 4" in warnings_of(caplog)
    assert same(strategy.weights, reference.weights)


def eval_reply(loss_: Any, n: int, **metrics: Any) -> EvaluateRes:
    return EvaluateRes(Status(Code.OK, ""), loss_, n, metrics)


@pytest.mark.parametrize(
    ("bad", "logged"),
    [
        (eval_reply(0.5, 10, accuracy=5.0), "accuracy (must be an accuracy in [0, 1], got 5.0)"),
        (eval_reply(0.5, 10, accuracy=math.nan), "accuracy (nan)"),
        (eval_reply(0.5, 10, accuracy=0.9, loss=0.0), "loss (reserved: the server sets it)"),
        (eval_reply(0.5, 10, accuracy=0.9, num_examples=10**15), "num_examples (reserved: the server sets it)"),
        (eval_reply(math.nan, 10, accuracy=0.9), "loss must be a finite number >= 0, got nan"),
        (eval_reply(-1.0, 10, accuracy=0.9), "loss must be a finite number >= 0, got -1.0"),
        (eval_reply(0.5, 0, accuracy=0.9), "num_examples must be a positive integer <= 2^53, got 0"),
        (eval_reply(0.5, 10**15, accuracy=0.9), "its weight in the federated figures is capped at 10000"),
    ],
)
def test_invalid_evaluation_replies_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture, bad: EvaluateRes, logged: str) -> None:
    strategy = make(max_count_ratio=1000.0)
    begin(strategy, 3)
    good = [(FakeProxy("a"), eval_reply(1.0, 10, accuracy=0.2)), (FakeProxy("b"), eval_reply(2.0, 10, accuracy=0.4))]
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_evaluate(1, [*good, (FakeProxy("evil"), bad)], [])
    assert logged in warnings_of(caplog) and "evil" in warnings_of(caplog)
    record = strategy._record
    assert record is not None
    assert 0.0 <= record.federated_accuracy <= 1.0 and 0.0 <= record.federated_loss
    assert "eval_num_examples" not in record.extra
    if "capped" not in logged:  # dropped (or its bad part dropped): the figures are those of the others
        assert record.federated_loss in (pytest.approx(1.5), pytest.approx((1.0 * 10 + 2.0 * 10 + 0.5 * 10) / 30))


# ------------------------------------------------------------------- 3. atomic server step, unpoisoned optimizer
@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_a_1e30_update_in_round_2_neither_poisons_nor_freezes_the_adaptive_optimizers(rule: str, caplog: pytest.LogCaptureFixture) -> None:
    clean, hit = make(rule), make(rule)
    steps: dict[str, list[float]] = {"clean": [], "hit": []}
    for rnd in range(1, 5):
        for label, strategy in (("clean", clean), ("hit", hit)):
            begin(strategy, 4, rnd)
            results = honest(strategy, 3, seed=rnd)
            if label == "hit" and rnd == 2:
                results.append(evil(strategy, tensors=list(ndarrays_to_parameters([w + np.float32(1e30) for w in strategy.weights]).tensors)))
            before = [w.copy() for w in strategy.weights]
            with caplog.at_level(logging.WARNING):
                fit(strategy, results, rnd)
            steps[label].append(max(float(np.abs(a - b).max()) for a, b in zip(strategy.weights, before)))
    assert "rejected update from client evil: the update's L2 norm" in warnings_of(caplog)
    assert steps["hit"] == steps["clean"] and same(hit.weights, clean.weights)
    assert all(np.isfinite(a).all() for a in hit.opt_state.v)  # type: ignore[union-attr]


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_with_the_norm_bound_off_a_step_that_would_overflow_the_state_is_refused_whole(rule: str, caplog: pytest.LogCaptureFixture) -> None:
    strategy = make(rule, max_update_norm_ratio=math.inf)
    begin(strategy, 3)
    fit(strategy, honest(strategy, 3))
    state = strategy.state_dict()
    begin(strategy, 1, 2)
    big = [(FakeProxy("evil"), reply(strategy, [w + np.float32(1e30) for w in strategy.weights], 50))]
    with caplog.at_level(logging.WARNING):
        params, _ = fit(strategy, big, 2)
    assert params is None and strategy._record is not None and strategy._record.step_refused == 1
    assert "server step refused: the step would make the optimizer's second moment non-finite" in warnings_of(caplog)
    after = strategy.state_dict()
    assert same(after["weights"], state["weights"]) and after["optimizer"]["step"] == state["optimizer"]["step"]
    assert same(after["optimizer"]["v"], state["optimizer"]["v"]) and same(after["optimizer"]["m"], state["optimizer"]["m"])
    assert "step_refused" in strategy._record.as_row()  # a metrics.csv column
    begin(strategy, 3, 3)
    before = [w.copy() for w in strategy.weights]
    fit(strategy, honest(strategy, 3, seed=3), 3)
    assert not same(strategy.weights, before)  # not frozen


def test_a_huge_scaffold_control_delta_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make("scaffold")
    begin(strategy, 4)
    rng = np.random.default_rng(5)
    bad = reply(strategy, [w + 0.01 * rng.normal(size=w.shape).astype(np.float32) for w in strategy.weights], 50, control=1e30)
    with caplog.at_level(logging.WARNING):
        fit(strategy, [*honest(strategy, 3), (FakeProxy("evil"), bad)])
    assert "rejected update from client evil: the control delta's L2 norm" in warnings_of(caplog)
    assert strategy.scaffold_state is not None and all(np.abs(c).max() < 1 for c in strategy.scaffold_state.control)


def test_the_norm_bound_reads_the_payload_once_in_the_uncompressed_mean() -> None:
    # finite_weighted_mean returns each client's distance from the center from the same pass as the mean.
    rng = np.random.default_rng(0)
    center = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    clients = [[c + rng.normal(size=c.shape).astype(np.float32) for c in center] for _ in range(4)]
    clients[2][1][0] = np.nan
    norms: list[float] = []
    mean, dropped = finite_weighted_mean(clients, [1, 2, 3, 4], block_elements=4, center=center, norms=norms)
    assert dropped == [2] and norms[2] == math.inf and mean is not None
    for i in (0, 1, 3):
        want = math.sqrt(sum(float(np.sum((x.astype(np.float64) - c) ** 2)) for x, c in zip(clients[i], center)))
        assert norms[i] == pytest.approx(want, rel=1e-5)  # float32 dot products, float64 sums of blocks


def test_norm_and_count_helpers_hand_computed() -> None:
    assert lower_median([5.0, 1.0]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0 and lower_median([4, 1, 3, 2]) == 2
    assert norm_bound([1.0, 2.0, math.inf], 100.0) == 100.0 and norm_bound([0.0, 5.0], 10.0) == math.inf
    assert cap_counts([10, 50, 10**9], 10.0) == ([10, 50, 500], [2]) and cap_counts([1, 10**9], math.inf)[1] == []
    # float32 squares overflow past ~1.8e19: the norm is then redone in float64, exactly.
    assert l2_norm([np.array([3e20, 4e20], np.float32)]) == pytest.approx(5e20, rel=1e-6)
    assert l2_norm([np.array([1.0, np.nan], np.float32)]) == math.inf
    center = [np.full(70_000, 1.0, np.float32)]  # more than one NORM_BLOCK
    assert l2_norm([np.full(70_000, 4.0, np.float32)], center) == pytest.approx(3.0 * math.sqrt(70_000), rel=1e-6)
    kept, problems = clean_metrics({"accuracy": 0.5, "val_accuracy": 1.5, "loss": -1, "num_x": 3, "s": "a", "b": False})
    assert kept == {"accuracy": 0.5, "num_x": 3}
    assert [p.split(" ")[0] for p in problems] == ["val_accuracy", "loss", "s", "b"]


# ------------------------------------------------------------------------------------------- 4. run config
@pytest.mark.parametrize("key", ["learning-rate", "client-wait-timeout", "synthetic-alpha", "secagg-num-shares", "round-timeout",
                                 "dp-clipping-norm", "server-learning-rate"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_inf_and_nan_are_refused_naming_the_key(key: str, value: float) -> None:
    context = {"synthetic-alpha": {"dataset": "synthetic", "num-partitions": 4}, "secagg-num-shares": {"secure-aggregation": True},
               "dp-clipping-norm": {"dp-mode": "central-server"}}.get(key, {})
    with pytest.raises(ConfigError, match=f"run-config key '{key}' must be"):
        parse_run_config({**context, key: value})


def test_a_key_whose_help_says_what_inf_means_takes_inf() -> None:
    cfg = parse_run_config({"max-count-ratio": math.inf, "max-update-norm-ratio": math.inf})
    assert math.isinf(strategy_options(cfg).max_count_ratio) and math.isinf(strategy_options(cfg).max_update_norm_ratio)
    assert "inf = " in FIELDS["max-count-ratio"].metadata["help"]
    with pytest.raises(ConfigError, match="'max-count-ratio' must be finite, got -inf"):
        parse_run_config({"max-count-ratio": -math.inf})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden-size", 2**40, "'hidden-size' must be <= 65536 (larger values exhaust memory), got 1099511627776"),
        ("num-samples", 10**9, "'num-samples' must be <= 10000000"),
        ("num-features", 10**6, "'num-features' must be <= 100000"),
        ("max-length", 2**20, "'max-length' must be <= 65536"),
        ("batch-size", 2**20, "'batch-size' must be <= 65536"),
        ("num-partitions", 10**7, "'num-partitions' must be <= 100000"),
        ("compression-block-size", 2**31, "'compression-block-size' must be <= 16777216"),
        ("seed", 2**64, "'seed' must be <= 9223372036854775807"),
        ("output-dir", "", "'output-dir' must not be empty"),
        ("output-dir", "runs\x00", "'output-dir' is a path and may not contain a NUL character"),
        ("server-learning-rate", 10**400, "'server-learning-rate' must be a finite float, got the integer"),
    ],
)
def test_absurd_sizes_and_empty_paths_are_refused_naming_the_key_and_the_bound(key: str, value: object, message: str) -> None:
    context = {"max-length": {"dataset": "text", "hf-model": "x"}}.get(key, {})
    with pytest.raises(ConfigError) as err:
        parse_run_config({**context, key: value})
    assert message in str(err.value)


def test_generated_data_is_bounded_as_a_whole() -> None:
    with pytest.raises(ConfigError, match=r"num-samples x num-features = 10000000 x 100 must be <= 100000000"):
        parse_run_config({"num-samples": 10**7, "num-features": 100})
