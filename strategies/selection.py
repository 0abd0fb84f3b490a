"""Choosing the model a run hands over: the round whose evaluation loss was lowest.

The last round's model is not always the best one: training can overfit, diverge, or end on a round
that few clients answered. Beside it a run keeps the *best* model, chosen by one metric fixed for the
whole run (`selection_metric`):

* ``central_loss``, the loss on the server's held-out data, when the server evaluates centrally;
* ``federated_loss`` otherwise: the example-weighted mean of the sampled clients' validation losses
  (a server without data).

Both are losses, so lower is better for every task (cross-entropy, mean squared error, next-token
cross-entropy). A round counts when its value is finite; a tie keeps the earlier round. Round 0
(the initial model, evaluated centrally before training) is a candidate too: a run in which every
round made the model worse hands back its starting point as the best.

`update_best` is pure: it returns the new choice and copies the weights it keeps, so later in-place
changes of the strategy's arrays cannot alter it. `best_state_dict` / `load_best_state` carry the choice
through a checkpoint; the weights are stored only when the best round is not the checkpoint's own
round (the common case while a model still improves costs nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NDArrays = list[np.ndarray]
SELECTION_METRICS = ("central_loss", "federated_loss")


@dataclass(frozen=True)
class BestRound:
    """The chosen round: its number, the metric and value it won by, and its global weights."""

    round: int
    metric: str
    value: float
    weights: NDArrays


def selection_metric(central_evaluation: bool) -> str:
    """``central_loss`` when the server evaluates on held-out data, else ``federated_loss``."""
    return "central_loss" if central_evaluation else "federated_loss"


def update_best(
    best: BestRound | None, rnd: int, metric: str, value: float, weights: Sequence[np.ndarray]
) -> BestRound | None:
    """The better of ``best`` and round ``rnd`` with ``value`` of ``metric``: a strictly lower finite value wins.

    Raises:
        ValueError: if ``metric`` is not the metric ``best`` was chosen by.
    """
    if best is not None and best.metric != metric:
        raise ValueError(f"the best round was chosen by {best.metric}, not {metric}")
    if not math.isfinite(value) or (best is not None and value >= best.value):
        return best
    return BestRound(rnd, metric, float(value), [np.array(w, dtype=np.float32, copy=True) for w in weights])


def best_state_dict(best: BestRound | None, current_round: int) -> dict[str, Any] | None:
    """The choice for a checkpoint at ``current_round``: weights only when they are not that round's."""
    if best is None:
        return None
    weights = None if best.round == current_round else [w.copy() for w in best.weights]
    return {"round": best.round, "metric": best.metric, "value": best.value, "weights": weights}


def load_best_state(state: Mapping[str, Any] | None, current_weights: Sequence[np.ndarray]) -> BestRound | None:
    """Back from `best_state_dict`; ``current_weights`` are the checkpoint's own (used when none were stored)."""
    if state is None:
        return None
    weights = state["weights"] if state["weights"] is not None else current_weights
    return BestRound(
        int(state["round"]), str(state["metric"]), float(state["value"]),
        [np.array(w, dtype=np.float32, copy=True) for w in weights],
    )
