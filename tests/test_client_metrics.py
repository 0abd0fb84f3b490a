"""Per-client figures: percentiles by hand and against numpy, validation, and what the strategy shell records."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies.base import FederatedStrategy, StrategyOptions
from strategies.client_metrics import client_distribution, per_client_columns, percentile
from tests.strategy_utils import client_manager, eval_res


def test_percentiles_by_hand() -> None:
    # Sorted 0.2, 0.5, 0.9, 1.0: h = 3 x 0.1 = 0.3 -> 0.2 + 0.3 x (0.5 - 0.2) = 0.29.
    assert percentile([0.9, 0.2, 1.0, 0.5], 0.10) == pytest.approx(0.29)
    assert client_distribution([0.9, 0.2, 1.0, 0.5], higher_is_better=True) == pytest.approx(
        {"mean": 0.65, "p10": 0.29, "worst": 0.2}
    )
    # Losses: h = 3 x 0.9 = 2.7 between 3 and 10 -> 3 + 0.7 x 7 = 7.9; the worst is the largest.
    assert client_distribution([1.0, 10.0, 2.0, 3.0], higher_is_better=False) == pytest.approx(
        {"mean": 4.0, "p90": 7.9, "worst": 10.0}
    )
    # 20 clients: h = 1.9, between the 2nd and 3rd lowest.
    values = [0.1, 0.3, 0.4] + [0.9] * 17
    assert percentile(values, 0.1) == pytest.approx(0.3 + 0.9 * 0.1)
    assert client_distribution([0.7], True) == {"mean": 0.7, "p10": 0.7, "worst": 0.7}


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60), st.floats(0.0, 1.0))
def test_percentile_equals_numpys_linear_method(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, 100 * q)), abs=1e-12)


def test_invalid_values_are_left_out_and_named() -> None:
    replies = [
        {"loss": 0.3, "accuracy": 0.8},
        {"loss": 0.2, "accuracy": 1.5},  # out of range
        {"loss": 0.1, "accuracy": float("nan")},
        {"loss": 0.4, "accuracy": True},  # a bool is not an accuracy
        {"loss": 0.5, "accuracy": 0.6, "personal_accuracy": 0.9},
    ]
    columns, problems = per_client_columns(replies)
    assert columns["clients_accuracy_mean"] == pytest.approx(0.7)
    assert columns["clients_accuracy_worst"] == pytest.approx(0.6)
    assert columns["clients_personal_accuracy_mean"] == pytest.approx(0.9)
    assert columns["clients_evaluated"] == 5
    assert "clients_loss_mean" not in columns  # classification: accuracies only
    assert len(problems) == 3 and "must be in [0, 1], got 1.5" in problems[0] and "not finite" in problems[1]
    assert "not a number" in problems[2]


def test_regression_reports_the_loss_distribution() -> None:
    columns, problems = per_client_columns([{"loss": 1.0}, {"loss": 3.0, "personal_loss": 0.5}, {"loss": math.inf}])
    assert columns == {"clients_evaluated": 3.0, "clients_loss_mean": 2.0, "clients_loss_p90": pytest.approx(2.8),
                       "clients_loss_worst": 3.0, "clients_personal_loss_mean": 0.5, "clients_personal_loss_p90": 0.5,
                       "clients_personal_loss_worst": 0.5}
    assert problems == ["client reply 2: loss is not finite: inf"]


def test_the_shell_records_per_client_figures_next_to_the_weighted_mean(caplog: pytest.LogCaptureFixture) -> None:
    strategy = FederatedStrategy(StrategyOptions(min_evaluate_clients=1), [np.zeros(2, np.float32)], [True])
    _, proxies = client_manager(3)
    strategy.configure_evaluate(1, None, client_manager(3)[0])  # type: ignore[arg-type]
    replies = [
        (proxies[0], eval_res(0.5, 100, accuracy=0.9, personal_accuracy=0.95)),  # a large client
        (proxies[1], eval_res(0.5, 10, accuracy=0.3, personal_accuracy=0.8)),
        (proxies[2], eval_res(0.5, 10, accuracy=2.0)),  # invalid: left out of the figures
    ]
    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy.aggregate_evaluate(1, replies, [])
    extra = strategy._record.extra  # type: ignore[union-attr]
    assert extra["clients_accuracy_mean"] == pytest.approx(0.6)  # each client once
    assert extra["clients_accuracy_p10"] == pytest.approx(0.36)
    assert extra["clients_accuracy_worst"] == pytest.approx(0.3)
    assert extra["clients_personal_accuracy_worst"] == pytest.approx(0.8)
    assert extra["eval_personal_accuracy"] == pytest.approx((100 * 0.95 + 10 * 0.8) / 110)  # the weighted mean stays
    # The reply's checks drop the accuracy before any figure sees it (the weighted mean and the per-client ones).
    assert "client 2: evaluation metrics ignored: accuracy (must be an accuracy in [0, 1], got 2.0" in caplog.text
    assert "per client acc mean/p10/worst 0.6000/0.3600/0.3000, personal acc mean/p10/worst" in caplog.text
