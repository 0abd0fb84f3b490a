"""Checks inputs must pass before they may touch the global model: updates, client weights, client structure,
the numbers clients report and their metrics.

One place for them, so every rule words a problem the same way and names the client and array at fault:

* :func:`check_update`: one client's update against the model (example count, arrays, shapes, dtype, finite);
  returns the reason for rejecting it, for the strategy shell to log. :func:`check_flat_float32` is its
  no-pass-over-the-data part for uncompressed payloads.
* :func:`check_weights`: per-client weights (positive, finite, one per client); raises.
* :func:`client_shape_error` and :func:`check_same_shapes`: every client has the arrays of client 0.
* :func:`check_count`, :func:`cap_counts`, :func:`norm_bound`: bounds on what one client can claim or send,
  relative to the round's other clients (the lower median, :func:`lower_median`).
* :func:`metric_kind` and :func:`clean_metrics`: a metric's meaning from its name, and the values a client may
  report for it.

numpy and torch only (no Flower).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from strategies.tensors import all_finite

__all__ = [
    "MAX_COUNT",
    "cap_counts",
    "check_count",
    "check_flat_float32",
    "check_same_shapes",
    "check_update",
    "check_weights",
    "clean_metrics",
    "client_shape_error",
    "is_real",
    "lower_median",
    "metric_kind",
    "norm_bound",
]

# Counts above 2^53 are not exact as float64, and no data set holds 9e15 examples: a larger count is bogus.
MAX_COUNT = 2**53

NDArrays = list[np.ndarray]


def check_update(
    arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], num_examples: int, check_finite: bool = True
) -> str | None:
    """Why this update must be rejected, or None when it is usable.

    Checks, in order: the example count, the number of arrays, each array's shape and dtype
    (floating point), and (unless ``check_finite`` is False, for callers that fuse that check into
    their own pass over the data) that every value is finite (:func:`strategies.tensors.all_finite`).
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        return f"num_examples must be a positive integer, got {num_examples!r}"
    if len(arrays) != len(shapes):
        return f"expected {len(shapes)} arrays, got {len(arrays)}"
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        if tuple(array.shape) != tuple(shape):
            return f"array {i} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(array.dtype, np.floating):
            return f"array {i} has dtype {array.dtype}, expected a floating-point dtype"
        if check_finite and not all_finite(array):
            return f"array {i} contains NaN or Inf"
    return None


def check_weights(weights: Sequence[float], num_clients: int | None = None, first_client: int = 0) -> np.ndarray:
    """Validate client weights (non-empty, positive, finite, one per client) and return them as float64.

    Args:
        weights: one weight per client (usually its number of training examples).
        num_clients: if given, the number of weights it must match.
        first_client: the index of the client ``weights[0]`` belongs to, for the error message (a caller that
            receives clients one at a time checks each weight as it comes).

    Raises:
        ValueError: naming the first client whose weight is not positive and finite, or the counts that differ.
    """
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"weights must be a sequence of numbers, got {weights!r}") from err
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if num_clients is not None and w.size != num_clients:
        raise ValueError(f"got {num_clients} clients but {w.size} weights")
    bad = np.flatnonzero(~np.isfinite(w) | (w <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"weights must be positive and finite; client {first_client + i} has weight {float(w[i])!r}")
    return w


def client_shape_error(client: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], index: int) -> str | None:
    """Why client ``index``'s arrays differ from client 0's ``shapes`` (count, then each shape), or None."""
    if len(client) != len(shapes):
        return f"client {index} has {len(client)} arrays; client 0 has {len(shapes)}"
    for j, (x, shape) in enumerate(zip(client, shapes)):
        if tuple(np.shape(x)) != tuple(shape):
            return f"client {index}, array {j}: shape {tuple(np.shape(x))} differs from client 0's {tuple(shape)}"
    return None


def check_same_shapes(clients: Sequence[Sequence[np.ndarray]]) -> list[tuple[int, ...]]:
    """Check that every client has as many arrays as client 0, with the same shapes; return those shapes.

    Raises:
        ValueError: for no client, or naming the first client (and array) that differs.
    """
    if len(clients) == 0:
        raise ValueError("need at least one client")
    shapes = [tuple(np.shape(x)) for x in clients[0]]
    for i, client in enumerate(clients):
        reason = client_shape_error(client, shapes, i)
        if reason is not None:
            raise ValueError(reason)
    return shapes


def check_flat_float32(wire: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> str | None:
    """Why an uncompressed payload cannot be the model's float32 arrays (count, size, dtype), or None.

    No pass over the data: the values (finiteness) are checked where they are read anyway.
    """
    if len(wire) != len(shapes):
        return f"expected {len(shapes)} arrays, got {len(wire)}"
    for i, (w, shape) in enumerate(zip(wire, shapes)):
        if w.dtype != np.float32:
            return f"array {i} has dtype {w.dtype}, expected float32"
        if w.size != math.prod(shape):
            return f"array {i} has {w.size} values, expected {math.prod(shape)} for shape {tuple(shape)}"
    return None


def is_real(value: object) -> bool:
    """A real number (int or float, numpy's included), not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def check_count(value: object, what: str = "num_examples") -> str | None:
    """Why ``value`` is not a usable count (a positive integer up to :data:`MAX_COUNT`), or None."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_) or not 0 < value <= MAX_COUNT:
        return f"{what} must be a positive integer <= 2^53, got {value!r}"
    return None


def lower_median(values: Sequence[float]) -> float:
    """The lower median: the middle value, or the smaller of the two middle ones (``sorted(v)[(n - 1) // 2]``).

    With two clients it is the smaller one, so a bound relative to it holds one client to the other; with more,
    it is an honest client's value as long as fewer than half the clients report larger ones.
    """
    if not values:
        raise ValueError("lower_median of no values")
    return sorted(values)[(len(values) - 1) // 2]


def cap_counts(counts: Sequence[int], max_ratio: float) -> tuple[list[int], list[int]]:
    """Each count capped at ``floor(max_ratio x lower median)`` (at least 1), and the indices that were capped.

    This bounds one client's weight in example-weighted means by its ratio to a typical client, whatever count
    it claims; ``max_ratio = inf`` caps nothing.
    """
    if not counts or math.isinf(max_ratio):
        return list(counts), []
    cap = max(1, math.floor(max_ratio * lower_median(counts)))
    capped = [i for i, c in enumerate(counts) if c > cap]
    return [min(c, cap) for c in counts], capped


def norm_bound(norms: Sequence[float], max_ratio: float) -> float:
    """The largest norm accepted in a round: ``max_ratio`` x the lower median of the finite ``norms``.

    ``inf`` (no bound) when ``max_ratio`` is inf, no norm is finite, or the lower median is 0 (nothing to
    compare with).
    """
    finite = [n for n in norms if math.isfinite(n)]
    if not finite or math.isinf(max_ratio):
        return math.inf
    reference = lower_median(finite)
    return max_ratio * reference if reference > 0 else math.inf


def metric_kind(name: str) -> str:
    """What a metric's name says it is: ``count`` (summed), ``maximum`` (``epsilon*``, ``*_max``: the largest
    is kept), ``accuracy`` (a fraction in [0, 1]), ``loss`` (>= 0) or ``value`` (any finite number).

    ``data_*`` metrics (what a client reports of its data for the partition summary, e.g. ``data_label_3``, or
    ``data_partition``, -1 for a node with its own file) are values.
    """
    if name.startswith("data_"):
        return "value"
    if name.startswith("num_") or name.endswith(("_bytes", "_count")):
        return "count"
    if name.startswith("epsilon") or name.endswith("_max"):
        return "maximum"
    if name == "accuracy" or name.endswith("_accuracy"):
        return "accuracy"
    if name == "loss" or name.endswith("_loss"):
        return "loss"
    return "value"


_RANGES = {
    "count": (0.0, float(MAX_COUNT), "a count in [0, 2^53]"),
    "accuracy": (0.0, 1.0, "an accuracy in [0, 1]"),
    "loss": (0.0, math.inf, "a loss >= 0"),
    "maximum": (-math.inf, math.inf, "a finite number"),
    "value": (-math.inf, math.inf, "a finite number"),
}


def clean_metrics(
    metrics: Mapping[Any, Any], reserved: Sequence[str] = ()
) -> tuple[dict[str, int | float], list[str]]:
    """The metrics a server may use, and why each other one was left out.

    Kept: string names not in ``reserved``, whose value is a real number (not a bool, a string or bytes), finite
    and in the range its name implies (:func:`metric_kind`: accuracies in [0, 1], losses and counts >= 0).
    ``data_client`` is always reserved (the partition summary's own column). Never raises.
    """
    kept: dict[str, int | float] = {}
    problems: list[str] = []
    for name, value in metrics.items():
        if not isinstance(name, str):
            problems.append(f"{name!r} (not a name)")
            continue
        if name in reserved or name == "data_client":
            problems.append(f"{name} (reserved: the server sets it)")
            continue
        if not is_real(value):
            problems.append(f"{name} (not a number: {type(value).__name__} {_short(value)})")
            continue
        number = int(value) if isinstance(value, int | np.integer) else float(value)  # type: ignore[arg-type]
        lo, hi, what = _RANGES[metric_kind(name)]
        if isinstance(number, int) and abs(number) > MAX_COUNT:
            problems.append(f"{name} (an integer beyond 2^53: {_short(number)})")
        elif isinstance(number, float) and not math.isfinite(number):
            problems.append(f"{name} ({number})")
        elif not lo <= number <= hi:
            problems.append(f"{name} (must be {what}, got {number!r})")
        else:
            kept[name] = number
    return kept, problems


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
