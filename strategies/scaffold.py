"""SCAFFOLD, server side: the global control variate.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", Algorithm 1. The server holds the model ``x`` and a control variate ``c`` (one array per
*trainable* array, zeros at the start). Each round, every sampled client ``i in S`` starts from ``(x, c)``, runs
``K`` local steps ``y_i <- y_i - eta_l * (grad f_i(y_i) - c_i + c)``, updates its own control variate (option II:
``c_i+ = c_i - c + (x - y_i) / (K * eta_l)``) and sends ``dy_i = y_i - x`` and ``dc_i = c_i+ - c_i``. With ``N``
clients in total, the server then applies::

    x <- x + eta_g * mean_{i in S} dy_i
    c <- c + (|S| / N) * mean_{i in S} dc_i

The ``x`` update is the ``sgd`` server optimizer of :mod:`strategies.optimizers` (learning rate ``eta_g``) on the
pseudo-gradient ``g = -mean_i dy_i``; this module keeps ``c``. Both means are unweighted, as in the paper. The
client side (the corrected local steps and ``c_i``) lives with the client code.

This module depends on numpy and torch only (no Flower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from strategies.tensors import float32_tensor, tensor_view

__all__ = ["NDArrays", "ScaffoldState", "scaffold_init", "scaffold_update_control"]

NDArrays: TypeAlias = list[np.ndarray]


@dataclass(frozen=True)
class ScaffoldState:
    """The server control variate ``c``: one float32 array per trainable array, in canonical order.

    The arrays are never modified in place by this module; treat them as read-only.
    """

    control: NDArrays

    def state_dict(self) -> dict[str, Any]:
        """Plain ``{"control": list[np.ndarray]}`` for checkpoints (arrays shared, not copied; do not write to them)."""
        return {"control": list(self.control)}

    @classmethod
    def load_state_dict(cls, state_dict: Mapping[str, Any], template: ScaffoldState | None = None) -> ScaffoldState:
        """Rebuild a state from :meth:`state_dict` output (arrays are copied to float32).

        Args:
            state_dict: mapping with exactly the key ``control``.
            template: if given (e.g. ``scaffold_init(trainable_weights)``), the loaded control variate must have
                the same number of arrays and the same shapes.

        Raises:
            ValueError: on missing or unexpected keys, a non-numeric array, or a mismatch with ``template``
                (naming the array index).
            TypeError: if ``control`` is not a list of arrays.
        """
        keys = set(state_dict)
        if keys != {"control"}:
            raise ValueError(
                f"SCAFFOLD state_dict: missing keys {sorted({'control'} - keys)}, "
                f"unexpected keys {sorted(keys - {'control'})}"
            )
        value = state_dict["control"]
        if isinstance(value, np.ndarray | str | bytes) or not isinstance(value, Sequence):
            raise TypeError("SCAFFOLD state_dict: control must be a list of arrays")
        try:
            control = [np.array(x, dtype=np.float32, copy=True) for x in value]
        except (TypeError, ValueError) as err:
            raise ValueError("SCAFFOLD state_dict: control holds a non-numeric array") from err
        if template is not None:
            _check_shapes("control", control, [np.shape(x) for x in template.control])
        return cls(control=control)


def _check_shapes(what: str, arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> None:
    if len(arrays) != len(shapes):
        raise ValueError(f"{what} has {len(arrays)} arrays but the control variate has {len(shapes)}")
    for j, (x, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if tuple(np.shape(x)) != tuple(shape):
            raise ValueError(f"{what}, array {j}: shape {tuple(np.shape(x))} differs from the control's {tuple(shape)}")


def scaffold_init(weights: NDArrays) -> ScaffoldState:
    """Initial server control variate ``c = 0``, shaped like ``weights`` (pass the trainable arrays only)."""
    return ScaffoldState(control=[np.zeros(np.shape(x), dtype=np.float32) for x in weights])


def scaffold_update_control(
    state: ScaffoldState, control_deltas: Sequence[NDArrays], num_total_clients: int
) -> ScaffoldState:
    """Server control-variate update of SCAFFOLD (Karimireddy et al., 2020, Algorithm 1, line 17)::

        c <- c + (|S| / N) * mean_{i in S} dc_i  =  c + (1 / N) * sum_{i in S} dc_i

    Pure: returns a new state and leaves ``state`` and the deltas untouched. With no deltas (no client replied)
    the control variate is unchanged.

    Args:
        state: the current control variate.
        control_deltas: per replying client, ``dc_i = c_i+ - c_i`` (one array per control array).
        num_total_clients: ``N``, the number of clients in the federation (not only those sampled).

    Raises:
        ValueError: if ``num_total_clients`` is not a positive integer or is smaller than the number of deltas, or
            a delta's array count or shape differs from the control variate's (naming the client and array).
    """
    n_total = num_total_clients
    if isinstance(n_total, bool) or not isinstance(n_total, int | np.integer) or n_total < 1:
        raise ValueError(f"num_total_clients must be a positive integer, got {n_total!r}")
    if n_total < len(control_deltas):
        raise ValueError(f"num_total_clients={n_total} is smaller than the {len(control_deltas)} control deltas")
    shapes = [tuple(np.shape(x)) for x in state.control]
    for i, delta in enumerate(control_deltas):
        _check_shapes(f"client {i} control delta", delta, shapes)
    scale = 1.0 / float(n_total)
    new_control: NDArrays = []
    for j, c in enumerate(state.control):
        acc = float32_tensor(c, f"control[{j}]").clone()
        for i, delta in enumerate(control_deltas):
            acc.add_(tensor_view(delta[j], f"client {i}, array {j}"), alpha=scale)
        new_control.append(acc.numpy())
    return ScaffoldState(control=new_control)
