"""A weighted mean accumulated one client at a time, in place."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

NDArrays = list[np.ndarray]


class StreamingMean:
    """sum_i w_i x_i / sum_i w_i with one float32 accumulator per array.

    Each `add` reads the client's arrays once (`acc += w * x` via ``torch.add_``, which needs no
    temporary), so the extra memory is one model's worth however many clients report. Inputs
    may be read-only views (e.g. of Flower's received bytes); they are never written.
    """

    def __init__(self) -> None:
        self._acc: list[torch.Tensor] | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        tensors = [_as_tensor(a) for a in arrays]
        if self._acc is None:
            self._acc = [t.to(torch.float32).mul(weight) for t in tensors]
        else:
            if len(tensors) != len(self._acc):
                raise ValueError(f"client {self.count}: expected {len(self._acc)} arrays, got {len(tensors)}")
            for i, (acc, t) in enumerate(zip(self._acc, tensors)):
                if acc.shape != t.shape:
                    raise ValueError(f"client {self.count}, array {i}: shape {tuple(t.shape)} != {tuple(acc.shape)}")
                acc.add_(t, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> NDArrays:
        if self._acc is None:
            raise ValueError("no client was added")
        scale = 1.0 / self.total_weight
        return [acc.mul_(scale).numpy() for acc in self._acc]


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory (read-only inputs included: they are only read)."""
    array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
