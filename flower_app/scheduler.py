"""The scheduler: client work over Flower's `Grid` where the legacy loop cannot do what the run asks.

Flower's legacy loop (`start_grid`) runs rounds that wait for every sampled client. This module drives
the same strategy shell (`strategies.base.FederatedStrategy`: sampling, decoding, validation,
aggregation, the server step, hooks, observers) through ``grid.push_messages`` / ``pull_messages`` with
*legacy* fit and evaluate messages, converted by ``flwr.compat.common.recorddict_compat`` exactly as
Flower's own `GridClientProxy` converts them, so the `NumPyClient`s run unchanged. Flower's public API
only; nothing of Flower is patched. It runs:

* `run_sync`: synchronous rounds with a deadline and over-selection (Bonawitz et al. 2019): the
  strategy samples ``ceil(needed x over-selection)`` clients, and a round aggregates the first
  ``needed`` that report, all of them within ``round-deadline`` seconds; later reports are dropped and
  counted (``late``). Also any sync round with device profiles, to time it.
* `FedBuff`: asynchronous buffered aggregation (Nguyen et al. 2022; `strategies.scheduling`).
  ``async-concurrency`` clients train at all times; every finished client's update enters a buffer, the
  server steps when it holds ``async-buffer-size`` updates (each weighted by its staleness, in
  `SchedulerState.process_updates`), and the finished client's slot gets new work at once, with the
  newest model. A client whose update waits in the buffer is not sampled again before that step (it
  contributes once per step; with concurrency = every client the slot then waits). Each server step is
  one row of metrics.csv and one checkpoint; num-server-rounds counts steps.

Time. With device profiles (`strategies.profiles`) time is *simulated*: a reply's arrival is its
dispatch time plus its node's simulated duration (the examples it reports processing divided by the
device's speed, the bytes moved divided by its bandwidths, stretched by its availability), or its
dropout point. The scheduler handles replies in the order of simulated arrival (an event queue keyed by
(arrival, dispatch number)), waiting for the real replies as needed, so a run is reproducible whatever
order the replies really came in. ``sim_seconds`` and ``sim_time`` in metrics.csv are simulated
seconds of each round (or step) and in total, beside ``seconds``, the real ones. Without profiles time
is real: replies are handled as they arrive, and the deadline is in real seconds.

Checkpoints. `SchedulerState` is a hook of the strategy shell, so its state rides in every checkpoint:
the simulated clock, the dispatch counter, and for FedBuff the clients in flight (node, model version,
dispatch number and time) with the weights of every older version one of them started from. A resumed
run sends that work again, to the same node if it is still connected, from the same version, so where
the arrival order is fixed (simulated time) it continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    MessageType,
    Parameters,
    Scalar,
)
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid

from flower_app.options import REPEAT_KEY, WORK_METRIC, SchedulerOptions
from strategies.base import FederatedStrategy
from strategies.hooks import ClientUpdate, FitFailures, FitResults, RoundRecord
from strategies.profiles import DeviceProfile, ProfileOptions, busy_seconds, dropout_point, finish_time, profile_for
from strategies.scheduling import cohort_size, select_in_time, staleness_weight

NDArrays = list[np.ndarray]
STALENESS_METRIC = "staleness"  # put into a FedBuff reply's metrics by the scheduler, read by SchedulerState
PARTITION_METRIC = "data_partition"  # what every FlowerClient reports of its data


# ------------------------------------------------------------------------------------------- transport
class NodeProxy(ClientProxy):
    """A node as the strategy shell samples it (``cid`` = its node ID); messages go through `GridTransport`."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _unused(self, *args: Any) -> Any:
        raise NotImplementedError("the scheduler sends messages through its GridTransport")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused  # type: ignore[assignment]


@dataclass
class Reply:
    """A pulled reply: the node's result, or why there is none."""

    message_id: str
    node_id: int
    result: FitRes | EvaluateRes | None
    error: str = ""


class GridTransport:
    """Legacy fit/evaluate messages over a `Grid`, as Flower's `GridClientProxy` sends them, without blocking.

    ``push`` returns message IDs at once; ``wait`` pulls the replies of the given IDs until enough arrived
    or time is up. Replies are matched by ``reply_to_message_id``.
    """

    def __init__(self, grid: Grid, poll_interval: float = 0.5) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self._sent: dict[str, tuple[int, str]] = {}  # message id -> (node id, message type)

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def push(
        self, items: Sequence[tuple[int, FitIns | EvaluateIns]], group: str, ttl: float | None
    ) -> list[str | None]:
        """Send each ``(node, instruction)``; returns a message ID per item (None if the SuperLink refused it)."""
        messages = []
        for node, ins in items:
            if isinstance(ins, FitIns):
                content, kind = compat.fitins_to_recorddict(ins, keep_input=True), MessageType.TRAIN
            else:
                content, kind = compat.evaluateins_to_recorddict(ins, keep_input=True), MessageType.EVALUATE
            messages.append(Message(content=content, dst_node_id=int(node), message_type=kind, ttl=ttl, group_id=group))
        ids = list(self.grid.push_messages(messages)) if messages else []
        if len(ids) != len(items):
            raise RuntimeError(f"the grid returned {len(ids)} message IDs for {len(items)} messages")
        out: list[str | None] = []
        for (node, ins), mid in zip(items, ids):
            out.append(str(mid) if mid else None)
            if mid:
                self._sent[str(mid)] = (int(node), MessageType.TRAIN if isinstance(ins, FitIns) else MessageType.EVALUATE)
        return out

    def pull(self, ids: Iterable[str]) -> list[Reply]:
        wanted = [i for i in ids if i in self._sent]
        if not wanted:
            return []
        replies = []
        for message in self.grid.pull_messages(wanted):
            mid = message.metadata.reply_to_message_id
            if mid not in self._sent:
                log(WARNING, "scheduler: a reply to an unknown message %r was ignored", mid)
                continue
            node, kind = self._sent.pop(mid)
            replies.append(self._convert(mid, node, kind, message))
        return replies

    def wait(self, ids: Iterable[str], count: int | None = None, until: float | None = None) -> list[Reply]:
        """Pull until ``count`` replies (default: all of ``ids``) arrived or ``time.monotonic()`` passes ``until``."""
        pending = set(ids)
        need = len(pending) if count is None else min(count, len(pending))
        got: list[Reply] = []
        while pending and len(got) < need:
            new = self.pull(sorted(pending))
            got.extend(new)
            pending -= {r.message_id for r in new}
            if len(got) >= need or not pending:
                break
            if until is not None and time.monotonic() >= until:
                break
            pause = self.poll_interval if until is None else min(self.poll_interval, max(until - time.monotonic(), 0.0))
            time.sleep(pause)
        return got

    def forget(self, ids: Iterable[str]) -> None:
        """Stop expecting replies to ``ids`` (late work whose replies are dropped unread)."""
        for i in ids:
            self._sent.pop(i, None)

    @staticmethod
    def _convert(mid: str, node: int, kind: str, message: Message) -> Reply:
        if message.has_error():
            return Reply(mid, node, None, f"node {node}: {message.error.reason}")
        try:
            if kind == MessageType.TRAIN:
                result: FitRes | EvaluateRes = compat.recorddict_to_fitres(message.content, keep_input=False)
            else:
                result = compat.recorddict_to_evaluateres(message.content)
        except Exception as err:  # noqa: BLE001 - a malformed reply is that client's failure
            return Reply(mid, node, None, f"node {node}: unreadable reply: {type(err).__name__}: {err}")
        if result.status.code != Code.OK:
            return Reply(mid, node, None, f"node {node}: {result.status.message}")
        return Reply(mid, node, result)


class GridClientManager(SimpleClientManager):
    """The Grid's nodes as `NodeProxy`s, refreshed whenever the strategy shell asks who is there."""

    def __init__(self, transport: GridTransport) -> None:
        super().__init__()
        self.transport = transport

    def refresh(self) -> None:
        ids = set(self.transport.node_ids())
        current = SimpleClientManager.all(self)
        for cid, proxy in list(current.items()):
            if int(cid) not in ids:
                self.unregister(proxy)
        for node in ids - {int(c) for c in current}:
            self.register(NodeProxy(node))

    def num_available(self) -> int:
        self.refresh()
        return super().num_available()

    def all(self) -> dict[str, ClientProxy]:
        self.refresh()
        return super().all()

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.num_available() >= num_clients:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.transport.poll_interval * 2, max(deadline - time.monotonic(), 0.0)))


# --------------------------------------------------------------------------------------- simulated time
class DeviceClock:
    """Times a reply on its node's simulated device (`strategies.profiles`), by the partition it reports."""

    def __init__(self, options: ProfileOptions) -> None:
        self.options = options
        self._profiles: dict[int, DeviceProfile] = {}

    def profile(self, partition: int) -> DeviceProfile:
        if partition not in self._profiles:
            self._profiles[partition] = profile_for(self.options, partition)
        return self._profiles[partition]

    def arrival(self, res: FitRes, start: float, download_bytes: int, dispatch: int) -> tuple[float, bool]:
        """When the reply reaches the server in simulated time, and whether the device dropped out on the way.

        Raises:
            ValueError: the reply lacks what its device's time needs (its partition, the examples processed).
        """
        partition, work = res.metrics.get(PARTITION_METRIC), res.metrics.get(WORK_METRIC)
        if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
            raise ValueError(f"device profiles need the client's partition id (metric {PARTITION_METRIC}), got {partition!r}")
        if isinstance(work, bool) or not isinstance(work, (int, float)) or work < 0:
            raise ValueError(f"device profiles need the examples the client processed (metric {WORK_METRIC}), got {work!r}")
        profile = self.profile(partition)
        busy = busy_seconds(profile, float(work), download_bytes, _nbytes(res.parameters))
        point = dropout_point(profile, self.options.seed, partition, dispatch)
        if point is not None:
            return finish_time(profile, start, point * busy), True
        return finish_time(profile, start, busy), False


# ------------------------------------------------------------------------------------- state (a hook)
@dataclass
class InFlight:
    """Work sent and not yet handled."""

    node_id: int
    version: int  # server steps done when it was sent: the model it trains from
    dispatch: int  # the run's dispatch counter when it was sent (seeds dropouts, breaks ties)
    start: float  # when it was sent: simulated seconds (device profiles) or time.monotonic()
    repeat: int = 0  # how many times this node got this version before
    message_id: str = ""
    download_bytes: int = 0
    reply: Reply | None = None
    arrival: float = math.inf  # simulated arrival (or dropout) once the reply is in
    dropped: bool = False

    def as_row(self) -> list[float]:
        return [self.node_id, self.version, self.dispatch, self.start, self.repeat]


class SchedulerState:
    """The scheduler's state as a hook of the strategy shell (checkpointed with it) and FedBuff's staleness weights.

    ``process_updates`` (FedBuff only) scales each update by ``s(tau)`` of its staleness ``tau``
    (`strategies.scheduling.staleness_weight`) before the shell aggregates: the example-weighted mean then
    is ``sum n_i s(tau_i) u_i / sum n_i``, and robust aggregators and FedNova combine the scaled updates.
    """

    name = "scheduler"

    def __init__(self, options: SchedulerOptions) -> None:
        self.options = options
        self.sim_time = 0.0  # simulated seconds so far (device profiles)
        self.dispatches = 0  # fit messages sent so far (in this run and the ones it resumes)
        self.in_flight: list[InFlight] = []  # FedBuff
        self.versions: dict[int, NDArrays] = {}  # FedBuff: weights of older versions work in flight started from
        self.repeats: dict[int, int] = {}  # FedBuff: node -> times it got the newest version
        self.version = 0  # FedBuff: server steps done (the newest version is the strategy's weights)

    @property
    def reads_updates(self) -> bool:
        return self.options.asynchronous

    def fit_config(self, rnd: int, num_available: int, num_sampled: int) -> Mapping[str, Scalar] | None:
        return {}

    def preprocess(self, results: FitResults, failures: FitFailures) -> tuple[FitResults, FitFailures]:
        return results, failures

    def process_updates(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        taus = []
        for u in updates:
            tau = int(u.metrics.pop(STALENESS_METRIC, 0))
            taus.append(tau)
            weight = staleness_weight(self.options.staleness_weighting, tau, self.options.staleness)
            if weight != 1.0:
                u.update = [np.multiply(a, np.float32(weight), dtype=np.float32) for a in u.update]
        if taus:
            record.extra.update(staleness_mean=float(np.mean(taus)), staleness_max=float(max(taus)))
        return updates

    def after_fit(self, record: RoundRecord) -> None:
        pass

    def end_round(self, record: RoundRecord) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        held = {f.version for f in self.in_flight}
        return {
            "sim_time": float(self.sim_time),
            "dispatches": int(self.dispatches),
            "in_flight": [f.as_row() for f in sorted(self.in_flight, key=lambda f: f.dispatch)],
            "versions": [{"version": v, "weights": list(w)} for v, w in sorted(self.versions.items())
                         if v in held and v != self.version],
            "repeats": [[node, count] for node, count in sorted(self.repeats.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None:  # a checkpoint written without the scheduler (mode and profiles are fixed on resume)
            return
        self.sim_time = float(state["sim_time"])
        self.dispatches = int(state["dispatches"])
        self.in_flight = [
            InFlight(int(n), int(v), int(d), float(s), int(r)) for n, v, d, s, r in state.get("in_flight", [])
        ]
        self.versions = {int(e["version"]): [np.asarray(w, dtype=np.float32) for w in e["weights"]]
                         for e in state.get("versions", [])}
        self.repeats = {int(n): int(c) for n, c in state.get("repeats", [])}


def scheduler_state(strategy: FederatedStrategy) -> SchedulerState:
    for hook in strategy.hooks:
        if isinstance(hook, SchedulerState):
            return hook
    raise ValueError("the strategy has no SchedulerState hook: build it with server_app.make_strategy")


# ---------------------------------------------------------------------------------------------- shared
def _nbytes(parameters: Parameters) -> int:
    return sum(len(t) for t in parameters.tensors)


def _ttl(options: SchedulerOptions, clock: DeviceClock | None) -> float | None:
    """The messages' time to live: round-timeout, else a real-time deadline, else Flower's default."""
    if options.round_timeout > 0:
        return options.round_timeout
    if clock is None and options.round_deadline > 0:
        return options.round_deadline
    return None


def evaluate_round(
    transport: GridTransport, strategy: FederatedStrategy, manager: GridClientManager, rnd: int,
    parameters: Parameters, ttl: float | None,
) -> None:
    """Federated evaluation, as the legacy loop does it (the shell finishes the round either way)."""
    instructions = strategy.configure_evaluate(rnd, parameters, manager)
    if not instructions:
        return
    ids = transport.push([(int(p.cid), ins) for p, ins in instructions], str(rnd), ttl)
    proxies = {int(p.cid): p for p, _ in instructions}
    results: list[tuple[ClientProxy, EvaluateRes]] = []
    failures: list[tuple[ClientProxy, EvaluateRes] | BaseException] = []
    failures += [RuntimeError(f"node {p.cid}: the SuperLink refused the message") for (p, _), i in zip(instructions, ids)
                 if i is None]
    for reply in transport.wait([i for i in ids if i is not None]):
        if reply.result is None:
            failures.append(RuntimeError(reply.error))
        else:
            results.append((proxies[reply.node_id], reply.result))  # type: ignore[arg-type]
    strategy.aggregate_evaluate(rnd, results, failures)


# -------------------------------------------------------------------------------------- synchronous
@dataclass
class _Sent:
    proxy: ClientProxy
    message_id: str | None
    dispatch: int
    download_bytes: int


def run_sync(
    grid: Grid, strategy: FederatedStrategy, options: SchedulerOptions, profiles: ProfileOptions | None,
    num_rounds: int,
) -> None:
    """``num_rounds`` synchronous rounds with the run's deadline, over-selection and simulated devices."""
    state = scheduler_state(strategy)
    transport = GridTransport(grid, options.poll_interval)
    manager = GridClientManager(transport)
    clock = DeviceClock(profiles) if profiles is not None else None
    ttl = _ttl(options, clock)
    parameters = strategy.initialize_parameters(manager)
    assert parameters is not None
    strategy.evaluate(0, parameters)
    for rnd in range(1, num_rounds + 1):
        instructions = strategy.configure_fit(rnd, parameters, manager)
        record = strategy.open_round(rnd)
        if instructions:
            results, failures = _fit_round(transport, strategy, state, options, clock, rnd, instructions, record, ttl)
            aggregated, _ = strategy.aggregate_fit(rnd, results, failures)
            if aggregated is not None:
                parameters = aggregated
        strategy.evaluate(rnd, parameters)
        evaluate_round(transport, strategy, manager, rnd, parameters, ttl)


def _fit_round(
    transport: GridTransport, strategy: FederatedStrategy, state: SchedulerState, options: SchedulerOptions,
    clock: DeviceClock | None, rnd: int, instructions: list[tuple[ClientProxy, FitIns]], record: RoundRecord,
    ttl: float | None,
) -> tuple[FitResults, FitFailures]:
    needed, sampled = strategy.cohort
    close_at = needed if sampled > needed else 0  # over-selection: the round closes at the needed-th report
    ids = transport.push([(int(p.cid), ins) for p, ins in instructions], str(rnd), ttl)
    sent = []
    for (proxy, ins), mid in zip(instructions, ids):
        sent.append(_Sent(proxy, mid, state.dispatches, _nbytes(ins.parameters)))
        state.dispatches += 1
    by_id = {s.message_id: s for s in sent if s.message_id is not None}
    failures: FitFailures = [RuntimeError(f"node {s.proxy.cid}: the SuperLink refused the message")
                             for s in sent if s.message_id is None]
    if clock is not None:
        return _simulated_round(transport, state, options, clock, rnd, sent, by_id, failures, close_at, record)
    start = time.monotonic()
    until = start + options.round_deadline if options.round_deadline > 0 else None
    pending = set(by_id)
    arrived: list[Reply] = []
    ok = 0
    while pending:
        want = close_at - ok if close_at else None
        batch = transport.wait(sorted(pending), count=want if want is None else max(want, 1), until=until)
        batch.sort(key=lambda r: by_id[r.message_id].dispatch)  # one pull's replies in sending order
        for reply in batch:
            pending.discard(reply.message_id)
            arrived.append(reply)
            ok += reply.result is not None
        if (close_at and ok >= close_at) or (until is not None and time.monotonic() >= until):
            break
    results: FitResults = []
    late = len(pending)
    for reply in arrived:
        if reply.result is None:
            failures.append(RuntimeError(reply.error))
        elif close_at and len(results) >= close_at:
            late += 1  # came in the same pull as the needed-th
        else:
            results.append((by_id[reply.message_id].proxy, reply.result))  # type: ignore[arg-type]
    transport.forget(pending)
    record.extra["late"] = float(late)
    if late:
        log(INFO, "round %d: %d of %d sampled clients reported in time (needed %d, deadline %s); %d late, dropped",
            record.round, len(results), len(sent), needed,
            f"{options.round_deadline:g}s" if options.round_deadline > 0 else "none", late)
    return results, failures


def _simulated_round(
    transport: GridTransport, state: SchedulerState, options: SchedulerOptions, clock: DeviceClock, rnd: int,
    sent: list[_Sent], by_id: dict[str, _Sent], failures: FitFailures, close_at: int, record: RoundRecord,
) -> tuple[FitResults, FitFailures]:
    """Every reply is awaited for real, then the round is cut in simulated time."""
    start = state.sim_time
    replies = transport.wait(list(by_id))
    candidates: list[tuple[float, Reply]] = []
    notices: list[float] = []  # when the server learns of a dropout or failure
    dropped = 0
    for reply in sorted(replies, key=lambda r: by_id[r.message_id].dispatch):
        s = by_id[reply.message_id]
        if reply.result is None:
            failures.append(RuntimeError(reply.error))
            notices.append(start)
            continue
        try:
            arrival, gone = clock.arrival(reply.result, start, s.download_bytes, s.dispatch)  # type: ignore[arg-type]
        except ValueError as err:
            failures.append(RuntimeError(f"node {reply.node_id}: {err}"))
            notices.append(start)
            continue
        if gone:
            dropped += 1
            notices.append(arrival)
        else:
            candidates.append((arrival, reply))
    selection = select_in_time([a for a, _ in candidates], start, options.round_deadline, close_at)
    end = selection.end
    if not (close_at and len(selection.accepted) == close_at):  # the round waited for everyone it could
        limit = start + options.round_deadline if options.round_deadline > 0 else math.inf
        end = max([end, *(t for t in notices if t <= limit)])
    results: FitResults = [(by_id[candidates[i][1].message_id].proxy, candidates[i][1].result)  # type: ignore[misc]
                           for i in selection.accepted]
    state.sim_time = end
    record.extra.update(late=float(len(selection.late)), dropped=float(dropped), sim_seconds=end - start, sim_time=end)
    log(INFO, "round %d: simulated %.1fs (total %.1fs): %d of %d sampled clients in time, %d late, %d dropped out",
        record.round, end - start, end, len(results), len(sent), len(selection.late), dropped)
    return results, failures


# --------------------------------------------------------------------------------------------- FedBuff
class FedBuff:
    """Buffered asynchronous aggregation over a `Grid` (see the module docstring)."""

    def __init__(
        self, grid: Grid, strategy: FederatedStrategy, options: SchedulerOptions, profiles: ProfileOptions | None,
        num_steps: int,
    ) -> None:
        self.strategy = strategy
        self.state = scheduler_state(strategy)
        self.options = options
        self.transport = GridTransport(grid, options.poll_interval)
        self.manager = GridClientManager(self.transport)
        self.clock = DeviceClock(profiles) if profiles is not None else None
        self.ttl = _ttl(options, self.clock)
        self.num_steps = num_steps
        self.version = strategy.start_round  # server steps done (in the runs this one resumes too)
        self.state.version = self.version
        self.step = 0  # steps done in this run
        self.buffer: FitResults = []
        self.buffer_nodes: set[int] = set()
        self.failures: FitFailures = []
        self.counts = {"dropped": 0, "stale": 0}
        self.step_start_time = self.state.sim_time
        self.ready: list[InFlight] = []  # real time: handled replies wait here in arrival order
        self.nodes: list[int] = []
        self._nodes_at = -math.inf
        self._params: tuple[int, Parameters] | None = None
        self.concurrency = 0
        self.buffer_size = 0

    # ----------------------------------------------------------------------------------------- run
    def run(self) -> None:
        parameters = self.strategy.initialize_parameters(self.manager)
        assert parameters is not None
        self.strategy.evaluate(0, parameters)
        if self.num_steps <= 0:
            return
        needed = self.strategy.options.min_available_clients
        if not self.manager.wait_for(needed, timeout=int(self.strategy.options.client_wait_timeout)):
            log(WARNING, "fedbuff: only %d of min-available-clients %d connected; going on with them",
                self.manager.num_available(), needed)
        self._refresh_nodes(force=True)
        available = len(self.nodes)
        self.concurrency = min(available, self.options.concurrency or cohort_size(
            available, self.options.fraction_fit, self.options.min_fit_clients))
        self.buffer_size = min(self.options.buffer_size, self.concurrency)
        if self.buffer_size < self.options.buffer_size:
            log(WARNING, "fedbuff: async-buffer-size %d is more than the %d clients training at once; using %d",
                self.options.buffer_size, self.concurrency, self.buffer_size)
        log(INFO, "fedbuff: %d clients training at once, a server step every %d updates, staleness weighting %s, "
            "%s time", self.concurrency, self.buffer_size, self.options.staleness_weighting,
            "simulated" if self.clock else "real")
        self.strategy.open_round(1)
        self._resend_in_flight()
        self._refill()
        while self.step < self.num_steps:
            if not self.state.in_flight:
                log(WARNING, "fedbuff: no client left to train (none connected); stopping after %d steps", self.step)
                break
            self._handle(self._next_event())
            if len(self.buffer) >= self.buffer_size:
                self._server_step()
            if self.step < self.num_steps:
                self._refill()

    # ----------------------------------------------------------------------------------- dispatch
    def _refresh_nodes(self, force: bool = False) -> None:
        if force or time.monotonic() - self._nodes_at > 5.0:
            self.nodes = self.transport.node_ids()
            self._nodes_at = time.monotonic()

    def _now(self) -> float:
        return self.state.sim_time if self.clock is not None else time.monotonic()

    def _parameters(self, version: int, weights: NDArrays) -> Parameters:
        if self._params is None or self._params[0] != version:
            self._params = (version, self.strategy.parameters_of(weights))
        return self._params[1]

    def _send(self, flight: InFlight, weights: NDArrays) -> None:
        config: dict[str, Scalar] = {"server-round": flight.version + 1}
        if flight.repeat:
            config[REPEAT_KEY] = flight.repeat
        parameters = self._parameters(flight.version, weights) if flight.version == self.version else \
            self.strategy.parameters_of(weights)
        (mid,) = self.transport.push([(flight.node_id, FitIns(parameters, config))], str(flight.version + 1), self.ttl)
        flight.download_bytes = _nbytes(parameters)
        record = self.strategy.open_round(self.step + 1)
        record.clients_sampled += 1
        record.bytes_sent += flight.download_bytes
        if mid is None:
            self.failures.append(RuntimeError(f"node {flight.node_id}: the SuperLink refused the message"))
            return
        flight.message_id = mid
        self.state.in_flight.append(flight)
        if flight.version < self.version:
            self.state.versions.setdefault(flight.version, weights)
        elif flight.version == self.version:
            self.state.versions[self.version] = self.strategy.weights  # kept for checkpoints once it is old

    def _idle(self) -> list[int]:
        busy = {f.node_id for f in self.state.in_flight} | self.buffer_nodes
        return [n for n in self.nodes if n not in busy]

    def _choose(self, candidates: list[int], dispatch: int) -> int:
        rng = random.Random(zlib.crc32(f"{self.options.seed}:{dispatch}:fedbuff".encode()))
        return rng.choice(sorted(candidates))

    def _refill(self) -> None:
        self._refresh_nodes()
        while len(self.state.in_flight) < self.concurrency:
            idle = self._idle()
            if not idle:
                return
            node = self._choose(idle, self.state.dispatches)
            repeat = self.state.repeats.get(node, 0)
            self.state.repeats[node] = repeat + 1
            flight = InFlight(node, self.version, self.state.dispatches, self._now(), repeat)
            self.state.dispatches += 1
            self._send(flight, self.strategy.weights)

    def _resend_in_flight(self) -> None:
        """Resume: the work in flight at the checkpoint goes out again, as it was first sent."""
        saved, self.state.in_flight = self.state.in_flight, []
        if saved:
            log(INFO, "fedbuff: resuming with %d clients' work in flight at the checkpoint; sending it again", len(saved))
        for flight in sorted(saved, key=lambda f: f.dispatch):
            if flight.node_id not in self._idle():
                idle = self._idle()
                if not idle:
                    log(WARNING, "fedbuff: no node to resend the work of node %d to; dropped", flight.node_id)
                    continue
                moved = self._choose(idle, flight.dispatch)
                log(WARNING, "fedbuff: node %d of the checkpoint is gone; its work goes to node %d",
                    flight.node_id, moved)
                flight.node_id = moved
            weights = self.strategy.weights if flight.version == self.version else self.state.versions.get(flight.version)
            if weights is None:
                log(WARNING, "fedbuff: the checkpoint lacks model version %d; node %d starts from the newest",
                    flight.version, flight.node_id)
                flight.version, weights = self.version, self.strategy.weights
            self._send(InFlight(flight.node_id, flight.version, flight.dispatch, flight.start, flight.repeat), weights)

    # ------------------------------------------------------------------------------------- events
    def _next_event(self) -> InFlight:
        by_id = {f.message_id: f for f in self.state.in_flight}
        if self.clock is None:  # real time: in order of arrival
            while not self.ready:
                for reply in sorted(self.transport.wait(list(by_id), count=1),
                                    key=lambda r: by_id[r.message_id].dispatch):
                    by_id[reply.message_id].reply = reply
                    self.ready.append(by_id[reply.message_id])
            return self.ready.pop(0)
        missing = [f.message_id for f in self.state.in_flight if f.reply is None]
        if missing:
            for reply in self.transport.wait(missing):
                flight = by_id[reply.message_id]
                flight.reply = reply
                self._time(flight)
        return min(self.state.in_flight, key=lambda f: (f.arrival, f.dispatch))

    def _time(self, flight: InFlight) -> None:
        assert self.clock is not None and flight.reply is not None
        result = flight.reply.result
        if result is None:
            flight.arrival = flight.start  # a failure is known at once
            return
        try:
            flight.arrival, flight.dropped = self.clock.arrival(result, flight.start, flight.download_bytes,  # type: ignore[arg-type]
                                                                flight.dispatch)
        except ValueError as err:
            flight.reply = Reply(flight.message_id, flight.node_id, None, f"node {flight.node_id}: {err}")
            flight.arrival = flight.start

    def _handle(self, flight: InFlight) -> None:
        self.state.in_flight.remove(flight)
        if self.clock is not None:
            self.state.sim_time = max(self.state.sim_time, flight.arrival)
        reply = flight.reply
        assert reply is not None
        if reply.result is None:
            self.failures.append(RuntimeError(reply.error))
        elif flight.dropped:
            self.counts["dropped"] += 1
        else:
            tau = self.version - flight.version
            if self.options.max_staleness and tau > self.options.max_staleness:
                self.counts["stale"] += 1
                log(INFO, "fedbuff: dropped an update from node %d, %d steps old (max-staleness %d)",
                    flight.node_id, tau, self.options.max_staleness)
            else:
                result = reply.result
                assert isinstance(result, FitRes)
                result.metrics[STALENESS_METRIC] = tau
                self.buffer.append((NodeProxy(flight.node_id), result))
                self.buffer_nodes.add(flight.node_id)
        self._release_versions()

    def _release_versions(self) -> None:
        held = {f.version for f in self.state.in_flight} | {self.version}
        for v in [v for v in self.state.versions if v not in held]:
            del self.state.versions[v]

    def _server_step(self) -> None:
        self.step += 1
        record = self.strategy.open_round(self.step)
        results, failures = self.buffer, self.failures
        self.buffer, self.failures, self.buffer_nodes = [], [], set()
        aggregated, _ = self.strategy.aggregate_fit(self.step, results, failures)
        self.version += 1
        self.state.version = self.version
        self.state.repeats = {}
        record.extra.update(dropped=float(self.counts["dropped"]), stale=float(self.counts["stale"]),
                            in_flight=float(len(self.state.in_flight)))
        if self.clock is not None:
            record.extra.update(sim_seconds=self.state.sim_time - self.step_start_time, sim_time=self.state.sim_time)
            self.step_start_time = self.state.sim_time
        self.counts = {"dropped": 0, "stale": 0}
        self.state.versions[self.version] = self.strategy.weights
        self._release_versions()
        parameters = aggregated if aggregated is not None else self.strategy.parameters_of(self.strategy.weights)
        self.strategy.evaluate(self.step, parameters)
        if self.step == self.num_steps and self.options.fraction_evaluate > 0:
            evaluate_round(self.transport, self.strategy, self.manager, self.step, parameters, self.ttl)
        else:
            self.strategy.close_round()


def run_scheduled(
    grid: Grid, strategy: FederatedStrategy, options: SchedulerOptions, profiles: ProfileOptions | None,
    num_rounds: int,
) -> None:
    """The run's rounds (sync) or server steps (async) over ``grid``."""
    if options.asynchronous:
        FedBuff(grid, strategy, options, profiles, num_rounds).run()
    else:
        run_sync(grid, strategy, options, profiles, num_rounds)
