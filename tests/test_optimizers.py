"""Tests for strategies.optimizers: hand-computed steps, torch.optim oracles, state round-trips, the mask."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from strategies.aggregators import weighted_mean
from strategies.optimizers import (
    OPTIMIZER_HPARAMS_USED,
    SERVER_OPTIMIZERS,
    NDArrays,
    ServerOptHParams,
    ServerOptimizer,
    ServerOptState,
    get_server_optimizer,
)

ALL = sorted(SERVER_OPTIMIZERS)
ADAPTIVE = ["adagrad", "adam", "yogi"]


def _arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _run(
    opt: ServerOptimizer,
    weights: NDArrays,
    grads: Sequence[NDArrays],
    mask: Sequence[bool] | None = None,
    state: ServerOptState | None = None,
) -> tuple[ServerOptState, NDArrays]:
    mask = [True] * len(weights) if mask is None else mask
    state = opt.init(weights, mask) if state is None else state
    for g in grads:
        state, weights = opt.step(state, weights, g, mask)
    return state, weights


def _grads(seed: int, shapes: Sequence[tuple[int, ...]], steps: int) -> list[NDArrays]:
    rng = np.random.default_rng(seed)
    return [[np.asarray(rng.normal(size=s) * (k + 1), dtype=np.float32) for s in shapes] for k in range(steps)]


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed steps
# ---------------------------------------------------------------------------------------------------------------


def test_sgd_hand_computed() -> None:
    opt = get_server_optimizer("sgd", ServerOptHParams(learning_rate=0.5))
    state, w = _run(opt, [_arr(1.0, 2.0)], [[_arr(0.2, -0.4)]])
    # [1, 2] - 0.5 * [0.2, -0.4] = [0.9, 2.2]
    np.testing.assert_allclose(w[0], [0.9, 2.2], rtol=1e-7)
    assert state == ServerOptState(step=1, m=None, v=None)


@pytest.mark.parametrize(("nesterov", "expected"), [(False, [0.0, -2.9]), (True, [-0.9, -5.51])])
def test_momentum_hand_computed(nesterov: bool, expected: list[float]) -> None:
    # beta = 0.9, lr = 1, w0 = 1, g = 1 then 2:
    #   b1 = 0.9 * 0 + 1 = 1;   plain: w1 = 1 - 1 = 0;                nesterov: w1 = 1 - (1 + 0.9 * 1) = -0.9
    #   b2 = 0.9 * 1 + 2 = 2.9; plain: w2 = 0 - 2.9 = -2.9;           nesterov: w2 = -0.9 - (2 + 0.9 * 2.9) = -5.51
    opt = get_server_optimizer("momentum", ServerOptHParams(momentum=0.9, nesterov=nesterov))
    state = opt.init([_arr(1.0)], [True])
    got = []
    w = [_arr(1.0)]
    for g in (1.0, 2.0):
        state, w = opt.step(state, w, [_arr(g)], [True])
        got.append(float(w[0][0]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert state.m is not None
    np.testing.assert_allclose(state.m[0], [2.9], rtol=1e-6)


def test_adam_hand_computed_without_bias_correction() -> None:
    # lr = 1, beta1 = 0.9, beta2 = 0.75, tau = 0.25, m = v = 0, w0 = 0; Delta = -g.
    # step 1, Delta = 2: m = 0.1 * 2 = 0.2; v = 0.25 * 4 = 1;               w = 0 + 0.2 / (1 + 0.25) = 0.16
    # step 2, Delta = 1: m = 0.9 * 0.2 + 0.1 * 1 = 0.28; v = 0.75 + 0.25 = 1; w = 0.16 + 0.28 / 1.25 = 0.384
    hp = ServerOptHParams(learning_rate=1.0, beta1=0.9, beta2=0.75, tau=0.25)
    state, w = _run(get_server_optimizer("adam", hp), [_arr(0.0)], [[_arr(-2.0)]])
    np.testing.assert_allclose(w[0], [0.16], rtol=1e-6)
    state, w = _run(get_server_optimizer("adam", hp), w, [[_arr(-1.0)]], state=state)
    np.testing.assert_allclose(w[0], [0.384], rtol=1e-6)
    assert state.m is not None and state.v is not None and state.step == 2
    np.testing.assert_allclose([state.m[0][0], state.v[0][0]], [0.28, 1.0], rtol=1e-6)


def test_adam_hand_computed_with_bias_correction() -> None:
    # Same first step with bias correction: m_hat = 0.2 / (1 - 0.9) = 2, v_hat = 1 / (1 - 0.75) = 4;
    # w = 0 + 2 / (sqrt(4) + 0.25) = 2 / 2.25 = 0.888...
    hp = ServerOptHParams(beta1=0.9, beta2=0.75, tau=0.25, bias_correction=True)
    _, w = _run(get_server_optimizer("adam", hp), [_arr(0.0)], [[_arr(-2.0)]])
    np.testing.assert_allclose(w[0], [2.0 / 2.25], rtol=1e-6)


def test_yogi_hand_computed_two_steps() -> None:
    # lr = 1, beta1 = 0.5, beta2 = 0.75, tau = 0.5, m = v = 0, w0 = [0, 0], Delta = -g.
    # step 1, Delta = [2, 2]: Delta^2 = 4 > v = 0 so sign(v - Delta^2) = -1: v = 0 + 0.25 * 4 = 1;
    #   m = 0.5 * 2 = 1;  w = 1 / (1 + 0.5) = 2/3 (both coordinates)
    # step 2, Delta = [4, 0.5]:
    #   A: Delta^2 = 16 > 1 -> v = 1 + 0.25 * 16 = 5   (Adam would give 0.75 + 4 = 4.75)
    #   B: Delta^2 = 0.25 < 1 -> v = 1 - 0.25 * 0.25 = 0.9375   (Adam would give 0.75 + 0.0625 = 0.8125)
    #   m = 0.5 * 1 + 0.5 * [4, 0.5] = [2.5, 0.75]
    #   w = 2/3 + [2.5 / (sqrt(5) + 0.5), 0.75 / (sqrt(0.9375) + 0.5)]
    hp = ServerOptHParams(learning_rate=1.0, beta1=0.5, beta2=0.75, tau=0.5)
    state, w = _run(get_server_optimizer("yogi", hp), [_arr(0.0, 0.0)], [[_arr(-2.0, -2.0)], [_arr(-4.0, -0.5)]])
    assert state.v is not None
    np.testing.assert_allclose(state.v[0], [5.0, 0.9375], rtol=1e-6)
    expected = [2 / 3 + 2.5 / (math.sqrt(5) + 0.5), 2 / 3 + 0.75 / (math.sqrt(0.9375) + 0.5)]
    np.testing.assert_allclose(w[0], expected, rtol=1e-6)


def test_yogi_keeps_v_when_delta_squared_equals_v() -> None:
    # v = 1 after Delta = 2 (as above); Delta = 1 gives Delta^2 = v, sign 0, so v stays 1.
    hp = ServerOptHParams(beta1=0.5, beta2=0.75, tau=0.5)
    state, _ = _run(get_server_optimizer("yogi", hp), [_arr(0.0)], [[_arr(-2.0)], [_arr(-1.0)]])
    assert state.v is not None and state.v[0][0] == 1.0


def test_adagrad_hand_computed() -> None:
    # beta1 = 0, tau = 0.5, lr = 1, v0 = 0, w0 = 0:
    #   Delta = 3: m = 3, v = 9;          w = 3 / (3 + 0.5) = 6/7
    #   Delta = 4: m = 4, v = 9 + 16 = 25; w = 6/7 + 4 / (5 + 0.5) = 6/7 + 8/11
    hp = ServerOptHParams(beta1=0.0, tau=0.5)
    state, w = _run(get_server_optimizer("adagrad", hp), [_arr(0.0)], [[_arr(-3.0)], [_arr(-4.0)]])
    assert state.v is not None
    np.testing.assert_allclose(state.v[0], [25.0], rtol=1e-7)
    np.testing.assert_allclose(w[0], [6 / 7 + 8 / 11], rtol=1e-6)
    # With the default beta1 = 0.9 the first step uses m = 0.1 * 3 = 0.3: w = 0.3 / 3.5
    _, w = _run(get_server_optimizer("adagrad", ServerOptHParams(tau=0.5)), [_arr(0.0)], [[_arr(-3.0)]])
    np.testing.assert_allclose(w[0], [0.3 / 3.5], rtol=1e-6)


def test_initial_accumulator_sets_v0() -> None:
    # adam, v0 = 1, beta2 = 0.75, Delta = 0 -> v = 0.75 * 1 = 0.75 and w unchanged (m = 0)
    hp = ServerOptHParams(beta2=0.75, initial_accumulator=1.0)
    opt = get_server_optimizer("adam", hp)
    assert opt.init([_arr(0.0, 0.0)], [True]).v is not None
    state, w = _run(opt, [_arr(5.0, 5.0)], [[_arr(0.0, 0.0)]])
    assert state.v is not None
    np.testing.assert_allclose(state.v[0], [0.75, 0.75], rtol=1e-7)
    np.testing.assert_array_equal(w[0], [5.0, 5.0])


# ---------------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------------

_SHAPES = [(3, 4), (5,), ()]


def _torch_run(
    make_opt: type[torch.optim.Optimizer], kwargs: Mapping[str, Any], weights: NDArrays, grads: Sequence[NDArrays]
) -> list[np.ndarray]:
    params = [torch.nn.Parameter(torch.tensor(np.asarray(w))) for w in weights]
    opt = make_opt(params, **kwargs)
    for g in grads:
        for p, gj in zip(params, g, strict=True):
            p.grad = torch.tensor(np.asarray(gj))
        opt.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize(
    ("lr", "b1", "b2", "tau"), [(0.1, 0.9, 0.99, 1e-3), (0.03, 0.5, 0.75, 1e-8), (1.0, 0.0, 0.9, 0.1)]
)
def test_adam_with_bias_correction_equals_torch_adam(lr: float, b1: float, b2: float, tau: float) -> None:
    weights = [g * 0.1 for g in _grads(10, _SHAPES, 1)[0]]
    grads = _grads(11, _SHAPES, 5)
    hp = ServerOptHParams(learning_rate=lr, beta1=b1, beta2=b2, tau=tau, bias_correction=True)
    _, ours = _run(get_server_optimizer("adam", hp), weights, grads)
    ref = _torch_run(torch.optim.Adam, {"lr": lr, "betas": (b1, b2), "eps": tau, "foreach": False}, weights, grads)
    for o, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("lr", "tau", "v0", "bias_correction"), [(0.1, 1e-3, 0.0, False), (0.5, 1e-10, 0.3, True)])
def test_adagrad_with_beta1_zero_equals_torch_adagrad(lr: float, tau: float, v0: float, bias_correction: bool) -> None:
    weights = [g * 0.1 for g in _grads(12, _SHAPES, 1)[0]]
    grads = _grads(13, _SHAPES, 5)
    hp = ServerOptHParams(learning_rate=lr, beta1=0.0, tau=tau, initial_accumulator=v0, bias_correction=bias_correction)
    _, ours = _run(get_server_optimizer("adagrad", hp), weights, grads)
    kwargs = {"lr": lr, "eps": tau, "initial_accumulator_value": v0, "lr_decay": 0.0, "foreach": False}
    ref = _torch_run(torch.optim.Adagrad, kwargs, weights, grads)
    for o, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("lr", "momentum", "nesterov"), [(0.5, 0.9, False), (0.2, 0.5, True)])
def test_momentum_equals_torch_sgd(lr: float, momentum: float, nesterov: bool) -> None:
    weights = [g * 0.1 for g in _grads(14, _SHAPES, 1)[0]]
    grads = _grads(15, _SHAPES, 5)
    hp = ServerOptHParams(learning_rate=lr, momentum=momentum, nesterov=nesterov)
    _, ours = _run(get_server_optimizer("momentum", hp), weights, grads)
    kwargs = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "foreach": False}
    ref = _torch_run(torch.optim.SGD, kwargs, weights, grads)
    for o, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_sgd_and_zero_momentum_with_lr_one_are_fedavg(name: str) -> None:
    rng = np.random.default_rng(16)
    w = [rng.normal(size=s).astype(np.float32) for s in _SHAPES]
    clients = [[x + rng.normal(size=x.shape).astype(np.float32) for x in w] for _ in range(4)]
    counts = [10.0, 30.0, 5.0, 55.0]
    avg = weighted_mean(clients, counts)
    opt = get_server_optimizer(name, ServerOptHParams(learning_rate=1.0, momentum=0.0))
    for _ in range(2):  # the momentum buffer must not carry anything over either
        pseudo_grad = [x - a for x, a in zip(w, avg, strict=True)]
        state = opt.init(w, [True] * 3)
        state, new = opt.step(state, w, pseudo_grad, [True] * 3)
        for n, a in zip(new, avg, strict=True):
            np.testing.assert_allclose(n, a, rtol=0, atol=1e-6)
        w = new


# ---------------------------------------------------------------------------------------------------------------
# Contract tests over the registry
# ---------------------------------------------------------------------------------------------------------------


def _hparams(name: str) -> ServerOptHParams:
    if name == "momentum":
        return ServerOptHParams(learning_rate=0.1, momentum=0.9)
    # bias correction makes the adaptive steps depend on the restored step count too
    return ServerOptHParams(learning_rate=0.1, bias_correction=name in ADAPTIVE)


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_continues_exactly(name: str) -> None:
    opt = get_server_optimizer(name, _hparams(name))
    w0 = [g * 0.5 for g in _grads(20, _SHAPES, 1)[0]]
    grads = _grads(21, _SHAPES, 4)
    mask = [True, False, True]
    _, uninterrupted = _run(opt, w0, grads, mask)
    state, w = _run(opt, w0, grads[:2], mask)
    saved = {
        k: (None if v is None else [np.array(x) for x in v]) if k != "step" else v
        for k, v in state.state_dict().items()
    }  # what a checkpoint would hold: independent copies
    restored = ServerOptState.load_state_dict(saved, template=opt.init(w0, mask))
    assert restored.step == 2
    _, resumed = _run(get_server_optimizer(name, _hparams(name)), w, grads[2:], mask, state=restored)
    for a, b in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_mask_leaves_buffers_at_the_plain_average_with_no_moments(name: str) -> None:
    opt = get_server_optimizer(name, _hparams(name))
    weights = [_arr(1.0, 2.0, 3.0), _arr(10.0, 20.0), _arr(-1.0)]
    mask = [True, False, True]
    state = opt.init(weights, mask)
    for moment in (state.m, state.v):
        assert moment is None or [x.shape for x in moment] == [(3,), (1,)]
    grads = [[_arr(0.1, 0.2, 0.3), _arr(4.0, -6.0), _arr(0.5)], [_arr(-0.1, 0.0, 0.1), _arr(1.0, 1.0), _arr(0.2)]]
    state, w = opt.step(state, weights, grads[0], mask)
    np.testing.assert_array_equal(w[1], [6.0, 26.0])  # 10 - 4, 20 + 6: the aggregate itself
    state, w = opt.step(state, w, grads[1], mask)
    np.testing.assert_array_equal(w[1], [5.0, 25.0])
    for moment in (state.m, state.v):
        assert moment is None or len(moment) == 2
    assert not np.allclose(w[0], weights[0])  # trainable arrays did move


@pytest.mark.parametrize("name", ALL)
def test_step_does_not_mutate_its_inputs(name: str) -> None:
    opt = get_server_optimizer(name, _hparams(name))
    weights = [g * 0.5 for g in _grads(30, _SHAPES, 1)[0]]
    mask = [True, True, False]
    state, _ = _run(opt, weights, _grads(31, _SHAPES, 1), mask)
    grad = _grads(32, _SHAPES, 1)[0]
    copies = (
        [x.copy() for x in weights],
        [x.copy() for x in grad],
        {k: (None if v is None else [x.copy() for x in v]) for k, v in state.state_dict().items() if k != "step"},
    )
    new_state, new_w = opt.step(state, weights, grad, mask)
    for a, b in zip(weights + grad, copies[0] + copies[1], strict=True):
        np.testing.assert_array_equal(a, b)
    for key, saved in copies[2].items():
        current = getattr(state, key)
        assert (current is None) == (saved is None)
        for a, b in zip(current or [], saved or [], strict=True):
            np.testing.assert_array_equal(a, b)
    assert state.step == 1 and new_state.step == 2
    assert all(not np.shares_memory(n, w) for n, w in zip(new_w, weights, strict=True))
    assert all(x.dtype == np.float32 for x in new_w)


@pytest.mark.parametrize("name", ALL)
def test_step_rejects_inconsistent_inputs(name: str) -> None:
    opt = get_server_optimizer(name, _hparams(name))
    weights = [_arr(1.0, 2.0), _arr(3.0)]
    state = opt.init(weights, [True, True])
    with pytest.raises(ValueError, match="pseudo_grad shape"):
        opt.step(state, weights, [_arr(1.0), _arr(3.0)], [True, True])
    with pytest.raises(ValueError, match="mask has 1 entries"):
        opt.step(state, weights, [_arr(1.0, 2.0), _arr(3.0)], [True])
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step(state, weights, [_arr(1.0, np.nan), _arr(3.0)], [True, True])
    with pytest.raises(TypeError, match=r"mask\[0\] must be a bool"):
        opt.step(state, weights, [_arr(1.0, 2.0), _arr(3.0)], [1, 1])  # type: ignore[list-item]
    if state.m is not None:  # a state built for another mask
        with pytest.raises(ValueError, match="optimizer state m has 2 arrays but there are 1 trainable"):
            opt.step(state, weights, [_arr(1.0, 2.0), _arr(3.0)], [True, False])


@pytest.mark.parametrize("name", ADAPTIVE + ["sgd", "momentum"])
def test_converges_on_a_quadratic(name: str) -> None:
    # f(w) = ||w - w*||^2, g = 2 (w - w*); adaptive steps move ~lr per step, so lr is decayed by hand
    # (a fresh optimizer keeps the state but not the learning rate).
    rng = np.random.default_rng(40)
    target = [rng.normal(size=s).astype(np.float32) for s in [(4, 3), (6,)]]
    w = [np.zeros_like(t) for t in target]
    mask = [True, True]

    def loss(ws: NDArrays) -> float:
        return float(sum(np.sum((x.astype(np.float64) - t) ** 2) for x, t in zip(ws, target, strict=True)))

    start = loss(w)
    state = None
    for lr in (0.1, 0.03, 0.01, 0.003):
        base = ServerOptHParams(learning_rate=1.0 if name == "adagrad" else lr)
        hp = ServerOptHParams(learning_rate=lr, momentum=0.5) if name == "momentum" else base
        opt = get_server_optimizer(name, hp)
        state = opt.init(w, mask) if state is None else state
        for _ in range(100):
            state, w = opt.step(state, w, [2 * (x - t) for x, t in zip(w, target, strict=True)], mask)
    assert loss(w) < 1e-4 * start, (loss(w), start)


# ---------------------------------------------------------------------------------------------------------------
# Registry, hyperparameters, state_dict validation
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names_and_hparams_table_agree() -> None:
    assert set(SERVER_OPTIMIZERS) == set(OPTIMIZER_HPARAMS_USED) == {"sgd", "momentum", "adam", "yogi", "adagrad"}
    fields = set(ServerOptHParams.__dataclass_fields__)
    assert all(used <= fields for used in OPTIMIZER_HPARAMS_USED.values())


def test_get_server_optimizer_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        get_server_optimizer("adamw", ServerOptHParams())
    assert str(info.value) == "unknown server optimizer 'adamw'; choose one of: adagrad, adam, momentum, sgd, yogi"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta1": -0.1}, "beta1"),
        ({"beta2": 1.0}, "beta2"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1e-3}, "tau"),
        ({"initial_accumulator": -1.0}, "initial_accumulator"),
        ({"nesterov": True}, "nesterov"),
        ({"learning_rate": "1"}, "learning_rate"),
    ],
)
def test_invalid_hparams_name_the_parameter(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServerOptHParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["nesterov", "bias_correction"])
def test_flag_hparams_must_be_bools(field: str) -> None:
    with pytest.raises(TypeError, match=field):
        ServerOptHParams(**{field: 1})  # type: ignore[arg-type]


def test_load_state_dict_validates() -> None:
    opt = get_server_optimizer("adam")
    weights = [_arr(1.0, 2.0), _arr(3.0)]
    template = opt.init(weights, [True, True])
    good = template.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['v'\]"):
        ServerOptState.load_state_dict({"step": 0, "m": good["m"]})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        ServerOptState.load_state_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        ServerOptState.load_state_dict({**good, "step": -1})
    with pytest.raises(ValueError, match=r"optimizer state v\[1\] has shape \(2,\), expected \(1,\)"):
        ServerOptState.load_state_dict({**good, "v": [_arr(1.0, 2.0), _arr(1.0, 2.0)]}, template=template)
    with pytest.raises(ValueError, match="m is absent"):
        ServerOptState.load_state_dict({**good, "m": None}, template=template)
    sgd_template = get_server_optimizer("sgd").init(weights, [True, True])
    with pytest.raises(ValueError, match="m is present"):
        ServerOptState.load_state_dict(good, template=sgd_template)
    loaded = ServerOptState.load_state_dict(good, template=template)
    assert loaded.step == 0 and loaded.m is not None and loaded.m[0] is not good["m"][0]
