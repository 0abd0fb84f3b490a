"""Differential privacy for federated updates: clipping, Gaussian noise, adaptive clipping, accounting.

User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"). Each sampled client's update ``u_i`` (its new weights minus the global weights, or its
gradient for FedSGD) is clipped to the L2 norm ``C``::

    clip(u_i) = u_i * min(1, C / ||u_i||_2)

the clipped updates are summed, Gaussian noise ``N(0, (z C)^2 I)`` is added to the sum and the
result is divided by the number ``m`` of contributions::

    u = (sum_i clip(u_i) + N(0, z^2 C^2 I)) / m

Adding or removing one client moves the sum by at most ``C``, so a round is the Gaussian
mechanism with noise multiplier ``z``, amplified by the client sampling rate ``q``; the rounds
compose, and an RDP accountant turns ``(z, q, rounds)`` into ``(epsilon, delta)``. Anything the
server does with ``u`` afterwards (momentum, Adam) is post-processing and costs nothing.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): each client also reports the centred bit ``b_i = 1[||u_i|| <= C] - 1/2`` (sensitivity
1/2); the server estimates the unclipped fraction from the noisy sum
``b = (sum_i b_i + N(0, s^2)) / m + 1/2`` and moves the norm geometrically towards the target
quantile ``g``::

    C <- C * exp(-eta * (b - g))

The count costs privacy too. With update noise ``z_u`` and count noise ``s``, the pair costs what
one Gaussian mechanism with multiplier ``(z_u^-2 + (2 s)^-2)^(-1/2)`` costs (their Theorem 1), so
for a total multiplier ``z`` the update gets ``z_u = (z^-2 - (2 s)^-2)^(-1/2)``.

Distributed noise: under secure aggregation the server never holds the sum in the clear, so each
of the round's clients adds its share ``N(0, sigma^2 / t)`` where ``t`` is the fewest contributions
the round accepts; any ``k >= t`` contributions then carry at least the configured noise.

The functions here are pure numpy; `PrivacyAccountant` wraps Flower's RDP accountant
(`flwr.serverapp.RdpAccountant`, backed by Google's ``dp-accounting``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NDArrays = list[np.ndarray]


# ----------------------------------------------------------------------------------- clipping
def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of all arrays taken together as one flat vector (accumulated in float64)."""
    total = 0.0
    for a in arrays:
        flat = np.asarray(a).reshape(-1)
        total += float(np.dot(flat.astype(np.float64, copy=False), flat.astype(np.float64, copy=False)))
    return math.sqrt(total)


def clip_to_norm(arrays: Sequence[np.ndarray], clip_norm: float) -> tuple[NDArrays, float]:
    """``u * min(1, C / ||u||)`` as new float32 arrays, and the norm ``||u||`` before clipping."""
    if not clip_norm > 0:
        raise ValueError(f"clipping norm must be > 0, got {clip_norm}")
    norm = l2_norm(arrays)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [np.multiply(a, scale, dtype=np.float32) for a in arrays], norm


def add_gaussian_noise(arrays: Sequence[np.ndarray], std: float, rng: np.random.Generator) -> NDArrays:
    """``a + N(0, std^2)`` element-wise, as new float32 arrays (``std = 0`` copies)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return [np.array(a, dtype=np.float32) for a in arrays]
    return [(np.asarray(a, dtype=np.float32) + rng.normal(0.0, std, size=np.shape(a)).astype(np.float32)) for a in arrays]


def secure_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy.

    DP noise must be unpredictable: a generator seeded from the run's ``seed`` would let anyone
    who knows the config subtract the noise again.
    """
    return np.random.default_rng()


# ---------------------------------------------------------------------------- noise budgeting
def min_contributions(num_sampled: int, max_failure_fraction: float) -> int:
    """Fewest client results a round of ``num_sampled`` clients accepts (at least 1).

    The shell drops a round when more than ``max_failure_fraction`` of its clients failed, so at
    least ``num_sampled - floor(f * num_sampled)`` contributions make it into an aggregate.
    """
    if num_sampled <= 0:
        return 1
    return max(1, num_sampled - math.floor(max_failure_fraction * num_sampled + 1e-9))


def noise_share_std(total_std: float, min_contributors: int) -> float:
    """Per-client std so that any ``k >= min_contributors`` shares sum to at least ``total_std``."""
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
    return total_std / math.sqrt(min_contributors)


def default_count_stddev(expected_clients: float, noise_multiplier: float) -> float:
    """Noise std on the unclipped count: clients per round / 20 (Andrew et al. 2021, Section 3).

    It is kept at least ``noise_multiplier`` so that the update keeps most of the budget
    (``z_u <= 1.16 z``), which the paper's rule cannot ensure for small cohorts.
    """
    return max(expected_clients / 20.0, noise_multiplier)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_u = (z^-2 - (2 s)^-2)^(-1/2)``: the update's share of a total multiplier ``z``.

    Raises ValueError when ``2 s <= z`` (the count alone would spend the whole budget).
    """
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping: the count noise std ({count_stddev:g}) must exceed half the noise multiplier "
            f"({noise_multiplier / 2:g}); raise dp-clip-count-stddev"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def adaptive_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float) -> float:
    """Geometric update ``C * exp(-eta (b - g))`` (Andrew et al. 2021, Algorithm 1)."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


# ------------------------------------------------------------------------------- accounting
@dataclass(frozen=True)
class AccountingSpec:
    """How rounds are accounted.

    ``central``: each round is a Poisson-subsampled Gaussian mechanism with rate
    ``q = clients sampled / population`` under add/remove-one-client neighbours (the accounting of
    McMahan et al. 2018; the shell samples a fixed-size subset, which this approximates as they do).
    ``local``: each client's own release is a Gaussian mechanism with std ``z C`` on an update whose
    value can move by ``2 C`` between any two local datasets, so its multiplier is ``z / 2``; the
    server sees who took part, so there is no amplification, and every round is counted (a client
    in every round, the worst case).
    """

    kind: str  # "central" | "local"
    noise_multiplier: float
    delta: float


class PrivacyAccountant:
    """Epsilon spent so far, round by round, with a `state_dict` for checkpoints.

    The ledger counts rounds per ``(noise multiplier, clients sampled)``; epsilon comes from
    Flower's `RdpAccountant` (``flwr.serverapp``, backed by Google's ``dp-accounting``) composed
    over that ledger, so a long run costs one RDP evaluation per distinct round shape, and a
    resumed run whose noise multiplier changed keeps the earlier rounds at their own noise.
    Rounds run with ``noise_multiplier = 0`` have no guarantee: epsilon is infinite after one.
    """

    def __init__(self, spec: AccountingSpec, population: int = 0) -> None:
        if spec.kind not in ("central", "local"):
            raise ValueError(f"unknown accounting kind {spec.kind!r}; choose one of: central, local")
        self.spec = spec
        self.population = int(population)
        self.ledger: dict[tuple[float, int], int] = {}  # (noise multiplier, clients sampled) -> rounds
        self.noiseless_rounds = 0
        self._cache: float | None = None
        self._memo: dict[tuple[tuple[tuple[float, int], int], ...], float] = {}  # ledger -> epsilon

    @property
    def rounds(self) -> int:
        return sum(self.ledger.values()) + self.noiseless_rounds

    def set_population(self, population: int) -> None:
        """Fix the population (once, before the first round is recorded)."""
        if population <= 0:
            raise ValueError(f"population must be positive, got {population}")
        if self.population > 0 and population != self.population:
            raise ValueError(f"population already fixed at {self.population}")
        self.population = int(population)

    def _check(self, num_sampled: int) -> None:
        if self.spec.kind == "local":
            return
        if self.population <= 0:
            raise ValueError("the population size is not known yet")
        if not 0 < num_sampled <= self.population:
            raise ValueError(
                f"{num_sampled} clients sampled from a population of {self.population}: "
                "set dp-population-size to the number of clients in the federation"
            )

    def record_round(self, num_sampled: int) -> None:
        """Compose one round in which ``num_sampled`` clients were sampled."""
        self._check(num_sampled)
        if self.spec.noise_multiplier > 0:
            key = (float(self.spec.noise_multiplier), int(num_sampled))
            self.ledger[key] = self.ledger.get(key, 0) + 1
        else:
            self.noiseless_rounds += 1
        self._cache = None

    def epsilon(self) -> float:
        """Epsilon spent at the spec's delta (0 before any round, inf after a noiseless one)."""
        if self._cache is None:
            self._cache = self._epsilon(self.ledger, self.noiseless_rounds)
        return self._cache

    def epsilon_after(self, num_sampled: int, rounds: int = 1) -> float:
        """Epsilon if ``rounds`` more rounds of ``num_sampled`` clients ran (nothing is recorded)."""
        self._check(num_sampled)
        if self.spec.noise_multiplier == 0:
            return math.inf
        ledger = dict(self.ledger)
        key = (float(self.spec.noise_multiplier), int(num_sampled))
        ledger[key] = ledger.get(key, 0) + rounds
        return self._epsilon(ledger, self.noiseless_rounds)

    def _epsilon(self, ledger: Mapping[tuple[float, int], int], noiseless: int) -> float:
        if noiseless:
            return math.inf
        if not ledger:
            return 0.0
        key = tuple(sorted(ledger.items()))
        if key not in self._memo:
            self._memo = {key: self._compute_epsilon(ledger)}  # one entry: the next round asks for the same ledger
        return self._memo[key]

    def _compute_epsilon(self, ledger: Mapping[tuple[float, int], int]) -> float:
        from flwr.serverapp import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        local = self.spec.kind == "local"
        config = PrivacyConfig(
            target_delta=self.spec.delta,
            population_size=1 if local else self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION if local else SamplingMethod.POISSON,
        )
        with _quiet_absl():
            accountant = RdpAccountant(config)
            for (z, m), count in sorted(ledger.items()):
                event = GaussianPrivacyEvent(z / 2.0, 1, 1) if local else GaussianPrivacyEvent(z, m, self.population)
                accountant.compose(event, count)
            return float(accountant.get_epsilon(self.spec.delta))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "delta": self.spec.delta,
            "population": self.population,
            "ledger": [[z, m, n] for (z, m), n in sorted(self.ledger.items())],
            "noiseless_rounds": self.noiseless_rounds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (this run's delta is the one epsilon is reported at)."""
        if state.get("kind") != self.spec.kind:
            raise ValueError(f"accountant state is for {state.get('kind')!r} accounting, this run uses {self.spec.kind!r}")
        self.population = int(state["population"])
        self.ledger = {(float(z), int(m)): int(n) for z, m, n in state["ledger"]}
        self.noiseless_rounds = int(state["noiseless_rounds"])
        self._cache = None


class _quiet_absl:
    """dp-accounting logs a warning per excluded RDP order (orders near 1 that do not converge)."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
