"""When the server aggregates: synchronous rounds with deadlines and over-selection, or FedBuff.

Two modes (`MODES`), each a `ModeSpec` whose properties the app's compatibility checks read:

* ``sync``: rounds. The server samples a cohort, waits, aggregates, steps. With a *deadline* and
  *over-selection* (Bonawitz et al. 2019, "Towards Federated Learning at Scale: System Design", SysML):
  it samples ``ceil(needed x factor)`` clients, and the round closes at the ``needed``-th report or at the
  deadline, whichever comes first; reports after that are dropped (`select_in_time`).
* ``async``: FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
  AISTATS). ``concurrency`` clients train at all times; each finished client's update enters a buffer,
  the server steps once the buffer holds ``K`` updates, and a finished client gets new work at once.
  An update that started from model version ``v`` and arrives when the server is at version ``v + tau``
  (``tau`` = staleness) is weighted by ``s(tau)`` (`staleness_weight`)::

      U = sum_i n_i s(tau_i) u_i / sum_i n_i          (n_i = the client's examples)
      w <- ServerOpt(w, -U)

  With equal ``n_i`` this is the paper's ``(1/K) sum_i s(tau_i) u_i``; with ``s = 1`` and no staleness
  it is FedAvg's example-weighted mean (an oracle the tests check). Robust aggregators and FedNova
  combine the scaled updates ``s(tau_i) u_i`` the same way.

Staleness functions (`STALENESS_FUNCTIONS`), after the paper's and Xie et al. 2019 (FedAsync):
``constant`` ``s = 1``; ``polynomial`` ``s = (1 + tau)^-a`` (``a = 0.5`` is FedBuff's ``1/sqrt(1 + tau)``);
``hinge`` ``s = 1`` for ``tau <= b``, else ``1 / (1 + a (tau - b))``.

Pure Python; no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "MODES",
    "STALENESS_FUNCTIONS",
    "ModeSpec",
    "Selection",
    "StalenessParams",
    "cohort_size",
    "get_mode",
    "over_selected",
    "select_in_time",
    "staleness_weight",
]


@dataclass(frozen=True)
class ModeSpec:
    """A way of scheduling client work, as the properties the app's checks read.

    Attributes:
        name: registry key (run-config ``mode``).
        asynchronous: updates are applied as they arrive, from clients that started on different model
            versions (FedBuff), instead of once per round from one cohort.
        reference: the paper.
    """

    name: str
    asynchronous: bool = False
    reference: str = ""

    @property
    def sends_deltas(self) -> bool:
        """Clients send ``w_i - w`` of the version they started from (the server holds only the newest ``w``)."""
        return self.asynchronous

    @property
    def secagg_conflict(self) -> str:
        """Why secure aggregation cannot run in this mode ("" = it can)."""
        if self.asynchronous:
            return ("SecAgg+ masks one fixed cohort whose members all report in the same round, but FedBuff "
                    "aggregates updates one at a time as they arrive, from clients that started at different times")
        return ""

    @property
    def dp_conflict(self) -> str:
        """Why differential privacy cannot run in this mode ("" = it can)."""
        if self.asynchronous:
            return ("the privacy accountant counts rounds of clients sampled with a known probability, but a FedBuff "
                    "step aggregates whoever finished first, so the sampling rate that amplifies privacy is unknown")
        return ""


MODES: dict[str, ModeSpec] = {
    "sync": ModeSpec("sync", reference="Bonawitz et al. 2019, Towards Federated Learning at Scale: System Design"),
    "async": ModeSpec(
        "async", asynchronous=True,
        reference="Nguyen et al. 2022, Federated Learning with Buffered Asynchronous Aggregation",
    ),
}


def get_mode(name: str) -> ModeSpec:
    """The registered mode ``name``; unknown names raise with the valid choices."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode '{name}'; choose one of: {', '.join(MODES)}") from None


# ------------------------------------------------------------------------------------------ cohorts, deadlines
def cohort_size(available: int, fraction: float, minimum: int) -> int:
    """Clients a round needs: ``max(floor(fraction x available), minimum)``, at most ``available``."""
    return min(available, max(int(fraction * available), minimum))


def over_selected(needed: int, available: int, factor: float) -> int:
    """Clients to sample so that ``needed`` report in time: ``ceil(needed x factor)``, at most ``available``."""
    if factor < 1.0 or not math.isfinite(factor):
        raise ValueError(f"over-selection factor must be >= 1, got {factor!r}")
    return min(available, math.ceil(needed * factor - 1e-9))


@dataclass(frozen=True)
class Selection:
    """Which reports a synchronous round aggregates.

    Attributes:
        accepted: indices of the reports aggregated, in order of arrival.
        late: indices of the reports dropped: after the deadline, or after the ``needed``-th report.
        end: when the round closes: the ``needed``-th report's arrival, else the deadline, else the last report.
    """

    accepted: tuple[int, ...]
    late: tuple[int, ...]
    end: float


def select_in_time(arrivals: Sequence[float], start: float, deadline: float, needed: int) -> Selection:
    """The reports a round with a deadline and over-selection keeps (Bonawitz et al. 2019, section 2.2).

    Args:
        arrivals: when each report arrives (the same clock as ``start``); ties keep their index order.
        start: when the round started.
        deadline: seconds after ``start`` the round waits at most (0 = no deadline).
        needed: the round closes once this many reports arrived (0 = wait for all).
    """
    if deadline < 0 or needed < 0:
        raise ValueError(f"deadline and needed must be >= 0, got {deadline}, {needed}")
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    limit = start + deadline if deadline > 0 else math.inf
    in_time = [i for i in order if arrivals[i] <= limit]
    accepted = in_time[:needed] if needed > 0 else in_time
    if needed > 0 and len(accepted) == needed:
        end = arrivals[accepted[-1]]
    elif deadline > 0 and len(in_time) < len(arrivals):
        end = limit
    else:
        end = max((arrivals[i] for i in accepted), default=start)
    kept = set(accepted)
    return Selection(tuple(accepted), tuple(i for i in order if i not in kept), end)


# ------------------------------------------------------------------------------------------------- staleness
@dataclass(frozen=True)
class StalenessParams:
    """Parameters of the staleness functions: ``exponent`` a (polynomial, hinge slope), ``cutoff`` b (hinge)."""

    exponent: float = 0.5
    cutoff: int = 4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"staleness exponent must be a finite number >= 0, got {self.exponent!r}")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 0:
            raise ValueError(f"staleness cutoff must be an integer >= 0, got {self.cutoff!r}")


def _constant(tau: int, p: StalenessParams) -> float:
    return 1.0


def _polynomial(tau: int, p: StalenessParams) -> float:
    return float((1.0 + tau) ** -p.exponent)


def _hinge(tau: int, p: StalenessParams) -> float:
    return 1.0 if tau <= p.cutoff else 1.0 / (1.0 + p.exponent * (tau - p.cutoff))


STALENESS_FUNCTIONS: dict[str, Callable[[int, StalenessParams], float]] = {
    "constant": _constant,
    "polynomial": _polynomial,
    "hinge": _hinge,
}
STALENESS_PARAMS_USED: dict[str, frozenset[str]] = {
    "constant": frozenset(),
    "polynomial": frozenset({"exponent"}),
    "hinge": frozenset({"exponent", "cutoff"}),
}


def staleness_weight(name: str, tau: int, params: StalenessParams = StalenessParams()) -> float:
    """``s(tau)`` of the staleness function ``name`` (see the module docstring); 1 at ``tau = 0`` for all."""
    if name not in STALENESS_FUNCTIONS:
        raise ValueError(f"unknown staleness-weighting '{name}'; choose one of: {', '.join(STALENESS_FUNCTIONS)}")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {tau!r}")
    return STALENESS_FUNCTIONS[name](tau, params)
