"""Personalization on the client: what stays on the node, and each method's local steps (plain PyTorch, no Flower).

`personal_split` divides the model's canonical weight list (`task.weight_spec`) into what travels and what stays
(`strategies.personalization` says which entries each method keeps). The server builds the same split, so its
model spec, its checkpoints and everything it sends or receives hold the shared part only. `Personalizer` runs a
method's client side around `task.train` and `task.evaluate`; the arrays it keeps from one round to the next
go into the node's state (`flower_app.node_state`) under `PERSONAL_KEY` and `DITTO_KEY`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from flower_app.config import ConfigError
from flower_app.task import (
    NDArrays,
    TrainOptions,
    TrainResult,
    WeightSpec,
    evaluate,
    get_weights,
    set_weights,
    train,
    weight_spec,
)
from strategies.personalization import (
    get_personalization,
    last_layer,
    module_keys,
    normalization_keys,
    split_keys,
)

PERSONAL_KEY = "personal-part"  # FedBN / FedPer / FedRep: the entries that never leave the node
DITTO_KEY = "ditto-model"  # Ditto: the personal model v_k, every entry of the canonical list


@dataclass(frozen=True)
class PersonalOptions:
    """The run's personalization (built by `flower_app.options.personal_options`)."""

    method: str = "none"
    modules: tuple[str, ...] = ()  # fedper / fedrep: the personal head ('' = the model's last layer)
    epochs: int = 1  # personal training: fine-tuning, Ditto's personal model, FedRep's head
    steps: int = 0  # at most this many optimizer steps of it (0 = epochs decide)
    learning_rate: float = 0.05
    ditto_lambda: float = 0.1


class NodeArrays(Protocol):
    """What a personalizer reads and writes of the node's state (`flower_app.node_state.NodeState`)."""

    def get(self, name: str, shapes: Sequence[tuple[int, ...]] | None = None) -> NDArrays | None: ...

    def put(self, name: str, arrays: NDArrays | None) -> None: ...


@dataclass(frozen=True)
class PersonalSplit:
    """The canonical weight list, and the parts of it that travel (``shared``) and stay (``personal``)."""

    full: WeightSpec
    shared: WeightSpec
    personal: WeightSpec


def subspec(spec: WeightSpec, keys: Sequence[str]) -> WeightSpec:
    """The entries of ``spec`` named in ``keys``, in the order of ``spec``."""
    wanted = set(keys)
    rows = [(k, s, t) for k, s, t in zip(spec.keys, spec.shapes, spec.trainable) if k in wanted]
    return WeightSpec(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))


def personal_keys(options: PersonalOptions, model: nn.Module, spec: WeightSpec) -> tuple[str, ...]:
    """The entries of ``spec`` that stay on the node under ``options.method``.

    Raises:
        ConfigError: when the method has nothing to keep on this model (FedBN on a model without normalization
            layers would be FedAvg), or would keep everything (nothing left to learn together).
    """
    method = get_personalization(options.method)
    model_name = type(model).__name__
    if method.personal_part == "normalization":
        candidates = normalization_keys(model)
        if not set(candidates) & set(spec.keys):
            raise ConfigError(
                f"personalization '{method.name}' keeps the normalization layers on the nodes, but {model_name} has none "
                "that trains or travels (it would equal fedavg); use a model with BatchNorm (model='cnn') or another method"
            )
    elif method.personal_part == "head":
        names = options.modules or (last_layer(model),)
        try:
            candidates = module_keys(model, names)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not set(candidates) & set(spec.keys):
            raise ConfigError(
                f"personal-modules {', '.join(names)}: nothing of them trains or travels in {model_name} (frozen), "
                "so there is no personal part; name modules that train"
            )
    else:
        return ()
    shared, personal = split_keys(spec.keys, candidates)
    if not shared:
        what = f"personal-modules {', '.join(options.modules or (last_layer(model),))}" if method.uses_modules else method.name
        raise ConfigError(
            f"personalization '{method.name}': {what} cover every array {model_name} trains, so nothing would be "
            "shared (that is local training alone); name a smaller head in personal-modules or use a larger model "
            "(e.g. model='mlp' instead of 'linear')"
        )
    return personal


def personal_split(options: PersonalOptions, model: nn.Module) -> PersonalSplit:
    """What travels and what stays, for this run's method and this model."""
    full = weight_spec(model)
    personal = personal_keys(options, model, full)
    shared_keys, _ = split_keys(full.keys, personal)
    return PersonalSplit(full, subspec(full, shared_keys), subspec(full, personal))


# A model built once and handed out again (transformers in simulation, `hf_models` cache) carries the personal
# part of whichever client used it last: a node without state of its own starts from the values the model had
# when it was first seen here, i.e. its seeded initialisation.
_INITIAL: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], NDArrays]] = weakref.WeakKeyDictionary()


def _initial(model: nn.Module, spec: WeightSpec) -> NDArrays:
    per_model = _INITIAL.setdefault(model, {})
    if spec.keys not in per_model:
        per_model[spec.keys] = get_weights(model, spec)
    return per_model[spec.keys]


class Personalizer:
    """A method's client side: keeps the personal part, trains it, evaluates the personalized model.

    `FlowerClient` calls, per fit: `restore` (the node's personal part into the model), `train` (the local
    training the rule's payload comes from), `after_fit` (keeps the personal part; Ditto trains its personal
    model); per evaluation: `restore`, then `evaluate_personal` after the global model's own evaluation.
    """

    def __init__(self, options: PersonalOptions, model: nn.Module, split: PersonalSplit | None = None) -> None:
        self.options = options
        self.method = get_personalization(options.method)
        self.split = split if split is not None else personal_split(options, model)
        self.initial = _initial(model, self.split.personal)

    @property
    def shared(self) -> WeightSpec:
        """What travels (the server's model spec)."""
        return self.split.shared

    @property
    def evaluation_changes_model(self) -> bool:
        """Whether `evaluate_personal` trains or replaces the model's weights (finetune, Ditto)."""
        return self.method.has_personal_model and not self.method.personal_part

    def personal_train_options(self, options: TrainOptions) -> TrainOptions:
        """The personal training: fine-tuning, Ditto's personal model (with lambda), FedRep's head."""
        mu = self.options.ditto_lambda if self.method.proximal else 0.0
        return replace(
            options, epochs=self.options.epochs, max_steps=self.options.steps,
            learning_rate=self.options.learning_rate, proximal_mu=mu,
        )

    # ------------------------------------------------------------------------------------------------ state
    def restore(self, model: nn.Module, node: NodeArrays) -> None:
        """Put this node's personal part (its initial values before its first round) into ``model``."""
        if not self.method.personal_part:
            return
        arrays = node.get(PERSONAL_KEY, self.split.personal.shapes)
        set_weights(model, self.split.personal, arrays if arrays is not None else self.initial)

    # ------------------------------------------------------------------------------------------------- fit
    def train(
        self,
        model: nn.Module,
        loader: DataLoader,
        task: str,
        options: TrainOptions,
        device: torch.device,
        correction: Sequence[torch.Tensor] | None = None,
    ) -> TrainResult:
        """The local training that the rule's payload comes from.

        ``correction`` (SCAFFOLD's ``c - c_i``) and FedProx's term concern the shared trainable parameters
        only: the personal ones train by plain local steps. FedRep trains the head first (personal epochs,
        steps and learning rate, body fixed), then the body (the run's local training, head fixed).
        """
        if not self.method.personal_part:
            return train(model, loader, task, options, device, correction)
        personal = set(self.split.personal.keys)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.method.head_first:
            head = [p for n, p in named if n in personal]
            body = [p for n, p in named if n not in personal]
            train(model, loader, task, self.personal_train_options(options), device, params=head)
            return train(model, loader, task, options, device, correction, params=body)
        full: list[torch.Tensor] | None = None
        if correction is not None:
            shared_corrections = iter(correction)
            full = [torch.zeros_like(p) if n in personal else next(shared_corrections) for n, p in named]
        anchor = [None if n in personal else p.detach().clone() for n, p in named] if options.proximal_mu > 0 else None
        return train(model, loader, task, options, device, full, params=[p for _, p in named], anchor=anchor)

    def after_fit(
        self,
        model: nn.Module,
        node: NodeArrays,
        received: NDArrays,
        loader: Callable[[], DataLoader],
        task: str,
        options: TrainOptions,
        device: torch.device,
    ) -> dict[str, float]:
        """Keep the personal part; Ditto: a round of its personal model. Returns metrics to report.

        ``received`` is the global model the round started from, in shared-spec order; ``loader`` makes the
        personal training's data loader (its own shuffling seed, so the global update is unchanged).
        """
        if self.method.personal_part:
            node.put(PERSONAL_KEY, get_weights(model, self.split.personal))
        if not self.method.personal_model:
            return {}
        # Ditto, Algorithm 1: v_k <- v_k - eta_p (grad F_k(v_k) + lambda (v_k - w^t)), from where it stopped.
        full = self.split.full
        v = node.get(DITTO_KEY, full.shapes)
        set_weights(model, full, v if v is not None else received)
        anchor = _trainable_tensors(model, full, received)
        result = train(model, loader(), task, self.personal_train_options(options), device, anchor=anchor)
        node.put(DITTO_KEY, get_weights(model, full))
        return {"personal_train_loss": result.loss}

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate_personal(
        self,
        model: nn.Module,
        node: NodeArrays,
        received: NDArrays,
        train_loader: Callable[[], DataLoader],
        val_loader: DataLoader,
        task: str,
        options: TrainOptions,
        device: torch.device,
        global_result: tuple[float, float | None],
    ) -> dict[str, float]:
        """``personal_loss`` (and ``personal_accuracy``) of the model this node would serve.

        FedBN / FedPer / FedRep: the received shared part with this node's personal part, which is what
        ``global_result`` already measured (the model is only complete with it). finetune: a copy of the
        received model after the personal training on the node's training data. Ditto: the personal model.
        """
        if not self.method.has_personal_model:
            return {}
        if self.method.personal_part:
            loss, accuracy = global_result
        else:
            if self.method.personal_model:
                v = node.get(DITTO_KEY, self.split.full.shapes)
                set_weights(model, self.split.full, v if v is not None else received)
            if self.method.finetune_at_evaluation:
                train(model, train_loader(), task, self.personal_train_options(options), device)
            loss, accuracy, _ = evaluate(model, val_loader, task, device)
        out = {"personal_loss": float(loss)}
        if accuracy is not None:
            out["personal_accuracy"] = float(accuracy)
        return out


def _trainable_tensors(model: nn.Module, spec: WeightSpec, arrays: NDArrays) -> list[torch.Tensor | None]:
    """``arrays`` (in ``spec`` order) as tensors aligned with the model's trainable parameters."""
    by_key = dict(zip(spec.keys, arrays))
    out: list[torch.Tensor | None] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = by_key.get(name)
            out.append(None if value is None else torch.as_tensor(np.asarray(value)).to(p.device, p.dtype))
    return out
