"""Federated evaluation folded into the fit message (run config federated-evaluation = "fit").

Oracles: a client's fit-time evaluation equals a separate evaluate of the same model, and training
is unchanged by it; a whole run in mode "fit" reports in round r exactly what mode "separate"
reports in round r - 1 (the same models, measured one message later), and its final evaluate
round what "separate" reports for the last round.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common import Code, EvaluateRes, RecordDict, Status, ndarrays_to_parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flower_app.client_app import FlowerClient
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.server_app import make_strategy
from flower_app.task import build_model, get_weights, weight_spec
from strategies.base import FederatedStrategy, StrategyOptions
from strategies.evaluation import (
    ACCURACY,
    EVALUATE_BEFORE_FIT,
    LOSS,
    NUM_EXAMPLES,
    PREFIX,
    split_fit_evaluation,
)
from tests.strategy_utils import client_manager, fit_res

NUM_CLIENTS = 3


def _client(partition: int, **overrides: object) -> FlowerClient:
    cfg = parse_run_config({"data-cache": False, "local-epochs": 1, **overrides})
    return FlowerClient(cfg, client_data(cfg, {"partition-id": partition, "num-partitions": NUM_CLIENTS}), RecordDict())


def test_fit_time_metrics_equal_a_separate_evaluate_and_training_is_unchanged() -> None:
    client = _client(0)
    weights = [w.copy() for w in get_weights(client.model, client.spec)]
    loss, n, metrics = client.evaluate(weights, {"server-round": 1})
    trained, count, fit_metrics = client.fit(weights, {"server-round": 1, EVALUATE_BEFORE_FIT: True})
    assert fit_metrics[LOSS] == loss and fit_metrics[NUM_EXAMPLES] == n and fit_metrics[ACCURACY] == metrics["accuracy"]
    trained = [t.copy() for t in trained]
    plain, plain_count, plain_metrics = _client(0).fit(weights, {"server-round": 1})
    assert count == plain_count and all(np.array_equal(a, b) for a, b in zip(trained, plain))
    assert {k: v for k, v in fit_metrics.items() if not k.startswith("fed_eval_")} == plain_metrics


@pytest.mark.parametrize("method", ["finetune", "ditto", "fedrep"])
def test_a_personal_evaluation_in_the_fit_message_leaves_training_unchanged(method: str) -> None:
    # finetune and Ditto train or swap the model to evaluate the personal one: the received model is reloaded.
    overrides = {"personalization": method, "personal-steps": 3}
    client = _client(0, **overrides)
    weights = [w.copy() for w in get_weights(client.model, client.spec)]
    loss, n, metrics = _client(0, **overrides).evaluate(weights, {"server-round": 1})
    trained, count, fit_metrics = client.fit(weights, {"server-round": 1, EVALUATE_BEFORE_FIT: True})
    assert fit_metrics[LOSS] == loss and fit_metrics[NUM_EXAMPLES] == n
    assert {k: v for k, v in fit_metrics.items() if k.startswith(PREFIX)} == {PREFIX + k: v for k, v in
                                                                               {"loss": loss, "num_examples": n, **metrics}.items()}
    trained = [t.copy() for t in trained]
    plain, plain_count, _ = _client(0, **overrides).fit(weights, {"server-round": 1})
    assert count == plain_count and all(np.array_equal(a, b) for a, b in zip(trained, plain))


def test_the_server_asks_a_seeded_fraction_of_the_training_clients() -> None:
    model = build_model("mlp", _client(0).data.info)
    weights = get_weights(model, weight_spec(model))
    options = StrategyOptions(min_fit_clients=10, min_available_clients=10, fraction_evaluate=0.3, min_evaluate_clients=2,
                              federated_evaluation="fit", num_rounds=3)
    strategy = FederatedStrategy(options, weights, weight_spec(model).trainable)
    manager, _ = client_manager(10)
    asked = [c.cid for c, ins in strategy.configure_fit(1, ndarrays_to_parameters(weights), manager) if ins.config.get(EVALUATE_BEFORE_FIT)]
    assert len(asked) == 3
    again = FederatedStrategy(options, weights, weight_spec(model).trainable)
    assert asked == [c.cid for c, ins in again.configure_fit(1, ndarrays_to_parameters(weights), manager)
                     if ins.config.get(EVALUATE_BEFORE_FIT)]
    for mode, fraction in (("separate", 1.0), ("none", 1.0), ("fit", 0.0)):
        other = FederatedStrategy(StrategyOptions(min_fit_clients=10, min_available_clients=10, fraction_evaluate=fraction,
                                                  federated_evaluation=mode), weights, weight_spec(model).trainable)
        assert not any(ins.config.get(EVALUATE_BEFORE_FIT) for _, ins in other.configure_fit(1, ndarrays_to_parameters(weights), manager))


def test_the_shell_takes_valid_evaluations_out_of_the_fit_metrics_and_leaves_bad_ones_out(caplog) -> None:  # type: ignore[no-untyped-def]
    weights = [np.zeros((2, 2), np.float32)]
    options = StrategyOptions(min_fit_clients=4, min_available_clients=4, federated_evaluation="fit", num_rounds=5)
    strategy = FederatedStrategy(options, weights, [True])
    manager, proxies = client_manager(4)
    strategy.configure_fit(2, ndarrays_to_parameters(weights), manager)
    good = {LOSS: 1.0, NUM_EXAMPLES: 10, ACCURACY: 0.5}
    results = [
        (proxies[0], fit_res(weights, 10, train_loss=2.0, **good)),
        (proxies[1], fit_res(weights, 30, train_loss=2.0, **{LOSS: 3.0, NUM_EXAMPLES: 30, ACCURACY: 0.9})),
        (proxies[2], fit_res(weights, 10, train_loss=2.0, **{LOSS: float("nan"), NUM_EXAMPLES: 10})),  # bad: NaN loss
        (proxies[3], fit_res(weights, 10, train_loss=2.0, **{LOSS: 1.0, NUM_EXAMPLES: 5, ACCURACY: 1.5})),  # bad accuracy
    ]
    _, metrics = strategy.aggregate_fit(2, results, [])
    record = strategy._record
    assert record is not None
    # As an evaluate reply: client 2 (NaN loss) is left out; client 3 keeps its loss, its accuracy of 1.5 is dropped.
    assert record.federated_loss == pytest.approx((10 * 1.0 + 30 * 3.0 + 5 * 1.0) / 45)
    assert record.federated_accuracy == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert record.extra["federated_model_round"] == 1
    assert not any(k.startswith("fed_eval") for k in metrics) and not any("fed_eval" in k for k in record.extra)
    assert caplog.text.count("ignored the fit-time evaluation of client 2: loss must be a finite number") == 1
    assert caplog.text.count("client 3: fit-time evaluation metrics ignored: accuracy") == 1
    # No evaluate round before the last one; one after it.
    assert strategy.configure_evaluate(2, ndarrays_to_parameters(weights), manager) == []
    strategy.configure_fit(5, ndarrays_to_parameters(weights), manager)
    strategy.aggregate_fit(5, [], [])
    assert len(strategy.configure_evaluate(5, ndarrays_to_parameters(weights), manager)) == 4


VALUES = st.one_of(st.integers(-3, 50), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3))
EVALUATION = st.dictionaries(st.sampled_from(["loss", "num_examples", "accuracy", "other"]), VALUES)


def _figures(strategy: FederatedStrategy) -> dict[str, float]:
    record = strategy._record
    assert record is not None
    out = {"loss": record.federated_loss, "accuracy": record.federated_accuracy}
    out.update({k: float(v) for k, v in record.extra.items() if k.startswith(("eval_", "clients_"))})
    return out


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVALUATION, min_size=1, max_size=4))
def test_a_fit_time_evaluation_counts_exactly_as_the_same_evaluate_reply(evaluations: list[dict]) -> None:
    """Oracle: the shell's evaluate-reply checks. Whatever a client puts in its fit-time evaluation, the round's
    federated figures are those of evaluate replies holding the same loss, count and metrics."""
    weights = [np.zeros(2, np.float32)]
    n = len(evaluations)
    manager, proxies = client_manager(n)
    options = {"min_fit_clients": n, "min_available_clients": n, "min_evaluate_clients": n}
    fit = FederatedStrategy(StrategyOptions(**options, federated_evaluation="fit", num_rounds=9), weights, [True])
    fit.configure_fit(2, ndarrays_to_parameters(weights), manager)
    fit.aggregate_fit(2, [(proxies[i], fit_res(weights, 10, train_loss=1.0, **{PREFIX + k: v for k, v in e.items()}))
                          for i, e in enumerate(evaluations)], [])
    separate = FederatedStrategy(StrategyOptions(**options, federated_evaluation="separate"), weights, [True])
    separate.configure_evaluate(1, ndarrays_to_parameters(weights), manager)
    replies = [(proxies[i], EvaluateRes(Status(Code.OK, ""), e.get("loss"), e.get("num_examples"),  # type: ignore[arg-type]
                                        {k: v for k, v in e.items() if k not in ("loss", "num_examples")}))
               for i, e in enumerate(evaluations)]
    separate.aggregate_evaluate(1, replies, [])
    got, expected = _figures(fit), _figures(separate)
    assert got.keys() == expected.keys(), (got, expected)
    for key, value in expected.items():
        assert value == got[key] or (math.isnan(value) and math.isnan(got[key])), (key, got, expected)


def test_split_keeps_other_metrics() -> None:
    evaluation, rest = split_fit_evaluation({LOSS: 1.0, NUM_EXAMPLES: 3, "train_loss": 2.0})
    assert evaluation == {"loss": 1.0, "num_examples": 3} and rest == {"train_loss": 2.0}


def _run(tmp_path: Path, mode: str) -> pd.DataFrame:
    cfg = parse_run_config({
        "output-dir": str(tmp_path), "run-name": mode, "num-server-rounds": 3, "federated-evaluation": mode,
        "min-fit-clients": NUM_CLIENTS, "min-available-clients": NUM_CLIENTS, "min-evaluate-clients": NUM_CLIENTS,
        "local-epochs": 1, "data-cache": False, "num-partitions": NUM_CLIENTS,
    })
    from flower_app.server_app import build_strategy

    strategy, rounds = build_strategy(cfg)
    clients = [FlowerClient(cfg, client_data(cfg, {"partition-id": i}), RecordDict()) for i in range(NUM_CLIENTS)]
    run_rounds(strategy, clients, rounds)
    return pd.read_csv(tmp_path / mode / "metrics.csv")


def test_a_run_in_mode_fit_measures_the_same_models_as_mode_separate(tmp_path: Path) -> None:
    fit, separate = _run(tmp_path, "fit"), _run(tmp_path, "separate")
    assert np.allclose(fit["central_loss"], separate["central_loss"])  # the same training
    for r in (2, 3):
        row_fit, row_sep = fit[fit["round"] == r].iloc[0], separate[separate["round"] == r - 1].iloc[0]
        assert row_fit["federated_model_round"] == r - 1
        assert row_fit["federated_loss"] == pytest.approx(row_sep["federated_loss"], rel=1e-6)
        assert row_fit["federated_accuracy"] == pytest.approx(row_sep["federated_accuracy"], rel=1e-6)
    last_fit, last_sep = fit[fit["round"] == 3].iloc[0], separate[separate["round"] == 3].iloc[0]
    assert last_fit["final_federated_loss"] == pytest.approx(last_sep["federated_loss"], rel=1e-6)
    assert last_fit["final_federated_accuracy"] == pytest.approx(last_sep["federated_accuracy"], rel=1e-6)
    assert "final_federated_loss" not in separate and "federated_model_round" not in separate


def test_make_strategy_takes_the_mode_from_the_run_config() -> None:
    model = build_model("mlp", _client(0).data.info)
    spec = weight_spec(model)
    for mode in ("fit", "separate", "none"):
        strategy = make_strategy(parse_run_config({"federated-evaluation": mode, "num-server-rounds": 4}),
                                 get_weights(model, spec), spec.trainable)
        assert strategy.options.federated_evaluation == mode and strategy.options.num_rounds == 4
