"""Tests for strategies.scaffold: the server control-variate update of SCAFFOLD."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.optimizers import ServerOptHParams, get_server_optimizer
from strategies.scaffold import ScaffoldState, scaffold_init, scaffold_update_control


def _arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_init_is_zeros_shaped_like_the_weights() -> None:
    state = scaffold_init([np.ones((2, 3), np.float64), np.ones(4, np.float32), np.asarray(5.0)])
    assert [c.shape for c in state.control] == [(2, 3), (4,), ()]
    assert all(c.dtype == np.float32 and not c.any() for c in state.control)


def test_update_control_hand_computed() -> None:
    # N = 4 clients, |S| = 2 replied with dc = [1, 2] and [3, -2]:
    #   c = 0 + (2 / 4) * mean = 0.5 * [2, 0] = [1, 0]
    state = scaffold_update_control(scaffold_init([_arr(0.0, 0.0)]), [[_arr(1.0, 2.0)], [_arr(3.0, -2.0)]], 4)
    np.testing.assert_allclose(state.control[0], [1.0, 0.0], rtol=1e-7)
    # then one client with dc = [4, 4]: c = [1, 0] + (1 / 4) * [4, 4] = [2, 1]
    state = scaffold_update_control(state, [[_arr(4.0, 4.0)]], 4)
    np.testing.assert_allclose(state.control[0], [2.0, 1.0], rtol=1e-7)


def test_full_participation_adds_the_unweighted_mean() -> None:
    rng = np.random.default_rng(0)
    c0 = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    deltas = [[rng.normal(size=x.shape).astype(np.float32) for x in c0] for _ in range(5)]
    state = scaffold_update_control(ScaffoldState(control=c0), deltas, num_total_clients=5)
    for j, c in enumerate(c0):
        np.testing.assert_allclose(state.control[j], c + np.mean([d[j] for d in deltas], axis=0), rtol=1e-6, atol=1e-6)


def test_update_is_pure() -> None:
    c0 = [_arr(1.0, 2.0)]
    deltas = [[_arr(0.5, 0.5)], [_arr(1.5, -0.5)]]
    state = ScaffoldState(control=c0)
    new = scaffold_update_control(state, deltas, 10)
    np.testing.assert_array_equal(state.control[0], [1.0, 2.0])
    np.testing.assert_array_equal(deltas[0][0], [0.5, 0.5])
    np.testing.assert_array_equal(deltas[1][0], [1.5, -0.5])
    assert not np.shares_memory(new.control[0], c0[0])
    np.testing.assert_allclose(new.control[0], [1.2, 2.0], rtol=1e-6)  # [1, 2] + [2, 0] / 10


def test_no_replies_leaves_the_control_unchanged() -> None:
    state = ScaffoldState(control=[_arr(1.0, -1.0)])
    new = scaffold_update_control(state, [], 3)
    np.testing.assert_array_equal(new.control[0], [1.0, -1.0])


def test_update_rejects_bad_inputs() -> None:
    state = scaffold_init([_arr(0.0, 0.0), _arr(0.0)])
    good = [_arr(1.0, 1.0), _arr(1.0)]
    with pytest.raises(ValueError, match="num_total_clients=1 is smaller than the 2 control deltas"):
        scaffold_update_control(state, [good, good], 1)
    with pytest.raises(ValueError, match="num_total_clients must be a positive integer"):
        scaffold_update_control(state, [], 0)
    with pytest.raises(ValueError, match=r"client 1 control delta, array 1: shape \(2,\) differs"):
        scaffold_update_control(state, [good, [_arr(1.0, 1.0), _arr(1.0, 1.0)]], 5)
    with pytest.raises(ValueError, match="client 0 control delta has 1 arrays but the control variate has 2"):
        scaffold_update_control(state, [[_arr(1.0, 1.0)]], 5)


def test_state_dict_round_trip_and_validation() -> None:
    state = scaffold_update_control(
        scaffold_init([_arr(0.0, 0.0), np.zeros((2, 2), np.float32)]),
        [[_arr(1.0, 2.0), np.ones((2, 2), np.float32)]],
        2,
    )
    saved = {"control": [np.array(x) for x in state.state_dict()["control"]]}
    template = scaffold_init([_arr(0.0, 0.0), np.zeros((2, 2), np.float32)])
    loaded = ScaffoldState.load_state_dict(saved, template=template)
    for a, b in zip(loaded.control, state.control, strict=True):
        np.testing.assert_array_equal(a, b)
    # Continuing from the restored state gives the same result as continuing from the original.
    more = [[_arr(-1.0, 3.0), np.full((2, 2), 2.0, np.float32)]]
    for a, b in zip(
        scaffold_update_control(loaded, more, 2).control, scaffold_update_control(state, more, 2).control, strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"unexpected keys \['c'\]"):
        ScaffoldState.load_state_dict({"control": saved["control"], "c": 1})
    with pytest.raises(ValueError, match=r"missing keys \['control'\]"):
        ScaffoldState.load_state_dict({})
    with pytest.raises(ValueError, match="array 1: shape"):
        ScaffoldState.load_state_dict({"control": [_arr(0.0, 0.0), _arr(0.0)]}, template=template)


def test_server_model_step_is_sgd_on_minus_the_mean_update() -> None:
    # x <- x + eta_g * mean(dy): with eta_g = 0.5, x = [1, 1], dy = [2, 0] and [0, 4]: x = [1, 1] + 0.5 * [1, 2]
    x = [_arr(1.0, 1.0)]
    mean_dy = np.mean([_arr(2.0, 0.0), _arr(0.0, 4.0)], axis=0)
    opt = get_server_optimizer("sgd", ServerOptHParams(learning_rate=0.5))
    _, new_x = opt.step(opt.init(x, [True]), x, [-mean_dy], [True])
    np.testing.assert_allclose(new_x[0], [1.5, 2.0], rtol=1e-7)
