"""What `FederatedStrategy` shows to the code composed into it: round records, client updates, hooks.

A hook is behaviour that runs inside the shell's round without copying its loop or wrapping it:
differential privacy clips and noises the accepted updates, accounts for the privacy spent and
stops training when the budget is used up. The shell takes its hooks as a constructor argument
and calls each, in order, at fixed points of every round (see `StrategyHook`). Hooks see updates
in one representation, `ClientUpdate.update` (u_i = w_i - w), whatever the clients sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.common import FitRes, Scalar
from flwr.server.client_proxy import ClientProxy

NDArrays = list[np.ndarray]
FitResults = list[tuple[ClientProxy, FitRes]]
FitFailures = list[tuple[ClientProxy, FitRes] | BaseException]


@dataclass
class RoundRecord:
    """One row of `metrics.csv`; hooks may add columns to ``extra``."""

    round: int
    central_loss: float = math.nan
    central_accuracy: float = math.nan
    federated_loss: float = math.nan
    federated_accuracy: float = math.nan
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    clients_sampled: int = 0
    results: int = 0
    failures: int = 0
    rejected: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    updated: bool = False
    step_refused: int = 0  # 1 when the round's server step was refused (see the log for why); the model is unchanged
    weights_capped: int = 0  # clients whose num_examples was capped at max-count-ratio x the round's lower median
    extra: dict[str, float] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        row = {k: v for k, v in self.__dict__.items() if k != "extra"}
        row.update(self.extra)
        return row


@dataclass
class ClientUpdate:
    """One client's accepted contribution to a round, decoded and validated.

    Attributes:
        cid: the client's id (its `ClientProxy.cid`).
        update: ``u_i = w_i - w``, float32 arrays in the model's canonical order: what the client's
            training moved the global weights ``w`` by. A client that sent weights ``w_i`` has it
            computed at decode; a FedSGD client's gradient ``g_i`` becomes ``u_i = -g_i`` (the step a
            learning rate of 1 takes). For buffers (non-trainable arrays) it is ``b_i - b``. Empty
            while the shell averages undecoded payloads in its streaming mean (no hook reads updates).
        extras: arrays sent after the model payload (SCAFFOLD: the control-variate update), as received.
        num_examples: the weight of the update in example-weighted means.
        metrics: what the client reported with it.

    A hook may replace ``update`` or ``num_examples`` (central DP clips, noises and weighs every
    update 1), or leave updates out of the list it returns.
    """

    cid: str
    update: NDArrays
    extras: NDArrays
    num_examples: int
    metrics: dict[str, Scalar]


class StrategyHook(Protocol):
    """Behaviour composed into `FederatedStrategy` by its ``hooks`` argument.

    Each round the shell calls every hook, in the order given:

    1. `fit_config` after sampling (``num_sampled`` may be 0): extra fit-config entries for the
       sampled clients, or None to skip the round (no client is asked to train or evaluate).
    2. `preprocess` on the raw replies, before they are decoded (e.g. take off trailing arrays
       that are not part of the model payload).
    3. `process_updates` on the accepted, decoded updates right before aggregation, when
       `reads_updates` is True; returning an empty list leaves the model unchanged.
    4. `after_fit` once the round's aggregation is done (``record.updated`` says whether the model moved).
    5. `end_round` before the observers see the finished record (also for round 0, the initial evaluation).

    ``state_dict`` goes into the strategy's checkpoint under ``name``; ``load_state_dict`` gets it
    back on resume, or None when the checkpoint has none (a run written without this hook).
    """

    @property
    def name(self) -> str:
        """Key of this hook's state in the strategy's `state_dict`."""
        ...

    @property
    def reads_updates(self) -> bool:
        """Whether `process_updates` must see every decoded update (False keeps the streaming mean)."""
        ...

    def fit_config(self, rnd: int, num_available: int, num_sampled: int) -> Mapping[str, Scalar] | None: ...

    def preprocess(self, results: FitResults, failures: FitFailures) -> tuple[FitResults, FitFailures]: ...

    def process_updates(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]: ...

    def after_fit(self, record: RoundRecord) -> None: ...

    def end_round(self, record: RoundRecord) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None: ...


StatisticsReply = tuple[str, NDArrays, int, Mapping[str, Scalar]]  # (client id, arrays, num_examples, metrics)


class StatisticsStep(Protocol):
    """A step before the first training round whose replies are statistics, not model updates.

    Federated preprocessing (`flower_app.server_preprocessing`) is one: its round asks every available
    client for statistics of its raw data, merges them and, once `done`, adds the agreed transform to
    every later fit and evaluate config (`round_config`). The shell runs it as a round of its own,
    driven by the same loop as training (the legacy loop, SecAgg+'s workflow, the scheduler) before
    the training rounds: no hook and no observer sees it, the model does not move, and its result rides
    in the checkpoint under ``name``, so a resumed run does not repeat it.
    """

    @property
    def name(self) -> str: ...

    @property
    def done(self) -> bool: ...

    @property
    def failure(self) -> str:
        """Why the step did not complete ("" while it may still)."""
        ...

    def fit_config(self) -> Mapping[str, Scalar]:
        """The request sent to every sampled client."""
        ...

    def aggregate(self, replies: list[StatisticsReply], failures: int, preaggregated: bool) -> None:
        """Check every reply (rejecting bad ones with the reason), and merge the rest (``done``), or set ``failure``."""
        ...

    def round_config(self) -> Mapping[str, Scalar]:
        """Once done: what every later fit and evaluate config carries."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None: ...


__all__ = [
    "ClientUpdate", "FitFailures", "FitResults", "NDArrays", "RoundRecord", "StatisticsReply", "StatisticsStep",
    "StrategyHook",
]
