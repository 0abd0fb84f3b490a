"""Test doubles for driving `FederatedStrategy` without Flower's runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from flower_app.inprocess import DetachedProxy as FakeProxy


def client_manager(n: int) -> tuple[SimpleClientManager, list[FakeProxy]]:
    manager = SimpleClientManager()
    proxies = [FakeProxy(str(i)) for i in range(n)]
    for p in proxies:
        manager.register(p)
    return manager, proxies


def fit_res(arrays: Sequence[np.ndarray], num_examples: int, **metrics: Any) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(arrays)), num_examples, dict(metrics))


def eval_res(loss: float, num_examples: int, **metrics: Any) -> EvaluateRes:
    return EvaluateRes(Status(Code.OK, ""), loss, num_examples, dict(metrics))


def to_arrays(parameters: Any) -> list[np.ndarray]:
    return parameters_to_ndarrays(parameters)
