"""Federated evaluation folded into the fit message: what the client reports, how the server checks it.

With ``federated-evaluation = "fit"`` the server sets `EVALUATE_BEFORE_FIT` in every fit config;
a client then evaluates the global model it RECEIVED on its local validation split before it
trains, and reports the result among its fit metrics under `LOSS`, `NUM_EXAMPLES` and
``fed_eval_<name>`` (e.g. `ACCURACY`). A round then needs one message (one ClientApp process in
a deployment) per client instead of two. The figure describes the model at the start of the
round, i.e. after the previous round's aggregation (the initial model in round 1).

The server takes these entries out of the fit metrics (`split_fit_evaluation`), checks each
client's like an evaluate reply (`check_evaluation`) and combines the valid ones exactly as it
combines evaluate replies (`strategies.base.aggregate_metrics`). Plain Python; no Flower, numpy or torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

Scalar = bool | int | float | str | bytes

MODES = ("fit", "separate", "none")  # run-config federated-evaluation
EVALUATE_BEFORE_FIT = "evaluate-before-fit"  # fit-config flag the server sets in mode "fit"
PREFIX = "fed_eval_"
LOSS = PREFIX + "loss"
NUM_EXAMPLES = PREFIX + "num_examples"
ACCURACY = PREFIX + "accuracy"


def fit_evaluation_metrics(loss: float, num_examples: int, metrics: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """A client's evaluation of the received model, as fit-metric entries (``accuracy`` -> ``fed_eval_accuracy``)."""
    out: dict[str, Scalar] = {LOSS: float(loss), NUM_EXAMPLES: int(num_examples)}
    out.update({PREFIX + k: v for k, v in metrics.items()})
    return out


def split_fit_evaluation(metrics: Mapping[str, Scalar]) -> tuple[dict[str, Scalar], dict[str, Scalar]]:
    """(the fit-time evaluation entries without their prefix, the other fit metrics)."""
    evaluation = {k[len(PREFIX):]: v for k, v in metrics.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in metrics.items() if not k.startswith(PREFIX)}
    return evaluation, rest


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check_evaluation(evaluation: Mapping[str, Scalar]) -> str | None:
    """Why a client's fit-time evaluation (prefix stripped) cannot be used, or None when it can.

    The rules of an evaluate reply: a positive integer example count and a finite loss; an
    accuracy, when reported, a number in [0, 1]; every other entry a finite number.
    """
    count = evaluation.get("num_examples")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return f"{NUM_EXAMPLES} must be a positive integer, got {count!r}"
    loss = _number(evaluation.get("loss"))
    if loss is None or not math.isfinite(loss):
        return f"{LOSS} must be a finite number, got {evaluation.get('loss')!r}"
    if "accuracy" in evaluation:
        accuracy = _number(evaluation["accuracy"])
        if accuracy is None or not 0.0 <= accuracy <= 1.0:
            return f"{ACCURACY} must be a number in [0, 1], got {evaluation['accuracy']!r}"
    for key, value in evaluation.items():
        number = _number(value)
        if number is None or not math.isfinite(number):
            return f"{PREFIX}{key} must be a finite number, got {value!r}"
    return None

