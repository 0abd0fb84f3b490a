"""Contract tests of FederatedStrategy, run over every registered rule and aggregator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies import STRATEGIES
from strategies.aggregators import AGGREGATORS, AggregatorParams
from strategies.base import FederatedStrategy, StrategyOptions, aggregate_metrics
from strategies.compression import CompressionConfig, compress
from strategies.hooks import ClientUpdate, RoundRecord
from strategies.optimizers import ServerOptHParams
from tests.strategy_utils import client_manager, eval_res, fit_res, to_arrays

SHAPES = [(3, 2), (2,), (2,)]  # a weight, a bias, a buffer
TRAINABLE = [True, True, False]


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def combos() -> list[tuple[str, str]]:
    return [(r, a) for r in sorted(STRATEGIES) for a in sorted(AGGREGATORS) if not (r == "fednova" and a != "mean")]


def make(rule: str = "fedavg", aggregator: str = "mean", **kw: object) -> FederatedStrategy:
    settings: dict = {"min_fit_clients": 1, "min_evaluate_clients": 1, "min_available_clients": 1, "client_wait_timeout": 0.1}
    optimizer = ServerOptHParams(learning_rate=kw.pop("lr", 1.0), momentum=kw.pop("momentum", 0.0))  # type: ignore[arg-type]
    settings.update(kw)
    options = StrategyOptions(
        rule=rule,
        aggregator=aggregator,
        aggregator_params=AggregatorParams(trim_fraction=0.2, num_byzantine=1),
        optimizer=optimizer,
        **settings,
    )
    return FederatedStrategy(options, initial_weights(), TRAINABLE)


def reply(strategy: FederatedStrategy, arrays: list[np.ndarray], n: int, steps: int = 4) -> object:
    """What a well-behaved client of this rule sends back, given its local weights."""
    payload = arrays
    if strategy.kind == "delta":
        payload = [a - w for a, w in zip(arrays, strategy.weights)]
    elif strategy.kind == "gradient":
        payload = [w - a for a, w in zip(arrays, strategy.weights)]  # a gradient that lr=1 turns into `arrays`
    wire, _ = compress(payload, strategy.options.compression)
    if strategy.rule.scaffold:
        wire = wire + [np.full(s, 0.1, np.float32) for s, t in zip(SHAPES, TRAINABLE) if t]
    return fit_res(wire, n, local_steps=steps, train_loss=1.0)


def run_round(strategy: FederatedStrategy, client_weights: list[list[np.ndarray]], ns: list[int]) -> tuple[object, dict]:
    manager, proxies = client_manager(len(client_weights))
    instructions = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    assert len(instructions) == len(client_weights)
    results = [(proxies[i], reply(strategy, w, n)) for i, (w, n) in enumerate(zip(client_weights, ns))]
    return strategy.aggregate_fit(1, results, [])


def _fit(strategy: FederatedStrategy, manager: object) -> list:
    return strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]


def honest_clients(n: int = 5) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(1)
    return [[w + 0.01 * rng.normal(size=w.shape).astype(np.float32) for w in initial_weights()] for _ in range(n)]


@pytest.mark.parametrize(("rule", "aggregator"), combos())
def test_every_rule_aggregates_hand_made_replies(rule: str, aggregator: str) -> None:
    strategy = make(rule, aggregator)
    params, _metrics = run_round(strategy, honest_clients(), [10, 20, 30, 40, 50])
    assert params is not None
    out = to_arrays(params)
    assert [a.shape for a in out] == SHAPES
    assert all(np.isfinite(a).all() for a in out)
    # Honest clients sit within 0.05 of the start: no rule may move further than a few steps of that.
    assert max(float(np.abs(a - w).max()) for a, w in zip(out, initial_weights())) < 0.5
    assert strategy._record is not None and strategy._record.results == 5 and strategy._record.rejected == 0


@pytest.mark.parametrize(("rule", "aggregator"), combos())
def test_zero_replies_and_only_failures_keep_the_model(rule: str, aggregator: str) -> None:
    strategy = make(rule, aggregator)
    manager, _ = client_manager(3)
    strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    params, _ = strategy.aggregate_fit(1, [], [RuntimeError("node lost")])
    assert params is None
    assert all(np.array_equal(a, b) for a, b in zip(strategy.weights, initial_weights()))
    assert strategy._record is not None and strategy._record.failures == 1


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "corrupt",
    [
        lambda ws: [ws[0][:2], *ws[1:]],  # wrong shape
        lambda ws: ws[:-1],  # missing array
        lambda ws: [np.full_like(ws[0], np.nan), *ws[1:]],  # NaN
        lambda ws: [ws[0], np.full_like(ws[1], np.inf), ws[2]],  # Inf
        lambda ws: [ws[0].astype(np.int32), *ws[1:]],  # integer dtype
    ],
    ids=["shape", "count", "nan", "inf", "dtype"],
)
def test_a_malformed_update_is_rejected_and_cannot_touch_the_model(rule: str, corrupt: object) -> None:
    clients = honest_clients(4)
    reference = make(rule)
    expected, _ = run_round(reference, clients, [10, 20, 30, 40])
    strategy = make(rule)
    manager, proxies = client_manager(5)
    strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    results = [(proxies[i], reply(strategy, w, n)) for i, (w, n) in enumerate(zip(clients, [10, 20, 30, 40]))]
    bad = reply(strategy, clients[0], 1000)
    bad.parameters = fit_res(corrupt(to_arrays(bad.parameters)), 1000).parameters  # type: ignore[attr-defined, operator]
    results.append((proxies[4], bad))
    params, _ = strategy.aggregate_fit(1, results, [])
    assert strategy._record is not None and strategy._record.rejected == 1
    assert params is not None and expected is not None
    for got, want in zip(to_arrays(params), to_arrays(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_non_positive_example_counts_are_rejected() -> None:
    strategy = make()
    manager, proxies = client_manager(2)
    strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    results = [(proxies[0], fit_res(initial_weights(), 0)), (proxies[1], fit_res(initial_weights(), 5))]
    strategy.aggregate_fit(1, results, [])
    assert strategy._record is not None and strategy._record.rejected == 1


def test_fedavg_hand_computed() -> None:
    # (1*[1,2] + 3*[3,4]) / 4 = [2.5, 3.5] for every array.
    strategy = make()
    a = [np.full(s, 1.0, np.float32) for s in SHAPES]
    b = [np.full(s, 3.0, np.float32) for s in SHAPES]
    a[1][:] = [1.0, 2.0]
    b[1][:] = [3.0, 4.0]
    params, _ = run_round(strategy, [a, b], [1, 3])
    out = to_arrays(params)
    np.testing.assert_allclose(out[1], [2.5, 3.5])
    np.testing.assert_allclose(out[0], np.full(SHAPES[0], 2.5))
    np.testing.assert_allclose(out[2], np.full(SHAPES[2], 2.5))


@pytest.mark.parametrize(("rule", "overrides"), [("fedavgm", {"momentum": 0.0}), ("fedprox", {}), ("fedsgd", {})])
def test_rules_that_reduce_to_fedavg(rule: str, overrides: dict) -> None:
    """FedAvgM with momentum 0 and lr 1, FedProx's server side, FedSGD with lr 1 on w - g all equal FedAvg."""
    clients, ns = honest_clients(), [3, 1, 4, 1, 5]
    want, _ = run_round(make("fedavg"), clients, ns)
    got, _ = run_round(make(rule, **overrides), clients, ns)
    for g, w in zip(to_arrays(got), to_arrays(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_compression_none_is_bit_identical_to_plain_fedavg_also_with_deltas() -> None:
    clients, ns = honest_clients(), [3, 1, 4, 1, 5]
    plain, _ = run_round(make("fedavg"), clients, ns)
    none_codec, _ = run_round(make("fedavg", compression=CompressionConfig("none")), clients, ns)
    assert all(np.array_equal(a, b) for a, b in zip(to_arrays(plain), to_arrays(none_codec)))
    delta, _ = run_round(make("fedavg", send_delta=True), clients, ns)
    for a, b in zip(to_arrays(plain), to_arrays(delta)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_int8_deltas_stay_within_the_quantization_bound() -> None:
    clients, ns = honest_clients(), [1, 1, 1, 1, 1]
    plain, _ = run_round(make("fedavg"), clients, ns)
    quant, _ = run_round(make("fedavg", send_delta=True, compression=CompressionConfig("int8")), clients, ns)
    # Each client's delta is off by at most half a step (max|delta| / 127 / 2), and so is their mean.
    max_delta = max(float(np.abs(c - w).max()) for client in clients for c, w in zip(client, initial_weights()))
    for a, b in zip(to_arrays(plain), to_arrays(quant)):
        assert float(np.abs(a - b).max()) <= max_delta / 127 / 2 + 1e-6


def test_failure_fraction_above_the_limit_keeps_the_model() -> None:
    strategy = make(max_failure_fraction=0.5)
    manager, proxies = client_manager(4)
    strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    results = [(proxies[0], reply(strategy, honest_clients(1)[0], 5))]
    params, _ = strategy.aggregate_fit(1, results, [RuntimeError("a"), RuntimeError("b")])
    assert params is None  # 2 of 3 failed > 0.5
    params, _ = strategy.aggregate_fit(1, results * 2, [RuntimeError("a")])
    assert params is not None  # 1 of 3 failed <= 0.5


@pytest.mark.parametrize(("rule", "aggregator"), combos())
def test_state_round_trips_and_a_resumed_strategy_continues_identically(rule: str, aggregator: str) -> None:
    kw = {"lr": 0.5, "momentum": 0.5} if rule == "fedavgm" else {"lr": 0.1} if rule in ("fedadam", "fedyogi", "fedadagrad") else {}
    rounds = [honest_clients(5) for _ in range(3)]
    ns = [10, 20, 30, 40, 50]
    straight = make(rule, aggregator, **kw)
    for clients in rounds:
        run_round(straight, clients, ns)
    first = make(rule, aggregator, **kw)
    run_round(first, rounds[0], ns)
    state = first.state_dict()
    resumed = make(rule, aggregator, **kw)
    resumed.load_state_dict(state)
    for clients in rounds[1:]:
        run_round(resumed, clients, ns)
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)


def test_load_state_dict_rejects_a_different_model() -> None:
    state = make().state_dict()
    state["weights"] = state["weights"][:2]
    with pytest.raises(ValueError, match="checkpoint weights do not fit the model"):
        make().load_state_dict(state)


def test_sampling_fraction_minimum_and_determinism() -> None:
    manager, _ = client_manager(10)
    s1 = make(fraction_fit=0.3, min_fit_clients=2, seed=7)
    s2 = make(fraction_fit=0.3, min_fit_clients=2, seed=7)
    chosen = [c.cid for c, _ in s1.configure_fit(1, s1.initialize_parameters(manager), manager)]  # type: ignore[arg-type]
    assert len(chosen) == 3
    assert chosen == [c.cid for c, _ in s2.configure_fit(1, s2.initialize_parameters(manager), manager)]  # type: ignore[arg-type]
    tiny = make(fraction_fit=0.01, min_fit_clients=4)
    assert len(tiny.configure_fit(1, tiny.initialize_parameters(manager), manager)) == 4  # type: ignore[arg-type]


def test_bounded_wait_goes_on_with_whoever_is_there() -> None:
    manager, _ = client_manager(2)
    strategy = make(min_available_clients=5, min_fit_clients=2, client_wait_timeout=0.2)
    assert len(strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)) == 2  # type: ignore[arg-type]
    short = make(min_available_clients=5, min_fit_clients=3, client_wait_timeout=0.2)
    assert short.configure_fit(1, short.initialize_parameters(manager), manager) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_the_fit_config_carries_only_what_the_server_decides_per_round(rule: str) -> None:
    # Hyper-parameters (proximal-mu, learning-rate, ...) reach clients through their own run config.
    manager, _ = client_manager(2)
    assert all(ins.config == {"server-round": 1} for _, ins in _fit(make(rule), manager))  # type: ignore[arg-type]


def test_scaffold_ships_the_control_variate_and_updates_it() -> None:
    strategy = make("scaffold")
    manager, proxies = client_manager(4)
    instructions = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    assert len(to_arrays(instructions[0][1].parameters)) == len(SHAPES) + sum(TRAINABLE)
    results = [(proxies[i], reply(strategy, w, 5)) for i, w in enumerate(honest_clients(4))]
    strategy.aggregate_fit(1, results, [])
    # Every client sent dc = 0.1 and all 4 of 4 took part: c = 0 + (4/4) * 0.1.
    assert strategy.scaffold_state is not None
    for c in strategy.scaffold_state.control:
        np.testing.assert_allclose(c, 0.1, rtol=1e-6)


def test_observers_get_one_record_per_round_with_bookkeeping() -> None:
    seen: list[RoundRecord] = []
    strategy = make()
    strategy.observers.append(lambda record, s: seen.append(record))
    strategy.evaluate_fn = lambda w: (0.5, {"accuracy": 0.75})
    manager, proxies = client_manager(2)
    strategy.evaluate(0, None)  # type: ignore[arg-type]
    instructions = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    results = [(proxies[i], reply(strategy, w, 5)) for i, w in enumerate(honest_clients(2))]
    strategy.aggregate_fit(1, results, [RuntimeError("x")])
    strategy.evaluate(1, None)  # type: ignore[arg-type]
    ev = strategy.configure_evaluate(1, None, manager)  # type: ignore[arg-type]
    strategy.aggregate_evaluate(1, [(proxies[0], eval_res(1.0, 1, accuracy=0.0)), (proxies[1], eval_res(2.0, 3, accuracy=1.0))], [])
    assert [r.round for r in seen] == [0, 1]
    r = seen[1]
    assert (r.results, r.failures, r.clients_sampled) == (2, 1, 2)
    assert r.federated_loss == pytest.approx((1.0 * 1 + 2.0 * 3) / 4) and r.federated_accuracy == pytest.approx(0.75)
    assert r.central_accuracy == 0.75
    sent = sum(len(t) for t in instructions[0][1].parameters.tensors) * 2 + sum(len(t) for t in ev[0][1].parameters.tensors) * 2
    assert r.bytes_sent == sent
    assert r.bytes_received == sum(len(t) for _, res in results for t in res.parameters.tensors)


def test_metrics_are_aggregated_by_meaning() -> None:
    out = aggregate_metrics([(1, {"loss": 1.0, "num_upload_bytes": 10, "epsilon": 2.0}), (3, {"loss": 3.0, "num_upload_bytes": 5, "epsilon": 1.0})])
    assert out == {"loss": 2.5, "num_upload_bytes": 15.0, "epsilon": 2.0}
    assert math.isnan(aggregate_metrics([(0, {"loss": 1.0})])["loss"])


def test_payload_kinds() -> None:
    assert STRATEGIES["fedsgd"].payload_kind(False) == "gradient"
    assert STRATEGIES["fedavg"].payload_kind(True) == "delta"
    assert STRATEGIES["fedadam"].payload_kind(False) == "weights"


# ------------------------------------------------------------------------------------ hooks
class ProbeHook:
    """A `StrategyHook` that records what the shell hands it, and drops or scales updates when told to."""

    def __init__(self, name: str = "probe", reads_updates: bool = True, drop: tuple[str, ...] = (),
                 scale: float | None = None, skip: bool = False) -> None:
        self.name, self.reads_updates, self.drop, self.scale, self.skip = name, reads_updates, drop, scale, skip
        self.calls: list[object] = []
        self.seen: list[ClientUpdate] = []
        self.loaded: object = "never"

    def fit_config(self, rnd: int, num_available: int, num_sampled: int) -> dict | None:
        self.calls.append("fit_config")
        return None if self.skip else {"probe-sampled": num_sampled}

    def preprocess(self, results: list, failures: list) -> tuple[list, list]:
        self.calls.append("preprocess")
        return results, failures

    def process_updates(self, record: RoundRecord, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        self.calls.append("process_updates")
        self.seen = [ClientUpdate(u.cid, [a.copy() for a in u.update], u.extras, u.num_examples, dict(u.metrics)) for u in updates]
        kept = [u for u in updates if u.cid not in self.drop]
        if self.scale is not None:
            for u in kept:
                u.update = [a * np.float32(self.scale) for a in u.update]
        return kept

    def after_fit(self, record: RoundRecord) -> None:
        self.calls.append(("after_fit", record.updated))

    def end_round(self, record: RoundRecord) -> None:
        self.calls.append("end_round")
        record.extra["probe"] = 1.0

    def state_dict(self) -> dict:
        return {"calls": len(self.calls)}

    def load_state_dict(self, state: object) -> None:
        self.loaded = state


def with_hook(hook: ProbeHook, rule: str = "fedavg", **kw: object) -> FederatedStrategy:
    plain = make(rule, **kw)
    return FederatedStrategy(plain.options, initial_weights(), TRAINABLE, hooks=[hook])


@pytest.mark.parametrize(("rule", "send_delta"), [("fedavg", False), ("fedavg", True), ("fedsgd", False)],
                         ids=["weights", "delta", "gradient"])
def test_hooks_get_client_updates_u_equals_w_i_minus_w_whatever_the_clients_send(rule: str, send_delta: bool) -> None:
    hook = ProbeHook()
    strategy = with_hook(hook, rule, send_delta=send_delta)
    assert strategy.kind == {("fedavg", False): "weights", ("fedavg", True): "delta", ("fedsgd", False): "gradient"}[(rule, send_delta)]
    clients = honest_clients(3)
    run_round(strategy, clients, [1, 2, 3])
    assert [type(u) for u in hook.seen] == [ClientUpdate] * 3
    for u, local, n in zip(hook.seen, clients, [1, 2, 3]):
        assert u.num_examples == n and u.metrics["train_loss"] == 1.0
        for got, a, w in zip(u.update, local, initial_weights()):
            np.testing.assert_array_equal(got, a - w)  # bit for bit: -(w - a) == a - w in IEEE arithmetic


def test_a_hook_that_drops_an_update_leaves_it_out_of_the_aggregate() -> None:
    clients, ns = honest_clients(3), [1, 2, 3]
    strategy = with_hook(ProbeHook(drop=("1",)))
    params, _ = run_round(strategy, clients, ns)
    expected, _ = run_round(make(), [clients[0], clients[2]], [1, 3])
    for got, want in zip(to_arrays(params), to_arrays(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_a_hook_that_alters_the_updates_moves_the_model_by_what_it_returns(scale: float) -> None:
    clients, ns = honest_clients(3), [1, 2, 3]
    strategy = with_hook(ProbeHook(scale=scale))
    params, _ = run_round(strategy, clients, ns)
    w0 = initial_weights()
    mean = [sum(n * (c[i] - w0[i]) for c, n in zip(clients, ns)) / sum(ns) for i in range(len(w0))]
    for got, w, u in zip(to_arrays(params), w0, mean):
        np.testing.assert_allclose(got, w + scale * u, rtol=1e-6, atol=1e-7)  # sgd, lr 1: w - (-U)
    if scale == 0.0:
        assert all(np.array_equal(a, b) for a, b in zip(to_arrays(params), w0))


def test_hooks_run_in_order_and_an_empty_list_keeps_the_model() -> None:
    hook = ProbeHook(drop=("0", "1"))
    seen: list[RoundRecord] = []
    strategy = with_hook(hook)
    strategy.observers.append(lambda record, s: seen.append(record))
    manager, proxies = client_manager(2)
    instructions = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]
    assert all(ins.config == {"server-round": 1, "probe-sampled": 2} for _, ins in instructions)
    params, _ = strategy.aggregate_fit(1, [(proxies[i], reply(strategy, w, 5)) for i, w in enumerate(honest_clients(2))], [])
    assert params is None and all(np.array_equal(a, b) for a, b in zip(strategy.weights, initial_weights()))
    strategy.configure_evaluate(1, None, manager)  # type: ignore[arg-type]
    strategy.aggregate_evaluate(1, [], [])
    assert hook.calls == ["fit_config", "preprocess", "process_updates", ("after_fit", False), "end_round"]
    assert seen[-1].extra["probe"] == 1.0  # end_round runs before the observers


def test_a_hook_can_skip_a_round_and_nobody_is_asked_to_train_or_evaluate() -> None:
    seen: list[RoundRecord] = []
    strategy = with_hook(ProbeHook(skip=True))
    strategy.observers.append(lambda record, s: seen.append(record))
    manager, _ = client_manager(3)
    assert strategy.configure_fit(1, strategy.initialize_parameters(manager), manager) == []  # type: ignore[arg-type]
    assert strategy.configure_evaluate(1, None, manager) == []  # type: ignore[arg-type]
    assert [r.round for r in seen] == [1] and seen[0].clients_sampled == 0 and not seen[0].updated


def test_a_hook_that_does_not_read_updates_keeps_the_streaming_mean() -> None:
    hook = ProbeHook(reads_updates=False, scale=0.0)
    clients, ns = honest_clients(3), [1, 2, 3]
    params, _ = run_round(with_hook(hook), clients, ns)
    expected, _ = run_round(make(), clients, ns)
    assert "process_updates" not in hook.calls
    assert all(np.array_equal(a, b) for a, b in zip(to_arrays(params), to_arrays(expected)))


def test_hook_state_travels_in_the_checkpoint_under_its_name() -> None:
    hook = ProbeHook()
    strategy = with_hook(hook)
    run_round(strategy, honest_clients(2), [1, 1])
    state = strategy.state_dict()
    assert state["probe"] == {"calls": 4}  # fit_config, preprocess, process_updates, after_fit
    resumed_hook = ProbeHook()
    with_hook(resumed_hook).load_state_dict(state)
    assert resumed_hook.loaded == {"calls": 4}
    without = ProbeHook()
    with_hook(without).load_state_dict(make().state_dict())  # a checkpoint written without this hook
    assert without.loaded is None
    with pytest.raises(ValueError, match="hook names"):
        FederatedStrategy(make().options, initial_weights(), TRAINABLE, hooks=[ProbeHook(name="weights")])
