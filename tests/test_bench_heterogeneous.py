"""The heterogeneous-devices benchmark: its curve arithmetic by hand, and its quick mode writes a sane table."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks import bench_heterogeneous as bench


def test_curve_time_to_target_and_accuracy_at_budget_by_hand() -> None:
    curve = bench.Curve(sim_time=[0.0, 10.0, 25.0, 40.0], accuracy=[0.1, 0.6, 0.5, 0.9])
    assert curve.time_to(0.55) == 10.0
    assert curve.time_to(0.9) == 40.0
    assert math.isnan(curve.time_to(0.95))
    assert curve.at(30.0) == 0.5  # the last evaluation at or before the budget
    assert curve.best(30.0) == 0.6
    assert curve.at(40.0) == 0.9


@pytest.mark.slow
def test_quick_mode_writes_a_table_with_every_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["bench_heterogeneous", "--quick", "--out", str(tmp_path)])
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    frame = pd.read_csv(tmp_path / "heterogeneous.csv")
    assert list(frame["method"]) == list(bench.METHODS)
    assert (frame["budget"] > 0).all() and frame["accuracy_at_budget"].between(0, 1).all()
    row = frame.set_index("method")
    assert row.loc["fedavg", "steps"] == 4  # the budget is sync FedAvg's time for --rounds (4 in quick mode)
    assert row.loc["fedbuff", "steps"] > row.loc["fedavg", "steps"]  # no waiting for stragglers
    assert row.loc["deadline", "late"] > 0
    assert (tmp_path / "heterogeneous.png").stat().st_size > 0
    curves = pd.read_csv(tmp_path / "heterogeneous_curves.csv")
    assert set(curves["method"]) == set(bench.METHODS)
