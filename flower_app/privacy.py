"""Privacy: SecAgg+ secure aggregation and differential privacy, switched by the run config.

Server: `wrap_strategy` puts a `PrivateStrategy` around the `FederatedStrategy` (composition);
`run_server` runs the legacy loop as `ServerApp(server_fn=...)` does, or Flower's
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` when secure aggregation is on.
Client: `client_mods` (SecAgg+ only when the run asks for it) and `privatize_fit` (clipping and
noise inside `FlowerClient.fit`). The arithmetic lives in `strategies.privacy`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from strategies.base import RoundRecord
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

if TYPE_CHECKING:
    from flwr.client import ClientApp
    from flwr.clientapp.typing import ClientAppCallable, Mod
    from flwr.server import ServerAppComponents
    from flwr.server.workflow import SecAggPlusWorkflow

    from flower_app.config import AppConfig
    from strategies.base import FederatedStrategy

NDArrays = list[np.ndarray]

DP_MODES = ("none", "central-server", "central-client", "local")


def check_privacy_config(cfg: AppConfig) -> None:
    """Refuse privacy settings that cannot work (called from `AppConfig._check_combinations`)."""
    from flower_app.config import ConfigError

    dp = cfg.dp_mode != "none"
    if cfg.secure_aggregation:
        if cfg.aggregator != "mean":
            raise ConfigError(
                f"secure-aggregation: the server only sees the sum of the updates, so the per-client rule "
                f"aggregator='{cfg.aggregator}' cannot run; use aggregator='mean'"
            )
        if cfg.strategy in ("scaffold", "fednova"):
            why = (
                "needs each client's control-variate update, unweighted"
                if cfg.strategy == "scaffold"
                else "rescales each client's update by its own step count"
            )
            raise ConfigError(
                f"secure-aggregation: strategy '{cfg.strategy}' {why}, but SecAgg+ returns one example-weighted "
                "mean of everything the clients send; choose fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad or fedsgd"
            )
        if cfg.compression != "none":
            raise ConfigError(
                f"secure-aggregation: compression '{cfg.compression}' cannot be summed under masking (SecAgg+ sends its "
                "own quantized integer vector, and codec scales or top-k indices are not additive); set compression='none'"
            )
        if cfg.dp_mode == "central-server":
            raise ConfigError(
                "dp-mode 'central-server' clips each update on the server, which secure aggregation hides; "
                "use dp-mode='central-client' (clients clip and add their share of the noise)"
            )
        _check_secagg_counts(cfg)
        if cfg.min_fit_clients < 2:
            raise ConfigError("secure-aggregation needs at least 2 clients a round: set min-fit-clients >= 2")
    if dp:
        if cfg.strategy in ("scaffold", "fednova"):
            what = "its control variates" if cfg.strategy == "scaffold" else "its local step count"
            raise ConfigError(
                f"dp-mode '{cfg.dp_mode}': strategy '{cfg.strategy}' also sends {what}, which clipping and noise "
                "do not cover; choose fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad or fedsgd"
            )
        if cfg.dp_mode != "local" and cfg.aggregator != "mean":
            raise ConfigError(
                f"dp-mode '{cfg.dp_mode}': the noise is calibrated to the sum of clipped updates, so aggregator "
                f"'{cfg.aggregator}' is not covered; use aggregator='mean' (or dp-mode='local')"
            )
        if cfg.dp_clipping == "adaptive" and cfg.dp_mode == "local":
            raise ConfigError("dp-clipping 'adaptive' estimates the norm from the clients' noisy count, a central-DP "
                              "mechanism; use dp-clipping='fixed' with dp-mode='local'")
        if cfg.secure_aggregation and cfg.secagg_clipping_range < cfg.dp_clipping_norm:
            raise ConfigError(
                f"secagg-clipping-range ({cfg.secagg_clipping_range:g}) is smaller than dp-clipping-norm "
                f"({cfg.dp_clipping_norm:g}): SecAgg+ would clip the clipped updates again; raise secagg-clipping-range"
            )
        if cfg.dp_target_epsilon > 0 and cfg.dp_noise_multiplier == 0:
            raise ConfigError("dp-target-epsilon needs noise: with dp-noise-multiplier=0 epsilon is infinite after one round")
    elif cfg.dp_target_epsilon > 0:
        raise ConfigError("dp-target-epsilon is set but dp-mode is 'none': there is no privacy budget to track")


def _check_secagg_counts(cfg: AppConfig) -> None:
    from flower_app.config import ConfigError

    shares, threshold = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
    if shares > 1 and (shares != int(shares) or shares < 3 or int(shares) % 2 == 0):
        raise ConfigError(
            f"secagg-num-shares: a count must be an odd integer >= 3 (each client shares with itself and the same "
            f"number of neighbours on either side), or a fraction <= 1; got {shares:g}"
        )
    if threshold > 1 and (threshold != int(threshold) or threshold < 2):
        raise ConfigError(
            f"secagg-reconstruction-threshold: a count must be an integer >= 2 (or a fraction <= 1), got {threshold:g}"
        )
    if shares > 1 and threshold > 1 and threshold >= shares:
        raise ConfigError(
            f"secagg-reconstruction-threshold ({threshold:g}) must be smaller than secagg-num-shares ({shares:g})"
        )
    if not math.isfinite(cfg.secagg_clipping_range):
        raise ConfigError("secagg-clipping-range must be finite")


# ======================================================================================= shared
FIT_CLIP_KEY = "dp-clipping-norm"  # fit config: the L2 norm a client clips its update to
FIT_NOISE_KEY = "dp-noise-std"  # fit config: std of the Gaussian noise a client adds to its update
FIT_COUNT_NOISE_KEY = "dp-count-noise-std"  # fit config (adaptive): std a client adds to its clipping bit


def privacy_enabled(cfg: AppConfig) -> bool:
    return cfg.secure_aggregation or cfg.dp_mode != "none"


def check_privacy_model(cfg: AppConfig, trainable: Sequence[bool], model_name: str) -> None:
    """DP covers what clients send; refuse models that also send data-dependent buffers."""
    from flower_app.config import ConfigError

    if cfg.dp_mode != "none" and not all(trainable):
        raise ConfigError(
            f"dp-mode '{cfg.dp_mode}': model '{model_name}' shares {len(trainable) - sum(trainable)} buffers (BatchNorm "
            "running statistics), which depend on the data and would need clipping and noise too (noise can make "
            "a running variance negative); use a model without BatchNorm, e.g. model='mlp'"
        )


def _kind(cfg: AppConfig) -> str:
    from strategies import get_rule
    from strategies.base import payload_kind

    return payload_kind(get_rule(cfg.strategy), cfg.send_delta)


def secagg_max_weight(cfg: AppConfig) -> float:
    """Central DP sends every update with weight 1, so SecAgg+ then scales by 1 / 1 (no precision lost)."""
    return 1.0 if cfg.dp_mode in ("central-server", "central-client") else cfg.secagg_max_weight


# ======================================================================================= client
def _when(predicate: Callable[[Context], bool], mod: Mod) -> Mod:
    """Apply ``mod`` only for runs where ``predicate(context)`` holds (mods are fixed at import)."""

    def conditional(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        return mod(msg, ctx, call_next) if predicate(ctx) else call_next(msg, ctx)

    return conditional


def _secagg_requested(ctx: Context) -> bool:
    return bool(ctx.run_config.get("secure-aggregation", False))


def client_mods() -> list[Mod]:
    """The ClientApp's mods: SecAgg+ for runs with ``secure-aggregation = true``."""
    from flwr.client.mod import secaggplus_mod

    return [_when(_secagg_requested, secaggplus_mod)]


def privatize_fit(
    cfg: AppConfig,
    fit_config: Mapping[str, Scalar],
    payload: NDArrays,
    global_weights: NDArrays,
    rng: np.random.Generator | None = None,
) -> tuple[NDArrays, NDArrays]:
    """Clip this client's update and add its noise (dp-mode central-client or local).

    Returns the payload to send (same kind as before: weights, update or gradient) and the
    arrays to append after it: with adaptive clipping, the centred clipping bit plus its noise.
    """
    if cfg.dp_mode not in ("central-client", "local"):
        return payload, []
    missing = [k for k in (FIT_CLIP_KEY, FIT_NOISE_KEY) if k not in fit_config]
    if cfg.dp_clipping == "adaptive":
        missing += [] if FIT_COUNT_NOISE_KEY in fit_config else [FIT_COUNT_NOISE_KEY]
    if missing:
        raise ValueError(
            f"dp-mode '{cfg.dp_mode}' but the server sent no {', '.join(missing)}: server and client run configs differ"
        )
    rng = rng or secure_rng()
    clip_norm = float(fit_config[FIT_CLIP_KEY])
    weights_kind = _kind(cfg) == "weights"
    update = [p - g for p, g in zip(payload, global_weights)] if weights_kind else payload
    clipped, norm = clip_to_norm(update, clip_norm)
    noisy = add_gaussian_noise(clipped, float(fit_config[FIT_NOISE_KEY]), rng)
    out = [np.add(g, u, dtype=np.float32) for g, u in zip(global_weights, noisy)] if weights_kind else noisy
    extras: NDArrays = []
    if cfg.dp_clipping == "adaptive":
        bit = (1.0 if norm <= clip_norm else 0.0) - 0.5
        extras = [np.array([bit + rng.normal(0.0, float(fit_config[FIT_COUNT_NOISE_KEY]))], dtype=np.float32)]
    return out, extras


def private_fit_report(
    cfg: AppConfig, wire: NDArrays, num_examples: int, metrics: dict[str, Scalar]
) -> tuple[int, dict[str, Scalar]]:
    """What a client reports in plain text next to a protected update.

    With privacy on, only the upload size leaves in the clear: per-client train loss, label
    counts and step counts are data too. Central DP weighs every client the same (weight 1), as
    DP-FedAvg's sensitivity bound assumes. Under SecAgg+, values the protocol will clip to
    ``[-secagg-clipping-range, secagg-clipping-range]`` are counted and warned about.
    """
    if not privacy_enabled(cfg):
        return num_examples, metrics
    report: dict[str, Scalar] = {"num_upload_bytes": metrics.get("num_upload_bytes", 0)}
    if cfg.dp_mode in ("central-server", "central-client"):
        num_examples = 1
    if cfg.secure_aggregation:
        fraction = secagg_clipped_fraction(wire, num_examples, secagg_max_weight(cfg), cfg.secagg_clipping_range)
        if fraction > 0:
            log(
                WARNING,
                "SecAgg+ will clip %.4f%% of this client's values to +-%g (weighted by %d / %g): raise "
                "secagg-clipping-range, or send updates instead of weights (send-delta=true)",
                100 * fraction, cfg.secagg_clipping_range, num_examples, secagg_max_weight(cfg),
            )
        if cfg.dp_mode == "none":
            report["secagg_clipped_fraction_max"] = fraction
    return num_examples, report


def secagg_clipped_fraction(arrays: Sequence[np.ndarray], num_examples: int, max_weight: float, clipping_range: float) -> float:
    """Fraction of values that SecAgg+ clips: it sends ``(n / max_weight) * x`` clipped to ``+-range``."""
    total = sum(int(np.size(a)) for a in arrays)
    if total == 0:
        return 0.0
    limit = clipping_range / (num_examples / max_weight)
    return sum(int(np.count_nonzero(np.abs(a) > limit)) for a in arrays) / total


# ======================================================================================= server
@dataclass
class _RoundPlan:
    """What one round's privacy needs: sampled clients, contributions and noise."""

    num_sampled: int
    min_contributions: int
    clip_norm: float
    update_noise_multiplier: float  # z_u (equals z with fixed clipping)
    count_stddev: float  # adaptive: noise std on the sum of centred bits (0 otherwise)
    released: bool = False


def wrap_strategy(cfg: AppConfig, strategy: FederatedStrategy) -> FederatedStrategy:
    """``strategy`` itself when privacy is off, else a `PrivateStrategy` around it."""
    if not privacy_enabled(cfg):
        return strategy
    return PrivateStrategy(strategy, cfg)  # type: ignore[return-value]  # duck-types FederatedStrategy


class PrivateStrategy(Strategy):
    """Secure aggregation and differential privacy around a `FederatedStrategy` (composition).

    * SecAgg+: the inner strategy runs in ``preaggregated`` mode (every result holds the
      protocol's mean, used once).
    * central-server: clips each accepted update on the server, adds ``N(0, (z_u C)^2)`` to the
      sum and weighs clients equally, through the inner strategy's ``update_hook``, so the server
      optimizer steps on the privatized average.
    * central-client / local: sends clients their clipping norm and noise std in the fit config
      (`privatize_fit` does the work); central-client refuses rounds with fewer contributions
      than the noise was split over.
    * accounting: epsilon after every round (``epsilon`` in metrics.csv), a stop before
      ``dp-target-epsilon`` would be exceeded, and the accountant in the checkpoint.

    Everything else (sampling, validation, aggregation, optimizer, evaluation, outputs) is the
    inner strategy's; attributes not defined here are read from it.
    """

    def __init__(self, inner: FederatedStrategy, cfg: AppConfig) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = cfg
        if cfg.secure_aggregation:
            inner.options = dataclasses.replace(inner.options, preaggregated=True)
        # Observers (metrics.csv, checkpoints) see this wrapper: its state_dict holds the accountant.
        self.observers = list(inner.observers)
        inner.observers = [self._observe]
        self.accountant: PrivacyAccountant | None = None
        if cfg.dp_mode != "none":
            kind = "local" if cfg.dp_mode == "local" else "central"
            spec = AccountingSpec(kind, cfg.dp_noise_multiplier, cfg.dp_delta)
            self.accountant = PrivacyAccountant(spec, cfg.dp_population_size)
        if cfg.dp_mode == "central-server":
            inner.update_hook = self._clip_and_noise
        elif cfg.dp_mode == "central-client":
            inner.update_hook = self._check_contributions
        self.clip_norm = cfg.dp_clipping_norm
        self.rng = secure_rng()
        self.budget_spent = False
        self.last_unclipped_fraction = math.nan
        self._plan: _RoundPlan | None = None
        self._warned_secagg_range = False

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this wrapper lacks: weights, data_summary, options, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"PrivateStrategy(secure_aggregation={self.cfg.secure_aggregation}, dp_mode={self.cfg.dp_mode!r})"

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = self.inner.state_dict()
        state["privacy"] = {
            "dp_mode": self.cfg.dp_mode,
            "clipping_norm": self.clip_norm,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
        if self.accountant is None:
            return
        saved = state.get("privacy") or {}
        if saved.get("accountant") is None:
            raise ValueError(
                f"resume: the checkpoint at round {int(state['round'])} was written by a run without differential "
                "privacy; its rounds cannot be accounted for, so start a new run (resume=false) for a DP guarantee"
            )
        self.accountant.load_state_dict(saved["accountant"])
        if self.cfg.dp_clipping == "adaptive":
            self.clip_norm = float(saved["clipping_norm"])
        log(INFO, "privacy: resumed with epsilon %.4f after %d accounted rounds", self.accountant.epsilon(), self.accountant.rounds)

    # -------------------------------------------------------------------- Flower API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if self.cfg.dp_mode != "none" and self.cfg.fraction_evaluate > 0:
            log(
                WARNING,
                "privacy: federated evaluation sends each client's loss and accuracy on its own data in the clear; "
                "the privacy guarantee does not cover them (set fraction-evaluate=0 for a strict guarantee)",
            )
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._plan = None
        rnd = server_round + self.inner.start_round
        if self.accountant is not None and self.accountant.population <= 0:
            self.accountant.set_population(max(client_manager.num_available(), 1))
            log(INFO, "privacy: population for the sampling rate: %d clients", self.accountant.population)
        if self.budget_spent or self._over_budget(rnd, self._expected_sample(client_manager)):
            return []
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        if not instructions:
            return []
        plan = self._make_plan(len(instructions))
        if self._over_budget(rnd, plan.num_sampled):  # more clients came than expected
            return []
        extra = self._fit_config(plan)
        for _, ins in instructions:
            ins.config.update(extra)
        self._plan = plan
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        plan = self._plan
        bits: list[float] = []
        if plan is not None and self.cfg.dp_mode == "central-client" and self.cfg.dp_clipping == "adaptive":
            results, bits = _split_clipping_bits(results)
        if self.cfg.secure_aggregation:
            failures = _distinct_failures(failures)
            if results:
                results = _as_float32_aggregate(results)
        if plan is not None and self.cfg.dp_mode in ("central-client", "local") and results:
            plan.released = True  # the clients' noisy updates reached the server
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        rnd = server_round + self.inner.start_round
        if plan is not None and plan.released and self.accountant is not None:
            self.accountant.record_round(plan.num_sampled)
            log(INFO, "round %d: privacy spent so far: epsilon %.4f at delta %g (%s)", rnd,
                self.accountant.epsilon(), self.cfg.dp_delta, self.accountant.spec.kind)
        if bits and plan is not None and parameters is not None:
            # Each client added its share of the count noise; the mean of the centred bits + 1/2
            # estimates the unclipped fraction (under SecAgg+ every result holds that mean).
            self._adapt_clip_norm(rnd, float(np.mean(bits)) + 0.5)
        clipped = metrics.get("secagg_clipped_fraction_max")
        if isinstance(clipped, (int, float)) and clipped > 0:
            log(WARNING, "round %d: SecAgg+ clipped up to %.4f%% of a client's values to +-%g; raise "
                "secagg-clipping-range or set send-delta=true", rnd, 100 * clipped, self.cfg.secagg_clipping_range)
        return parameters, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.budget_spent and self._plan is None:
            # No training happened this round: close its record without asking clients.
            self.inner.aggregate_evaluate(server_round, [], [])
            return []
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)

    # ---------------------------------------------------------------------- internals
    def _observe(self, record: RoundRecord, strategy: FederatedStrategy) -> None:
        if self.accountant is not None:
            record.extra["epsilon"] = self.accountant.epsilon()
            record.extra["dp_clipping_norm"] = self._plan.clip_norm if self._plan is not None else self.clip_norm
            if self.cfg.dp_clipping == "adaptive":
                record.extra["dp_unclipped_fraction"] = self.last_unclipped_fraction
                self.last_unclipped_fraction = math.nan
        for observer in self.observers:
            observer(record, self)  # type: ignore[arg-type]  # duck-types FederatedStrategy

    def _expected_sample(self, client_manager: ClientManager) -> int:
        available = client_manager.num_available()
        opts = self.inner.options
        return min(available, max(int(opts.fraction_fit * available), opts.min_fit_clients))

    def _over_budget(self, rnd: int, num_sampled: int) -> bool:
        """True (and says so once) when one more round of ``num_sampled`` clients would pass the target."""
        target = self.cfg.dp_target_epsilon
        if self.accountant is None or target <= 0 or num_sampled <= 0:
            return False
        spent = self.accountant.epsilon()
        after = self.accountant.epsilon_after(num_sampled)
        if after <= target:
            return False
        self.budget_spent = True
        left = self.cfg.num_server_rounds - rnd + 1
        log(
            WARNING,
            "privacy budget: round %d would take epsilon from %.4f to %.4f, past dp-target-epsilon %.4f (delta %g); "
            "training stops here and the remaining %d round(s) are skipped",
            rnd, spent, after, target, self.cfg.dp_delta, left,
        )
        return True

    def _make_plan(self, num_sampled: int) -> _RoundPlan:
        cfg = self.cfg
        z = cfg.dp_noise_multiplier
        count_std = 0.0
        z_update = z
        if cfg.dp_mode != "none" and cfg.dp_clipping == "adaptive":
            count_std = cfg.dp_clip_count_stddev or default_count_stddev(num_sampled, z)
            z_update = update_noise_multiplier(z, count_std)
        t = min_contributions(num_sampled, self.inner.options.max_failure_fraction)
        plan = _RoundPlan(num_sampled, t, self.clip_norm, z_update, count_std)
        if cfg.secure_aggregation and cfg.dp_mode == "central-client" and not self._warned_secagg_range:
            share = noise_share_std(z_update * self.clip_norm, t)
            if cfg.secagg_clipping_range < self.clip_norm + 4 * share:
                self._warned_secagg_range = True
                log(WARNING, "privacy: secagg-clipping-range %g is below clipping norm + 4 noise std (%g): SecAgg+ "
                    "will clip some noisy values; raise secagg-clipping-range", cfg.secagg_clipping_range,
                    self.clip_norm + 4 * share)
        return plan

    def _fit_config(self, plan: _RoundPlan) -> dict[str, Scalar]:
        mode = self.cfg.dp_mode
        if mode == "local":
            return {FIT_CLIP_KEY: plan.clip_norm, FIT_NOISE_KEY: self.cfg.dp_noise_multiplier * plan.clip_norm}
        if mode == "central-client":
            config: dict[str, Scalar] = {
                FIT_CLIP_KEY: plan.clip_norm,
                FIT_NOISE_KEY: noise_share_std(plan.update_noise_multiplier * plan.clip_norm, plan.min_contributions),
            }
            if self.cfg.dp_clipping == "adaptive":
                config[FIT_COUNT_NOISE_KEY] = noise_share_std(plan.count_stddev, plan.min_contributions)
            return config
        return {}

    def _check_contributions(self, record: RoundRecord, updates: list[Any]) -> list[Any]:
        """central-client: the noise shares only add up to the configured noise with enough of them."""
        plan = self._plan
        if plan is not None and len(updates) < plan.min_contributions:
            log(WARNING, "round %d: %d contributions, fewer than the %d the clients' noise was split over; "
                "the global model is unchanged", record.round, len(updates), plan.min_contributions)
            return []
        return updates

    def _clip_and_noise(self, record: RoundRecord, updates: list[Any]) -> list[Any]:
        """central-server: clip every update to C, add N(0, (z_u C)^2) to their sum, weigh them equally."""
        plan = self._plan
        if plan is None:
            return updates
        weights = self.inner.weights
        as_weights = self.inner.kind == "weights"
        unclipped = 0
        for u in updates:
            delta = [np.subtract(a, w, dtype=np.float32) for a, w in zip(u.arrays, weights)] if as_weights else u.arrays
            u.arrays, norm = clip_to_norm(delta, plan.clip_norm)
            unclipped += int(norm <= plan.clip_norm)
            u.num_examples = 1
        updates[0].arrays = add_gaussian_noise(updates[0].arrays, plan.update_noise_multiplier * plan.clip_norm, self.rng)
        if as_weights:
            for u in updates:
                u.arrays = [np.add(w, d, dtype=np.float32) for w, d in zip(weights, u.arrays)]
        plan.released = True
        if self.cfg.dp_clipping == "adaptive":
            noisy = (unclipped - len(updates) / 2 + self.rng.normal(0.0, plan.count_stddev)) / len(updates) + 0.5
            self._adapt_clip_norm(record.round, noisy)
        return updates

    def _adapt_clip_norm(self, rnd: int, unclipped_fraction: float) -> None:
        new = adaptive_clip_norm(self.clip_norm, unclipped_fraction, self.cfg.dp_target_quantile, self.cfg.dp_clip_learning_rate)
        log(INFO, "round %d: adaptive clipping: noisy unclipped fraction %.3f (target %.2f), norm %.4g -> %.4g",
            rnd, unclipped_fraction, self.cfg.dp_target_quantile, self.clip_norm, new)
        self.last_unclipped_fraction = unclipped_fraction
        self.clip_norm = new


def _split_clipping_bits(
    results: list[tuple[ClientProxy, FitRes]],
) -> tuple[list[tuple[ClientProxy, FitRes]], list[float]]:
    """Take the trailing clipping-bit array off every result (adaptive central-client)."""
    kept: list[tuple[ClientProxy, FitRes]] = []
    bits: list[float] = []
    for proxy, res in results:
        tensors = res.parameters.tensors
        try:
            bit = ndarray_view(tensors[-1])
            if bit.size != 1:
                raise ValueError(f"expected a 1-element clipping bit, got shape {bit.shape}")
        except (IndexError, ValueError) as err:
            log(WARNING, "client %s sent no usable clipping bit (%s); its update is left out", proxy.cid, err)
            continue
        bits.append(float(bit.reshape(-1)[0]))
        res.parameters = Parameters(tensors=list(tensors[:-1]), tensor_type=res.parameters.tensor_type)
        kept.append((proxy, res))
    return kept, bits


def _distinct_failures(failures: list[Any]) -> list[Any]:
    """Flower 1.42's SecAgg+ workflow records a client lost while sending its masked vector twice
    (once per loop over the replies, each time as a new Exception around the same error)."""
    seen: set[int] = set()
    distinct = []
    for failure in failures:
        key = id(failure.args[0]) if isinstance(failure, Exception) and failure.args else id(failure)
        if key not in seen:
            seen.add(key)
            distinct.append(failure)
    return distinct


def _as_float32_aggregate(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
    """SecAgg+ dequantizes to float64; the model travels as float32, so cast its one aggregate once."""
    from flwr.common import ndarrays_to_parameters

    first = results[0][1].parameters
    try:
        arrays = [ndarray_view(t) for t in first.tensors]
    except ValueError:
        return results  # the shell rejects it with the reason
    if all(a.dtype == np.float32 for a in arrays):
        return results
    cast = ndarrays_to_parameters([a.astype(np.float32) for a in arrays])
    for _, res in results:
        if res.parameters is first or res.parameters.tensors == first.tensors:
            res.parameters = cast
    return results


def secagg_workflow(cfg: AppConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the run's settings (counts > 1 become ints)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    def count_or_fraction(value: float) -> int | float:
        return int(value) if value > 1 else float(value)

    return SecAggPlusWorkflow(
        num_shares=count_or_fraction(cfg.secagg_num_shares),
        reconstruction_threshold=count_or_fraction(cfg.secagg_reconstruction_threshold),
        max_weight=secagg_max_weight(cfg),
        clipping_range=cfg.secagg_clipping_range,
        quantization_range=cfg.secagg_quantization_range,
        timeout=cfg.round_timeout if cfg.round_timeout > 0 else None,
    )


def run_server(grid: Grid, context: Context, server_fn: Callable[[Context], ServerAppComponents]) -> None:
    """The ServerApp's main: the legacy loop, or the SecAgg+ workflow when the run asks for it.

    Without secure aggregation this is exactly what ``ServerApp(server_fn=...)`` does
    (`start_grid` with the components); with it, Flower's `DefaultWorkflow` runs the same
    strategy with `SecAggPlusWorkflow` as its fit step.
    """
    from flwr.server.compat import LegacyContext, start_grid
    from flwr.server.workflow import DefaultWorkflow

    from flower_app.config import parse_run_config

    cfg = parse_run_config(context.run_config)
    components = server_fn(context)
    if not cfg.secure_aggregation:
        start_grid(
            grid=grid,
            server=components.server,
            config=components.config,
            strategy=components.strategy,
            client_manager=components.client_manager,
        )
        return
    log(INFO, "secure aggregation: SecAgg+ (shares %g, threshold %g, clipping range %g, quantization range %d)",
        cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold, cfg.secagg_clipping_range,
        cfg.secagg_quantization_range)
    legacy = LegacyContext(
        context=context,
        config=components.config,
        strategy=components.strategy,
        client_manager=components.client_manager,
    )
    DefaultWorkflow(fit_workflow=secagg_workflow(cfg))(grid, legacy)


# ================================================================== in-process grid (tests, benchmarks)
class InProcessGrid(Grid):
    """A `Grid` that hands every message to a `ClientApp` in this process, one at a time.

    Each node gets its own `Context` (node config, state that persists across messages), and
    every message and reply is deep-copied, as a transport would, so mods that edit a message
    (SecAgg+ does) never see another node's copy. ``drop(message)`` returning True makes that
    node fail on that message (a dropout); a client exception becomes an error reply, as in
    Flower's runtimes. It lets tests and benchmarks run `run_server` (the legacy loop or the
    SecAgg+ workflow) end to end without Ray or a SuperLink.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, bool | int | float | str]],
        run_config: Mapping[str, bool | int | float | str],
        drop: Callable[[Message], bool] | None = None,
        run_id: int = 1,
    ) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        # Messages take their run and sender from here (the runtimes set it for a real ServerApp).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.client_app = client_app
        self.drop = drop
        self._run = Run.create_empty(run_id)
        self.contexts = {
            node_id: Context(run_id, node_id, dict(nc), RecordDict(), dict(run_config))
            for node_id, nc in enumerate(node_configs, start=101)
        }
        self._lock = threading.Lock()
        self._replies: dict[str, Message] = {}
        self._next_id = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        message = copy.deepcopy(message)
        if self.drop is not None and self.drop(message):
            return Message(Error(code=0, reason="node dropped out"), reply_to=message)
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as err:  # noqa: BLE001 - a failing client becomes an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        return copy.deepcopy(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            with self._lock:  # one client at a time, like one core per client
                reply = self._deliver(message)
                self._next_id += 1
                ids.append(str(self._next_id))
                self._replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
