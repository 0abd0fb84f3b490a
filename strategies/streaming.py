"""Weighted means computed in place, with one float32 accumulator per array.

Two shapes of the same computation, sum_i w_i x_i / sum_i w_i:

- `blocked_weighted_mean` when every client's arrays are already in memory (Flower hands the
  strategy all replies at once; `strategies.serde.views` reads them without copying). It walks the
  model in cache-sized blocks and adds every client's block while the accumulator block stays in
  cache, so each update is read from memory exactly once and the result written once: the memory
  floor of the computation. The finiteness check of each update is fused into the same pass.
- `StreamingMean` when clients arrive one at a time (e.g. decoded from a compressed payload), so
  that only one decoded update is alive at once.

Neither makes a weighted copy of any update; inputs may be read-only and are never written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from strategies.aggregators import accumulate_client, tensor_view

NDArrays = list[np.ndarray]

BLOCK_ELEMENTS = 1 << 17  # 512 KiB of float32: the accumulator block plus one input block fit in L2


def _check_weights(weights: Sequence[float]) -> None:
    for i, w in enumerate(weights):
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"weight of client {i} must be positive and finite, got {w}")


def blocked_weighted_mean(
    clients: Sequence[Sequence[np.ndarray]], weights: Sequence[float], block_elements: int = BLOCK_ELEMENTS
) -> tuple[NDArrays, list[int]]:
    """Weighted mean of equally shaped clients, and the indices of clients holding NaN or Inf.

    When some client is not finite the returned mean is meaningless: drop those clients and call
    again. Shapes must already agree (`strategies.validation.check_update` without the finiteness
    check is the cheap way to ensure it).
    """
    if not clients:
        raise ValueError("no client to average")
    if len(weights) != len(clients):
        raise ValueError(f"{len(clients)} clients but {len(weights)} weights")
    _check_weights(weights)
    total = float(sum(weights))
    scale = [w / total for w in weights]
    finite = [True] * len(clients)
    out: NDArrays = []
    for j, first in enumerate(clients[0]):
        flat = [tensor_view(c[j], f"client {i}, array {j}").reshape(-1) for i, c in enumerate(clients)]
        for i, t in enumerate(flat):
            if t.numel() != flat[0].numel():
                raise ValueError(f"client {i}, array {j}: {t.numel()} elements, expected {flat[0].numel()}")
        acc = torch.empty(flat[0].numel(), dtype=torch.float32)
        for start in range(0, acc.numel(), block_elements):
            block = acc[start : start + block_elements]
            for i, t in enumerate(flat):
                chunk = t[start : start + block_elements]
                if finite[i] and not torch.isfinite(chunk.sum()):
                    finite[i] = bool(torch.isfinite(chunk).all())  # a finite sum implies finite values
                if i == 0:
                    torch.mul(chunk, scale[0], out=block)
                else:
                    block.add_(chunk, alpha=scale[i])
        out.append(acc.numpy().reshape(np.shape(first)))
    return out, [i for i, ok in enumerate(finite) if not ok]


class StreamingMean:
    """sum_i w_i x_i / sum_i w_i, adding one client at a time into one accumulator per array."""

    def __init__(self) -> None:
        self._acc: list[torch.Tensor] = []
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        _check_weights([weight])
        accumulate_client(self._acc, arrays, weight, self.count)
        self.total_weight += weight
        self.count += 1

    def result(self) -> NDArrays:
        if not self._acc:
            raise ValueError("no client was added")
        scale = 1.0 / self.total_weight
        return [acc.mul_(scale).numpy() for acc in self._acc]
