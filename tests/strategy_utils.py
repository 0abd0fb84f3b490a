"""Test doubles for driving `FederatedStrategy` without Flower's runtime."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

from flower_app.inprocess import DetachedProxy as FakeProxy
from strategies.wire import from_parameters


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
    """The arrays of Flower `Parameters` in either format (`strategies.wire`), as writable copies."""
    return [a.copy() for a in from_parameters(parameters)]


def packed_nbytes(arrays: list[np.ndarray]) -> int:
    """Bytes of `strategies.serde.pack` of ``arrays``, from the format as documented (an oracle for its size):
    magic (6) + header length (4) + the JSON header, padded to 64; then each array's bytes, padded to 64."""
    header = json.dumps([[a.dtype.str, list(a.shape)] for a in arrays], separators=(",", ":"))
    pad = lambda n: -(-n // 64) * 64
    return pad(10 + len(header.encode())) + sum(pad(a.nbytes) for a in arrays)
