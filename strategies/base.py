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
    ndarrays_to_parameters,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies import get_rule
from strategies.aggregators import AggregatorParams, fednova_combine, get_aggregator
from strategies.client_metrics import per_client_columns
from strategies.compression import CompressionConfig, decompress
from strategies.hooks import ClientUpdate, FitFailures, FitResults, RoundRecord, StrategyHook
from strategies.optimizers import ServerOptHParams, get_server_optimizer
from strategies.scaffold import ScaffoldState, scaffold_init, scaffold_update_control
from strategies.serde import views
from strategies.streaming import StreamingMean, blocked_weighted_mean
from strategies.validation import check_update

NDArrays = list[np.ndarray]
CONTROL_STATE_KEY = "scaffold"  # the server control variate (rules with RuleSpec.scaffold)
STATE_KEYS = ("round", "weights", "optimizer", CONTROL_STATE_KEY)  # the shell's own entries of state_dict
EvaluateFn = Callable[[NDArrays], tuple[float, dict[str, Scalar]]]


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


def _central_extras(metrics: Mapping[str, Scalar]) -> dict[str, float]:
    """Centralized metrics besides accuracy (perplexity, per-task figures) as ``central_<name>`` columns."""
    return {f"central_{k}": float(v) for k, v in metrics.items() if k != "accuracy" and isinstance(v, (int, float))}


class RoundObserver(Protocol):
    def __call__(self, record: RoundRecord, strategy: FederatedStrategy) -> None: ...


# Metrics are aggregated by what they mean: counts add up, budgets take the maximum,
# everything else (losses, accuracies) is an example-weighted mean.
def metric_reducer(name: str) -> str:
    if name.startswith("num_") or name.endswith(("_bytes", "_count")):
        return "sum"
    if name.startswith("epsilon") or name.endswith("_max"):
        return "max"
    return "mean"


def aggregate_metrics(replies: Sequence[tuple[int, Mapping[str, Scalar]]]) -> dict[str, float]:
    """Combine per-client metrics: sums for counts, max for budgets, weighted means otherwise."""
    names = sorted({k for _, m in replies for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out: dict[str, float] = {}
    for name in names:
        pairs = [(n, float(m[name])) for n, m in replies if name in m]
        how = metric_reducer(name)
        if how == "sum":
            out[name] = sum(v for _, v in pairs)
        elif how == "max":
            out[name] = max(v for _, v in pairs)
        else:
            total = sum(n for n, _ in pairs)
            out[name] = sum(n * v for n, v in pairs) / total if total > 0 else math.nan
    return out


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
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names) or set(names) & set(STATE_KEYS):
            raise ValueError(f"hook names {names} must be distinct and differ from the strategy's own state keys {STATE_KEYS}")
        self.opt_state = self.optimizer.init(self.weights, self.trainable)
        self.scaffold_state: ScaffoldState | None = (
            scaffold_init(self._trainable_part(self.weights)) if self.rule.scaffold else None
        )
        self._record: RoundRecord | None = None
        self._round_start = 0.0
        self._num_available = 0
        self._skipped_round = -1  # a round a hook called off in configure_fit
        # Per client: what it reported of its data (data_* metrics), for partitions.csv.
        self.data_summary: dict[str, dict[str, Scalar]] = {}
        # Sent with every fit and evaluate instruction (the app adds the run's name: nodes key their kept state by it).
        self.client_config: dict[str, Scalar] = {}

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the config: weights, rule state and the hooks' state."""
        state = {
            "round": self.current_round,
            "weights": [w.copy() for w in self.weights],
            "optimizer": self.opt_state.state_dict(),
            CONTROL_STATE_KEY: self.scaffold_state.state_dict() if self.scaffold_state is not None else None,
        }
        for hook in self.hooks:
            state[hook.name] = hook.state_dict()
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

    @property
    def current_round(self) -> int:
        return self._record.round if self._record is not None else self.start_round

    # -------------------------------------------------------------------- Flower interface
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.weights)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        rnd = server_round + self.start_round
        self._round_start = time.perf_counter()
        self._record = RoundRecord(round=rnd)
        clients = self._sample(client_manager, rnd, "fit", self.options.fraction_fit, self.options.min_fit_clients)
        config: dict[str, Scalar] = {"server-round": rnd, **self.client_config}
        for hook in self.hooks:
            extra = hook.fit_config(rnd, self._num_available, len(clients))
            if extra is None:
                self._skipped_round = rnd
                return []
            config.update(extra)
        if self.rule.scaffold:
            assert self.scaffold_state is not None
            parameters = ndarrays_to_parameters(self.weights + self.scaffold_state.control)
        self._record.clients_sampled = len(clients)
        self._record.bytes_sent += _nbytes(parameters) * len(clients)
        self._record.extra["bytes_sent_per_client"] = _nbytes(parameters)  # the model each sampled client gets
        log(INFO, "round %d: training on %d of %d clients", rnd, len(clients), self._num_available)
        return [(c, FitIns(parameters, dict(config))) for c in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        record = self._ensure_record(server_round)
        if self.preaggregated:
            failures = _distinct_failures(failures)
        for hook in self.hooks:
            results, failures = hook.preprocess(results, failures)
        parameters, metrics = self._aggregate(record, results, failures)
        for hook in self.hooks:
            hook.after_fit(record)
        return parameters, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self.evaluate_fn is None:
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
        record = self._ensure_record(server_round)
        clients: list[ClientProxy] = []
        if self.options.fraction_evaluate > 0 and record.round != self._skipped_round:
            clients = self._sample(
                client_manager, record.round, "evaluate", self.options.fraction_evaluate, self.options.min_evaluate_clients
            )
        if not clients:
            self._finish_round()  # Flower skips aggregate_evaluate when nobody evaluates
            return []
        params = ndarrays_to_parameters(self.weights)
        record.bytes_sent += _nbytes(params) * len(clients)
        config: dict[str, Scalar] = {"server-round": record.round, **self.client_config}
        return [(c, EvaluateIns(params, dict(config))) for c in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        record = self._ensure_record(server_round)
        for failure in failures:
            log(WARNING, "round %d: evaluation failure: %s", record.round, _describe_failure(failure))
        replies = [(r.num_examples, {"loss": r.loss, **r.metrics}) for _, r in results if r.num_examples > 0 and math.isfinite(r.loss)]
        metrics = aggregate_metrics(replies) if replies else {}
        loss = metrics.pop("loss", None)
        record.federated_loss = loss if loss is not None else math.nan
        record.federated_accuracy = metrics.pop("accuracy", math.nan)
        record.extra.update({f"eval_{k}": v for k, v in metrics.items()})
        # Each client once: mean, 10th percentile and worst of its accuracy (loss for regression).
        columns, problems = per_client_columns([{"loss": r.loss, **r.metrics} for _, r in results if r.num_examples > 0])
        for problem in problems:
            log(WARNING, "round %d: per-client figures leave out %s", record.round, problem)
        record.extra.update(columns)
        self._finish_round()
        return loss, dict[str, Scalar](metrics)

    # -------------------------------------------------------------------------- internals
    def _aggregate(
        self, record: RoundRecord, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate and decode the replies, aggregate the updates and take the server step."""
        record.results, record.failures = len(results), len(failures)
        for failure in failures:
            log(WARNING, "round %d: client failure: %s", record.round, _describe_failure(failure))
        record.bytes_received += sum(_nbytes(res.parameters) for _, res in results)
        if results:  # the mean upload of one client (updates, compressed or not, plus any extras)
            record.extra["bytes_received_per_client"] = sum(_nbytes(res.parameters) for _, res in results) / len(results)
        lazy = self._lazy_mean()
        accepted, wires = self._accept(record, results, decode=not lazy)
        combined = self._mean_of(record, accepted, wires) if lazy and accepted else None
        if lazy:
            accepted = [u for u, wire in zip(accepted, wires) if wire is not None]
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
        for u in accepted:
            data = {k[len("data_"):]: u.metrics.pop(k) for k in [k for k in u.metrics if k.startswith("data_")]}
            if data:
                self.data_summary[u.cid] = {"client": u.cid, **data}
        for hook in self.hooks:
            if hook.reads_updates:
                accepted = hook.process_updates(record, accepted)
                if not accepted:
                    return None, {}
        self._apply(accepted, combined)
        record.updated = True
        fit_metrics = aggregate_metrics([(u.num_examples, u.metrics) for u in accepted])
        record.train_loss = fit_metrics.pop("train_loss", math.nan)
        record.train_accuracy = fit_metrics.pop("train_accuracy", math.nan)
        record.extra.update({f"fit_{k}": v for k, v in fit_metrics.items()})
        return ndarrays_to_parameters(self.weights), {k: v for k, v in fit_metrics.items()}

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
        count = min(len(available), max(int(fraction * len(available)), minimum))
        rng = random.Random(zlib.crc32(f"{self.options.seed}:{rnd}:{purpose}".encode()))
        chosen = rng.sample(sorted(available), count)
        return [available[cid] for cid in chosen]

    def _trainable_part(self, arrays: Sequence[np.ndarray]) -> NDArrays:
        return [a for a, t in zip(arrays, self.trainable) if t]

    def _split(self, res: FitRes) -> tuple[NDArrays, NDArrays]:
        """The received payload (zero-copy views) and SCAFFOLD control deltas (empty otherwise)."""
        arrays = views(res.parameters.tensors)
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

    def _accept(
        self, record: RoundRecord, results: FitResults, decode: bool
    ) -> tuple[list[ClientUpdate], list[NDArrays | None]]:
        """Check each result; rejected ones are logged and left out.

        With ``decode``, every payload is decoded, fully checked and turned into an update now.
        Without it only what needs no pass over the data is checked (counts, SCAFFOLD extras,
        FedNova's steps); `_mean_of` decodes and checks the rest while it averages the payloads
        (returned beside the updates, as received).
        """
        accepted: list[ClientUpdate] = []
        wires: list[NDArrays | None] = []
        control_shapes = [s for s, t in zip(self.shapes, self.trainable) if t]
        shared: NDArrays | None = None  # preaggregated: the one aggregate, decoded once
        for proxy, res in results:
            try:
                wire, extras = self._split(res)
                reason = None if res.num_examples > 0 else f"num_examples must be a positive integer, got {res.num_examples!r}"
                if reason is None and self.rule.scaffold:
                    reason = check_update(extras, control_shapes, res.num_examples)
                    reason = f"control variate: {reason}" if reason else None
                steps = res.metrics.get("local_steps", 0)
                if reason is None and self.rule.reports_local_steps and not (isinstance(steps, int) and steps > 0):
                    reason = f"{self.rule.name} needs a positive integer metric local_steps, got {steps!r}"
                update: NDArrays = []
                if reason is None and decode and shared is not None:
                    update = shared
                elif reason is None and decode:
                    payload = self._decode(wire)
                    reason = check_update(payload, self.shapes, res.num_examples)
                    update = self._to_update(payload) if reason is None else []
                    shared = update if self.preaggregated and reason is None else None
            except ValueError as err:
                reason = str(err)
            if reason is not None:
                self._reject(record, proxy.cid, reason)
                continue
            accepted.append(ClientUpdate(proxy.cid, update, extras, int(res.num_examples), dict(res.metrics)))
            wires.append(None if decode else wire)
        return accepted, wires

    def _mean_of(self, record: RoundRecord, updates: list[ClientUpdate], wires: list[NDArrays | None]) -> NDArrays | None:
        """The example-weighted mean update, rejecting bad payloads on the way (their wire becomes None).

        Uncompressed payloads are zero-copy views of the received bytes: they are averaged by
        `blocked_weighted_mean`, which reads each once and reports non-finite clients. Compressed
        payloads are decoded, checked and added one at a time, so one decoded payload is alive.
        The mean of the payloads is turned into the mean update once, at the end.
        """
        codec = self.options.compression
        if codec.codec == "none":
            live: list[int] = []
            for i, (u, wire) in enumerate(zip(updates, wires)):
                assert wire is not None
                # Uncompressed float32 payloads are used as received (reshaped views; the codec sends
                # tensors flat); finiteness is checked inside the mean's single pass.
                reason = _check_flat_float32(wire, self.shapes)
                if reason is not None:
                    wires[i] = None
                    self._reject(record, u.cid, reason)
                    continue
                wires[i] = [w.reshape(shape) for w, shape in zip(wire, self.shapes)]
                live.append(i)
            while True:
                if not live:
                    return None
                combined, bad = blocked_weighted_mean(
                    [cast(NDArrays, wires[i]) for i in live], [float(updates[i].num_examples) for i in live]
                )
                if not bad:
                    break
                for j in bad:
                    wires[live[j]] = None
                    self._reject(record, updates[live[j]].cid, "the update contains NaN or Inf")
                live = [i for i in live if wires[i] is not None]
            return self._to_update(combined)
        mean = StreamingMean()
        for i, (u, wire) in enumerate(zip(updates, wires)):
            try:
                payload = decompress(cast(NDArrays, wire), self.shapes, codec)
                reason = check_update(payload, self.shapes, u.num_examples)
            except ValueError as err:
                reason = str(err)
            if reason is not None:
                wires[i] = None
                self._reject(record, u.cid, reason)
                continue
            mean.add(payload, u.num_examples)
            del payload
        return self._to_update(mean.result()) if mean.count else None

    def _apply(self, updates: list[ClientUpdate], combined: NDArrays | None = None) -> None:
        """Aggregate the accepted updates (unless ``combined``, their mean, is given) and take the server step."""
        weights = [float(u.num_examples) for u in updates]
        if combined is not None:
            pass
        elif self.rule.fednova:
            steps = [int(u.metrics["local_steps"]) for u in updates]
            combined = fednova_combine([u.update for u in updates], weights, steps)
        elif self.preaggregated:
            combined = updates[0].update  # the protocol's mean; every result holds the same one
        elif self.options.aggregator == "mean":
            combined, _ = blocked_weighted_mean([u.update for u in updates], weights)
        else:
            combined = self.aggregate_fn([u.update for u in updates], weights, self.options.aggregator_params)
        self.opt_state, self.weights = self.optimizer.step(self.opt_state, self.weights, _negated(combined), self.trainable)
        if self.scaffold_state is not None:
            self.scaffold_state = scaffold_update_control(
                self.scaffold_state, [u.extras for u in updates], max(self._num_available, len(updates))
            )


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


def _check_flat_float32(wire: NDArrays, shapes: Sequence[tuple[int, ...]]) -> str | None:
    """Count, size and dtype of an uncompressed payload (no pass over the data)."""
    if len(wire) != len(shapes):
        return f"expected {len(shapes)} arrays, got {len(wire)}"
    for i, (w, shape) in enumerate(zip(wire, shapes)):
        if w.dtype != np.float32:
            return f"array {i} has dtype {w.dtype}, expected float32"
        if w.size != math.prod(shape):
            return f"array {i} has {w.size} values, expected {math.prod(shape)} for shape {tuple(shape)}"
    return None


def _nbytes(parameters: Parameters) -> int:
    return sum(len(t) for t in parameters.tensors)


def _describe_failure(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    proxy, res = failure
    status = getattr(res, "status", None)
    return f"client {proxy.cid}: {getattr(status, 'message', res)}"
