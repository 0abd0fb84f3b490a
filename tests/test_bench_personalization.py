"""The personalization benchmark's bookkeeping: the figures it reports and the goal it checks."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from benchmarks import bench_personalization as bench


def test_summary_averages_the_last_three_rounds_and_fedavg_serves_its_global_model() -> None:
    rows = [{"round": r, "clients_accuracy_mean": a, "clients_accuracy_p10": a - 0.1, "clients_accuracy_worst": a - 0.2,
             "federated_accuracy": a + 0.01} for r, a in enumerate([0.1, 0.5, 0.6, 0.7], start=1)]
    out = bench.summary(rows)
    assert out["global_mean"] == pytest.approx(0.6) and out["global_p10"] == pytest.approx(0.5)
    assert out["personal_mean"] == out["global_mean"] and out["weighted_personal"] == pytest.approx(0.61)
    rows[-1]["clients_personal_accuracy_mean"] = 0.9
    assert bench.summary(rows)["personal_mean"] == pytest.approx(0.9)  # only rounds that have it
    assert math.isnan(bench.tail_mean([], "x"))


def test_goal_compares_the_best_personalized_method_with_fedavgs_global_model() -> None:
    frame = pd.DataFrame([
        {"setting": "b-digits-shards2", "method": "fedavg", "personalization": "none", "global_mean": 0.80,
         "global_p10": 0.50, "personal_mean": 0.80, "personal_p10": 0.50},
        {"setting": "b-digits-shards2", "method": "ditto", "personalization": "ditto", "global_mean": 0.7,
         "global_p10": 0.4, "personal_mean": 0.86, "personal_p10": 0.70},
        {"setting": "b-digits-shards2", "method": "fedper", "personalization": "fedper", "global_mean": 0.84,
         "global_p10": 0.45, "personal_mean": 0.84, "personal_p10": 0.45},
    ])
    verdict = bench.goal(frame)
    assert "best personalized ditto mean 0.860 vs FedAvg's global model 0.800 (+6.0 points" in verdict
    assert verdict.endswith(": reached")
    frame.loc[1, "personal_p10"] = 0.5  # not above the global model's worst decile
    assert bench.goal(frame).endswith("NOT reached")
