"""Server-side update rules of federated learning, behind one registry.

Every rule is the same pipeline: each client's payload (weights, an update, or a gradient) is
decoded and validated; an aggregator (`strategies.aggregators`) combines the payloads; the
server optimizer (`strategies.optimizers`) turns the pseudo-gradient into new global weights.
A rule is therefore a `RuleSpec`: which server optimizer, and what the clients do locally.
`strategies.base.FederatedStrategy` is the Flower shell around it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuleSpec:
    """A server update rule from the literature, as configuration of the common pipeline.

    Attributes:
        name: registry key.
        server_optimizer: key of `strategies.optimizers.SERVER_OPTIMIZERS` applied to the
            pseudo-gradient.
        client_mode: ``"train"`` (local epochs of SGD, send weights or an update) or
            ``"gradient"`` (FedSGD: send the full-batch gradient at the global weights).
        proximal: clients add FedProx's proximal term with the run's ``proximal-mu``.
        scaffold: clients and server keep SCAFFOLD control variates.
        fednova: the server normalizes updates by each client's number of local steps.
        reference: the paper.
    """

    name: str
    server_optimizer: str
    client_mode: str = "train"
    proximal: bool = False
    scaffold: bool = False
    fednova: bool = False
    reference: str = ""


STRATEGIES: dict[str, RuleSpec] = {
    "fedavg": RuleSpec("fedavg", "sgd", reference="McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data"),
    "fedsgd": RuleSpec("fedsgd", "sgd", client_mode="gradient", reference="McMahan et al. 2017 (FedSGD baseline)"),
    "fedavgm": RuleSpec("fedavgm", "momentum", reference="Hsu et al. 2019, Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification"),
    "fedprox": RuleSpec("fedprox", "sgd", proximal=True, reference="Li et al. 2020, Federated Optimization in Heterogeneous Networks"),
    "fedadam": RuleSpec("fedadam", "adam", reference="Reddi et al. 2021, Adaptive Federated Optimization"),
    "fedyogi": RuleSpec("fedyogi", "yogi", reference="Reddi et al. 2021, Adaptive Federated Optimization"),
    "fedadagrad": RuleSpec("fedadagrad", "adagrad", reference="Reddi et al. 2021, Adaptive Federated Optimization"),
    "scaffold": RuleSpec("scaffold", "sgd", scaffold=True, reference="Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"),
    "fednova": RuleSpec("fednova", "sgd", fednova=True, reference="Wang et al. 2020, Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization"),
}


def get_rule(name: str) -> RuleSpec:
    """The registered rule ``name``; unknown names raise with the valid choices."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy '{name}'; choose one of: {', '.join(sorted(STRATEGIES))}") from None


__all__ = ["STRATEGIES", "RuleSpec", "get_rule"]
