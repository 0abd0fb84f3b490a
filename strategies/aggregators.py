"""Aggregation rules: combine per-client arrays into one list of arrays.

Every rule here takes, for each client ``i``, a list of arrays ``x_i`` (one per model tensor, in the canonical
order) and a positive weight ``n_i`` (usually the client's number of training examples), and returns one list of
float32 arrays with the same shapes.

The server applies these rules to client *updates* ``u_i = w_i - w`` (not to the client weights themselves). All
rules are translation-equivariant (``agg(x_i + c) = agg(x_i) + c``), so aggregating updates and aggregating weights
give the same model, and the result can be handed as a pseudo-gradient ``g = -agg(u_i)`` to any server optimizer
in :mod:`strategies.optimizers`.

Rules:

* :func:`weighted_mean`: ``sum_i n_i x_i / sum_i n_i`` (FedAvg); the one implementation of the weighted mean,
  :func:`strategies.streaming.weighted_mean`, re-exported here.
* :func:`coordinate_median`, :func:`trimmed_mean`: coordinate-wise robust statistics (Yin et al., 2018).
* :func:`krum` (and Multi-Krum): distance-based selection (Blanchard et al., 2017).
* :func:`fednova_combine`: FedNova's normalized averaging for heterogeneous local step counts (Wang et al., 2020).

:data:`AGGREGATORS` maps run-config names to callables with one uniform signature; :func:`get_aggregator` looks
them up. This module depends on numpy and torch only (no Flower), so it can be tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch

from strategies.streaming import weighted_mean, weighted_sum
from strategies.tensors import all_finite, float32_tensor, tensor_view
from strategies.validation import check_same_shapes, check_weights

__all__ = [
    "AGGREGATORS",
    "AGGREGATOR_PARAMS_USED",
    "AGGREGATOR_SPECS",
    "Aggregator",
    "AggregatorParams",
    "AggregatorSpec",
    "NDArrays",
    "coordinate_median",
    "fednova_combine",
    "get_aggregator",
    "krum",
    "krum_scores",
    "trimmed_mean",
    "weighted_mean",
]

NDArrays: TypeAlias = list[np.ndarray]

# Krum's pairwise distances are accumulated over column blocks of this many elements, so the float64 working
# copy is ``num_clients * _DISTANCE_CHUNK * 8`` bytes whatever the model size.
_DISTANCE_CHUNK = 1 << 18


def _stack(arrays: Sequence[NDArrays], j: int) -> torch.Tensor:
    """Stack array ``j`` of every client into one float32 tensor of shape ``(num_clients, *shape)``."""
    return torch.stack([float32_tensor(client[j], f"client {i}, array {j}") for i, client in enumerate(arrays)])


# ----------------------------------------------------------------------------------------------------------------
# Aggregation rules (the weighted mean, FedAvg's, is strategies.streaming.weighted_mean).
# ----------------------------------------------------------------------------------------------------------------


def coordinate_median(arrays: Sequence[NDArrays], weights: Sequence[float]) -> NDArrays:
    """Coordinate-wise median of per-client arrays.

    Yin, Chen, Ramchandran and Bartlett, 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates"::

        median_j[k] = med_i x_{i,j}[k]

    For an even number of clients the median is the mean of the two middle values. The median is *unweighted*,
    as in the paper: ``weights`` are validated (one positive, finite weight per client) but otherwise ignored, so
    that a client cannot gain influence by claiming many examples. A non-finite value (NaN sorts last, +-inf at
    the ends) is treated as an extreme value, so a minority of such clients cannot make the result non-finite.

    Returns:
        New float32 arrays.

    Raises:
        ValueError: on an empty client list, inconsistent shapes, or invalid weights.
    """
    check_same_shapes(arrays)
    check_weights(weights, len(arrays))
    n = len(arrays)
    out: NDArrays = []
    for j in range(len(arrays[0])):
        ordered = torch.sort(_stack(arrays, j), dim=0).values
        if n % 2 == 1:
            med = ordered[n // 2].clone()
        else:
            med = ordered[n // 2 - 1].add(ordered[n // 2]).mul_(0.5)
        out.append(med.numpy())
    return out


def trimmed_mean(arrays: Sequence[NDArrays], weights: Sequence[float], trim_fraction: float) -> NDArrays:
    """Coordinate-wise trimmed mean of per-client arrays.

    Yin, Chen, Ramchandran and Bartlett, 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates". With ``n`` clients and ``k = floor(trim_fraction * n)``, for every coordinate the ``k``
    largest and ``k`` smallest values are dropped and the remaining ``n - 2k`` are averaged::

        trimmed_j[k'] = 1/(n - 2k) * sum_{r=k}^{n-k-1} sort_i(x_{i,j}[k'])_r

    The mean is unweighted, as in the paper: ``weights`` are validated but otherwise ignored. ``trim_fraction = 0``
    is the plain unweighted mean. ``floor`` tolerates a 1e-9 rounding error, so ``0.29 * 100`` trims 29.

    Returns:
        New float32 arrays (the kept values are summed in float64).

    Raises:
        ValueError: if ``trim_fraction`` is not in ``[0, 0.5)`` or leaves no value, on an empty client list,
            inconsistent shapes, or invalid weights.
    """
    if not (isinstance(trim_fraction, int | float) and 0.0 <= trim_fraction < 0.5):
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    check_same_shapes(arrays)
    check_weights(weights, len(arrays))
    n = len(arrays)
    k = _trim_count(n, trim_fraction)
    if n - 2 * k < 1:  # unreachable for trim_fraction < 0.5; kept as a guard for the rounding tolerance above
        raise ValueError(f"trim_fraction={trim_fraction} trims {k} values from each end of {n}, leaving none")
    out: NDArrays = []
    for j in range(len(arrays[0])):
        ordered = torch.sort(_stack(arrays, j), dim=0).values
        kept = ordered[k : n - k]
        out.append(kept.sum(dim=0, dtype=torch.float64).div_(n - 2 * k).to(torch.float32).numpy())
    return out


def _pairwise_sq_distances(arrays: Sequence[NDArrays]) -> np.ndarray:
    """Squared Euclidean distances between clients, over all their arrays flattened and concatenated.

    Computed as ``d_ab = G_aa + G_bb - 2 G_ab`` from the float64 Gram matrix ``G``, accumulated over column blocks
    of at most ``_DISTANCE_CHUNK`` coordinates, so the work memory is ``n * _DISTANCE_CHUNK`` float64 values and
    ``n x n`` scalars (never ``n^2`` copies of the model). Each block is centered on its per-coordinate mean first
    (distances are translation invariant), which avoids cancellation when the clients are close to each other but
    far from the origin. Clients with a NaN or infinite value are at distance ``inf`` from everyone else.
    """
    n = len(arrays)
    finite = np.ones(n, dtype=bool)
    for i, client in enumerate(arrays):
        finite[i] = all(all_finite(tensor_view(x, f"client {i}")) for x in client)
    idx = np.flatnonzero(finite)
    gram = torch.zeros((idx.size, idx.size), dtype=torch.float64)
    for j in range(len(arrays[0])):
        flats = [tensor_view(arrays[int(i)][j], f"client {int(i)}, array {j}").reshape(-1) for i in idx]
        size = flats[0].numel() if flats else 0
        for start in range(0, size, _DISTANCE_CHUNK):
            block = torch.stack([f[start : start + _DISTANCE_CHUNK] for f in flats]).to(torch.float64)
            block -= block.mean(dim=0, keepdim=True)
            gram += block @ block.T
    sq_norms = torch.diagonal(gram)
    sub = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_(min=0.0)
    sub.fill_diagonal_(0.0)
    dist = np.full((n, n), np.inf)
    dist[np.ix_(idx, idx)] = sub.numpy()
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(arrays: Sequence[NDArrays], num_byzantine: int) -> np.ndarray:
    """Krum score of every client (lower is more central).

    Blanchard, El Mhamdi, Guerraoui and Stainer, 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent". With ``n`` clients of which at most ``f`` are Byzantine::

        score(i) = sum_{j in N_i} ||x_i - x_j||^2

    where ``N_i`` are the ``n - f - 2`` clients closest to ``i`` (``i`` excluded), and ``x_i`` is all of client
    ``i``'s arrays flattened and concatenated. Requires ``n >= 2f + 3``. Clients with a NaN or infinite value get
    score ``inf``.

    Returns:
        float64 array of shape ``(n,)``.

    Raises:
        ValueError: if ``num_byzantine < 0``, ``n < 2 * num_byzantine + 3``, or shapes are inconsistent.
    """
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int | np.integer) or num_byzantine < 0:
        raise ValueError(f"num_byzantine must be a non-negative integer, got {num_byzantine!r}")
    check_same_shapes(arrays)
    n, f = len(arrays), int(num_byzantine)
    if n < 2 * f + 3:
        raise ValueError(f"Krum needs n >= 2f + 3 clients: got n={n} with f={f} (needs at least {2 * f + 3})")
    dist = _pairwise_sq_distances(arrays)
    num_neighbours = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = others[:num_neighbours].sum()
    return scores


def krum(arrays: Sequence[NDArrays], weights: Sequence[float], num_byzantine: int, num_selected: int = 1) -> NDArrays:
    """Krum and Multi-Krum aggregation.

    Blanchard, El Mhamdi, Guerraoui and Stainer, 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent". Clients are scored by :func:`krum_scores`
    (``score(i) = sum of squared distances to its n - f - 2 nearest neighbours``). Krum (``num_selected = 1``)
    returns the arrays of the client with the lowest score; Multi-Krum (``num_selected = m > 1``) returns the
    weighted mean, by ``weights``, of the ``m`` lowest-scoring clients::

        S = argmin_{|S| = m} sum_{i in S} score(i);   krum = sum_{i in S} n_i x_i / sum_{i in S} n_i

    Ties are broken by the lower client index, so the result is deterministic. ``m = n`` gives the weighted mean
    of all clients (no robustness); the paper's guarantees assume ``m <= n - f``.

    Returns:
        New float32 arrays.

    Raises:
        ValueError: if ``n < 2 * num_byzantine + 3`` (naming both numbers), ``num_selected`` is not in
            ``[1, n]``, weights are invalid, or shapes are inconsistent.
    """
    scores = krum_scores(arrays, num_byzantine)
    w = check_weights(weights, len(arrays))
    n = len(arrays)
    if isinstance(num_selected, bool) or not isinstance(num_selected, int | np.integer) or not 1 <= num_selected <= n:
        raise ValueError(f"num_selected must be an integer in [1, {n}] for {n} clients, got {num_selected!r}")
    selected = np.argsort(scores, kind="stable")[: int(num_selected)]
    return weighted_mean([arrays[int(i)] for i in selected], [float(w[i]) for i in selected])


def fednova_combine(updates: Iterable[NDArrays], weights: Sequence[float], local_steps: Sequence[int]) -> NDArrays:
    """FedNova aggregation of client updates for plain local SGD.

    Wang, Liu, Liang, Joshi and Poor, 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization". Client ``i`` ran ``tau_i`` local SGD steps and sent ``u_i = w_i - w``. With
    ``p_i = n_i / sum_k n_k``, FedNova averages the *normalized* updates and rescales by the effective step count::

        d_i = u_i / tau_i;   tau_eff = sum_i p_i tau_i;   update = tau_eff * sum_i p_i d_i

    so a client that ran more steps does not pull the model towards its own objective. For plain SGD the
    normalizer ``||a_i||_1`` of the paper is ``tau_i``; local momentum or proximal terms need other normalizers
    and are not covered here. With equal ``tau_i`` this is the weighted mean of the ``u_i``.

    ``updates`` may be a generator; it is consumed once, one client at a time (see :func:`weighted_mean`); a
    sequence is combined in one blocked pass (:func:`strategies.streaming.weighted_sum`).

    Returns:
        The aggregated update (not the new weights), as new float32 arrays.

    Raises:
        ValueError: if a weight is not positive and finite, a step count is not a positive integer, the counts
            of clients, weights and step counts differ, or shapes are inconsistent.
    """
    w = check_weights(weights, None)
    steps = list(local_steps)
    if len(steps) != w.size:
        raise ValueError(f"got {w.size} weights but {len(steps)} local step counts")
    for i, t in enumerate(steps):
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 1:
            raise ValueError(f"local_steps must be positive integers; client {i} has {t!r}")
    tau = np.asarray(steps, dtype=np.float64)
    p = w / w.sum()
    tau_eff = float(np.dot(p, tau))
    return weighted_sum(updates, (tau_eff * p / tau).tolist())


# ----------------------------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregatorParams:
    """Settings of the robust aggregators; each aggregator reads only its own (see :data:`AGGREGATOR_PARAMS_USED`).

    Attributes:
        trim_fraction: ``trimmed-mean``: fraction of clients dropped at *each* end, per coordinate; in ``[0, 0.5)``.
        num_byzantine: ``krum``/``multi-krum``: assumed maximum number of Byzantine clients ``f >= 0``; a round
            needs ``n >= 2f + 3`` replies.
        num_selected: ``multi-krum``: number ``m`` of lowest-score clients averaged. ``0`` (the default) means
            ``m = n - f``, the largest set the paper's analysis covers; otherwise ``1 <= m <= n``. ``krum`` always
            selects one client.
    """

    trim_fraction: float = 0.2
    num_byzantine: int = 1
    num_selected: int = 0

    def __post_init__(self) -> None:
        tf = self.trim_fraction
        if isinstance(tf, bool) or not isinstance(tf, int | float) or not 0.0 <= tf < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {tf!r}")
        f = self.num_byzantine
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"num_byzantine must be a non-negative integer, got {f!r}")
        m = self.num_selected
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"num_selected must be a non-negative integer (0: n - num_byzantine), got {m!r}")


Aggregator: TypeAlias = Callable[[Sequence[NDArrays], Sequence[float], AggregatorParams], NDArrays]


def _mean_rule(arrays: Sequence[NDArrays], weights: Sequence[float], params: AggregatorParams) -> NDArrays:
    return weighted_mean(arrays, weights)


def _median_rule(arrays: Sequence[NDArrays], weights: Sequence[float], params: AggregatorParams) -> NDArrays:
    return coordinate_median(arrays, weights)


def _trimmed_mean_rule(arrays: Sequence[NDArrays], weights: Sequence[float], params: AggregatorParams) -> NDArrays:
    return trimmed_mean(arrays, weights, params.trim_fraction)


def _krum_rule(arrays: Sequence[NDArrays], weights: Sequence[float], params: AggregatorParams) -> NDArrays:
    return krum(arrays, weights, params.num_byzantine, num_selected=1)


def _multi_krum_rule(arrays: Sequence[NDArrays], weights: Sequence[float], params: AggregatorParams) -> NDArrays:
    m = params.num_selected if params.num_selected > 0 else len(arrays) - params.num_byzantine
    return krum(arrays, weights, params.num_byzantine, num_selected=m)


AGGREGATORS: dict[str, Aggregator] = {
    "krum": _krum_rule,
    "mean": _mean_rule,
    "median": _median_rule,
    "multi-krum": _multi_krum_rule,
    "trimmed-mean": _trimmed_mean_rule,
}
"""Run-config name -> aggregation rule ``(arrays, weights, params) -> arrays``."""

AGGREGATOR_PARAMS_USED: dict[str, frozenset[str]] = {
    "krum": frozenset({"num_byzantine"}),
    "mean": frozenset(),
    "median": frozenset(),
    "multi-krum": frozenset({"num_byzantine", "num_selected"}),
    "trimmed-mean": frozenset({"trim_fraction"}),
}
"""Which :class:`AggregatorParams` fields each rule reads; a caller can reject settings that would do nothing."""


def _nothing(n: int, params: AggregatorParams) -> str:
    return ""


def _trim_count(n: int, trim_fraction: float) -> int:
    """Values :func:`trimmed_mean` drops at each end for ``n`` clients."""
    return math.floor(trim_fraction * n + 1e-9)


def _krum_requirement(n: int, params: AggregatorParams) -> str:
    f = params.num_byzantine
    if n < 2 * f + 3:
        return f"Krum needs n >= 2f + 3 replies: n={n} with f={f} (num-byzantine) needs at least {2 * f + 3}"
    return ""


def _multi_krum_requirement(n: int, params: AggregatorParams) -> str:
    reason = _krum_requirement(n, params)
    m, f = params.num_selected, params.num_byzantine
    if not reason and m > n - f:
        reason = (f"Multi-Krum averages num-selected={m} replies, but only n - f = {n - f} of n={n} are assumed honest "
                  f"(f={f}, num-byzantine)")
    return reason


def _median_weakness(n: int, params: AggregatorParams) -> str:
    if n < 3:
        return f"the median of {n} replies is their mean: it needs at least 3 to outvote one bad reply"
    return ""


def _trimmed_mean_weakness(n: int, params: AggregatorParams) -> str:
    t = params.trim_fraction
    if t > 0 and _trim_count(n, t) == 0:
        return (f"trim-fraction {t:g} of n={n} replies trims floor({t:g} x {n}) = 0 at each end, so it is a plain mean; "
                f"it trims one from each end from n={math.ceil((1 - 1e-9) / t)} on")
    return ""


@dataclass(frozen=True)
class AggregatorSpec:
    """What an aggregation rule needs from a round (for callers' compatibility checks).

    Attributes:
        per_client: it needs every client's update on its own, not only their weighted sum; it cannot
            run under secure aggregation (the server sees only the sum) nor under central differential
            privacy (the noise is calibrated to the sum of clipped updates).
        requirement: ``(n, params) -> why`` ``n`` replies cannot be aggregated at all ("" = they can); a round
            that fails it keeps the model. Monotone: if ``n`` replies satisfy it, so do more.
        weakness: ``(n, params) -> why`` ``n`` replies leave the rule without the robustness it is chosen for
            ("" = they do not); such a round is aggregated, with a warning. Monotone like ``requirement``.
    """

    per_client: bool
    requirement: Callable[[int, AggregatorParams], str] = _nothing
    weakness: Callable[[int, AggregatorParams], str] = _nothing


AGGREGATOR_SPECS: dict[str, AggregatorSpec] = {
    "krum": AggregatorSpec(per_client=True, requirement=_krum_requirement),
    "mean": AggregatorSpec(per_client=False),
    "median": AggregatorSpec(per_client=True, weakness=_median_weakness),
    "multi-krum": AggregatorSpec(per_client=True, requirement=_multi_krum_requirement),
    "trimmed-mean": AggregatorSpec(per_client=True, weakness=_trimmed_mean_weakness),
}
"""Run-config name -> :class:`AggregatorSpec`."""


def get_aggregator(name: str) -> Aggregator:
    """Look up an aggregation rule by its run-config name.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    try:
        return AGGREGATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}") from None
