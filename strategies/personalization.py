"""Personalized federated learning: which parts of a model stay on a client, and what a client does with them.

Under label or feature skew one global model ``w`` serves some data owners much worse than others. The methods
here give each client ``k`` a model of its own while the federation still learns from everyone. They differ in
what is personal and in the client's local steps; the server side stays the registered update rule
(:mod:`strategies`), which only ever sees the *shared* part. Every method is a :class:`PersonalizationSpec`; the
app's compatibility checks read its properties, never its name.

Methods (``personalization`` in the run config)
-----------------------------------------------
``none``
    FedAvg's global model serves every client (McMahan et al. 2017).
``finetune``
    The local-adaptation baseline (Wang et al. 2019, "Federated Evaluation of On-device Personalization";
    Yu, Bagdasaryan and Shmatikov 2020, "Salvaging Federated Learning by Local Adaptation"): before it evaluates,
    a client takes ``s`` SGD steps from the received ``w`` on its own training data,
    ``v_k = w - eta_p sum_{j<s} grad F_k(v_k^{(j)})``, and evaluates ``v_k``. Nothing is kept between rounds.
``fedbn``
    FedBN (Li, Jiang, Zhang, Kamp and Dou, ICLR 2021, "FedBN: Federated Learning on Non-IID Features via Local
    Batch Normalization"): the normalization layers' affine parameters (gamma, beta) and running statistics
    (mean, variance) never leave the client; every other array is averaged as in FedAvg.
    :func:`normalization_keys` finds them.
``fedper``
    FedPer (Arivazhagan, Aggarwal, Singh and Choudhary 2019, "Federated Learning with Personalization Layers"):
    the model is a shared body ``phi`` and a personal head ``h_k``; both train together in the local epochs,
    only ``phi`` travels. The head is a list of module names (:func:`module_keys`; default :func:`last_layer`).
``fedrep``
    FedRep (Collins, Hassani, Mokhtari and Shakkottai, ICML 2021, "Exploiting Shared Representations for
    Personalized Federated Learning", Algorithm 1): the same split, trained in two phases each round. First the
    head with the received body fixed, for ``tau_h`` steps::

        h_k <- h_k - eta_h grad_h f_k(phi^t, h_k)

    then the body with the new head fixed, for ``tau_phi`` steps::

        phi_k <- phi_k - eta grad_phi f_k(phi_k, h_k)

    and ``phi_k`` is sent. The head adapts to the current representation before the body moves.
``ditto``
    Ditto (Li, Hu, Beirami and Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
    Personalization", Algorithm 1): beside the global model's own local update (whatever the update rule does),
    each client keeps a whole personal model ``v_k`` that minimizes::

        h_k(v; w^t) = F_k(v) + (lambda / 2) ||v - w^t||^2

    by ``s`` local steps ``v_k <- v_k - eta_p (grad F_k(v_k) + lambda (v_k - w^t))`` from where it stopped last
    round (``v_k = w^t`` on its first round), with ``w^t`` the global model the client received. ``lambda = 0``
    is local training alone; a large ``lambda`` ties ``v_k`` to ``w``. The term is FedProx's
    (:func:`strategies.client_rules.proximal_term`) with its centre at the received global model.

What travels
------------
Only the shared entries of the canonical weight list (trainable parameters and floating-point buffers in
``state_dict`` order), in that order: :func:`split_keys` keeps the order and drops the personal keys. Ditto and
``finetune`` share everything (their personal model is a separate copy). The personal part never leaves the
client; a server's model spec excludes it, so a resumed run or a checkpoint never holds it either.

Compatibility
-------------
A method whose personal part learns only in local training (``fedbn``, ``fedper``, ``fedrep``) needs a rule
that trains locally (not FedSGD). Every server optimizer and aggregator composes with every method: they act on
the shared part only (Collins et al. and Li et al. 2021 both run their client steps under FedAvg-style
averaging; nothing in the server step depends on what the clients keep). Differential privacy and secure
aggregation cover what travels; with FedBN the running statistics stay home, so a BatchNorm model can run
under DP.

This module depends on torch (module introspection, imported when used) and nothing of Flower.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the functions that need it: the registry alone stays light
    from torch import nn

__all__ = [
    "PERSONALIZATION",
    "PersonalizationSpec",
    "get_personalization",
    "last_layer",
    "module_keys",
    "normalization_keys",
    "split_keys",
]

PERSONAL_PARTS = ("", "normalization", "head")


@dataclass(frozen=True)
class PersonalizationSpec:
    """A personalized-FL method, as what it keeps on the client and what the client does.

    Attributes:
        name: registry key.
        personal_part: which entries of the shared model stay on the client: ``""`` (none), ``"normalization"``
            (FedBN) or ``"head"`` (named modules, FedPer / FedRep).
        personal_model: the client keeps a whole personal model beside the global one (Ditto).
        finetune_at_evaluation: the client fine-tunes a copy of the received model before it evaluates.
        head_first: local training runs in two phases, the personal head first, then the shared body (FedRep).
        proximal: the personal model's objective has the proximal term ``(lambda / 2) ||v - w||^2`` (Ditto).
        reference: the paper.
    """

    name: str
    personal_part: str = ""
    personal_model: bool = False
    finetune_at_evaluation: bool = False
    head_first: bool = False
    proximal: bool = False
    reference: str = ""

    def __post_init__(self) -> None:
        if self.personal_part not in PERSONAL_PARTS:
            raise ValueError(f"personal_part must be one of {PERSONAL_PARTS}, got {self.personal_part!r}")
        if self.head_first and self.personal_part != "head":
            raise ValueError("head_first needs personal_part='head'")

    @property
    def keeps_state(self) -> bool:
        """The client keeps arrays of its own from one round to the next."""
        return bool(self.personal_part) or self.personal_model

    @property
    def has_personal_model(self) -> bool:
        """Federated evaluation reports a personalized model beside the global one."""
        return self.keeps_state or self.finetune_at_evaluation

    @property
    def global_model_complete(self) -> bool:
        """The server's model is a whole model: False when part of every client's model never reaches it."""
        return not self.personal_part

    @property
    def personal_training(self) -> bool:
        """The method trains something with its own epochs, steps and learning rate."""
        return self.finetune_at_evaluation or self.personal_model or self.head_first

    @property
    def uses_modules(self) -> bool:
        """The personal part is a list of module names (``personal-modules``)."""
        return self.personal_part == "head"

    @property
    def local_training_conflict(self) -> str:
        """Why an update rule without local training (FedSGD) cannot run this method ("" = it can)."""
        if self.personal_part:
            return f"keeps its {self.personal_part} on the clients, which learns only in local training"
        return ""

    @property
    def evaluation_only(self) -> bool:
        """Everything the method does happens in federated evaluation."""
        return self.finetune_at_evaluation and not self.keeps_state


PERSONALIZATION: dict[str, PersonalizationSpec] = {
    "none": PersonalizationSpec("none", reference="McMahan et al. 2017 (one global model)"),
    "finetune": PersonalizationSpec(
        "finetune", finetune_at_evaluation=True,
        reference="Wang et al. 2019, Federated Evaluation of On-device Personalization (local fine-tuning)",
    ),
    "fedbn": PersonalizationSpec(
        "fedbn", personal_part="normalization",
        reference="Li et al. 2021, FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
    ),
    "fedper": PersonalizationSpec(
        "fedper", personal_part="head",
        reference="Arivazhagan et al. 2019, Federated Learning with Personalization Layers",
    ),
    "fedrep": PersonalizationSpec(
        "fedrep", personal_part="head", head_first=True,
        reference="Collins et al. 2021, Exploiting Shared Representations for Personalized Federated Learning",
    ),
    "ditto": PersonalizationSpec(
        "ditto", personal_model=True, proximal=True,
        reference="Li et al. 2021, Ditto: Fair and Robust Federated Learning Through Personalization",
    ),
}


def get_personalization(name: str) -> PersonalizationSpec:
    """The registered method ``name``; unknown names raise with the valid choices."""
    try:
        return PERSONALIZATION[name]
    except KeyError:
        raise ValueError(f"unknown personalization '{name}'; choose one of: {', '.join(sorted(PERSONALIZATION))}") from None


# ------------------------------------------------------------------------------------------- which entries
# Transformers' own norms (LlamaRMSNorm, T5LayerNorm...) subclass nn.Module directly, so a class name ending
# in "Norm" (optionally with a dimension suffix) counts too.
_NORM_SUFFIXES = ("Norm", "Norm1d", "Norm2d", "Norm3d")


def is_normalization(module: nn.Module) -> bool:
    """BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm, or a class named ``*Norm`` (``*Norm2d``...)."""
    from torch import nn

    types: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    if hasattr(nn, "RMSNorm"):
        types += (nn.RMSNorm,)
    return isinstance(module, types) or type(module).__name__.endswith(_NORM_SUFFIXES)


def normalization_keys(model: nn.Module) -> tuple[str, ...]:
    """The ``state_dict`` keys of every normalization layer's parameters and buffers (FedBN's local part).

    Keys are in ``state_dict`` order. Integer buffers (``num_batches_tracked``) are included; callers intersect
    with what travels.
    """
    prefixes = [name for name, module in model.named_modules() if name and is_normalization(module)]
    return tuple(k for k in model.state_dict(keep_vars=True) if _under_any(k, prefixes))


def _under_any(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def _contains_path(module_path: Sequence[str], name: Sequence[str]) -> bool:
    """Whether the dotted ``name`` occurs as consecutive components of ``module_path``."""
    n = len(name)
    return any(tuple(module_path[i : i + n]) == tuple(name) for i in range(len(module_path) - n + 1))


def module_keys(model: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """The ``state_dict`` keys of the modules named in ``names``, in ``state_dict`` order.

    A name matches a key when its dotted components occur consecutively in the key's module path, so ``head``,
    ``head.3`` and ``lora_A`` (every LoRA ``A`` matrix, ``...query.lora_A.default.weight``) all work.

    Raises:
        ValueError: for an empty name or a name that matches nothing (listing the model's module names).
    """
    keys = list(model.state_dict(keep_vars=True))
    found: list[str] = []
    for name in names:
        parts = tuple(p for p in name.split("."))
        if not name or any(not p for p in parts):
            raise ValueError(f"personal-modules: {name!r} is not a module name")
        hits = [k for k in keys if _contains_path(k.split(".")[:-1], parts)]
        if not hits:
            modules = [n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
            raise ValueError(
                f"personal-modules: no module of {type(model).__name__} is named {name!r}; modules with parameters: "
                f"{', '.join(modules[:40])}{' ...' if len(modules) > 40 else ''}"
            )
        found += hits
    wanted = set(found)
    return tuple(k for k in keys if k in wanted)


def last_layer(model: nn.Module) -> str:
    """The name of the last leaf module (in registration order) that has trainable parameters.

    For the built-in models: ``head.3`` (cnn), ``net.5`` (mlp), ``linear`` (linear); for LoRA models the task
    head kept in ``modules_to_save``.

    Raises:
        ValueError: if no module has a trainable parameter.
    """
    last = ""
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            last = name
    if not last:
        raise ValueError(f"{type(model).__name__} has no module with trainable parameters")
    return last


def split_keys(keys: Sequence[str], personal: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(shared, personal)``: ``keys`` split by membership in ``personal``, each in the order of ``keys``.

    Keys of ``personal`` that are not in ``keys`` (e.g. integer buffers, which never travel) are ignored.
    """
    mine = set(personal)
    return tuple(k for k in keys if k not in mine), tuple(k for k in keys if k in mine)
