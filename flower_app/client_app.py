"""ClientApp: a `NumPyClient` around the local PyTorch training in `flower_app.task`.

`fit` trains (or takes the gradient, per the rule), clips and noises the update when the run
asks for client-side DP (`client_privacy`), compresses it, and reports. Every setting comes from
the run config through `flower_app.options`; the fit config only carries what the server decides
each round (the round number, DP's clipping norm and noise).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, RecordDict, Scalar

from flower_app.client_privacy import client_mods, private_fit_report, privatize_update
from flower_app.config import AppConfig, parse_run_config
from flower_app.data import ClientData, client_data, label_counts
from flower_app.node_state import NodeState, kept_state, open_store, warn_if_lost_on_resume
from flower_app.options import (
    compression_config,
    finetune_options,
    payload_kind,
    personal_options,
    privacy_options,
    train_options,
)
from flower_app.personal import Personalizer
from flower_app.task import (
    NDArrays,
    build_model,
    evaluate,
    full_gradient,
    get_weights,
    make_loader,
    resolve_device,
    set_weights,
)
from strategies import get_rule
from strategies.client_rules import fedsgd_payload, scaffold_control_update, scaffold_correction
from strategies.compression import compress, wire_nbytes

CONTROL_KEY = "scaffold-control"  # this client's SCAFFOLD control variate c_i
RESIDUAL_KEY = "compression-residual"  # what compression has not sent yet (error feedback)


class FlowerClient(NumPyClient):
    """Trains the shared model on this node's data; sends weights, an update or a gradient."""

    def __init__(
        self, cfg: AppConfig, data: ClientData, state: RecordDict, node_config: Mapping[str, Scalar] | None = None
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.state = state  # Flower's node state (the store when the node config names no state-dir)
        self.rule = get_rule(cfg.strategy)
        self.kind = payload_kind(cfg)  # "weights", "delta" or "gradient"
        self.options = train_options(cfg)
        self.codec = compression_config(cfg)
        self.privacy = privacy_options(cfg)
        self.device = resolve_device(cfg.device)
        self.model = build_model(cfg.model, data.info, cfg.hidden_size, seed=cfg.seed, finetune=finetune_options(cfg, cache=True))
        # Personalization: what stays on this node; only the shared part travels (the server's spec too).
        self.personal = Personalizer(personal_options(cfg), self.model)
        self.spec = self.personal.shared
        # What this node keeps between messages (personal part, c_i, residual): node state or its state-dir.
        self.store = open_store(cfg, state, node_config or {}, data.partition_id)
        warn_if_lost_on_resume(cfg, self.store, kept_state(cfg))
        self.node: NodeState | None = None

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model, self.spec)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.node = node = self.store.open(config, fit=True)  # what this node kept, as of the previous round
        n = len(self.spec)
        global_weights, control = parameters[:n], parameters[n:]  # SCAFFOLD: c follows the weights
        set_weights(self.model, self.spec, global_weights)
        self.personal.restore(self.model, node)
        # Shuffling depends on (seed, round, partition) only, so a resumed run replays exactly.
        seed = zlib.crc32(f"{self.cfg.seed}:{int(config.get('server-round', 0))}:{self.data.partition_id}".encode())
        torch.manual_seed(seed)  # dropout and other random layers replay too (this is the client's process)
        loader = make_loader(self.data.train.x, self.data.train.y, self.cfg.batch_size, shuffle=True, seed=seed)
        payload, extras, metrics = self._local_work(global_weights, control, loader)
        metrics.update(self.personal.after_fit(  # keeps the personal part; Ditto: a round of the personal model
            self.model, node, global_weights, self._personal_loader(config, "ditto"), self.data.info.task,
            self.options, self.device,
        ))
        if self.privacy.client_dp:  # clip and noise the update (the server sent this round's norm and noise)
            payload, bits = privatize_update(self.privacy, config, payload)
            extras = extras + bits
        wire, residual = compress(payload, self.codec, node.get(RESIDUAL_KEY))
        node.put(RESIDUAL_KEY, residual)
        node.commit()
        wire = wire + extras
        metrics.update(
            num_upload_bytes=wire_nbytes(wire),
            data_partition=self.data.partition_id,
            data_num_examples=len(self.data.train),
            **label_counts(self.data.train, self.data.num_classes),
        )
        num_examples, metrics = private_fit_report(self.privacy, wire, len(self.data.train), metrics)
        return wire, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        self.node = node = self.store.open(config, fit=False)
        received = parameters[: len(self.spec)]
        set_weights(self.model, self.spec, received)
        self.personal.restore(self.model, node)
        loader = make_loader(self.data.val.x, self.data.val.y, self.cfg.batch_size, shuffle=False)
        loss, accuracy, n = evaluate(self.model, loader, self.data.info.task, self.device)
        metrics: dict[str, Scalar] = {"accuracy": accuracy} if accuracy is not None else {}
        metrics.update(self.personal.evaluate_personal(  # the model this node would serve
            self.model, node, received, self._personal_loader(config, "finetune"), loader, self.data.info.task,
            self.options, self.device, (loss, accuracy),
        ))
        return loss, n, metrics

    def _personal_loader(self, config: dict[str, Scalar], tag: str) -> Callable[[], torch.utils.data.DataLoader]:
        """The personal training's loader, shuffled by (seed, round, partition, tag): the global update's is unchanged."""
        def make() -> torch.utils.data.DataLoader:
            seed = zlib.crc32(f"{self.cfg.seed}:{int(config.get('server-round', 0))}:{self.data.partition_id}:{tag}".encode())
            torch.manual_seed(seed)
            return make_loader(self.data.train.x, self.data.train.y, self.cfg.batch_size, shuffle=True, seed=seed)

        return make

    def _local_work(
        self, global_weights: NDArrays, control: NDArrays, loader: torch.utils.data.DataLoader
    ) -> tuple[NDArrays, NDArrays, dict[str, Scalar]]:
        """The rule's client step: the payload (weights, update or gradient), extra arrays, metrics."""
        if self.rule.client_mode == "gradient":
            gradient, loss = self._gradient_payload(global_weights, loader)
            return gradient, [], {"train_loss": loss, "local_steps": 1}
        # SCAFFOLD: this client's c_i, read once from node state (zeros before its first round).
        assert self.node is not None
        shapes = [tuple(c.shape) for c in control]
        own = (self.node.get(CONTROL_KEY, shapes) or [np.zeros_like(c) for c in control]) if self.rule.scaffold else []
        correction = self._scaffold_correction(control, own) if self.rule.scaffold else None
        result = self.personal.train(self.model, loader, self.data.info.task, self.options, self.device, correction)
        new_weights = get_weights(self.model, self.spec)
        extras: NDArrays = []
        if self.rule.scaffold:
            extras = self._scaffold_control_delta(global_weights, new_weights, control, own, result.num_steps)
        # The one conversion on the client: the update u = w_local - w_global, when the run sends updates.
        payload = [w - g for w, g in zip(new_weights, global_weights)] if self.kind == "delta" else new_weights
        metrics: dict[str, Scalar] = {"train_loss": result.loss, "local_steps": result.num_steps}
        if result.accuracy is not None:
            metrics["train_accuracy"] = result.accuracy
        return payload, extras, metrics

    # ------------------------------------------------------------------------- FedSGD
    def _gradient_payload(self, global_weights: NDArrays, loader: torch.utils.data.DataLoader) -> tuple[NDArrays, float]:
        """Gradients for trainable arrays; for buffers, w_global - b_local (averages them)."""
        grads, loss = full_gradient(self.model, loader, self.data.info.task, self.device, self.options.max_steps)
        local = get_weights(self.model, self.spec)
        return fedsgd_payload(grads, global_weights, local, self.spec.trainable), loss

    # ----------------------------------------------------------------------- SCAFFOLD
    def _scaffold_correction(self, control: NDArrays, own: NDArrays) -> list[torch.Tensor]:
        """c - c_i per trainable parameter (Karimireddy et al. 2020, Algorithm 1 line 10)."""
        return scaffold_correction(control, own)

    def _scaffold_control_delta(
        self, start: NDArrays, end: NDArrays, control: NDArrays, own: NDArrays, steps: int
    ) -> NDArrays:
        """Option II: c_i+ = c_i - c + (x - y_i) / (K * lr); returns c_i+ - c_i and stores c_i+."""
        x = [w for w, t in zip(start, self.spec.trainable) if t]
        y = [w for w, t in zip(end, self.spec.trainable) if t]
        new_own, delta = scaffold_control_update(own, control, x, y, steps, self.options.learning_rate)
        assert self.node is not None
        self.node.put(CONTROL_KEY, new_own)
        return delta


class NodeDataError(RuntimeError):
    """This node's data could not be loaded; the server logs the message as the client's failure."""


def build_client(context: Context) -> FlowerClient:
    """This node's client, from the run config and its node config.

    The extension point for other ClientApps built on this one (the tests' fault-injecting app
    wraps what it returns).
    """
    cfg = parse_run_config(context.run_config)
    try:
        data = client_data(cfg, context.node_config)
    except (OSError, ValueError) as err:  # missing/unreadable file, bad CSV, bad node config
        raise NodeDataError(
            f"node {context.node_id} cannot load its data (node-config {dict(context.node_config)}): "
            f"{type(err).__name__}: {err}"
        ) from err
    return FlowerClient(cfg, data, context.state, context.node_config)


def client_fn(context: Context) -> Client:
    return build_client(context).to_client()


app = ClientApp(client_fn=client_fn, mods=client_mods())  # SecAgg+ when the run config asks for it
