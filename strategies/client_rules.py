"""Client halves of the update rules: the arithmetic a client does for SCAFFOLD, FedSGD and FedProx.

The server halves live beside this module (:mod:`strategies.scaffold`, :mod:`strategies.optimizers`,
:mod:`strategies.aggregators`). These functions are pure: they read their arguments, return new arrays or tensors,
and write nothing they are given. The client adapter (``flower_app/client_app.py``) and the training loop
(``flower_app/task.py``) call them; this module depends on numpy and torch only (no Flower).

Arrays are in the canonical order of the model's weights (trainable parameters and floating-point buffers in
``state_dict`` order). Where a rule concerns only trainable parameters (SCAFFOLD's control variates, FedProx's
term) the arguments hold the trainable arrays only, in the same order.

* :func:`scaffold_correction` and :func:`scaffold_control_update`: SCAFFOLD's gradient correction ``c - c_i`` and
  its client control-variate update, option II (Karimireddy et al., 2020).
* :func:`fedsgd_payload`: what a FedSGD client sends (McMahan et al., 2017).
* :func:`proximal_term` and :func:`proximal_gradient`: FedProx's proximal term ``(mu / 2) ||w - w^t||^2`` and its
  gradient (Li et al., 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

__all__ = [
    "NDArrays",
    "fedsgd_payload",
    "proximal_gradient",
    "proximal_term",
    "scaffold_control_update",
    "scaffold_correction",
]

NDArrays: TypeAlias = list[np.ndarray]


def _check_aligned(
    reference_name: str, reference: Sequence[np.ndarray | torch.Tensor], **others: Sequence[np.ndarray | torch.Tensor]
) -> None:
    """Every sequence in ``others`` has as many arrays as ``reference``, with the same shapes."""
    shapes = [tuple(x.shape) for x in reference]
    for name, arrays in others.items():
        if len(arrays) != len(shapes):
            raise ValueError(f"{name} has {len(arrays)} arrays but {reference_name} has {len(shapes)}")
        for j, (x, shape) in enumerate(zip(arrays, shapes)):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name}[{j}] has shape {tuple(x.shape)}, {reference_name}[{j}] has {shape}")


# ----------------------------------------------------------------------------------------------------------------
# SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, 2020, "SCAFFOLD: Stochastic Controlled Averaging
# for Federated Learning", Algorithm 1).
# ----------------------------------------------------------------------------------------------------------------


def scaffold_correction(control: Sequence[np.ndarray], own: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """SCAFFOLD's gradient correction ``c - c_i``, one tensor per trainable array.

    Algorithm 1, line 10: each local step of client ``i`` is::

        y_i <- y_i - eta_l * (g_i(y_i) - c_i + c)

    so the correction added to every local gradient is ``c - c_i``, with ``c`` the server's control variate (sent
    with the model) and ``c_i`` the client's own (zeros before its first round).

    Args:
        control: ``c``, one array per trainable array.
        own: ``c_i``, with the same shapes.

    Returns:
        New float32 CPU tensors (``c`` is converted to float32 first).

    Raises:
        ValueError: if the two do not have the same number of arrays and shapes (naming the array).
    """
    _check_aligned("control", control, own=own)
    return [torch.from_numpy(np.asarray(c, dtype=np.float32) - ci) for c, ci in zip(control, own)]


def scaffold_control_update(
    own: Sequence[np.ndarray],
    control: Sequence[np.ndarray],
    start: Sequence[np.ndarray],
    end: Sequence[np.ndarray],
    num_steps: int,
    learning_rate: float,
) -> tuple[NDArrays, NDArrays]:
    """SCAFFOLD's client control-variate update, option II, and the delta the client sends.

    Algorithm 1, line 12 (option II) and line 13 (eq. (4) of the paper). After ``K`` corrected local SGD steps
    with learning rate ``eta_l`` from the global model ``x`` to ``y_i``::

        c_i+  = c_i - c + (x - y_i) / (K * eta_l)
        dc_i  = c_i+ - c_i  =  (x - y_i) / (K * eta_l) - c

    Option II reuses the local steps instead of computing an extra full gradient (option I): with plain SGD,
    ``x - y_i = eta_l * sum_k (g_k - c_i + c)``, so ``c_i+`` is the mean of the ``K`` uncorrected gradients
    ``g_k`` the client computed along its way. The server adds ``dc_i`` into ``c``
    (:func:`strategies.scaffold.scaffold_update_control`).

    ``K = 0`` (a client without a batch) is taken as ``K = 1``; then ``y_i = x`` and ``c_i+ = c_i - c``.

    Args:
        own: ``c_i``, the client's control variate before the round, one array per trainable array.
        control: ``c``, the server's control variate received with the model.
        start: ``x``, the trainable arrays of the global model the round started from.
        end: ``y_i``, the trainable arrays after local training.
        num_steps: ``K``, the number of local optimizer steps taken.
        learning_rate: ``eta_l``, the local learning rate (positive).

    Returns:
        ``(c_i+, dc_i)``: new float32 arrays.

    Raises:
        ValueError: if the four array lists differ in count or shape (naming the list and array), ``num_steps`` is
            not a non-negative integer or ``learning_rate`` is not positive and finite.
    """
    _check_aligned("own", own, control=control, start=start, end=end)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if not (isinstance(learning_rate, int | float) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}")
    scale = 1.0 / (max(int(num_steps), 1) * learning_rate)
    new_own = [ci - c + (xi - yi) * scale for ci, c, xi, yi in zip(own, control, start, end)]
    delta = [(n - o).astype(np.float32) for n, o in zip(new_own, own)]
    return [a.astype(np.float32) for a in new_own], delta


# ----------------------------------------------------------------------------------------------------------------
# FedSGD (McMahan, Moore, Ramage, Hampson and Aguera y Arcas, 2017, "Communication-Efficient Learning of Deep
# Networks from Decentralized Data", the FedSGD baseline).
# ----------------------------------------------------------------------------------------------------------------


def fedsgd_payload(
    gradients: Sequence[torch.Tensor],
    global_weights: Sequence[np.ndarray],
    local_weights: Sequence[np.ndarray],
    trainable: Sequence[bool],
) -> NDArrays:
    """What a FedSGD client sends: its gradient for trainable arrays, ``w - b_i`` for buffers.

    Client ``i`` computes the full-batch gradient ``g_i = grad F_i(w)`` at the global weights ``w`` and sends it;
    the server steps ``w <- w - eta * sum_i p_i g_i`` on the example-weighted mean. Buffers (BatchNorm running
    statistics) have no gradient: the forward passes moved them from ``w_j`` to the client's ``b_{i,j}``, and the
    client sends ``w_j - b_{i,j}``. The server sets an array that is not trainable to ``w_j - mean_i(payload)``
    (see :mod:`strategies.optimizers`), which for buffers is ``mean_i b_{i,j}``: buffers are averaged, as FedAvg
    averages them.

    Args:
        gradients: one CPU tensor per *trainable* array, in order (e.g. ``task.full_gradient``).
        global_weights: ``w``, every array the client received.
        local_weights: the client's arrays after computing the gradients (buffers updated).
        trainable: per array, True for trainable parameters.

    Returns:
        One array per array of ``global_weights``; a trainable array's entry shares memory with its gradient.

    Raises:
        ValueError: if the counts disagree (gradients vs trainable flags, weights vs flags) or a gradient's or
            local array's shape differs from the global array's.
    """
    if len(global_weights) != len(trainable) or len(local_weights) != len(trainable):
        raise ValueError(
            f"got {len(global_weights)} global and {len(local_weights)} local arrays for {len(trainable)} flags"
        )
    _check_aligned("global_weights", global_weights, local_weights=local_weights)
    trainable_shapes = [tuple(w.shape) for w, t in zip(global_weights, trainable) if t]
    if len(gradients) != len(trainable_shapes):
        raise ValueError(f"got {len(gradients)} gradients for {len(trainable_shapes)} trainable arrays")
    for k, (g, shape) in enumerate(zip(gradients, trainable_shapes)):
        if tuple(g.shape) != shape:
            raise ValueError(f"gradient {k} has shape {tuple(g.shape)}, its trainable array has {shape}")
    it = iter(gradients)
    return [next(it).numpy() if t else (w - b) for t, w, b in zip(trainable, global_weights, local_weights)]


# ----------------------------------------------------------------------------------------------------------------
# FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, 2020, "Federated Optimization in Heterogeneous
# Networks", eq. (2)).
# ----------------------------------------------------------------------------------------------------------------


def _check_mu(mu: float) -> None:
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"proximal mu must be a non-negative finite number, got {mu!r}")


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term ``(mu / 2) * ||w - w^t||^2``, differentiable in ``params``.

    Client ``k`` minimizes ``h_k(w; w^t) = F_k(w) + (mu / 2) ||w - w^t||^2`` (eq. (2)), where ``w^t`` is the global
    model the round started from. The norm runs over all trainable parameters. Add the term to the loss before
    ``backward()``; its gradient is :func:`proximal_gradient`. ``mu = 0`` is FedAvg's local objective.

    Args:
        params: the trainable parameters ``w``.
        anchor: ``w^t``, detached tensors with the same shapes (on the same device).
        mu: ``mu >= 0``.

    Returns:
        A scalar tensor (0-dim); ``tensor(0.)`` when there are no parameters.

    Raises:
        ValueError: if ``mu`` is negative or not finite, or the two lists differ in count or shape.
    """
    _check_mu(mu)
    _check_aligned("params", params, anchor=anchor)
    if not params:
        return torch.zeros(())
    squares = [(p - s).pow(2).sum() for p, s in zip(params, anchor)]
    total = squares[0]
    for sq in squares[1:]:
        total = total + sq
    return 0.5 * mu * total


def proximal_gradient(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> list[torch.Tensor]:
    """The gradient of :func:`proximal_term`: ``mu * (w - w^t)`` per parameter (new, detached tensors).

    Raises:
        ValueError: as :func:`proximal_term`.
    """
    _check_mu(mu)
    _check_aligned("params", params, anchor=anchor)
    return [(p.detach() - s.detach()).mul_(mu) for p, s in zip(params, anchor)]
