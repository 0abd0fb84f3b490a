"""Server optimizers: turn the aggregated pseudo-gradient into new global weights.

Each round the server holds the global weights ``w`` and an aggregate ``a`` of the client updates
``u_i = w_i - w`` (see :mod:`strategies.aggregators`). The *pseudo-gradient* is ``g = -a`` (for FedAvg,
``g = w - mean_i w_i``), and a server optimizer maps ``(state, w, g)`` to ``(state', w')``. This follows the
"FedOpt" framing of Reddi et al., 2021, "Adaptive Federated Optimization": FedAvg is the server optimizer ``sgd``
with learning rate 1, FedAvgM is ``momentum``, and FedAdagrad/FedAdam/FedYogi are the adaptive rules.

Like TensorFlow Federated's optimizers, an optimizer is two pure methods with explicit state::

    state = opt.init(weights, mask)
    state, weights = opt.step(state, weights, pseudo_grad, mask)

``step`` never mutates its inputs (weights, pseudo-gradient or state) and returns new arrays. ``mask[j]`` says
whether array ``j`` is a trainable parameter: only those are optimized and have moments. An array with
``mask[j] = False`` (a float buffer such as BatchNorm running statistics) becomes ``w_j - g_j``, i.e. the plain
aggregate, and keeps no state. Integer buffers should not be passed at all.

Trainable arrays are computed in float32 with torch (multi-threaded, views of the numpy inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np
import torch

from strategies.tensors import all_finite, float32_tensor, tensor_view

__all__ = [
    "OPTIMIZER_HPARAMS_USED",
    "SERVER_OPTIMIZERS",
    "AdaptiveOptimizer",
    "MomentumOptimizer",
    "NDArrays",
    "SGDOptimizer",
    "ServerOptHParams",
    "ServerOptState",
    "ServerOptimizer",
    "get_server_optimizer",
]

NDArrays: TypeAlias = list[np.ndarray]


def _is_real(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)


@dataclass(frozen=True)
class ServerOptHParams:
    """Hyperparameters of the server optimizers; each reads only its own (see :data:`OPTIMIZER_HPARAMS_USED`).

    Attributes:
        learning_rate: server learning rate ``eta > 0`` (all optimizers). ``sgd`` with 1.0 is FedAvg.
        momentum: ``momentum``: coefficient ``beta`` in ``[0, 1)``.
        nesterov: ``momentum``: use Nesterov's look-ahead (requires ``momentum > 0``).
        beta1: adaptive rules: first-moment decay in ``[0, 1)``.
        beta2: ``adam``/``yogi``: second-moment decay in ``[0, 1)``.
        tau: adaptive rules: ``tau > 0`` added to ``sqrt(v)``, the degree of adaptivity (Reddi et al. 2021).
        initial_accumulator: adaptive rules: ``v_{-1}`` (every coordinate), ``>= 0``. Reddi et al.'s Algorithm 2
            asks for ``v_{-1} >= tau^2``; the default 0 instead matches ``torch.optim.Adam``/``Adagrad`` (whose
            ``eps`` plays the role of ``tau``), and ``tau`` already keeps the denominator positive.
        bias_correction: adaptive rules: divide ``m`` by ``1 - beta1^t`` and, for ``adam``/``yogi``, ``v`` by
            ``1 - beta2^t`` (Kingma and Ba, 2015). Off in Reddi et al.; on, ``adam`` equals ``torch.optim.Adam``.
    """

    learning_rate: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    initial_accumulator: float = 0.0
    bias_correction: bool = False

    def __post_init__(self) -> None:
        for name in ("learning_rate", "momentum", "beta1", "beta2", "tau", "initial_accumulator"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.initial_accumulator < 0:
            raise ValueError(f"initial_accumulator must be >= 0, got {self.initial_accumulator!r}")
        for name in ("nesterov", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True requires momentum > 0")


@dataclass(frozen=True)
class ServerOptState:
    """Explicit state of a server optimizer.

    Attributes:
        step: number of steps taken so far (``t`` of the bias correction is ``step + 1`` in the next step).
        m: first moment (``adam``/``yogi``/``adagrad``) or momentum buffer (``momentum``), one float32 array per
            *trainable* array in canonical order (masked-out arrays have none); ``None`` for ``sgd``.
        v: second moment of the adaptive rules, laid out like ``m``; ``None`` otherwise.

    The arrays are never modified in place by this module; treat them as read-only.
    """

    step: int
    m: NDArrays | None = None
    v: NDArrays | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain ``{"step": int, "m": list[np.ndarray] | None, "v": list[np.ndarray] | None}`` for checkpoints.

        The arrays are shared with the state, not copied (the state is never mutated); do not write to them.
        """
        return {
            "step": int(self.step),
            "m": None if self.m is None else list(self.m),
            "v": None if self.v is None else list(self.v),
        }

    @classmethod
    def load_state_dict(cls, state_dict: Mapping[str, Any], template: ServerOptState | None = None) -> ServerOptState:
        """Rebuild a state from :meth:`state_dict` output (arrays are copied to float32).

        Args:
            state_dict: mapping with exactly the keys ``step``, ``m`` and ``v``.
            template: if given (e.g. ``opt.init(weights, mask)``), the loaded ``m``/``v`` must be present or absent
                as in the template, with the same number of arrays and the same shapes.

        Raises:
            ValueError: on missing or unexpected keys, a negative or non-integer step, a non-numeric array, or a
                mismatch with ``template`` (naming the moment and array index).
            TypeError: if ``m`` or ``v`` is neither ``None`` nor a list of arrays.
        """
        keys = set(state_dict)
        if keys != {"step", "m", "v"}:
            missing, extra = sorted({"step", "m", "v"} - keys), sorted(keys - {"step", "m", "v"})
            raise ValueError(f"server optimizer state_dict: missing keys {missing}, unexpected keys {extra}")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"server optimizer state_dict: step must be a non-negative integer, got {step!r}")
        moments: dict[str, NDArrays | None] = {}
        for name in ("m", "v"):
            value = state_dict[name]
            if value is None:
                moments[name] = None
                continue
            if isinstance(value, np.ndarray | str | bytes) or not isinstance(value, Sequence):
                raise TypeError(f"server optimizer state_dict: {name} must be None or a list of arrays")
            try:
                moments[name] = [np.array(x, dtype=np.float32, copy=True) for x in value]
            except (TypeError, ValueError) as err:
                raise ValueError(f"server optimizer state_dict: {name} holds a non-numeric array") from err
        state = cls(step=int(step), m=moments["m"], v=moments["v"])
        if template is not None:
            for name in ("m", "v"):
                got, want = getattr(state, name), getattr(template, name)
                if (got is None) != (want is None):
                    raise ValueError(
                        f"server optimizer state_dict: {name} is {'absent' if got is None else 'present'} but this "
                        f"optimizer {'has' if want is not None else 'has no'} {name}"
                    )
                if got is not None and want is not None:
                    _check_moment(name, got, [w.shape for w in want])
        return state


def _check_moment(name: str, moment: NDArrays, shapes: Sequence[tuple[int, ...]]) -> None:
    if len(moment) != len(shapes):
        raise ValueError(
            f"optimizer state {name} has {len(moment)} arrays but there are {len(shapes)} trainable arrays"
        )
    for k, (x, shape) in enumerate(zip(moment, shapes, strict=True)):
        if tuple(np.shape(x)) != tuple(shape):
            raise ValueError(f"optimizer state {name}[{k}] has shape {tuple(np.shape(x))}, expected {tuple(shape)}")


class ServerOptimizer(Protocol):
    """A server update rule with explicit state (TensorFlow Federated style).

    ``init(weights, mask)`` returns the initial state; ``step(state, weights, pseudo_grad, mask)`` returns the
    next state and new weights without mutating any input.
    """

    def init(self, weights: NDArrays, mask: Sequence[bool]) -> ServerOptState: ...

    def step(
        self, state: ServerOptState, weights: NDArrays, pseudo_grad: NDArrays, mask: Sequence[bool]
    ) -> tuple[ServerOptState, NDArrays]: ...


def _trainable_indices(weights: NDArrays, mask: Sequence[bool]) -> list[int]:
    if len(mask) != len(weights):
        raise ValueError(f"mask has {len(mask)} entries but there are {len(weights)} arrays")
    for j, flag in enumerate(mask):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"mask[{j}] must be a bool, got {flag!r}")
    return [j for j, flag in enumerate(mask) if flag]


def _check_step_inputs(weights: NDArrays, pseudo_grad: NDArrays, mask: Sequence[bool]) -> list[int]:
    trainable = _trainable_indices(weights, mask)
    if len(pseudo_grad) != len(weights):
        raise ValueError(f"pseudo_grad has {len(pseudo_grad)} arrays but weights have {len(weights)}")
    for j, (w, g) in enumerate(zip(weights, pseudo_grad, strict=True)):
        if np.shape(w) != np.shape(g):
            raise ValueError(f"array {j}: pseudo_grad shape {np.shape(g)} differs from weights shape {np.shape(w)}")
        if not all_finite(tensor_view(g, f"pseudo_grad[{j}]")):
            raise ValueError(f"pseudo_grad[{j}] contains NaN or inf")
    return trainable


class _MaskedOptimizer:
    """Shared plumbing: validation, the mask split, and the plain aggregate for masked-out arrays."""

    has_m: bool = False
    has_v: bool = False

    def __init__(self, hparams: ServerOptHParams) -> None:
        if not isinstance(hparams, ServerOptHParams):
            raise TypeError(f"hparams must be a ServerOptHParams, got {type(hparams).__name__}")
        self.hparams = hparams

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams!r})"

    def _initial_v(self) -> float:
        return 0.0

    def init(self, weights: NDArrays, mask: Sequence[bool]) -> ServerOptState:
        """Initial state: step 0 and, for trainable arrays only, zero ``m`` / constant ``v`` as the rule needs."""
        trainable = _trainable_indices(weights, mask)
        shapes = [tuple(np.shape(weights[j])) for j in trainable]
        m = [np.zeros(s, dtype=np.float32) for s in shapes] if self.has_m else None
        v = [np.full(s, self._initial_v(), dtype=np.float32) for s in shapes] if self.has_v else None
        return ServerOptState(step=0, m=m, v=v)

    def step(
        self, state: ServerOptState, weights: NDArrays, pseudo_grad: NDArrays, mask: Sequence[bool]
    ) -> tuple[ServerOptState, NDArrays]:
        """One server step; see the class docstring for the rule. Pure: returns new state and new arrays.

        Raises:
            ValueError: if ``weights``, ``pseudo_grad`` and ``mask`` disagree in length or shape, the
                pseudo-gradient is not finite, or the state does not match the trainable arrays.
            TypeError: if a mask entry is not a bool.
        """
        trainable = _check_step_inputs(weights, pseudo_grad, mask)
        shapes = [tuple(np.shape(weights[j])) for j in trainable]
        for name, needed in (("m", self.has_m), ("v", self.has_v)):
            moment = getattr(state, name)
            if needed and moment is None:
                raise ValueError(f"optimizer state has no {name}; build it with this optimizer's init()")
            if needed and moment is not None:
                _check_moment(name, moment, shapes)
        t = state.step + 1
        new_weights: NDArrays = [np.empty(0)] * len(weights)
        new_m: NDArrays = []
        new_v: NDArrays = []
        for k, j in enumerate(trainable):
            w = float32_tensor(weights[j], f"weights[{j}]")
            g = float32_tensor(pseudo_grad[j], f"pseudo_grad[{j}]")
            m = float32_tensor(state.m[k], f"state.m[{k}]") if self.has_m and state.m is not None else None
            v = float32_tensor(state.v[k], f"state.v[{k}]") if self.has_v and state.v is not None else None
            w_new, m_new, v_new = self._update(t, w, g, m, v)
            new_weights[j] = w_new.numpy()
            if m_new is not None:
                new_m.append(m_new.numpy())
            if v_new is not None:
                new_v.append(v_new.numpy())
        for j, flag in enumerate(mask):
            if not flag:
                w_arr = np.asarray(weights[j])
                new_weights[j] = np.subtract(w_arr, pseudo_grad[j]).astype(w_arr.dtype, copy=False)
        new_state = ServerOptState(step=t, m=new_m if self.has_m else None, v=new_v if self.has_v else None)
        return new_state, new_weights

    def _update(
        self, t: int, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return fresh ``(w', m', v')`` tensors for one trainable array; the inputs must not be written to."""
        raise NotImplementedError


class SGDOptimizer(_MaskedOptimizer):
    """Server SGD: ``w <- w - eta * g``.

    With the pseudo-gradient ``g = w - mean_i(w_i)`` and ``eta = 1`` this is FedAvg (McMahan et al., 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data"); SCAFFOLD's server step
    ``x <- x + eta_g * mean_i(dy_i)`` (Karimireddy et al., 2020) is this rule with ``g = -mean_i(dy_i)``.
    No state besides the step count.
    """

    def _update(
        self, t: int, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return torch.add(w, g, alpha=-self.hparams.learning_rate), None, None


class MomentumOptimizer(_MaskedOptimizer):
    """Server SGD with momentum, FedAvgM.

    Hsu, Qi and Brown, 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification". With momentum ``beta`` and buffer ``b_0 = 0``::

        b_t = beta * b_{t-1} + g_t
        w_t = w_{t-1} - eta * b_t                      (nesterov: w_t = w_{t-1} - eta * (g_t + beta * b_t))

    This is ``torch.optim.SGD(lr=eta, momentum=beta, nesterov=...)`` fed ``g``; ``beta = 0``, ``eta = 1`` is FedAvg.
    The buffer is stored as the state's ``m``.
    """

    has_m = True

    def _update(
        self, t: int, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        assert m is not None
        hp = self.hparams
        buf = m.mul(hp.momentum).add_(g)
        direction = torch.add(g, buf, alpha=hp.momentum) if hp.nesterov else buf
        return torch.add(w, direction, alpha=-hp.learning_rate), buf, None


class AdaptiveOptimizer(_MaskedOptimizer):
    """FedAdagrad, FedAdam and FedYogi.

    Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar and McMahan, 2021, "Adaptive Federated Optimization",
    Algorithm 2. With ``Delta_t = -g_t`` (the aggregated client update), ``m_{-1} = 0`` and
    ``v_{-1} = initial_accumulator``::

        m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
        adagrad: v_t = v_{t-1} + Delta_t^2
        adam:    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
        yogi:    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
        w_t = w_{t-1} + eta * m_t / (sqrt(v_t) + tau)

    With ``bias_correction`` (Kingma and Ba, 2015, "Adam: A Method for Stochastic Optimization")::

        w_t = w_{t-1} + eta * (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + tau)

    where the ``v`` correction applies to ``adam`` and ``yogi`` only (``adagrad``'s ``v`` is a sum, not an
    average). Then ``adam`` equals ``torch.optim.Adam(lr=eta, betas=(beta1, beta2), eps=tau)`` fed ``g``, and
    ``adagrad`` with ``beta1 = 0`` equals ``torch.optim.Adagrad(lr=eta, eps=tau,
    initial_accumulator_value=initial_accumulator)`` (with or without bias correction).
    """

    has_m = True
    has_v = True

    def __init__(self, rule: Literal["adagrad", "adam", "yogi"], hparams: ServerOptHParams) -> None:
        if rule not in ("adagrad", "adam", "yogi"):
            raise ValueError(f"unknown adaptive rule {rule!r}; choose one of: adagrad, adam, yogi")
        super().__init__(hparams)
        self.rule = rule

    def __repr__(self) -> str:
        return f"AdaptiveOptimizer({self.rule!r}, {self.hparams!r})"

    def _initial_v(self) -> float:
        return float(self.hparams.initial_accumulator)

    def _update(
        self, t: int, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        assert m is not None and v is not None
        hp = self.hparams
        delta = torch.neg(g)
        # m + (1 - beta1) * (Delta - m) == beta1 * m + (1 - beta1) * Delta; lerp is what torch.optim.Adam uses.
        m_new = torch.lerp(m, delta, 1.0 - hp.beta1)
        if self.rule == "adagrad":
            v_new = torch.addcmul(v, delta, delta)
        elif self.rule == "adam":
            v_new = v.mul(hp.beta2).addcmul_(delta, delta, value=1.0 - hp.beta2)
        else:  # yogi
            delta_sq = delta.mul(delta)
            v_new = torch.addcmul(v, delta_sq, torch.sign(v - delta_sq), value=-(1.0 - hp.beta2))
        step_size = hp.learning_rate
        denom = v_new.sqrt()
        if hp.bias_correction:
            step_size /= 1.0 - hp.beta1**t
            if self.rule != "adagrad":
                denom.div_(math.sqrt(1.0 - hp.beta2**t))
        denom.add_(hp.tau)
        return torch.addcdiv(w, m_new, denom, value=step_size), m_new, v_new


ServerOptimizerFactory: TypeAlias = Callable[[ServerOptHParams], ServerOptimizer]

SERVER_OPTIMIZERS: dict[str, ServerOptimizerFactory] = {
    "adagrad": lambda hp: AdaptiveOptimizer("adagrad", hp),
    "adam": lambda hp: AdaptiveOptimizer("adam", hp),
    "momentum": MomentumOptimizer,
    "sgd": SGDOptimizer,
    "yogi": lambda hp: AdaptiveOptimizer("yogi", hp),
}
"""Run-config name -> factory ``hparams -> ServerOptimizer``."""

OPTIMIZER_HPARAMS_USED: dict[str, frozenset[str]] = {
    "adagrad": frozenset({"learning_rate", "beta1", "tau", "initial_accumulator", "bias_correction"}),
    "adam": frozenset({"learning_rate", "beta1", "beta2", "tau", "initial_accumulator", "bias_correction"}),
    "momentum": frozenset({"learning_rate", "momentum", "nesterov"}),
    "sgd": frozenset({"learning_rate"}),
    "yogi": frozenset({"learning_rate", "beta1", "beta2", "tau", "initial_accumulator", "bias_correction"}),
}
"""Which :class:`ServerOptHParams` fields each optimizer reads; a caller can reject settings that would do nothing."""


def get_server_optimizer(name: str, hparams: ServerOptHParams | None = None) -> ServerOptimizer:
    """Build a server optimizer by its run-config name (``hparams`` defaults to ``ServerOptHParams()``).

    Raises:
        ValueError: for an unknown name (listing the valid ones) or invalid hyperparameters (naming the field;
            raised when the :class:`ServerOptHParams` is constructed).
    """
    try:
        factory = SERVER_OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown server optimizer {name!r}; choose one of: {', '.join(sorted(SERVER_OPTIMIZERS))}"
        ) from None
    return factory(hparams if hparams is not None else ServerOptHParams())
