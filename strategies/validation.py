"""Checks inputs must pass before they may touch the global model: updates, client weights, client structure.

One place for them, so every rule words a problem the same way and names the client and array at fault:

* :func:`check_update`: one client's update against the model (example count, arrays, shapes, dtype, finite);
  returns the reason for rejecting it, for the strategy shell to log.
* :func:`check_weights`: per-client weights (positive, finite, one per client); raises.
* :func:`client_shape_error` and :func:`check_same_shapes`: every client has the arrays of client 0.

numpy and torch only (no Flower).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.tensors import all_finite

__all__ = ["check_same_shapes", "check_update", "check_weights", "client_shape_error"]

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
