"""Client halves of the rules (strategies.client_rules): hand-computed values and oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.aggregators import weighted_mean
from strategies.client_rules import (
    fedsgd_payload,
    proximal_gradient,
    proximal_term,
    scaffold_control_update,
    scaffold_correction,
)
from strategies.optimizers import ServerOptHParams, get_server_optimizer


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _read_only(arrays: list[np.ndarray]) -> list[np.ndarray]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


# ---------------------------------------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_correction_hand_computed() -> None:
    # c - c_i = [1 - 0.5, -2 - 0.5] = [0.5, -2.5];  [[4]] - [[1]] = [[3]]
    control = _read_only([np.array([1.0, -2.0]), np.array([[4.0]], np.float32)])  # float64 c is cast to float32
    own = _read_only([_f32(0.5, 0.5), np.array([[1.0]], np.float32)])
    out = scaffold_correction(control, own)
    assert [t.dtype for t in out] == [torch.float32, torch.float32]
    torch.testing.assert_close(out[0], torch.tensor([0.5, -2.5]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], torch.tensor([[3.0]]), rtol=0, atol=0)


def test_scaffold_control_update_hand_computed() -> None:
    # K = 2, lr = 0.25: 1 / (K lr) = 2.  Array 0: (x - y) * 2 = ([3, 3] - [1, 4]) * 2 = [4, -2]
    #   c_i+ = c_i - c + [4, -2] = [1, 2] - [0.5, -1] + [4, -2] = [4.5, 1];  dc_i = c_i+ - c_i = [3.5, -1]
    # Array 1: (x - y) * 2 = ([[0]] - [[0.5]]) * 2 = [[-1]];  c_i+ = [[0]] - [[2]] + [[-1]] = [[-3]];  dc_i = [[-3]]
    own = _read_only([_f32(1.0, 2.0), np.zeros((1, 1), np.float32)])
    control = _read_only([_f32(0.5, -1.0), np.full((1, 1), 2.0, np.float32)])
    start = _read_only([_f32(3.0, 3.0), np.zeros((1, 1), np.float32)])
    end = _read_only([_f32(1.0, 4.0), np.full((1, 1), 0.5, np.float32)])
    new_own, delta = scaffold_control_update(own, control, start, end, num_steps=2, learning_rate=0.25)
    np.testing.assert_array_equal(new_own[0], [4.5, 1.0])
    np.testing.assert_array_equal(new_own[1], [[-3.0]])
    np.testing.assert_array_equal(delta[0], [3.5, -1.0])
    np.testing.assert_array_equal(delta[1], [[-3.0]])
    assert all(a.dtype == np.float32 for a in new_own + delta)


def test_scaffold_option_two_is_the_mean_of_the_uncorrected_gradients() -> None:
    """With plain SGD, x - y_i = lr * sum_k (g_k - c_i + c), so option II gives c_i+ = mean_k g_k."""
    rng = np.random.default_rng(0)
    q = np.diag([1.0, 2.0, 0.5])
    r = rng.normal(size=3)
    x, own, control = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    lr, steps = 0.1, 7
    y, grads = x.copy(), []
    for _ in range(steps):
        g = q @ y - r  # gradient of 0.5 y'Qy - r'y
        grads.append(g)
        y = y - lr * (g - own + control)
    new_own, delta = scaffold_control_update([own], [control], [x], [y], steps, lr)
    np.testing.assert_allclose(new_own[0], np.mean(grads, axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(delta[0], np.mean(grads, axis=0) - own, rtol=1e-6, atol=1e-6)


def test_scaffold_no_local_step_gives_c_i_minus_c() -> None:
    own, control, x = [_f32(1.0, 2.0)], [_f32(0.25, 4.0)], [_f32(7.0, 8.0)]
    new_own, delta = scaffold_control_update(own, control, x, x, num_steps=0, learning_rate=0.1)
    np.testing.assert_array_equal(new_own[0], [0.75, -2.0])
    np.testing.assert_array_equal(delta[0], [-0.25, -4.0])


def test_scaffold_rejects_bad_inputs() -> None:
    a, b = [_f32(1.0, 2.0)], [_f32(1.0, 2.0, 3.0)]
    with pytest.raises(ValueError, match=r"control\[0\] has shape \(3,\), own\[0\] has \(2,\)"):
        scaffold_control_update(a, b, a, a, 1, 0.1)
    with pytest.raises(ValueError, match="end has 2 arrays but own has 1"):
        scaffold_control_update(a, a, a, a + a, 1, 0.1)
    with pytest.raises(ValueError, match="num_steps"):
        scaffold_control_update(a, a, a, a, -1, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        scaffold_control_update(a, a, a, a, 1, 0.0)
    with pytest.raises(ValueError, match="own has 2 arrays but control has 1"):
        scaffold_correction(a, a + a)


# ------------------------------------------------------------------------------------------------------------ FedSGD


def test_fedsgd_payload_hand_computed() -> None:
    trainable = [True, False, True]
    global_weights = _read_only([_f32(1.0, 1.0), _f32(5.0), np.zeros((2, 1), np.float32)])
    local = _read_only([_f32(1.0, 1.0), _f32(3.5), np.zeros((2, 1), np.float32)])  # the buffer moved 5 -> 3.5
    grads = [torch.tensor([0.25, -0.5]), torch.tensor([[2.0], [3.0]])]
    out = fedsgd_payload(grads, global_weights, local, trainable)
    np.testing.assert_array_equal(out[0], [0.25, -0.5])
    np.testing.assert_array_equal(out[1], [1.5])  # w - b = 5 - 3.5
    np.testing.assert_array_equal(out[2], [[2.0], [3.0]])
    assert np.shares_memory(out[0], grads[0].numpy()) and np.shares_memory(out[2], grads[1].numpy())


def test_fedsgd_server_step_takes_the_gradient_step_and_averages_the_buffers() -> None:
    """The server's step on the mean payload: w - lr * mean(g) for parameters, mean(b_i) for buffers."""
    trainable = [True, False]
    w = [_f32(1.0, 2.0), _f32(10.0)]
    clients = [  # (gradient, local buffer, examples)
        (torch.tensor([1.0, 0.0]), _f32(4.0), 1),
        (torch.tensor([0.0, 2.0]), _f32(8.0), 3),
    ]
    payloads = [fedsgd_payload([g], w, [w[0], b], trainable) for g, b, _ in clients]
    mean = weighted_mean(payloads, [n for *_, n in clients])
    optimizer = get_server_optimizer("sgd", ServerOptHParams(learning_rate=0.5))
    _, new = optimizer.step(optimizer.init(w, trainable), w, mean, trainable)
    # mean g = ([1, 0] * 1 + [0, 2] * 3) / 4 = [0.25, 1.5];  w - 0.5 * g = [0.875, 1.25]
    np.testing.assert_allclose(new[0], [0.875, 1.25], rtol=0, atol=1e-7)
    # buffer: (4 * 1 + 8 * 3) / 4 = 7, whatever the server learning rate
    np.testing.assert_allclose(new[1], [7.0], rtol=0, atol=1e-6)


def test_fedsgd_payload_rejects_mismatches() -> None:
    w = [_f32(1.0, 2.0), _f32(3.0)]
    with pytest.raises(ValueError, match="got 2 gradients for 1 trainable arrays"):
        fedsgd_payload([torch.zeros(2), torch.zeros(1)], w, w, [True, False])
    with pytest.raises(ValueError, match=r"gradient 0 has shape \(3,\), its trainable array has \(2,\)"):
        fedsgd_payload([torch.zeros(3)], w, w, [True, False])
    with pytest.raises(ValueError, match="for 3 flags"):
        fedsgd_payload([torch.zeros(2)], w, w, [True, False, False])


# ----------------------------------------------------------------------------------------------------------- FedProx


def test_proximal_term_and_gradient_hand_computed() -> None:
    # ||w - w^t||^2 = (1 - 0)^2 + (2 - 0)^2 + (3 - 1)^2 = 1 + 4 + 4 = 9;  mu / 2 * 9 = 0.25 * 9 = 2.25
    # gradient mu * (w - w^t) = 0.5 * [1, 2] = [0.5, 1];  0.5 * [[2]] = [[1]]
    params = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = proximal_term(params, anchor, 0.5)
    assert term.item() == 2.25
    grads = proximal_gradient(params, anchor, 0.5)
    torch.testing.assert_close(grads[0], torch.tensor([0.5, 1.0]), rtol=0, atol=0)
    torch.testing.assert_close(grads[1], torch.tensor([[1.0]]), rtol=0, atol=0)
    term.backward()
    for p, g in zip(params, grads):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # autograd of the term is the closed form
    torch.testing.assert_close(anchor[0], torch.tensor([0.0, 0.0]), rtol=0, atol=0)


def test_proximal_mu_zero_is_zero_and_bad_mu_or_shapes_raise() -> None:
    params, anchor = [torch.tensor([3.0, -1.0])], [torch.tensor([0.0, 0.0])]
    assert proximal_term(params, anchor, 0.0).item() == 0.0
    assert proximal_term([], [], 1.0).item() == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="proximal mu"):
            proximal_term(params, anchor, bad)
    with pytest.raises(ValueError, match=r"anchor\[0\] has shape \(3,\), params\[0\] has \(2,\)"):
        proximal_gradient(params, [torch.zeros(3)], 1.0)
