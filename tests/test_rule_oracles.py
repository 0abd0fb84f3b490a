"""Oracles for whole rules, run through the real NumPyClient and strategy shell in one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common import RecordDict

from flower_app.client_app import FlowerClient
from flower_app.config import AppConfig, parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.outputs import latest_run
from flower_app.server_app import build_strategy

NUM_CLIENTS = 3


def clients(cfg: AppConfig) -> list[FlowerClient]:
    return [
        FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": NUM_CLIENTS}), RecordDict())
        for i in range(NUM_CLIENTS)
    ]


def config(tmp_path: Path, **overrides: object) -> AppConfig:
    base = {"output-dir": str(tmp_path), "fraction-evaluate": 0.0, "min-available-clients": NUM_CLIENTS,
            "min-fit-clients": NUM_CLIENTS, "client-wait-timeout": 1.0, "min-partition-size": 5}
    return parse_run_config({**base, **overrides})


def test_fedsgd_equals_fedavg_with_one_full_batch_local_step(tmp_path: Path) -> None:
    common = {"dataset": "linear", "num-samples": 300, "partitioner": "quantity-skew", "batch-size": 10_000,
              "num-server-rounds": 3}
    avg_cfg = config(tmp_path / "avg", strategy="fedavg", **{**common, "learning-rate": 0.3, "local-epochs": 1})
    sgd_cfg = config(tmp_path / "sgd", strategy="fedsgd", **{**common, "server-learning-rate": 0.3})
    avg, _ = build_strategy(avg_cfg)
    sgd, _ = build_strategy(sgd_cfg)
    run_rounds(avg, clients(avg_cfg), 3)
    run_rounds(sgd, clients(sgd_cfg), 3)
    for a, s in zip(avg.weights, sgd.weights):
        np.testing.assert_allclose(a, s, rtol=1e-5, atol=1e-6)
    assert not np.allclose(avg.weights[0], build_strategy(avg_cfg)[0].weights[0])  # it did move


def test_fedsgd_linear_regression_converges_to_the_pooled_least_squares_solution(tmp_path: Path) -> None:
    # Non-IID: label-skew partitioners need classes, so the split is skewed in size instead.
    cfg = config(
        tmp_path, **{"strategy": "fedsgd", "dataset": "linear", "num-samples": 600, "num-features": 5,
                     "partitioner": "quantity-skew", "quantity-alpha": 0.5, "batch-size": 512,
                     "server-learning-rate": 0.5, "num-server-rounds": 300}
    )
    strategy, _ = build_strategy(cfg)
    fed_clients = clients(cfg)
    sizes = [len(c.data.train) for c in fed_clients]
    assert max(sizes) > 2 * min(sizes), f"partition sizes not skewed: {sizes}"
    run_rounds(strategy, fed_clients, cfg.num_server_rounds)
    # Closed form on the pooled training data of all clients (float64): min ||[X 1] theta - y||^2.
    x = np.concatenate([c.data.train.x.numpy() for c in fed_clients]).astype(np.float64)
    y = np.concatenate([c.data.train.y.numpy() for c in fed_clients]).astype(np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    theta, *_ = np.linalg.lstsq(design, y, rcond=None)
    weight, bias = strategy.weights  # linear.weight (1, F), linear.bias (1,)
    learned = np.concatenate([weight.ravel(), bias.ravel()]).astype(np.float64)
    rel_err = np.linalg.norm(learned - theta.ravel()) / np.linalg.norm(theta)
    assert rel_err < 1e-4, rel_err


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedavg"},
        {"strategy": "fedadam", "server-learning-rate": 0.05},
        {"strategy": "fedavgm", "server-momentum": 0.5, "aggregator": "trimmed-mean", "trim-fraction": 0.34},
        {"strategy": "fedyogi", "server-learning-rate": 0.05, "send-delta": True, "compression": "int8"},
    ],
    ids=["fedavg", "fedadam", "fedavgm-trimmed", "fedyogi-int8"],
)
def test_four_rounds_equal_two_then_resume_for_two(tmp_path: Path, overrides: dict) -> None:
    common = {"num-server-rounds": 4, "dataset": "digits", "model": "mlp", "hidden-size": 32, "local-epochs": 1,
              "error-feedback": False, **overrides}
    straight_cfg = config(tmp_path / "straight", **common)
    straight, _ = build_strategy(straight_cfg)
    run_rounds(straight, clients(straight_cfg), 4)

    first_cfg = config(tmp_path / "split", **common)
    first, _ = build_strategy(first_cfg)
    run_rounds(first, clients(first_cfg), 2)  # stopped after round 2's checkpoint
    resumed_cfg = config(tmp_path / "split", **{**common, "resume": True})
    resumed, remaining = build_strategy(resumed_cfg)
    assert remaining == 2 and resumed.start_round == 2
    run_rounds(resumed, clients(resumed_cfg), remaining)

    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)
    s_state, r_state = straight.opt_state.state_dict(), resumed.opt_state.state_dict()
    assert s_state.keys() == r_state.keys()
    for key in s_state:
        if isinstance(s_state[key], list):
            for a, b in zip(s_state[key], r_state[key]):
                np.testing.assert_array_equal(a, b)
        else:
            assert s_state[key] == r_state[key]
    rounds = pd.read_csv(latest_run(tmp_path / "split") / "metrics.csv")["round"].tolist()
    assert rounds == [0, 1, 2, 3, 4]
