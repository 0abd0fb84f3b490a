"""The distribution of a metric over clients: what one example-weighted mean hides.

Federated evaluation asks each sampled client to evaluate on its own held-out split. The usual figure is the
example-weighted mean over clients, which a few large clients dominate. Under data heterogeneity the question
a data owner asks is how well the model serves *them*, so each client counts once here (Li et al. 2021, Ditto,
report the worst and the 10th percentile of per-client accuracy; pFL-Bench, Chen et al. NeurIPS 2022, the
unweighted mean and the bottom decile).

For a metric where higher is better (accuracy), with the per-client values ``a_1..a_n``::

    mean  = (1/n) sum_i a_i
    p10   = Q(0.10)   the 10th percentile
    worst = min_i a_i

and where lower is better (loss) the mirror image: ``p90 = Q(0.90)`` and ``worst = max_i l_i``. ``Q(q)`` is the
linear interpolation between order statistics (Hyndman and Fan's type 7, numpy's default): with the values
sorted, ``x_(0) <= ... <= x_(n-1)``, ``h = (n - 1) q``, ``Q(q) = x_(floor h) + (h - floor h) (x_(floor h + 1) -
x_(floor h))``. With one client every figure is its value.

Values that are not real numbers, not finite, or out of range (an accuracy outside [0, 1]) are left out and
returned as problems, so one bad reply neither poisons nor hides the others. Pure numpy; no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["PER_CLIENT_METRICS", "client_distribution", "per_client_columns", "percentile"]

PER_CLIENT_QUANTILE = 0.10  # the "worst decile" threshold
# Metric -> higher is better. Accuracies when the task has them, losses otherwise (regression).
PER_CLIENT_METRICS: dict[str, bool] = {
    "accuracy": True,
    "personal_accuracy": True,
    "loss": False,
    "personal_loss": False,
}
COLUMN_PREFIX = "clients_"


def percentile(values: Sequence[float], q: float) -> float:
    """``Q(q)`` by linear interpolation between order statistics (numpy's default, Hyndman-Fan type 7)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(float(v) for v in values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def client_distribution(values: Sequence[float], higher_is_better: bool) -> dict[str, float]:
    """``{"mean", "p10", "worst"}`` (higher is better) or ``{"mean", "p90", "worst"}`` of per-client values.

    Raises:
        ValueError: for no values or a value that is not finite.
    """
    if not values:
        raise ValueError("no per-client values")
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("per-client values must be finite")
    if higher_is_better:
        return {"mean": float(arr.mean()), "p10": percentile(values, PER_CLIENT_QUANTILE), "worst": float(arr.min())}
    return {"mean": float(arr.mean()), "p90": percentile(values, 1.0 - PER_CLIENT_QUANTILE), "worst": float(arr.max())}


def _check(name: str, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return f"{name} is not a number: {value!r}"
    v = float(value)
    if not math.isfinite(v):
        return f"{name} is not finite: {v}"
    if name.endswith("accuracy") and not 0.0 <= v <= 1.0:
        return f"{name} must be in [0, 1], got {v}"
    return None


def per_client_columns(replies: Sequence[Mapping[str, object]]) -> tuple[dict[str, float], list[str]]:
    """Columns ``clients_<metric>_<figure>`` over the replies, and the problems found.

    Each reply is one client's evaluation metrics with its ``loss``. Accuracies are summarized when any reply
    has one (classification); otherwise losses are (regression). ``clients_evaluated`` counts the replies.
    A value that fails its check is left out of its metric's figures and named in the problems.
    """
    columns: dict[str, float] = {}
    problems: list[str] = []
    if not replies:
        return columns, problems
    columns[f"{COLUMN_PREFIX}evaluated"] = float(len(replies))
    has_accuracy = any("accuracy" in r or "personal_accuracy" in r for r in replies)
    for name, higher in PER_CLIENT_METRICS.items():
        if has_accuracy != name.endswith("accuracy"):
            continue
        values: list[float] = []
        for i, reply in enumerate(replies):
            if name not in reply:
                continue
            problem = _check(name, reply[name])
            if problem is not None:
                problems.append(f"client reply {i}: {problem}")
                continue
            values.append(float(reply[name]))  # type: ignore[arg-type]
        if values:
            for figure, value in client_distribution(values, higher).items():
                columns[f"{COLUMN_PREFIX}{name}_{figure}"] = value
    return columns, problems
