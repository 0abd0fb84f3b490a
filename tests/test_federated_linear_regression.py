"""Federated linear regression on real medical data (scikit-learn's diabetes set) reaches the pooled least-squares fit.

The split is non-IID: ``partitioner='sorted'`` gives each of four sites a range of the target (one site
sees the mildest disease progression, another the most severe), so no site's own fit is the pooled one.
The oracle is the closed form: ``numpy.linalg.lstsq`` on the union of the sites' training data, with the
same preprocessing (the source standardizes the features with the train split's statistics; every site
holds rows of that one array, so the pooled data are preprocessed identically).

Why not every rule in a few rounds: the standardized diabetes features are strongly collinear (the serum
measurements s1, s2, s3, s5), so the Hessian of the mean squared error, ``2 A^T A / n``, has condition
number about 470. FedSGD is exactly full-batch gradient descent on the pooled data (the example-weighted
mean of the sites' gradients is the pooled gradient), and FedAvg with one full-batch local step is the
same iteration; plain gradient descent needs ~1,500 steps on this data to pin every parameter to 1e-3,
more than a fast test can run (30 to 80 ms a round through the real client and strategy on 2 busy cores). So:

* fast: FedSGD and FedAvg follow pooled gradient descent step for step (the equivalence that makes them
  converge to the least-squares fit), and FedAvg with server momentum (FedAvgM, heavy ball) *reaches* the
  fit in 150 rounds;
* slow: FedSGD runs the number of rounds gradient descent's contraction bound asks for, and reaches it.

FedAvg with several local steps per round does not reach the pooled fit on a non-IID split: its fixed point
differs from it by a client-drift bias of order ``learning_rate * (local steps - 1)``; no test claims it.

Coupling to the app (``flower_app`` is being restructured): the one helper :func:`federated_fit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

NUM_CLIENTS = 4


@dataclass(frozen=True)
class Fit:
    """A federated run: the linear model's parameters ``[w..., b]`` before and after, and each site's training data."""

    initial: np.ndarray
    learned: np.ndarray
    site_x: list[np.ndarray]
    site_y: list[np.ndarray]

    @property
    def design(self) -> np.ndarray:
        """The pooled design matrix ``[X 1]`` (float64)."""
        x = np.concatenate(self.site_x).astype(np.float64)
        return np.hstack([x, np.ones((len(x), 1))])

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate(self.site_y).astype(np.float64).ravel()


def federated_fit(tmp_path: Path, num_rounds: int, **overrides: bool | float | str) -> Fit:
    """Run the app's own strategy and NumPyClients in-process on diabetes split by target across four sites.

    The test file's only coupling to ``flower_app``: the run config, the node's data, the client, the
    strategy and the in-process loop.
    """
    from flwr.common import RecordDict

    from flower_app.client_app import FlowerClient
    from flower_app.config import parse_run_config
    from flower_app.data import client_data
    from flower_app.inprocess import run_rounds
    from flower_app.server_app import build_strategy

    cfg = parse_run_config(
        {
            "dataset": "diabetes", "partitioner": "sorted", "model": "linear", "batch-size": 1000,
            "num-server-rounds": num_rounds, "output-dir": str(tmp_path), "checkpoint-every": 100_000,
            "fraction-evaluate": 0.0, "min-available-clients": NUM_CLIENTS, "min-fit-clients": NUM_CLIENTS,
            "client-wait-timeout": 1.0, **overrides,
        }
    )
    clients = [
        FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": NUM_CLIENTS}), RecordDict())
        for i in range(NUM_CLIENTS)
    ]
    strategy, _ = build_strategy(cfg)

    def theta(weights: list[np.ndarray]) -> np.ndarray:
        weight, bias = weights  # linear.weight (1, F), linear.bias (1,)
        return np.concatenate([weight.ravel(), bias.ravel()]).astype(np.float64)

    initial = theta(strategy.weights)
    run_rounds(strategy, clients, num_rounds)
    return Fit(
        initial, theta(strategy.weights), [c.data.train.x.numpy() for c in clients], [c.data.train.y.numpy() for c in clients]
    )


def least_squares(fit: Fit) -> tuple[np.ndarray, float]:
    """The pooled closed-form fit and its training MSE."""
    design, y = fit.design, fit.targets
    theta, *_ = np.linalg.lstsq(design, y, rcond=None)
    return theta, float(np.mean((design @ theta - y) ** 2))


def mse(fit: Fit, theta: np.ndarray) -> float:
    return float(np.mean((fit.design @ theta - fit.targets) ** 2))


def hessian_eigenvalues(fit: Fit) -> np.ndarray:
    """Eigenvalues of the Hessian ``2 A^T A / n`` of the pooled mean squared error, ascending."""
    design = fit.design
    return np.linalg.eigvalsh(2.0 * design.T @ design / len(design))


def assert_non_iid(fit: Fit) -> None:
    """Each site holds its own range of the target, in order: a split no site's own fit represents."""
    highs = [float(y.max()) for y in fit.site_y]
    lows = [float(y.min()) for y in fit.site_y]
    assert all(h <= low for h, low in zip(highs, lows[1:])), (lows, highs)
    means = [float(y.mean()) for y in fit.site_y]
    assert means[-1] - means[0] > 100.0, means  # progression units: the mildest vs the most severe site


# Parameter tolerance (relative, Euclidean): float32 parameters and gradients round at 6e-8 relative;
# the least-squares solution amplifies that by up to the condition number (~470), a floor near 3e-5. 1e-4
# is three times above that floor and far inside the statistical uncertainty of the fit (1e-4 of |theta|,
# about 0.017 progression units, is below 1 % of every coefficient's standard error, 2.9 to 22, on 318 patients).
PARAMETER_TOLERANCE = 1e-4
# Training MSE: at the optimum the excess is quadratic in the parameter error, at most
# lambda_max |d theta|^2 / 2 = 8 * 0.017^2 / 2 ~ 1.2e-3 units^2 against an MSE of ~2,600: under 1e-6 relative.
MSE_TOLERANCE = 1e-6


@pytest.mark.parametrize(
    ("strategy", "step"),
    [("fedsgd", {"server-learning-rate": 0.24}), ("fedavg", {"learning-rate": 0.24, "local-epochs": 1})],
)
def test_fedsgd_and_fedavg_are_gradient_descent_on_the_pooled_data(
    tmp_path: Path, strategy: str, step: dict[str, float]
) -> None:
    rounds, eta = 40, 0.24
    fit = federated_fit(tmp_path, rounds, strategy=strategy, **step)
    assert_non_iid(fit)
    design, y = fit.design, fit.targets
    # The oracle: `rounds` steps of full-batch gradient descent on the pooled data, in float64.
    theta = fit.initial.copy()
    for _ in range(rounds):
        theta -= eta * 2.0 / len(y) * design.T @ (design @ theta - y)
    assert np.linalg.norm(fit.learned - theta) / np.linalg.norm(theta) < 1e-5  # float32 over 40 steps
    # ... which converges to the least-squares fit at rate max|1 - eta * lambda| < 1 (eta < 2 / lambda_max).
    eigenvalues = hessian_eigenvalues(fit)
    rate = max(abs(1 - eta * eigenvalues[0]), abs(1 - eta * eigenvalues[-1]))
    assert 0.99 < rate < 1.0  # slow: the condition number is large (see the module docstring)
    optimum, optimum_mse = least_squares(fit)
    assert np.linalg.norm(fit.learned - optimum) < rate**rounds * np.linalg.norm(fit.initial - optimum)
    assert mse(fit, fit.initial) > mse(fit, fit.learned) > optimum_mse


def test_fedavg_with_server_momentum_reaches_the_pooled_least_squares_fit(tmp_path: Path) -> None:
    # FedAvgM with one full-batch local step is Polyak's heavy ball on the pooled objective; with
    # step 0.45 and momentum 0.85 (near the optimal 4 / (sqrt(L) + sqrt(mu))^2 and
    # ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2 for these eigenvalues) it contracts by ~0.92 a round.
    fit = federated_fit(
        tmp_path, 150, strategy="fedavgm", **{"learning-rate": 0.45, "local-epochs": 1, "server-momentum": 0.85}
    )
    assert_non_iid(fit)
    eigenvalues = hessian_eigenvalues(fit)
    assert eigenvalues[-1] / eigenvalues[0] > 300  # the ill-conditioning that makes plain FedSGD slow
    optimum, optimum_mse = least_squares(fit)
    start_error = np.linalg.norm(fit.initial - optimum) / np.linalg.norm(optimum)
    error = np.linalg.norm(fit.learned - optimum) / np.linalg.norm(optimum)
    assert start_error > 0.9 and error < PARAMETER_TOLERANCE, error
    assert (mse(fit, fit.learned) - optimum_mse) / optimum_mse < MSE_TOLERANCE


@pytest.mark.slow
def test_fedsgd_reaches_the_pooled_least_squares_fit(tmp_path: Path) -> None:
    eta, tolerance = 0.24, 1e-3
    # Gradient descent's bound, ||theta_R - theta*|| <= rate^R ||theta_0 - theta*||, sets the rounds; the
    # eigenvalues come from a short run on the same sites (the pooled data do not depend on the rounds).
    probe = federated_fit(tmp_path / "probe", 1, strategy="fedsgd", **{"server-learning-rate": eta})
    eigenvalues = hessian_eigenvalues(probe)
    rate = max(abs(1 - eta * eigenvalues[0]), abs(1 - eta * eigenvalues[-1]))
    optimum, optimum_mse = least_squares(probe)
    start = np.linalg.norm(probe.initial - optimum) / np.linalg.norm(optimum)
    # The bound is tight only along the slowest direction; float32 rounding (~3e-5) is far below the tolerance.
    rounds = math.ceil(math.log(tolerance / start) / math.log(rate))
    assert rounds < 2500, rounds
    fit = federated_fit(tmp_path / "run", rounds, strategy="fedsgd", **{"server-learning-rate": eta})
    assert_non_iid(fit)
    error = np.linalg.norm(fit.learned - optimum) / np.linalg.norm(optimum)
    assert error < tolerance, (rounds, error)
    # 1e-3 of the parameters: the excess MSE is at most lambda_max |d theta|^2 / 2 ~ 8 * 0.17^2 / 2 / 2,600 = 4.4e-5.
    assert (mse(fit, fit.learned) - optimum_mse) / optimum_mse < 1e-4
