"""Privacy on the server: differential privacy as a hook of the strategy shell.

`ServerPrivacy` follows `strategies.hooks.StrategyHook`; `server_app.build_strategy` passes it to
`FederatedStrategy` (with ``preaggregated`` for secure aggregation, which the shell handles):

* central-server: clips each accepted update, adds ``N(0, (z_u C)^2)`` to their sum and weighs
  clients equally, so the server optimizer steps on the privatized average.
* central-client / local: sends clients their clipping norm and noise std in the fit config
  (`client_privacy.privatize_update` does the work); central-client refuses rounds with fewer
  contributions than the noise was split over.
* adaptive clipping: moves the norm towards the target quantile from the noisy unclipped count.
* accounting: epsilon after every round (``epsilon`` in metrics.csv), a stop before
  ``dp-target-epsilon`` would be exceeded, and the accountant in the checkpoint.

The arithmetic lives in `strategies.privacy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import Parameters, Scalar
from flwr.common.logger import log

from flower_app.client_privacy import FIT_CLIP_KEY, FIT_COUNT_NOISE_KEY, FIT_NOISE_KEY
from flower_app.options import PrivacyOptions
from strategies.base import StrategyOptions
from strategies.hooks import ClientUpdate, FitFailures, FitResults, RoundRecord, StrategyHook
from strategies.privacy import (
    AccountingSpec,
    PrivacyAccountant,
    adaptive_clip_norm,
    add_gaussian_noise,
    clip_to_norm,
    default_count_stddev,
    min_contributions,
    noise_share_std,
    secure_rng,
    update_noise_multiplier,
)
from strategies.serde import ndarray_view
from strategies.wire import from_parameters, is_packed, to_parameters


@dataclass
class _RoundPlan:
    """What one round's privacy needs: sampled clients, contributions and noise."""

    num_sampled: int
    min_contributions: int
    clip_norm: float
    update_noise_multiplier: float  # z_u (equals z with fixed clipping)
    count_stddev: float  # adaptive: noise std on the sum of centred bits (0 otherwise)
    released: bool = False  # noisy updates reached the server: the round costs privacy


def privacy_hooks(options: PrivacyOptions, strategy: StrategyOptions, num_rounds: int) -> list[StrategyHook]:
    """The strategy's privacy hook, or none when the run has neither secure aggregation nor DP."""
    if not options.enabled:
        return []
    if options.dp_mode != "none" and strategy.fraction_evaluate > 0 and strategy.federated_evaluation != "none":
        log(
            WARNING,
            "privacy: federated evaluation sends each client's loss and accuracy on its own data in the clear; "
            "the privacy guarantee does not cover them (set fraction-evaluate=0 for a strict guarantee)",
        )
    return [ServerPrivacy(options, strategy.max_failure_fraction, num_rounds)]


class ServerPrivacy:
    """Differential privacy inside the strategy shell (a `StrategyHook`); with secure aggregation alone
    it only reports what SecAgg+ clipped.

    Args:
        options: the run's privacy settings.
        max_failure_fraction: the shell's; it bounds the fewest contributions a round accepts.
        num_rounds: rounds of the run (for the log when the budget stops training).
    """

    name = "privacy"

    def __init__(self, options: PrivacyOptions, max_failure_fraction: float, num_rounds: int) -> None:
        self.options = options
        self.max_failure_fraction = max_failure_fraction
        self.num_rounds = num_rounds
        self.accountant: PrivacyAccountant | None = None
        if options.dp_mode != "none":
            kind = "local" if options.dp_mode == "local" else "central"
            spec = AccountingSpec(kind, options.noise_multiplier, options.delta)
            self.accountant = PrivacyAccountant(spec, options.population_size)
        self.clip_norm = options.clipping_norm
        self.rng = secure_rng()
        self.budget_spent = False
        self.last_unclipped_fraction = math.nan
        self._plan: _RoundPlan | None = None
        self._bits: list[float] = []
        self._warned_secagg_range = False

    def __repr__(self) -> str:
        return f"ServerPrivacy(dp_mode={self.options.dp_mode!r}, secure_aggregation={self.options.secure_aggregation})"

    @property
    def reads_updates(self) -> bool:
        return self.options.dp_mode in ("central-server", "central-client")

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        accountant = self.accountant.state_dict() if self.accountant is not None else None
        return {"dp_mode": self.options.dp_mode, "clipping_norm": self.clip_norm, "accountant": accountant}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.accountant is None:
            return
        if state is None or state.get("accountant") is None:
            raise ValueError(
                "resume: the checkpoint was written by a run without differential privacy; its rounds cannot be "
                "accounted for, so start a new run (resume=false) for a DP guarantee"
            )
        self.accountant.load_state_dict(state["accountant"])
        if self.options.adaptive_clipping:
            self.clip_norm = float(state["clipping_norm"])
        log(INFO, "privacy: resumed with epsilon %.4f after %d accounted rounds", self.accountant.epsilon(), self.accountant.rounds)

    # -------------------------------------------------------------------- the round
    def fit_config(self, rnd: int, num_available: int, num_sampled: int) -> Mapping[str, Scalar] | None:
        self._plan = None
        if self.accountant is None:
            return {}
        if self.accountant.population <= 0:
            self.accountant.set_population(max(num_available, 1))
            log(INFO, "privacy: population for the sampling rate: %d clients", self.accountant.population)
        if self.budget_spent or self._over_budget(rnd, num_sampled):
            return None
        self._plan = self._make_plan(num_sampled)
        return self._client_config(self._plan)

    def preprocess(self, results: FitResults, failures: FitFailures) -> tuple[FitResults, FitFailures]:
        plan = self._plan
        self._bits = []
        if plan is not None and self.options.dp_mode == "central-client" and self.options.adaptive_clipping:
            results, self._bits = _split_clipping_bits(results)
        if plan is not None and self.options.client_dp and results:
            plan.released = True  # the clients' noisy updates reached the server
        return results, failures

    def process_updates(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        if self.options.dp_mode == "central-server":
            return self._clip_and_noise(record, updates)
        return self._check_contributions(record, updates)

    def after_fit(self, record: RoundRecord) -> None:
        plan = self._plan
        if plan is not None and plan.released and self.accountant is not None:
            self.accountant.record_round(plan.num_sampled)
            log(INFO, "round %d: privacy spent so far: epsilon %.4f at delta %g (%s)", record.round,
                self.accountant.epsilon(), self.options.delta, self.accountant.spec.kind)
        if self._bits and plan is not None and record.updated:
            # Each client added its share of the count noise; the mean of the centred bits + 1/2
            # estimates the unclipped fraction (under SecAgg+ every result holds that mean).
            self._adapt_clip_norm(record.round, float(np.mean(self._bits)) + 0.5)
        clipped = record.extra.get("fit_secagg_clipped_fraction_max")
        if clipped is not None and clipped > 0:
            log(WARNING, "round %d: SecAgg+ clipped up to %.4f%% of a client's values to +-%g; raise "
                "secagg-clipping-range or set send-delta=true", record.round, 100 * clipped,
                self.options.secagg_clipping_range)

    def end_round(self, record: RoundRecord) -> None:
        if self.accountant is None:
            return
        record.extra["epsilon"] = self.accountant.epsilon()
        record.extra["dp_clipping_norm"] = self._plan.clip_norm if self._plan is not None else self.clip_norm
        if self.options.adaptive_clipping:
            record.extra["dp_unclipped_fraction"] = self.last_unclipped_fraction
            self.last_unclipped_fraction = math.nan

    # ---------------------------------------------------------------------- internals
    def _over_budget(self, rnd: int, num_sampled: int) -> bool:
        """True (and says so once) when one more round of ``num_sampled`` clients would pass the target."""
        target = self.options.target_epsilon
        if self.accountant is None or target <= 0 or num_sampled <= 0:
            return False
        spent = self.accountant.epsilon()
        after = self.accountant.epsilon_after(num_sampled)
        if after <= target:
            return False
        self.budget_spent = True
        log(
            WARNING,
            "privacy budget: round %d would take epsilon from %.4f to %.4f, past dp-target-epsilon %.4f (delta %g); "
            "training stops here and the remaining %d round(s) are skipped",
            rnd, spent, after, target, self.options.delta, self.num_rounds - rnd + 1,
        )
        return True

    def _make_plan(self, num_sampled: int) -> _RoundPlan:
        opts = self.options
        z = opts.noise_multiplier
        count_std = 0.0
        z_update = z
        if opts.adaptive_clipping:
            count_std = opts.clip_count_stddev or default_count_stddev(num_sampled, z)
            z_update = update_noise_multiplier(z, count_std)
        t = min_contributions(num_sampled, self.max_failure_fraction)
        plan = _RoundPlan(num_sampled, t, self.clip_norm, z_update, count_std)
        if opts.secure_aggregation and opts.dp_mode == "central-client" and not self._warned_secagg_range:
            share = noise_share_std(z_update * self.clip_norm, t)
            if opts.secagg_clipping_range < self.clip_norm + 4 * share:
                self._warned_secagg_range = True
                log(WARNING, "privacy: secagg-clipping-range %g is below clipping norm + 4 noise std (%g): SecAgg+ "
                    "will clip some noisy values; raise secagg-clipping-range", opts.secagg_clipping_range,
                    self.clip_norm + 4 * share)
        return plan

    def _client_config(self, plan: _RoundPlan) -> dict[str, Scalar]:
        mode = self.options.dp_mode
        if mode == "local":
            return {FIT_CLIP_KEY: plan.clip_norm, FIT_NOISE_KEY: self.options.noise_multiplier * plan.clip_norm}
        if mode == "central-client":
            config: dict[str, Scalar] = {
                FIT_CLIP_KEY: plan.clip_norm,
                FIT_NOISE_KEY: noise_share_std(plan.update_noise_multiplier * plan.clip_norm, plan.min_contributions),
            }
            if self.options.adaptive_clipping:
                config[FIT_COUNT_NOISE_KEY] = noise_share_std(plan.count_stddev, plan.min_contributions)
            return config
        return {}

    def _check_contributions(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """central-client: the noise shares only add up to the configured noise with enough of them."""
        plan = self._plan
        if plan is not None and len(updates) < plan.min_contributions:
            log(WARNING, "round %d: %d contributions, fewer than the %d the clients' noise was split over; "
                "the global model is unchanged", record.round, len(updates), plan.min_contributions)
            return []
        return updates

    def _clip_and_noise(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """central-server: clip every update to C, add N(0, (z_u C)^2) to their sum, weigh them equally."""
        plan = self._plan
        if plan is None:
            return updates
        unclipped = 0
        for u in updates:
            u.update, norm = clip_to_norm(u.update, plan.clip_norm)
            unclipped += int(norm <= plan.clip_norm)
            u.num_examples = 1
        updates[0].update = add_gaussian_noise(updates[0].update, plan.update_noise_multiplier * plan.clip_norm, self.rng)
        plan.released = True
        if self.options.adaptive_clipping:
            noisy = (unclipped - len(updates) / 2 + self.rng.normal(0.0, plan.count_stddev)) / len(updates) + 0.5
            self._adapt_clip_norm(record.round, noisy)
        return updates

    def _adapt_clip_norm(self, rnd: int, unclipped_fraction: float) -> None:
        opts = self.options
        new = adaptive_clip_norm(self.clip_norm, unclipped_fraction, opts.target_quantile, opts.clip_learning_rate)
        log(INFO, "round %d: adaptive clipping: noisy unclipped fraction %.3f (target %.2f), norm %.4g -> %.4g",
            rnd, unclipped_fraction, opts.target_quantile, self.clip_norm, new)
        self.last_unclipped_fraction = unclipped_fraction
        self.clip_norm = new


def _split_clipping_bits(results: FitResults) -> tuple[FitResults, list[float]]:
    """Take the trailing clipping-bit array off every result (adaptive central-client)."""
    kept: FitResults = []
    bits: list[float] = []
    for proxy, res in results:
        tensors = res.parameters.tensors
        try:
            packed = is_packed(res.parameters)
            arrays = from_parameters(res.parameters) if packed else [ndarray_view(tensors[-1])]
            bit = arrays[-1]
            if bit.size != 1:
                raise ValueError(f"expected a 1-element clipping bit, got shape {bit.shape}")
        except (IndexError, ValueError) as err:
            log(WARNING, "client %s sent no usable clipping bit (%s); its update is left out", proxy.cid, err)
            continue
        bits.append(float(bit.reshape(-1)[0]))
        # the update without its bit, in the format it came in (a packed one is packed again: one copy)
        res.parameters = to_parameters(arrays[:-1], packed=True) if packed else \
            Parameters(tensors=list(tensors[:-1]), tensor_type=res.parameters.tensor_type)
        kept.append((proxy, res))
    return kept, bits
