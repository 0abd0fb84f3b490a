"""Drive a Flower strategy and NumPyClients in one process, without Ray or a SuperLink.

This reproduces the legacy server loop's message flow (configure_fit -> fit on each client ->
aggregate_fit -> evaluate -> configure_evaluate -> evaluate on each client -> aggregate_evaluate),
with the same (de)serialization of arrays, so tests and benchmarks can run many rounds of the real
strategy and client code quickly and deterministically. `flwr run` remains the way to run the app.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.client import NumPyClient
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy


class LocalProxy(ClientProxy):
    """A ClientProxy that calls a NumPyClient in this process."""

    def __init__(self, cid: str, client: NumPyClient) -> None:
        super().__init__(cid)
        self.client = client

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        arrays, n, metrics = self.client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        loss, n, metrics = self.client.evaluate(parameters_to_ndarrays(ins.parameters), ins.config)
        return EvaluateRes(Status(Code.OK, ""), loss, n, metrics)

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def run_rounds(strategy: Strategy, clients: Sequence[NumPyClient], num_rounds: int) -> None:
    """Run `num_rounds` rounds of `strategy` over `clients`; client exceptions become failures."""
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
            replies = [(proxy, proxy.evaluate(ins, None, rnd)) for proxy, ins in instructions]
            strategy.aggregate_evaluate(rnd, replies, [])
