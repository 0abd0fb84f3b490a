"""`FederatedStrategy`: the Flower shell around a server update rule.

The shell samples clients, ships the global weights, decodes and validates every reply, and
hands the accepted updates to the pure pieces: an aggregator (`strategies.aggregators`) and a
server optimizer (`strategies.optimizers`). It keeps the round's bookkeeping (results,
failures, rejected updates, bytes, seconds, metrics) and reports each finished round to its
observers, which write metrics, plots and checkpoints. It implements the legacy
`flwr.server.strategy.Strategy` API, the one `NumPyClient` talks to in Flower 1.42.

Payload kinds and the one representation. A client sends, per `RuleSpec.payload_kind`:
``weights`` (w_i), ``delta`` (u_i = w_i - w) or ``gradient`` (FedSGD, the gradient g_i at w).
Decoding turns every payload into an update, once: u_i = w_i - w, u_i as sent, or u_i = -g_i.
Hooks and aggregators see updates (`strategies.hooks.ClientUpdate`); the aggregate U gives the
pseudo-gradient g = -U that the server optimizer steps on (w - lr g = w + lr U: with lr = 1 the
sgd optimizer sets w to the average of the clients' models; FedSGD's g is the mean gradient).
Aggregators are translation equivariant (mean, median, trimmed mean, Krum), so this is what
aggregating the weights gives. The uncompressed mean averages the received bytes in place and
converts the one mean (mean_i(w_i) - w = mean_i(w_i - w)), so no per-client update is materialised.

Composition. Behaviour such as differential privacy comes in as hooks (`StrategyHook`), passed
to the constructor with the observers; secure aggregation is the ``preaggregated`` mode.

Hardening. Whatever goes wrong while one reply is handled (any exception) rejects that reply, with
the round, the client and the reason. What clients report is bounded relative to the round's lower
median (`strategies.validation`): counts are capped at ``max_count_ratio`` times it, FedNova's step
counts beyond it and updates whose norm exceeds ``max_update_norm_ratio`` times it are rejected.
An aggregator that cannot run on the replies left keeps the model (`AggregatorSpec.requirement`).
Every check comes before the server step, and the step is atomic: new weights, optimizer moments and
control variate replace the old together, and only when all are finite (``step_refused`` otherwise).
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Protocol, cast

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies import get_rule
from strategies.aggregators import AGGREGATOR_SPECS, AggregatorParams, fednova_combine, get_aggregator
from strategies.client_metrics import per_client_columns
from strategies.compression import CompressionConfig, decompress
from strategies.evaluation import EVALUATE_BEFORE_FIT, split_fit_evaluation
from strategies.hooks import (
    ClientUpdate,
    FitFailures,
    FitResults,
    RoundRecord,
    StatisticsReply,
    StatisticsStep,
    StrategyHook,
)
from strategies.optimizers import ServerOptHParams, ServerOptState, get_server_optimizer
from strategies.scaffold import ScaffoldState, scaffold_init, scaffold_update_control
from strategies.scheduling import cohort_size, over_selected
from strategies.selection import BestRound, best_state_dict, load_best_state, selection_metric, update_best
from strategies.streaming import StreamingMean, finite_weighted_mean
from strategies.tensors import all_finite, l2_norm
from strategies.validation import (
    cap_counts,
    check_count,
    check_flat_float32,
    check_update,
    clean_metrics,
    is_real,
    lower_median,
    metric_kind,
    norm_bound,
)
from strategies.wire import from_parameters, to_parameters

NDArrays = list[np.ndarray]
CONTROL_STATE_KEY = "scaffold"  # the server control variate (rules with RuleSpec.scaffold)
BEST_STATE_KEY = "best"  # the round with the lowest evaluation loss (strategies.selection)
STATE_KEYS = ("round", "weights", "optimizer", CONTROL_STATE_KEY, BEST_STATE_KEY)  # the shell's own state_dict entries
EvaluateFn = Callable[[NDArrays], tuple[float, dict[str, Scalar]]]
# Names the server sets in an evaluation reply's figures: a client metric may not override them.
EVALUATION_RESERVED = ("loss", "num_examples")


@dataclass(frozen=True)
class StrategyOptions:
    """Everything the shell needs, typed (built from the app's run config)."""

    rule: str = "fedavg"
    aggregator: str = "mean"
    aggregator_params: AggregatorParams = field(default_factory=AggregatorParams)
    optimizer: ServerOptHParams = field(default_factory=ServerOptHParams)
    fraction_fit: float = 1.0
    min_fit_clients: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    client_wait_timeout: float = 120.0
    max_failure_fraction: float = 0.5
    seed: int = 0
    send_delta: bool = False
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    # Hardening (issue 10): bounds on what one client can claim or send, relative to the round's lower median.
    max_count_ratio: float = 1000.0  # num_examples capped at this x the lower median; FedNova local_steps beyond: rejected
    max_update_norm_ratio: float = 100.0  # an update (or SCAFFOLD control delta) with a larger norm ratio: rejected
    # --- speed (issue 12): federated evaluation in the fit message (strategies.evaluation) ---
    federated_evaluation: str = "separate"  # "fit" | "separate" | "none"
    num_rounds: int = 0  # rounds of the run, resumed ones included ("fit": one evaluate round after the last; 0 = none)
    over_selection: float = 1.0  # sample ceil(cohort x this) clients for fit (`strategies.scheduling.over_selected`)
    # Messages' arrays packed into one buffer (`strategies.serde.pack`): fewer objects for Flower's transport.
    # Off by default: a stock NumPyClient reads only Flower's one-.npy-per-array format; the app's clients read both.
    pack_arrays: bool = False


def _central_extras(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """Centralized metrics besides accuracy (perplexity, per-task figures) as ``central_<name>`` columns."""
    return {f"central_{k}": float(v) for k, v in metrics.items() if k != "accuracy" and isinstance(v, (int, float))}


class RoundObserver(Protocol):
    def __call__(self, record: RoundRecord, strategy: FederatedStrategy) -> None: ...


# Metrics are aggregated by what they mean: counts add up, budgets take the maximum,
# everything else (losses, accuracies) is an example-weighted mean.
def metric_reducer(name: str) -> str:
    kind = metric_kind(name)
    return "sum" if kind == "count" else "max" if kind == "maximum" else "mean"


def aggregate_metrics(replies: Sequence[tuple[int, Mapping[str, Scalar]]]) -> dict[str, float]:
    """Combine per-client metrics: sums for counts, max for budgets, weighted means otherwise.

    Only finite real numbers take part (a string, a bool, NaN or Inf is left out, whatever the other clients
    sent under that name), and only positive finite weights weigh a mean; a mean without any is NaN. A figure
    that overflows is left out. Never raises.
    """
    names = sorted({k for _, m in replies for k, v in m.items() if isinstance(k, str) and _usable(v)})
    out: dict[str, float] = {}
    for name in names:
        pairs = [(n, float(m[name])) for n, m in replies if _usable(m.get(name))]  # type: ignore[arg-type]
        how = metric_reducer(name)
        if how == "sum":
            value = sum(v for _, v in pairs)  # a float sum overflows to inf, which is left out below
        elif how == "max":
            value = max(v for _, v in pairs)
        else:
            value = _weighted_mean([(w, v) for w, v in ((_weight(n), v) for n, v in pairs) if 0 < w < math.inf])
        if math.isfinite(value) or (how == "mean" and math.isnan(value)):
            out[name] = value
    return out


def _weight(n: object) -> float:
    """A reply's weight as a float (NaN for anything that is not a real number or overflows)."""
    try:
        return float(n) if is_real(n) else math.nan  # type: ignore[arg-type]
    except OverflowError:
        return math.nan


def _usable(value: object) -> bool:
    return math.isfinite(_weight(value))


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float:
    """sum n_i v_i / sum n_i, scaled so that neither a huge count nor a huge value overflows (NaN for none)."""
    if not pairs:
        return math.nan
    total = sum(n for n, _ in pairs)
    top = max(abs(v) for _, v in pairs)
    if top == 0:
        return 0.0
    return top * math.fsum((n / total) * (v / top) for n, v in pairs)


class FederatedStrategy(Strategy):
    """A `flwr.server.strategy.Strategy` that runs any registered rule.

    Args:
        options: typed settings.
        initial_weights: the global model, as float32 arrays in canonical order.
        trainable: per array, True for trainable parameters (the server optimizer acts on
            these) and False for buffers (set to the aggregate).
        evaluate_fn: centralized evaluation of a set of weights on held-out data.
        observers: called with each finished round's record.
        start_round: rounds already done (resume); Flower's round numbers restart at 1.
        hooks: behaviour run inside every round, in this order (`StrategyHook`).
        preaggregated: secure aggregation (SecAgg+): every result holds the same payload, the
            protocol's example-weighted mean of all clients' payloads, which is used once as the
            aggregate.
        round_config: entries sent to every sampled client in each fit and evaluate config (the
            data description and agreed class names each node checks its data against).
        statistics: a step run as a round of its own before the training rounds (federated
            preprocessing, `StatisticsStep`); the driver runs it with one round and then calls
            `finish_statistics`. None, or a step restored from the checkpoint, means no such round.

    The best round (lowest central loss with ``evaluate_fn``, else lowest federated loss;
    `strategies.selection`) is kept in ``best`` and in the checkpoint.
    """

    def __init__(
        self,
        options: StrategyOptions,
        initial_weights: NDArrays,
        trainable: Sequence[bool],
        evaluate_fn: EvaluateFn | None = None,
        observers: Sequence[RoundObserver] = (),
        start_round: int = 0,
        hooks: Sequence[StrategyHook] = (),
        preaggregated: bool = False,
        round_config: Mapping[str, Scalar] | None = None,
        statistics: StatisticsStep | None = None,
    ) -> None:
        super().__init__()
        if len(trainable) != len(initial_weights):
            raise ValueError("trainable must have one flag per weight array")
        self.options = options
        self.rule = get_rule(options.rule)
        self.kind = self.rule.payload_kind(options.send_delta)
        self.aggregate_fn = get_aggregator(options.aggregator)
        self.optimizer = get_server_optimizer(self.rule.server_optimizer, options.optimizer)
        self.weights: NDArrays = [np.asarray(w, dtype=np.float32) for w in initial_weights]
        self.shapes = [tuple(w.shape) for w in self.weights]
        self.trainable = list(trainable)
        self.evaluate_fn = evaluate_fn
        self.observers = list(observers)
        self.start_round = start_round
        self.hooks = tuple(hooks)
        self.preaggregated = preaggregated
        self.statistics = statistics
        names = [h.name for h in self.hooks] + ([statistics.name] if statistics is not None else [])
        if len(set(names)) != len(names) or set(names) & set(STATE_KEYS):
            raise ValueError(f"hook names (and the statistics step's) {names} must be distinct and differ from the strategy's own state keys {STATE_KEYS}")
        self.opt_state = self.optimizer.init(self.weights, self.trainable)
        self.scaffold_state: ScaffoldState | None = (
            scaffold_init(self._trainable_part(self.weights)) if self.rule.scaffold else None
        )
        self._record: RoundRecord | None = None
        self._round_start = 0.0
        self._num_available = 0
        self._skipped_round = -1  # a round a hook called off in configure_fit
        # The last fit sampling: (clients the round needs, clients sampled); more with over-selection.
        self.cohort: tuple[int, int] = (0, 0)
        # Per client: what it reported of its data (data_* metrics), for partitions.csv.
        self.data_summary: dict[str, dict[str, Scalar]] = {}
        self.round_config: dict[str, Scalar] = dict(round_config or {})
        self.selection_metric = selection_metric(evaluate_fn is not None)
        self.best: BestRound | None = None
        # Sent with every fit and evaluate instruction (the app adds the run's name: nodes key their kept state by it).
        self.client_config: dict[str, Scalar] = {}
        self._statistics_phase = statistics is not None and not statistics.done

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the config: weights, rule state and the hooks' state."""
        state = {
            "round": self.current_round,
            "weights": [w.copy() for w in self.weights],
            "optimizer": self.opt_state.state_dict(),
            CONTROL_STATE_KEY: self.scaffold_state.state_dict() if self.scaffold_state is not None else None,
            BEST_STATE_KEY: best_state_dict(self.best, self.current_round),
        }
        for hook in self.hooks:
            state[hook.name] = hook.state_dict()
        if self.statistics is not None:
            state[self.statistics.name] = self.statistics.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weights = [np.asarray(w, dtype=np.float32) for w in state["weights"]]
        reason = check_update(weights, self.shapes, 1)
        if reason is not None:
            raise ValueError(f"checkpoint weights do not fit the model: {reason}")
        self.weights = weights
        self.start_round = int(state["round"])
        self.opt_state = type(self.opt_state).load_state_dict(state["optimizer"], template=self.opt_state)
        if self.rule.scaffold:
            if state.get(CONTROL_STATE_KEY) is None:
                raise ValueError("checkpoint has no SCAFFOLD control variate but the strategy is 'scaffold'")
            self.scaffold_state = ScaffoldState.load_state_dict(state[CONTROL_STATE_KEY], template=self.scaffold_state)
        for hook in self.hooks:
            hook.load_state_dict(state.get(hook.name))
        if self.statistics is not None:  # a resumed run keeps the checkpoint's result and does not repeat the step
            self.statistics.load_state_dict(state.get(self.statistics.name))
            self._statistics_phase = not self.statistics.done
        best = load_best_state(state.get(BEST_STATE_KEY), self.weights)  # None in checkpoints older than it
        if best is not None and best.metric != self.selection_metric:
            log(WARNING, "the checkpoint's best round (%d) was chosen by %s; this run chooses by %s: starting afresh",
                best.round, best.metric, self.selection_metric)
            best = None
        self.best = best

    @property
    def current_round(self) -> int:
        return self._record.round if self._record is not None else self.start_round

    # -------------------------------------------------------------------- Flower interface
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.parameters_of(self.weights)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if self._statistics_phase:
            return self._configure_statistics(client_manager)
        rnd = server_round + self.start_round
        self._round_start = time.perf_counter()
        self._record = RoundRecord(round=rnd)
        clients = self._sample(client_manager, rnd, "fit", self.options.fraction_fit, self.options.min_fit_clients)
        config: dict[str, Scalar] = {"server-round": rnd, **self._round_config(), **self.client_config}
        for hook in self.hooks:
            extra = hook.fit_config(rnd, self._num_available, len(clients))
            if extra is None:
                self._skipped_round = rnd
                return []
            config.update(extra)
        if self.rule.scaffold:
            parameters = self.fit_parameters()
        self._record.clients_sampled = len(clients)
        self._record.bytes_sent += _nbytes(parameters) * len(clients)
        self._record.extra["bytes_sent_per_client"] = _nbytes(parameters)  # the model each sampled client gets
        log(INFO, "round %d: training on %d of %d clients", rnd, len(clients), self._num_available)
        evaluators = self._fit_evaluators(rnd, clients)  # they evaluate the model they receive before training
        return [(c, FitIns(parameters, {**config, EVALUATE_BEFORE_FIT: True} if c.cid in evaluators else dict(config)))
                for c in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self._statistics_phase:
            self._aggregate_statistics(results, failures)
            return None, {}
        record = self._ensure_record(server_round)
        if self.preaggregated:
            failures = _distinct_failures(failures)
        for hook in self.hooks:
            results, failures = hook.preprocess(results, failures)
        self._fit_time_evaluation(record, results)
        parameters, metrics = self._aggregate(record, results, failures)
        for hook in self.hooks:
            hook.after_fit(record)
        return parameters, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self.evaluate_fn is None or self._statistics_phase:  # the server's data awaits the agreed transform
            return None
        loss, metrics = self.evaluate_fn(self.weights)
        if server_round == 0:
            if self.start_round == 0:
                record = RoundRecord(round=0, central_loss=loss, central_accuracy=float(metrics.get("accuracy", math.nan)))
                record.extra.update(_central_extras(metrics))
                self._notify(record)
            return loss, metrics
        record = self._ensure_record(server_round)
        record.central_loss = loss
        record.central_accuracy = float(metrics.get("accuracy", math.nan))
        record.extra.update(_central_extras(metrics))
        return loss, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self._statistics_phase:
            return []
        record = self._ensure_record(server_round)
        clients: list[ClientProxy] = []
        if self.options.fraction_evaluate > 0 and self._evaluate_round(record.round) and record.round != self._skipped_round:
            clients = self._sample(
                client_manager, record.round, "evaluate", self.options.fraction_evaluate, self.options.min_evaluate_clients
            )
        if not clients:
            self._finish_round()  # Flower skips aggregate_evaluate when nobody evaluates
            return []
        params = self.parameters_of(self.weights)
        record.bytes_sent += _nbytes(params) * len(clients)
        config: dict[str, Scalar] = {"server-round": record.round, **self._round_config(), **self.client_config}
        return [(c, EvaluateIns(params, dict(config))) for c in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        if self._statistics_phase:
            return None, {}
        record = self._ensure_record(server_round)
        for failure in failures:
            log(WARNING, "round %d: evaluation failure: %s", record.round, _describe_failure(failure))
        replies: list[tuple[str, int, dict[str, int | float]]] = []
        for proxy, res in results:
            reply = self._evaluation_reply(record, proxy.cid, res.num_examples, res.loss, res.metrics, "evaluation")
            if reply is not None:
                replies.append(reply)
        metrics = self._combine_evaluations(record, replies)
        loss = metrics.pop("loss", None)
        if self.options.federated_evaluation == "fit":  # the one evaluate round after the last: the final model
            record.extra["final_federated_loss"] = loss if loss is not None else math.nan
            record.extra["final_federated_accuracy"] = metrics.pop("accuracy", math.nan)
            record.extra.update({f"final_eval_{k}": v for k, v in metrics.items()})
            record.extra.update({f"final_{k}": v for k, v in self._per_client(record, replies).items()})
        else:
            record.federated_loss = loss if loss is not None else math.nan
            record.federated_accuracy = metrics.pop("accuracy", math.nan)
            record.extra.update({f"eval_{k}": v for k, v in metrics.items()})
            record.extra.update(self._per_client(record, replies))
        self._finish_round()
        return loss, dict[str, Scalar](metrics)

    def _evaluation_reply(
        self, record: RoundRecord, cid: str, num_examples: object, loss: object, metrics: object, what: str
    ) -> tuple[str, int, dict[str, int | float]] | None:
        """(cid, num_examples, metrics with the loss) of one client's evaluation, or None (logged) when unusable.

        The same checks for an evaluate reply and for a fit-time evaluation (`strategies.evaluation`).
        """
        try:
            reason = check_count(num_examples)
            if reason is None and not (is_real(loss) and math.isfinite(loss) and loss >= 0):  # type: ignore[arg-type, operator]
                reason = f"loss must be a finite number >= 0, got {loss!r}"
            if reason is None:
                cleaned, problems = clean_metrics(metrics, reserved=EVALUATION_RESERVED)  # type: ignore[arg-type]
                if problems:
                    log(WARNING, "round %d: client %s: %s metrics ignored: %s", record.round, cid, what, "; ".join(problems))
                return cid, int(num_examples), {"loss": float(loss), **cleaned}  # type: ignore[call-overload, arg-type]
        except Exception as err:  # noqa: BLE001 - one client's reply can never stop the round
            reason = _describe_error(err)
        log(WARNING, "round %d: ignored the %s of client %s: %s", record.round, what, cid, reason)
        return None

    def _per_client(self, record: RoundRecord, replies: list[tuple[str, int, dict[str, int | float]]]) -> dict[str, float]:
        """Each valid evaluation once: mean, 10th percentile and worst of its accuracy (loss for regression)."""
        columns, problems = per_client_columns([m for _, _, m in replies])
        for problem in problems:
            log(WARNING, "round %d: per-client figures leave out %s", record.round, problem)
        return columns

    def _combine_evaluations(
        self, record: RoundRecord, replies: list[tuple[str, int, dict[str, int | float]]]
    ) -> dict[str, float]:
        """The example-weighted figures of valid evaluations, each count capped at max-count-ratio x the lower median."""
        counts, capped = cap_counts([n for _, n, _ in replies], self.options.max_count_ratio)
        for i in capped:
            log(WARNING, "round %d: client %s evaluated on %d examples, more than max-count-ratio %g x the round's "
                "lower median; its weight in the federated figures is capped at %d",
                record.round, replies[i][0], replies[i][1], self.options.max_count_ratio, counts[i])
        return aggregate_metrics([(n, m) for n, (_, _, m) in zip(counts, replies)]) if replies else {}
    # ------------------------------------------------- for drivers other than Flower's loop (scheduler)
    def fit_parameters(self) -> Parameters:
        """What a client trains from: the global weights (and SCAFFOLD's control variate after them)."""
        if self.scaffold_state is not None:
            return self.parameters_of(self.weights + self.scaffold_state.control)
        return self.parameters_of(self.weights)

    def parameters_of(self, arrays: Sequence[np.ndarray]) -> Parameters:
        """``arrays`` as Flower `Parameters` for a message: packed into one buffer with ``options.pack_arrays``."""
        return to_parameters(arrays, self.options.pack_arrays)

    @property
    def record(self) -> RoundRecord | None:
        """The round in progress (None before the first)."""
        return self._record

    def open_round(self, server_round: int) -> RoundRecord:
        """Start (or return) the record of ``server_round`` (counted from this run's start, as Flower's are)."""
        if self._statistics_phase:
            return RoundRecord(round=0)  # the statistics round is no row of metrics.csv
        return self._ensure_record(server_round)

    def close_round(self) -> None:
        """Finish the round in progress: its seconds, the log line, hooks' end_round and the observers."""
        if not self._statistics_phase:
            self._finish_round()

    # ------------------------------------------------------------------ the statistics step
    @property
    def statistics_phase(self) -> bool:
        """Whether the next round the driver runs is the statistics step's (`StatisticsStep`)."""
        return self._statistics_phase

    def finish_statistics(self) -> None:
        """End the statistics round the driver ran: later rounds train.

        Raises:
            RuntimeError: If the step did not complete (too few usable replies, or none came): no silent fallback.
        """
        step = self.statistics
        if step is None or not self._statistics_phase:
            return
        if not step.done:
            raise RuntimeError(
                f"the statistics round did not complete: {step.failure or 'no client replied'}; the run stops "
                "before training (nothing falls back to each node's own statistics)"
            )
        self._statistics_phase = False
        self._record = None

    def _round_config(self) -> dict[str, Scalar]:
        """What every fit and evaluate config carries: the agreement entries, then the statistics step's result."""
        if self.statistics is not None and self.statistics.done:
            return {**self.round_config, **self.statistics.round_config()}
        return self.round_config

    def _configure_statistics(self, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Every available client (at least min-fit-clients) is asked for its statistics; no model is sent."""
        assert self.statistics is not None
        self._round_start = time.perf_counter()
        clients = self._sample(client_manager, 0, "statistics", 1.0, self.options.min_fit_clients)
        self.cohort = (len(clients), len(clients))  # the scheduler closes the round at this many replies
        config: dict[str, Scalar] = {"server-round": 0, **self.round_config, **self.client_config,
                                     **self.statistics.fit_config()}
        empty = self.parameters_of([])
        log(INFO, "statistics round: asking %d of %d clients for statistics of their data", len(clients),
            self._num_available)
        return [(c, FitIns(empty, dict(config))) for c in clients]

    def _aggregate_statistics(self, results: FitResults, failures: FitFailures) -> None:
        """Hand the statistics replies to the step, decoded (a reply that cannot even be decoded is rejected there)."""
        assert self.statistics is not None
        if self.preaggregated:
            failures = _distinct_failures(failures)
        for failure in failures:
            log(WARNING, "statistics round: client failure: %s", _describe_failure(failure))
        replies: list[StatisticsReply] = []
        for proxy, res in results:
            try:
                arrays: NDArrays = from_parameters(res.parameters)
            except Exception as err:  # noqa: BLE001 - one client can never crash the server
                log(WARNING, "statistics round: rejected the statistics of client %s: %s", proxy.cid, _describe_error(err))
                arrays = []
            replies.append((proxy.cid, arrays, res.num_examples, dict(res.metrics or {})))
        self.statistics.aggregate(replies, len(failures), self.preaggregated)

    # -------------------------------------------------------------------------- internals
    def _evaluate_round(self, rnd: int) -> bool:
        """Whether round ``rnd`` has an evaluate round: every round ("separate"), after the last ("fit")."""
        mode = self.options.federated_evaluation
        return mode == "separate" or (mode == "fit" and 0 < self.options.num_rounds <= rnd)

    def _fit_evaluators(self, rnd: int, clients: Sequence[ClientProxy]) -> set[str]:
        """Mode "fit": the training clients asked to evaluate first, a seeded ``fraction-evaluate`` of them
        (at least ``min-evaluate-clients``); none when ``fraction-evaluate`` is 0."""
        if self.options.federated_evaluation != "fit" or self.options.fraction_evaluate <= 0 or not clients:
            return set()
        cids = sorted(c.cid for c in clients)
        count = min(len(cids), max(int(self.options.fraction_evaluate * len(cids)), self.options.min_evaluate_clients))
        return set(random.Random(zlib.crc32(f"{self.options.seed}:{rnd}:fit-evaluate".encode())).sample(cids, count))

    def _fit_time_evaluation(self, record: RoundRecord, results: FitResults) -> None:
        """Take each reply's evaluation of the model it received out of its fit metrics (`strategies.evaluation`).

        In mode "fit" the valid ones (checked like evaluate replies) are combined like evaluate replies into the
        round's federated columns: the model at the start of this round (``federated_model_round``).
        """
        replies: list[tuple[str, int, dict[str, int | float]]] = []
        for proxy, res in results:
            try:
                evaluation, rest = split_fit_evaluation(res.metrics)
            except Exception as err:  # noqa: BLE001 - left to the fit reply's own checks
                log(WARNING, "round %d: fit-time evaluation of client %s left out: %s", record.round, proxy.cid,
                    _describe_error(err))
                continue
            if not evaluation:
                continue
            res.metrics = rest
            count, loss = evaluation.pop("num_examples", None), evaluation.pop("loss", None)
            reply = self._evaluation_reply(record, proxy.cid, count, loss, evaluation, "fit-time evaluation")
            if reply is not None:
                replies.append(reply)
        if self.options.federated_evaluation != "fit" or self.options.fraction_evaluate <= 0:
            return
        metrics = self._combine_evaluations(record, replies)
        record.federated_loss = metrics.pop("loss", math.nan)
        record.federated_accuracy = metrics.pop("accuracy", math.nan)
        record.extra.update({f"eval_{k}": v for k, v in metrics.items()})
        record.extra["federated_model_round"] = record.round - 1
        record.extra.update(self._per_client(record, replies))
        if self.selection_metric == "federated_loss":  # it measured the weights before this round's step: still these
            self.best = update_best(self.best, record.round - 1, self.selection_metric, record.federated_loss, self.weights)

    def _aggregate(
        self, record: RoundRecord, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate and decode the replies, aggregate the updates and take the server step.

        Every check of the round (each reply, the bounds relative to the round, the aggregator's needs, the
        metrics) comes before the step, and the step itself is atomic (`_apply`): a round either moves the model
        and the optimizer state together, to finite values, or leaves both as they were and says why.
        """
        record.results, record.failures = len(results), len(failures)
        for failure in failures:
            log(WARNING, "round %d: client failure: %s", record.round, _describe_failure(failure))
        record.bytes_received += sum(_nbytes(res.parameters) for _, res in results)
        if results:  # the mean upload of one client (updates, compressed or not, plus any extras)
            record.extra["bytes_received_per_client"] = sum(_nbytes(res.parameters) for _, res in results) / len(results)
        lazy = self._lazy_mean()
        accepted, wires = self._accept(record, results, decode=not lazy)
        accepted, wires = self._bound_local_steps(record, accepted, wires)
        accepted, wires = self._bound_extras(record, accepted, wires)
        self._cap_weights(record, accepted)
        combined = self._mean_of(record, accepted, wires) if lazy and accepted else None
        if lazy:
            accepted = [u for u, wire in zip(accepted, wires) if wire is not None]
        elif not self.preaggregated:
            accepted = self._bound_norms(record, accepted)
        bad = len(failures) + record.rejected
        attempted = len(results) + len(failures)
        if not accepted:
            log(WARNING, "round %d: no usable client update; the global model is unchanged", record.round)
            return None, {}
        if attempted and bad / attempted > self.options.max_failure_fraction:
            log(
                WARNING,
                "round %d: %d of %d clients failed or were rejected (more than max-failure-fraction %.2f); "
                "the global model is unchanged",
                record.round, bad, attempted, self.options.max_failure_fraction,
            )
            return None, {}
        for u in accepted:  # what clients report of their data goes to partitions.csv, not into the figures
            data = {k[len("data_"):]: u.metrics.pop(k) for k in [k for k in u.metrics if k.startswith("data_")]}
            if data:
                self.data_summary[u.cid] = {"client": u.cid, **data}
        for hook in self.hooks:
            if hook.reads_updates:
                accepted = hook.process_updates(record, accepted)
                if not accepted:
                    return None, {}
        if combined is None and not self._aggregator_can_run(record, len(accepted)):
            return None, {}
        fit_metrics = aggregate_metrics([(u.num_examples, u.metrics) for u in accepted])
        if not self._apply(record, accepted, combined):
            return None, {}
        record.updated = True
        record.train_loss = fit_metrics.pop("train_loss", math.nan)
        record.train_accuracy = fit_metrics.pop("train_accuracy", math.nan)
        record.extra.update({f"fit_{k}": v for k, v in fit_metrics.items()})
        return self.parameters_of(self.weights), {k: v for k, v in fit_metrics.items()}

    def _ensure_record(self, server_round: int) -> RoundRecord:
        rnd = server_round + self.start_round
        if self._record is None or self._record.round != rnd:
            self._record = RoundRecord(round=rnd)
            self._round_start = time.perf_counter()
        return self._record

    def _finish_round(self) -> None:
        record = self._record
        if record is None:
            return
        record.seconds = time.perf_counter() - self._round_start
        log(
            INFO,
            "round %d done in %.1fs: central acc %.4f loss %.4f | federated acc %.4f loss %.4f | "
            "%d results, %d failures, %d rejected%s",
            record.round, record.seconds, record.central_accuracy, record.central_loss,
            record.federated_accuracy, record.federated_loss, record.results, record.failures, record.rejected,
            _per_client_summary(record.extra),
        )
        self._notify(record)

    def _notify(self, record: RoundRecord) -> None:
        # The weights now are the ones this record evaluated (central and federated evaluation come after the step),
        # except a fit-time federated evaluation, which measured the round's starting weights (`_fit_time_evaluation`
        # took them); then only the evaluate round after the last one measures the weights now.
        if self.selection_metric == "federated_loss" and self.options.federated_evaluation == "fit":
            value = float(record.extra.get("final_federated_loss", math.nan))
        else:
            value = getattr(record, self.selection_metric)
        self.best = update_best(self.best, record.round, self.selection_metric, value, self.weights)
        for hook in self.hooks:
            hook.end_round(record)
        for observer in self.observers:
            observer(record, self)

    def _sample(self, client_manager: ClientManager, rnd: int, purpose: str, fraction: float, minimum: int) -> list[ClientProxy]:
        """Seeded sampling of max(fraction x available, minimum) clients, with a bounded wait."""
        needed = self.options.min_available_clients
        if client_manager.num_available() < needed:
            log(INFO, "round %d: waiting up to %.0fs for %d clients (%d connected)", rnd,
                self.options.client_wait_timeout, needed, client_manager.num_available())
            client_manager.wait_for(needed, timeout=self.options.client_wait_timeout)  # type: ignore[arg-type]
        available = client_manager.all()
        self._num_available = len(available)
        if len(available) < needed:
            log(WARNING, "round %d: only %d of min-available-clients %d connected after waiting %.0fs; going on with them",
                rnd, len(available), needed, self.options.client_wait_timeout)
        if len(available) < minimum:
            log(WARNING, "round %d: %d clients connected, fewer than the minimum %d for %s; skipping it",
                rnd, len(available), minimum, purpose)
            return []
        needed = cohort_size(len(available), fraction, minimum)
        count = over_selected(needed, len(available), self.options.over_selection) if purpose == "fit" else needed
        if purpose == "fit":
            self.cohort = (needed, count)
        rng = random.Random(zlib.crc32(f"{self.options.seed}:{rnd}:{purpose}".encode()))
        chosen = rng.sample(sorted(available), count)
        return [available[cid] for cid in chosen]

    def _trainable_part(self, arrays: Sequence[np.ndarray]) -> NDArrays:
        return [a for a, t in zip(arrays, self.trainable) if t]

    def _split(self, res: FitRes) -> tuple[NDArrays, NDArrays]:
        """The received payload (zero-copy views) and SCAFFOLD control deltas (empty otherwise)."""
        arrays = from_parameters(res.parameters)
        extras: NDArrays = []
        if self.rule.scaffold:
            n = sum(self.trainable)
            if len(arrays) < n:
                raise ValueError(f"expected the model payload plus {n} control-variate arrays, got {len(arrays)} arrays")
            arrays, extras = arrays[: len(arrays) - n], arrays[len(arrays) - n :]
        return arrays, extras

    def _lazy_mean(self) -> bool:
        """Whether this round can average without holding every decoded update at once."""
        return (
            self.options.aggregator == "mean"
            and not self.rule.fednova
            and not self.preaggregated
            and not any(hook.reads_updates for hook in self.hooks)
        )

    def _reject(self, record: RoundRecord, cid: str, reason: str) -> None:
        record.rejected += 1
        log(WARNING, "round %d: rejected update from client %s: %s", record.round, cid, reason)

    def _refuse_step(self, record: RoundRecord, reason: str) -> bool:
        record.step_refused = 1
        log(WARNING, "round %d: server step refused: %s; the global model and the optimizer state are unchanged",
            record.round, reason)
        return False

    def _decode(self, wire: NDArrays) -> NDArrays:
        """A payload as float32 arrays of the model's shapes (checked by the codec)."""
        if self.preaggregated:  # SecAgg+ dequantizes to float64; the model travels as float32
            wire = [w.astype(np.float32) if w.dtype == np.float64 else w for w in wire]
        return decompress(wire, self.shapes, self.options.compression)

    def _to_update(self, payload: NDArrays) -> NDArrays:
        """The update u = w_i - w that a decoded payload (or a mean of payloads) stands for.

        weights w_i: u = w_i - w; delta: u as sent; gradient g: u = -g. Written over ``payload``
        where it is a fresh array (decoded from a codec, or a mean); received bytes are read-only.
        """
        if self.kind == "delta":
            return payload
        out: NDArrays = []
        for p, w in zip(payload, self.weights):
            target = p if p.flags.writeable else None
            out.append(np.subtract(p, w, out=target) if self.kind == "weights" else np.negative(p, out=target))
        return out

    def _center(self) -> NDArrays | None:
        """What a payload's distance is measured from to give its update's norm: w for weights, 0 otherwise."""
        return self.weights if self.kind == "weights" else None

    def _accept(
        self, record: RoundRecord, results: FitResults, decode: bool
    ) -> tuple[list[ClientUpdate], list[NDArrays | None]]:
        """Check each result; rejected ones are logged and left out.

        With ``decode``, every payload is decoded, fully checked and turned into an update now.
        Without it only what needs no pass over the data is checked (counts, SCAFFOLD extras,
        FedNova's steps); `_mean_of` decodes and checks the rest while it averages the payloads
        (returned beside the updates, as received). Whatever goes wrong with one reply (any
        exception: a malformed header, an odd metric type, memory) rejects that reply only.
        """
        accepted: list[ClientUpdate] = []
        wires: list[NDArrays | None] = []
        shared: list[NDArrays] = []  # preaggregated: the one aggregate, decoded once
        for proxy, res in results:
            try:
                reason, update = self._check_reply(record, proxy.cid, res, decode, shared)
            except Exception as err:  # noqa: BLE001 - one client can never crash the server
                reason, update = _describe_error(err), None
            if update is None:
                self._reject(record, proxy.cid, reason)
                continue
            accepted.append(update[0])
            wires.append(update[1])
        return accepted, wires

    def _check_reply(
        self, record: RoundRecord, cid: str, res: FitRes, decode: bool, shared: list[NDArrays]
    ) -> tuple[str, tuple[ClientUpdate, NDArrays | None] | None]:
        """(why the reply is unusable, None), or ("", (its update, its undecoded payload when not ``decode``))."""
        wire, extras = self._split(res)
        reason = check_count(res.num_examples)
        if reason is not None:
            return reason, None
        if self.rule.scaffold:
            control_shapes = [s for s, t in zip(self.shapes, self.trainable) if t]
            reason = check_update(extras, control_shapes, int(res.num_examples))
            if reason is not None:
                return f"control variate: {reason}", None
        metrics, problems = clean_metrics(res.metrics)
        if self.rule.reports_local_steps:
            steps = metrics.get("local_steps")
            if not (isinstance(steps, int) and 0 < steps <= 2**53):
                return f"{self.rule.name} needs a positive integer metric local_steps, got {res.metrics.get('local_steps')!r}", None
        if problems:
            log(WARNING, "round %d: client %s: metrics ignored: %s", record.round, cid, "; ".join(problems))
        update: NDArrays = []
        if decode and shared:
            update = shared[0]
        elif decode:
            payload = self._decode(wire)
            reason = check_update(payload, self.shapes, int(res.num_examples))
            if reason is not None:
                return reason, None
            update = self._to_update(payload)
            if self.preaggregated:
                shared.append(update)
        return "", (ClientUpdate(cid, update, extras, int(res.num_examples), dict[str, Scalar](metrics)), None if decode else wire)

    def _bound_local_steps(
        self, record: RoundRecord, updates: list[ClientUpdate], wires: list[NDArrays | None]
    ) -> tuple[list[ClientUpdate], list[NDArrays | None]]:
        """FedNova: reject a local_steps above max-count-ratio x the round's lower median (it would scale the
        whole round's update by itself)."""
        if not self.rule.reports_local_steps or len(updates) < 2:
            return updates, wires
        ratio = self.options.max_count_ratio
        steps = [float(u.metrics["local_steps"]) for u in updates]
        bound = ratio * lower_median(steps)
        kept = [i for i, t in enumerate(steps) if t <= bound]
        for i in sorted(set(range(len(updates))) - set(kept)):
            self._reject(record, updates[i].cid, f"local_steps {int(steps[i])} is more than max-count-ratio {ratio:g} x "
                         f"the round's lower median {int(lower_median(steps))}")
        return [updates[i] for i in kept], [wires[i] for i in kept]

    def _cap_weights(self, record: RoundRecord, updates: list[ClientUpdate]) -> None:
        """Cap each client's num_examples at max-count-ratio x the round's lower median (its weight in means)."""
        counts, capped = cap_counts([u.num_examples for u in updates], self.options.max_count_ratio)
        for i in capped:
            log(WARNING, "round %d: client %s reported %d examples, more than max-count-ratio %g x the round's lower "
                "median %d; its weight is capped at %d", record.round, updates[i].cid, updates[i].num_examples,
                self.options.max_count_ratio, lower_median([u.num_examples for u in updates]), counts[i])
            updates[i].num_examples = counts[i]
        record.weights_capped = len(capped)

    def _bound_extras(
        self, record: RoundRecord, updates: list[ClientUpdate], wires: list[NDArrays | None]
    ) -> tuple[list[ClientUpdate], list[NDArrays | None]]:
        """SCAFFOLD: reject control deltas beyond max-update-norm-ratio x the round's lower median (`_within_bound`)."""
        if not self.rule.scaffold or not updates:
            return updates, wires
        keep = self._within_bound(record, updates, [l2_norm(u.extras) for u in updates], "control delta")
        return [updates[i] for i in keep], [wires[i] for i in keep]

    def _bound_norms(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """Reject decoded updates whose norm is beyond max-update-norm-ratio x the round's lower median, or not
        finite (w_i - w can overflow where w_i is finite)."""
        if math.isinf(self.options.max_update_norm_ratio):  # no bound: only what is not finite goes
            norms = [0.0 if all(all_finite(a) for a in u.update) else math.inf for u in updates]
        else:
            norms = [l2_norm(u.update) for u in updates]
        keep = self._within_bound(record, updates, norms, "update")
        return [updates[i] for i in keep]

    def _within_bound(self, record: RoundRecord, updates: Sequence[ClientUpdate], norms: Sequence[float], what: str) -> list[int]:
        """Indices of ``updates`` whose ``norms`` are finite and within the round's bound; the others are rejected."""
        ratio = self.options.max_update_norm_ratio
        bound = norm_bound(norms, ratio)
        keep: list[int] = []
        for i, (u, norm) in enumerate(zip(updates, norms)):
            if not math.isfinite(norm):
                self._reject(record, u.cid, f"the {what} is not finite (NaN, Inf, or values near the float32 limit)")
            elif norm > bound:
                self._reject(record, u.cid, f"the {what}'s L2 norm {norm:.4g} is more than max-update-norm-ratio "
                             f"{ratio:g} x the round's lower median {bound / ratio:.4g}")
            else:
                keep.append(i)
        return keep

    def _mean_of(self, record: RoundRecord, updates: list[ClientUpdate], wires: list[NDArrays | None]) -> NDArrays | None:
        """The example-weighted mean update, rejecting bad payloads on the way (their wire becomes None).

        Uncompressed payloads are zero-copy views of the received bytes: they are averaged by
        `strategies.streaming.finite_weighted_mean`, which reads each once and reports the non-finite
        clients and every client's update norm. Compressed payloads are decoded, checked and added one at
        a time, so one decoded payload is alive. Either way, a client whose norm is beyond the round's
        bound (`_within_bound`) is left out, which costs a second pass over the others. The mean of the
        payloads is turned into the mean update once, at the end.
        """
        if self.options.compression.codec == "none":
            live: list[int] = []
            for i, (u, wire) in enumerate(zip(updates, wires)):
                assert wire is not None
                # Uncompressed float32 payloads are used as received (reshaped views; the codec sends
                # tensors flat); finiteness is checked inside the mean's single pass.
                reason = check_flat_float32(wire, self.shapes)
                if reason is not None:
                    wires[i] = None
                    self._reject(record, u.cid, reason)
                    continue
                wires[i] = [w.reshape(shape) for w, shape in zip(wire, self.shapes)]
                live.append(i)
            if not live:
                return None
            bounded = math.isfinite(self.options.max_update_norm_ratio)
            norms: list[float] = []
            mean, dropped = finite_weighted_mean(
                [cast(NDArrays, wires[i]) for i in live], [float(updates[i].num_examples) for i in live],
                center=self._center(), norms=norms if bounded else None,
            )
            if not bounded:
                norms = [0.0] * len(live)  # no bound: every finite client is within it
            for j in dropped:
                wires[live[j]] = None
                self._reject(record, updates[live[j]].cid, "the update contains NaN or Inf")
            finite = [j for j in range(len(live)) if j not in dropped]
            keep = [finite[k] for k in self._within_bound(record, [updates[live[j]] for j in finite], [norms[j] for j in finite], "update")]
            if len(keep) < len(finite):
                for j in set(finite) - set(keep):
                    wires[live[j]] = None
                mean, _ = finite_weighted_mean(
                    [cast(NDArrays, wires[live[j]]) for j in keep], [float(updates[live[j]].num_examples) for j in keep]
                ) if keep else (None, [])
            return self._to_update(mean) if mean is not None else None
        return self._streaming_mean_of(record, updates, wires)

    def _streaming_mean_of(self, record: RoundRecord, updates: list[ClientUpdate], wires: list[NDArrays | None]) -> NDArrays | None:
        """`_mean_of` for compressed payloads: decode, check and blend in one client at a time."""
        codec = self.options.compression
        center = self._center()
        bounded = math.isfinite(self.options.max_update_norm_ratio)
        norms: dict[int, float] = {}

        def one_pass(indices: list[int], first: bool) -> StreamingMean:
            mean = StreamingMean()
            for i in indices:
                u = updates[i]
                try:
                    payload = decompress(cast(NDArrays, wires[i]), self.shapes, codec)
                    reason = check_update(payload, self.shapes, u.num_examples)
                    if reason is None and first:
                        norms[i] = l2_norm(payload, center) if bounded else 0.0
                except Exception as err:  # noqa: BLE001 - one client can never crash the server
                    reason = _describe_error(err)
                if reason is not None:
                    wires[i] = None
                    self._reject(record, u.cid, reason)
                    continue
                mean.add(payload, u.num_examples)
                del payload
            return mean

        live = [i for i, wire in enumerate(wires) if wire is not None]
        mean = one_pass(live, first=True)
        decoded = [i for i in live if wires[i] is not None]
        keep = [decoded[k] for k in self._within_bound(record, [updates[i] for i in decoded], [norms[i] for i in decoded], "update")]
        if len(keep) < len(decoded):
            for i in set(decoded) - set(keep):
                wires[i] = None
            mean = one_pass(keep, first=False)  # a second pass without the clients beyond the bound
        return self._to_update(mean.result()) if mean.count else None

    def _aggregator_can_run(self, record: RoundRecord, n: int) -> bool:
        """The aggregator's needs for ``n`` replies (`AggregatorSpec`): refuse the step when it cannot run, warn
        when it runs without the robustness it is for."""
        if self.rule.fednova or self.preaggregated:
            return True
        name, spec, params = self.options.aggregator, AGGREGATOR_SPECS[self.options.aggregator], self.options.aggregator_params
        reason = spec.requirement(n, params)
        if reason:
            return self._refuse_step(record, f"aggregator '{name}' cannot aggregate {n} replies: {reason}")
        weakness = spec.weakness(n, params)
        if weakness:
            log(WARNING, "round %d: aggregator '%s' cannot do its job with %d replies: %s (aggregated all the same)",
                record.round, name, n, weakness)
        return True

    def _apply(self, record: RoundRecord, updates: list[ClientUpdate], combined: NDArrays | None = None) -> bool:
        """Aggregate the accepted updates (unless ``combined``, their mean, is given) and take the server step.

        Atomic: the new weights, the optimizer state and the SCAFFOLD control variate are all computed and
        checked finite before any of them replaces the old; otherwise nothing changes, the refusal is logged
        and counted (``step_refused``). Returns whether the model moved.
        """
        try:
            weights = [float(u.num_examples) for u in updates]
            if combined is None:
                if self.rule.fednova:
                    steps = [int(u.metrics["local_steps"]) for u in updates]
                    combined = fednova_combine([u.update for u in updates], weights, steps)
                elif self.preaggregated:
                    combined = updates[0].update  # the protocol's mean; every result holds the same one
                else:
                    combined = self.aggregate_fn([u.update for u in updates], weights, self.options.aggregator_params)
            if not all(all_finite(c) for c in combined):
                return self._refuse_step(record, "the aggregate of the updates is not finite")
            opt_state, new_weights = self.optimizer.step(self.opt_state, self.weights, _negated(combined), self.trainable)
            new_control = self.scaffold_state
            if self.scaffold_state is not None:
                new_control = scaffold_update_control(
                    self.scaffold_state, [u.extras for u in updates], max(self._num_available, len(updates))
                )
        except Exception as err:  # noqa: BLE001 - e.g. an aggregator's own precondition: the round keeps the model
            return self._refuse_step(record, _describe_error(err))
        problem = _not_finite(new_weights, opt_state, new_control)
        if problem:
            return self._refuse_step(record, f"the step would make {problem} non-finite (an update too large for float32)")
        self.opt_state, self.weights, self.scaffold_state = opt_state, new_weights, new_control
        return True


def _per_client_summary(extra: Mapping[str, float]) -> str:
    """`` | per client acc mean/p10/worst 0.81/0.52/0.40, personal ...`` for the round's log line ("" = none)."""
    parts = []
    for metric, label in (("accuracy", "acc"), ("personal_accuracy", "personal acc"), ("loss", "loss"),
                          ("personal_loss", "personal loss")):
        figures = [(f, extra.get(f"clients_{metric}_{f}")) for f in ("mean", "p10", "p90", "worst")]
        shown = [(f, v) for f, v in figures if v is not None]
        if shown:
            parts.append(f"{label} {'/'.join(f for f, _ in shown)} {'/'.join(f'{v:.4f}' for _, v in shown)}")
    return f" | per client {', '.join(parts)}" if parts else ""


def _negated(update: NDArrays) -> NDArrays:
    """The pseudo-gradient g = -U of a mean update U, written over U where it is a fresh array."""
    out = [np.asarray(u, dtype=np.float32) for u in update]
    return [np.negative(o, out=o if o.flags.writeable else None) for o in out]


def _distinct_failures(failures: FitFailures) -> FitFailures:
    """Flower 1.42's SecAgg+ workflow records a client lost while sending its masked vector twice
    (once per loop over the replies, each time as a new Exception around the same error)."""
    seen: set[int] = set()
    distinct: FitFailures = []
    for failure in failures:
        key = id(failure.args[0]) if isinstance(failure, Exception) and failure.args else id(failure)
        if key not in seen:
            seen.add(key)
            distinct.append(failure)
    return distinct


def _not_finite(weights: NDArrays, state: ServerOptState, control: ScaffoldState | None) -> str:
    """What of a proposed step is not finite ("" = all of it is)."""
    for name, arrays in (("the weights", weights), ("the optimizer's first moment", state.m or []),
                         ("the optimizer's second moment", state.v or []),
                         ("the SCAFFOLD control variate", control.control if control is not None else [])):
        if not all(all_finite(a) for a in arrays):
            return name
    return ""


def _describe_error(err: BaseException) -> str:
    """A rejection reason from an exception: its message, with the type unless it is a plain ValueError."""
    text = str(err) or repr(err)
    return text if type(err) is ValueError else f"{type(err).__name__}: {text}"


def _nbytes(parameters: Parameters) -> int:
    """Bytes of a payload, for the bookkeeping; 0 for one that cannot even be measured (it is rejected later)."""
    try:
        return sum(len(t) for t in parameters.tensors)
    except Exception:  # noqa: BLE001 - whatever a client sent, counting its bytes may not stop the round
        return 0


def _describe_failure(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    proxy, res = failure
    status = getattr(res, "status", None)
    return f"client {proxy.cid}: {getattr(status, 'message', res)}"
