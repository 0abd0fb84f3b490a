"""Federated evaluation folded into the fit message: what the client reports, how the server checks it.

With ``federated-evaluation = "fit"`` the server sets `EVALUATE_BEFORE_FIT` in every fit config;
a client then evaluates the global model it RECEIVED on its local validation split before it
trains, and reports the result among its fit metrics under `LOSS`, `NUM_EXAMPLES` and
``fed_eval_<name>`` (e.g. `ACCURACY`). A round then needs one message (one ClientApp process in
a deployment) per client instead of two. The figure describes the model at the start of the
round, i.e. after the previous round's aggregation (the initial model in round 1).

The server takes these entries out of the fit metrics (`split_fit_evaluation`), then checks and
combines each client's exactly as an evaluate reply (`strategies.base.FederatedStrategy`: the same
count, loss and metric checks, the same count cap, the same per-client figures). Plain Python; no
Flower, numpy or torch.
"""

from __future__ import annotations

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
