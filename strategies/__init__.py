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

    The fields say what the rule does; the properties below derive from them what travels, what is
    kept, and which run-wide features (secure aggregation, differential privacy, robust aggregators,
    a client-side AdamW) can run with it. The app's compatibility checks and their messages read only
    these properties, so a new rule is added here and nowhere else. Compression applies to every
    rule's model payload (extra arrays travel uncompressed), so it has no property.

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

    def payload_kind(self, send_delta: bool) -> str:
        """What a client sends: ``"gradient"`` (gradient rules), else ``"delta"`` or ``"weights"``."""
        if self.client_mode == "gradient":
            return "gradient"
        return "delta" if send_delta else "weights"

    @property
    def local_training(self) -> bool:
        """Clients train locally (epochs, learning rate, client optimizer); gradient rules do not."""
        return self.client_mode == "train"

    @property
    def extra_arrays(self) -> str:
        """What a client sends after its model payload ("" = nothing)."""
        return "control-variate update" if self.scaffold else ""

    @property
    def client_state(self) -> str:
        """What a client keeps from one round to the next ("" = nothing)."""
        return "control variate c_i" if self.scaffold else ""

    @property
    def reports_local_steps(self) -> bool:
        """The server reads each client's ``local_steps`` metric."""
        return self.fednova

    @property
    def secagg_conflict(self) -> str:
        """Why secure aggregation (one example-weighted mean of all that clients send) cannot run this rule ("" = it can)."""
        if self.extra_arrays:
            return f"needs each client's {self.extra_arrays}, unweighted"
        if self.reports_local_steps:
            return "rescales each client's update by its own step count"
        return ""

    @property
    def dp_conflict(self) -> str:
        """Why differential privacy (which clips and noises the model payload only) does not cover this rule ("" = it does)."""
        if self.extra_arrays:
            return f"also sends its {self.extra_arrays}"
        if self.reports_local_steps:
            return "also sends its local step count"
        return ""

    @property
    def aggregator_conflict(self) -> str:
        """Why only aggregators that take a weighted mean fit this rule ("" = any aggregator does)."""
        return "does its own normalized averaging" if self.fednova else ""

    @property
    def async_conflict(self) -> str:
        """Why asynchronous aggregation (FedBuff: updates from different model versions) cannot run this rule ("" = it can)."""
        if self.client_state:
            return f"keeps a {self.client_state} per client, updated against the one server state a round's cohort shares"
        return ""

    @property
    def adamw_conflict(self) -> str:
        """Why clients cannot train with AdamW under this rule ("" = they can)."""
        return "it assumes local SGD steps" if not self.local_training or self.scaffold or self.fednova else ""


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
