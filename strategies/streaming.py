"""The weighted mean of client updates, computed in place: one implementation, two ways in.

McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data" (FedAvg)::

    mean_j = sum_i w_i x_{i,j} / sum_i w_i

for clients ``i`` with weights ``w_i > 0`` (usually example counts) and arrays ``x_{i,j}``. One routine adds
clients into one float32 accumulator per array, ``acc (=|+=) c_i * x_i`` with torch's ``mul(out=)`` and
``add_(alpha=)``, so no weighted copy of any update is made; inputs may be read-only (zero-copy views of received
bytes) and are never written. Every function here goes through it:

- All clients in memory (a sequence, e.g. Flower's replies viewed by `strategies.serde.views`): the model is
  walked in cache-sized blocks of ``block_elements`` values, and every client's block is added while the
  accumulator block stays in cache. Each update is read from memory exactly once and the result written once: the
  memory floor of the computation. The finiteness check of each update can be fused into the same pass
  (:func:`strategies.tensors.all_finite` on each block while it is in cache): :func:`blocked_weighted_mean`
  reports the clients holding NaN or Inf, :func:`finite_weighted_mean` also leaves them out.
- Clients one at a time (an iterator, or :class:`StreamingMean` for updates decoded one by one from a compressed
  payload): each client is added whole (blocking gains nothing with one input), so only the client being added
  need be alive. The caller validates it first (`strategies.validation.check_update`), as a client that is
  already added cannot be taken out.

Coefficients. When all weights are known up front they are normalized first (``p_i = w_i / sum_k w_k`` in
float64) and the accumulator is the mean: no pass at the end, and large example counts cannot overflow float32
(each partial sum is at most the largest input in magnitude). :class:`StreamingMean` learns the weights one client
at a time; it keeps the running mean, blending each client in with ``w_i / sum_{k<=i} w_k``, for the same reason.
Arrays of another dtype are converted to float32 block by block before they are scaled.

Norms. :func:`finite_weighted_mean` can also return each client's L2 norm (its distance from a ``center``) from
the same pass, so that a caller can bound the clients' updates without reading them again.

numpy and torch only (no Flower).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from strategies.tensors import NORM_BLOCK, all_finite, sq_norm_into, tensor_view
from strategies.validation import check_weights, client_shape_error

__all__ = [
    "BLOCK_ELEMENTS",
    "StreamingMean",
    "blocked_weighted_mean",
    "finite_weighted_mean",
    "weighted_mean",
    "weighted_sum",
]

NDArrays = list[np.ndarray]

BLOCK_ELEMENTS = 1 << 17  # 512 KiB of float32: the accumulator block plus one input block fit in L2


def _spans(
    target: torch.Tensor, views: list[torch.Tensor], block_elements: int
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(accumulator block, each client's block) pairs covering one array; whole tensors when one block does."""
    n = target.numel()
    if n <= block_elements:
        yield target, views
        return
    flat_target = target.view(-1)
    flats = [v.reshape(-1) for v in views]
    for start in range(0, n, block_elements):
        stop = start + block_elements
        yield flat_target[start:stop], [f[start:stop] for f in flats]


def _accumulate(
    acc: list[torch.Tensor],
    group: Sequence[Sequence[np.ndarray]],
    coefs: Sequence[float],
    first_client: int,
    block_elements: int,
    finite: list[bool] | None,
    sq_norms: list[float] | None = None,
    center: Sequence[np.ndarray] | None = None,
) -> None:
    """``acc (=|+=) sum_k coefs[k] * group[k]``: the one accumulation step of every mean and sum here.

    ``group[k]`` is client ``first_client + k`` (for error messages). An empty ``acc`` is created from the group
    (float32, the first client's block written by ``mul(out=)``); otherwise the group must match its shapes. With
    ``finite``, ``finite[k]`` becomes False when client ``k`` holds a NaN or Inf (checked in the same pass). With
    ``sq_norms``, ``||group[k] - center||^2`` is added to ``sq_norms[k]`` in the same pass (``center`` None is the
    origin; it must be finite), for the clients still finite; the norm then doubles as the finiteness check.
    """
    fresh = not acc
    shapes = [tuple(np.shape(x)) for x in group[0]] if fresh else [tuple(a.shape) for a in acc]
    for k, client in enumerate(group):
        reason = client_shape_error(client, shapes, first_client + k)
        if reason is not None:
            raise ValueError(reason)
    if center is not None:
        reason = client_shape_error(center, shapes, 0)
        if reason is not None:
            raise ValueError(f"center: {reason}")
    # Blocks pay off when several inputs share the accumulator block, or when each input block is read twice
    # (finiteness, then sum) while in cache; one client without the check is added whole.
    blocked = len(group) > 1 or finite is not None
    for j, shape in enumerate(shapes):
        views = [tensor_view(c[j], f"client {first_client + k}, array {j}") for k, c in enumerate(group)]
        if center is not None and sq_norms is not None:
            views.append(tensor_view(center[j], f"center, array {j}"))
        if fresh:
            acc.append(torch.empty(shape, dtype=torch.float32))
        step = block_elements if blocked else max(acc[j].numel(), 1)
        scratch = torch.empty(min(NORM_BLOCK, max(acc[j].numel(), 1)), dtype=torch.float32) if sq_norms is not None else None
        for block, chunks in _spans(acc[j], views, step):
            ref = chunks[len(group)] if len(chunks) > len(group) else None
            for k, chunk in enumerate(chunks[: len(group)]):
                if chunk.dtype != torch.float32:
                    chunk = chunk.to(torch.float32)
                if sq_norms is not None and (finite is None or finite[k]):
                    # The norm is also the finiteness check: ||x - c||^2 is finite iff x is (c, the global
                    # weights, is finite), and sq_norm_into is exact for finite values however large.
                    norm = sq_norm_into(chunk, ref, scratch)
                    if math.isfinite(norm):
                        sq_norms[k] += norm
                    elif finite is not None:
                        finite[k] = False
                    else:
                        sq_norms[k] = math.inf
                elif finite is not None and finite[k] and not all_finite(chunk):
                    finite[k] = False
                if fresh and k == 0:
                    torch.mul(chunk, coefs[0], out=block)
                else:
                    block.add_(chunk, alpha=coefs[k])


def _sum(
    clients: Iterable[Sequence[np.ndarray]],
    coefs: Sequence[float],
    block_elements: int,
    check_finite: bool,
    sq_norms: list[float] | None = None,
    center: Sequence[np.ndarray] | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """``sum_i coefs[i] * clients[i]`` and, with ``check_finite`` (sequences only), the non-finite clients.

    With ``sq_norms`` (sequences only), one ``||clients[i] - center||^2`` per client is appended to it.
    """
    if not isinstance(block_elements, int) or isinstance(block_elements, bool) or block_elements < 1:
        raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
    acc: list[torch.Tensor] = []
    if isinstance(clients, Sequence):
        if len(clients) > len(coefs):
            raise ValueError(f"got {len(clients)} clients: more clients than the {len(coefs)} weights given")
        if len(clients) < len(coefs):
            raise ValueError(f"got {len(clients)} clients but {len(coefs)} weights")
        finite = [True] * len(clients) if check_finite else None
        norms = [0.0] * len(clients) if sq_norms is not None else None
        _accumulate(acc, clients, coefs, 0, block_elements, finite, norms, center)
        if sq_norms is not None and norms is not None:
            sq_norms.extend(v if (finite is None or finite[i]) else math.inf for i, v in enumerate(norms))
        return acc, [i for i, ok in enumerate(finite or []) if not ok]
    if check_finite or sq_norms is not None:
        raise TypeError("the finiteness check and the norms need every client in memory: pass a sequence, not an iterator")
    num_seen = 0
    for i, client in enumerate(clients):
        if i >= len(coefs):
            raise ValueError(f"got more clients than the {len(coefs)} weights given (client {i} is extra)")
        _accumulate(acc, [client], [coefs[i]], i, block_elements, None)
        num_seen = i + 1
    if num_seen != len(coefs):
        raise ValueError(f"got {num_seen} clients but {len(coefs)} weights")
    return acc, []


def _normalized(weights: Sequence[float]) -> list[float]:
    w = check_weights(weights)
    return [float(p) for p in w / w.sum()]


def weighted_sum(
    clients: Iterable[Sequence[np.ndarray]], coefficients: Sequence[float], block_elements: int = BLOCK_ELEMENTS
) -> NDArrays:
    """``sum_i c_i x_i`` in float32 (a sequence in one blocked pass, an iterator one client at a time).

    The building block of :func:`weighted_mean` (``c_i = w_i / sum w``) and of FedNova's combination
    (`strategies.aggregators.fednova_combine`).

    Raises:
        ValueError: if a coefficient is not finite, the numbers of clients and coefficients differ, or a client's
            array count or shapes differ from client 0's (naming the client and array).
    """
    coefs = [float(c) for c in coefficients]
    if not coefs or not np.isfinite(coefs).all():
        raise ValueError(f"coefficients must be a non-empty sequence of finite numbers, got {coefs!r}")
    acc, _ = _sum(clients, coefs, block_elements, check_finite=False)
    return [a.numpy() for a in acc]


def weighted_mean(
    clients: Iterable[Sequence[np.ndarray]], weights: Sequence[float], block_elements: int = BLOCK_ELEMENTS
) -> NDArrays:
    """Weighted mean of per-client arrays (FedAvg aggregation; the registered aggregator ``mean``).

    ``mean_j = sum_i w_i x_{i,j} / sum_i w_i``, with the weights normalized up front (see the module docstring).
    A sequence of clients is averaged in one blocked pass. An iterator (e.g. a generator that deserializes each
    client lazily) is consumed once, one client at a time, and at most one client is referenced at any moment.
    Either way the work memory is one float32 accumulator per array (the size of one model). Values are not
    checked: a client holding NaN or Inf makes the mean non-finite (see :func:`finite_weighted_mean`).

    Args:
        clients: per client, the list of arrays (same count and shapes for every client; any real dtype).
        weights: one positive, finite weight per client.
        block_elements: values per block of the in-memory pass (tuning only; any positive value gives the mean).

    Returns:
        The weighted mean, as new float32 arrays.

    Raises:
        ValueError: if a weight is not positive and finite, the number of clients differs from the number of
            weights, or a client's array count or shapes differ from client 0's (naming the client and array).
    """
    acc, _ = _sum(clients, _normalized(weights), block_elements, check_finite=False)
    return [a.numpy() for a in acc]


def blocked_weighted_mean(
    clients: Sequence[Sequence[np.ndarray]], weights: Sequence[float], block_elements: int = BLOCK_ELEMENTS
) -> tuple[NDArrays, list[int]]:
    """:func:`weighted_mean` of clients in memory, and the indices of the clients holding NaN or Inf.

    One blocked pass: each update is read once, for its finiteness and its contribution. When some client is
    not finite the returned mean is meaningless: leave those clients out and call again, or call
    :func:`finite_weighted_mean`, which does.

    Raises:
        ValueError: as :func:`weighted_mean`.
    """
    acc, bad = _sum(clients, _normalized(weights), block_elements, check_finite=True)
    return [a.numpy() for a in acc], bad


def finite_weighted_mean(
    clients: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    block_elements: int = BLOCK_ELEMENTS,
    *,
    center: Sequence[np.ndarray] | None = None,
    norms: list[float] | None = None,
) -> tuple[NDArrays | None, list[int]]:
    """The weighted mean of the clients whose values are all finite, and the indices of the others.

    One blocked pass (:func:`blocked_weighted_mean`) when every client is finite; when some are not, the mean of
    the others is computed in a second pass, with their weights renormalized.

    Args:
        clients: per client, the list of arrays (as :func:`weighted_mean`).
        weights: one positive, finite weight per client.
        block_elements: values per block (tuning only).
        center: arrays of the clients' shapes; the norms below are distances from it (default: the origin).
        norms: if given, a list to which one float per client is appended: ``||x_i - center||_2`` (all its arrays
            as one vector, accumulated in float64 in the first pass, at no extra read of the data); ``inf`` for
            the clients left out. A caller that bounds the norms can then leave out more clients by calling
            again on the rest.

    Returns:
        ``(mean, dropped)``: the mean as new float32 arrays (None when no client is finite) and the indices of
        the clients holding NaN or Inf, in increasing order.

    Raises:
        ValueError: as :func:`weighted_mean`.
    """
    w = check_weights(weights, len(clients))
    keep = list(range(len(clients)))
    dropped: list[int] = []
    sq: list[float] | None = [] if norms is not None else None
    while keep:
        acc, bad = _sum([clients[i] for i in keep], _normalized(w[keep].tolist()), block_elements, True, sq, center)
        if sq is not None and norms is not None:
            norms.extend(math.sqrt(v) if math.isfinite(v) else math.inf for v in sq)
            sq = None  # the second pass, if any, only recomputes the mean
        if not bad:
            return [a.numpy() for a in acc], sorted(dropped)
        dropped.extend(keep[k] for k in bad)
        keep = [i for k, i in enumerate(keep) if k not in bad]
    return None, sorted(dropped)


class StreamingMean:
    """``sum_i w_i x_i / sum_i w_i``, adding one client at a time (the weights need not be known up front).

    For updates that are decoded one by one: only the update being added need be alive. Each :meth:`add` checks
    the weight and the shapes against the first client; the values are not checked (validate the update first).

    The accumulator always holds the weighted mean of the clients added so far: adding client ``i`` with weight
    ``w_i`` after a total weight ``W`` is ``acc <- (1 - c) acc + c x_i`` with ``c = w_i / (W + w_i)``. Every
    partial result is a convex combination of the inputs, so it cannot overflow float32 whatever the weights
    (summing ``w_i x_i`` first overflows for large counts times large values).
    """

    def __init__(self) -> None:
        self._acc: list[torch.Tensor] = []
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        """Blend ``arrays`` into the running mean with ``weight``.

        Raises:
            ValueError: if the weight is not positive and finite, or the arrays differ from the first client's in
                count or shape (naming this client by its position).
        """
        w = float(check_weights([weight], first_client=self.count)[0])
        total = self.total_weight + w
        c = w / total if math.isfinite(total) else 0.0
        if self._acc:
            shapes = [tuple(a.shape) for a in self._acc]
            reason = client_shape_error(arrays, shapes, self.count)
            if reason is not None:
                raise ValueError(reason)
            for a in self._acc:
                a.mul_(1.0 - c)
        _accumulate(self._acc, [arrays], [c if self._acc else 1.0], self.count, BLOCK_ELEMENTS, None)
        self.total_weight = total
        self.count += 1

    def result(self) -> NDArrays:
        """The weighted mean of the clients added, as float32 arrays (the accumulator itself: call once).

        Raises:
            ValueError: if no client was added.
        """
        if not self._acc:
            raise ValueError("no client was added")
        return [acc.numpy() for acc in self._acc]
