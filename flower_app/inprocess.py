"""Run the app's server and clients in one process, without Ray or a SuperLink (tests, benchmarks).

Two drivers. `run_rounds` reproduces the legacy server loop's message flow (configure_fit -> fit
on each client -> aggregate_fit -> evaluate -> configure_evaluate -> evaluate on each client ->
aggregate_evaluate) between a strategy and NumPyClients, with the same (de)serialization of arrays.
`InProcessGrid` is a `Grid` that hands Flower's own messages to a `ClientApp`, so the real ServerApp
main (`server_app.run_server`, the SecAgg+ workflow included) runs end to end. `flwr run` remains
the way to run the app.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.client import ClientApp, NumPyClient
from flwr.common import Code, EvaluateRes, FitRes, Status
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from strategies.wire import from_parameters, is_packed, to_parameters


class LocalProxy(ClientProxy):
    """A ClientProxy that calls a NumPyClient in this process."""

    def __init__(self, cid: str, client: NumPyClient) -> None:
        super().__init__(cid)
        self.client = client

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        # as the ClientApp's `ArrayClient`: the reply in the format of the request (copies, as np.load makes)
        arrays, n, metrics = self.client.fit([a.copy() for a in from_parameters(ins.parameters)], ins.config)
        return FitRes(Status(Code.OK, ""), to_parameters(arrays, is_packed(ins.parameters)), n, metrics)

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        loss, n, metrics = self.client.evaluate([a.copy() for a in from_parameters(ins.parameters)], ins.config)
        return EvaluateRes(Status(Code.OK, ""), loss, n, metrics)

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class DetachedProxy(ClientProxy):
    """A client known only by its id: the caller builds its replies and hands them to the strategy.

    For driving `aggregate_fit` / `aggregate_evaluate` directly (tests, benchmarks); never called.
    """

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class TimedClient(NumPyClient):
    """Delegates to a NumPyClient and records the seconds of each fit (benchmarks: seconds per client and round)."""

    def __init__(self, client: NumPyClient, seconds: list[float]) -> None:
        self.client = client
        self.seconds = seconds

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.client.get_parameters(config)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        start = time.perf_counter()
        result = self.client.fit(parameters, config)
        self.seconds.append(time.perf_counter() - start)
        return result

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return self.client.evaluate(parameters, config)


def run_rounds(strategy: Strategy, clients: Sequence[NumPyClient], num_rounds: int) -> None:
    """Run `num_rounds` rounds of `strategy` over `clients`; client exceptions (fit or evaluate) become failures."""
    manager = SimpleClientManager()
    for i, client in enumerate(clients):
        manager.register(LocalProxy(str(i), client))
    parameters = strategy.initialize_parameters(manager)
    assert parameters is not None, "the strategy must provide initial parameters"
    strategy.evaluate(0, parameters)
    for rnd in range(1, num_rounds + 1):
        results, failures = [], []
        for proxy, ins in strategy.configure_fit(rnd, parameters, manager):
            try:
                results.append((proxy, proxy.fit(ins, None, rnd)))
            except Exception as err:  # noqa: BLE001 - Flower turns client errors into failures too
                failures.append(err)
        new_parameters, _ = strategy.aggregate_fit(rnd, results, failures)  # type: ignore[arg-type]
        if new_parameters is not None:
            parameters = new_parameters
        strategy.evaluate(rnd, parameters)
        instructions = strategy.configure_evaluate(rnd, parameters, manager)
        if instructions:
            replies, eval_failures = [], []
            for evaluator, eval_ins in instructions:
                try:
                    replies.append((evaluator, evaluator.evaluate(eval_ins, None, rnd)))
                except Exception as err:  # noqa: BLE001 - as in fit: a failing client is a failure
                    eval_failures.append(err)
            strategy.aggregate_evaluate(rnd, replies, eval_failures)  # type: ignore[arg-type]


def run_statistics(strategy: Any, clients: Sequence[NumPyClient]) -> None:
    """The statistics round of a strategy with a statistics step (federated preprocessing), as `run_server` runs it
    before training: one round of the same loop, then `finish_statistics` (which raises if it did not complete)."""
    if strategy.statistics_phase:
        run_rounds(strategy, clients, 1)
        strategy.finish_statistics()


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

    def _deliver(self, message: Message, message_id: str) -> Message:
        # As Flower's own grids do: the message gets its ID when pushed, and its reply names it.
        message.metadata.__dict__["_message_id"] = message_id
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
                self._next_id += 1
                ids.append(str(self._next_id))
                self._replies[ids[-1]] = self._deliver(message, ids[-1])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
