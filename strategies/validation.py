"""Checks a client's update must pass before it may touch the global model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NDArrays = list[np.ndarray]


def _all_finite(array: np.ndarray) -> bool:
    # A finite sum implies finite elements (NaN and Inf propagate), and costs one read with
    # no temporary; only when the sum overflows (huge but finite values) do we pay for the
    # element-wise check.
    if array.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(array, axis=None)
    return bool(np.isfinite(total)) or bool(np.isfinite(array).all())


def check_update(
    arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], num_examples: int, check_finite: bool = True
) -> str | None:
    """Why this update must be rejected, or None when it is usable.

    Checks, in order: the example count, the number of arrays, each array's shape and dtype
    (floating point), and (unless ``check_finite`` is False, for callers that fuse that check into
    their own pass over the data) that every value is finite.
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
        if check_finite and not _all_finite(array):
            return f"array {i} contains NaN or Inf"
    return None
