"""ClientApp: a `NumPyClient` around the local PyTorch training in `flower_app.task`.

`fit` trains (or takes the gradient, per the rule), clips and noises the update when the run
asks for client-side DP (`client_privacy`), compresses it, and reports. Every setting comes from
the run config through `flower_app.options`; the fit config only carries what the server decides
each round (the round number, DP's clipping norm and noise, whether to evaluate the received model
first: `strategies.evaluation`).

In a deployment every message starts a fresh process that imports this module: its import path is
kept to what a fit needs (`tests/test_client_imports.py` holds it there), the node's data comes
from its disk cache (`flower_app.data`), torch's threads follow the node's ``torch-threads``
(`flower_app.threads`), and `ArrayClient` hands the arrays to and from Flower without extra copies.

How much a node trains (epochs, step cap, batch size) may be fitted to its device by its node
config or, in simulation, its device profile (`options.work_plan`); it reports the examples it processed (``num_examples_processed``),
from which the server's scheduler times it on a simulated device.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import (
    Code,
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    RecordDict,
    Scalar,
    Status,
)

from datasets import FeatureTransform
from datasets.labels import unpack_class_names
from flower_app.client_privacy import client_mods, private_fit_report, privatize_update
from flower_app.config import AppConfig, parse_run_config
from flower_app.data import (
    CLASS_NAMES_KEY,
    STATS_REQUEST_KEY,
    ClientData,
    check_agreement,
    client_data,
    config_transform,
    label_counts,
    prepared_data,
    statistics_reply,
)
from flower_app.node_state import NodeState, kept_state, open_store, warn_if_lost_on_resume
from flower_app.options import (
    REPEAT_KEY,
    WORK_METRIC,
    WorkPlan,
    compression_config,
    configured_transform,
    finetune_options,
    payload_kind,
    personal_options,
    privacy_options,
    train_options,
    work_plan,
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
from flower_app.threads import apply_threads
from strategies import get_rule
from strategies.client_rules import fedsgd_payload, scaffold_control_update, scaffold_correction
from strategies.compression import compress, wire_nbytes
from strategies.evaluation import EVALUATE_BEFORE_FIT, fit_evaluation_metrics
from strategies.wire import from_parameters, is_packed, to_parameters

CONTROL_KEY = "scaffold-control"  # this client's SCAFFOLD control variate c_i
RESIDUAL_KEY = "compression-residual"  # what compression has not sent yet (error feedback)


class FlowerClient(NumPyClient):
    """Trains the shared model on this node's data; sends weights, an update or a gradient.

    ``send_views``: when True, `get_parameters` and a fit that sends weights return views of the
    model's own tensors (no copy; valid until the model changes), for a caller that writes them out
    at once (`ArrayClient` sets it). By default they are copies, as a `NumPyClient` caller expects.
    """

    send_views = False

    def __init__(
        self, cfg: AppConfig, data: ClientData, state: RecordDict, work: WorkPlan | None = None,
        node_config: Mapping[str, Any] | None = None, node: str = "this node",
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.node_name = node  # for messages: "node 123 (partition 2)"
        self.state = state  # Flower's node state (the store when the node config names no state-dir)
        self.rule = get_rule(cfg.strategy)
        self.kind = payload_kind(cfg)  # "weights", "delta" or "gradient"
        # What this node trains each round: the run's settings, fitted to its device (profile, node config).
        self.work = work if work is not None else work_plan(cfg, node_config or {}, data.partition_id)
        self.options = replace(train_options(cfg), epochs=self.work.epochs, max_steps=self.work.max_steps)
        self.codec = compression_config(cfg)
        self.privacy = privacy_options(cfg)
        self.device = resolve_device(cfg.device)
        # Federated / fixed preprocessing: ``data`` is the raw partition; the agreed transform (the fit or evaluate
        # config's, or the run config's for 'fixed') is applied to it before the first round that uses it.
        self.raw = data
        self._prepared_for: tuple[FeatureTransform | None, str | None] = (None, None)
        if cfg.preprocessing == "fixed":
            self._prepare({})
        self._build_model()
        # What this node keeps between messages (personal part, c_i, residual): node state or its state-dir.
        self.store = open_store(cfg, state, node_config or {}, data.partition_id)
        warn_if_lost_on_resume(cfg, self.store, kept_state(cfg))
        self.node: NodeState | None = None

    def _build_model(self) -> None:
        self.model = build_model(self.cfg.model, self.data.info, self.cfg.hidden_size, seed=self.cfg.seed,
                                 finetune=finetune_options(self.cfg, cache=True))
        # Personalization: what stays on this node; only the shared part travels (the server's spec too).
        self.personal = Personalizer(personal_options(self.cfg), self.model)
        self.spec = self.personal.shared

    def _prepare(self, config: Mapping[str, Any]) -> None:
        """Apply the agreed transform (and class names) to the raw partition, once per agreement.

        Preprocessing 'federated' takes both from the server's config (a config without them means the server
        and this node run different configs); 'fixed' from its own run config unless the server sends one.
        """
        if self.cfg.preprocessing == "local":
            return
        try:
            transform = config_transform(config)
        except ValueError as err:
            raise NodeDataError(f"{self.node_name} refuses to take part: {err}") from err
        if transform is None and self.cfg.preprocessing == "fixed":
            transform = configured_transform(self.cfg)
        if transform is None:
            raise NodeDataError(
                f"{self.node_name} refuses to take part: preprocessing 'federated' but the server sent no agreed "
                "transform (the server and this node run different run configs)"
            )
        names = config.get(CLASS_NAMES_KEY) if self.cfg.preprocessing == "federated" and not self.cfg.class_names else None
        key = (transform, names if isinstance(names, str) else None)
        if key == self._prepared_for:
            return
        agreed = unpack_class_names(key[1]) if key[1] is not None else None
        try:
            data = prepared_data(self.raw, transform, agreed)
        except ValueError as err:
            raise NodeDataError(f"{self.node_name} refuses to take part: {err}") from err
        rebuild = hasattr(self, "model") and data.info != self.data.info  # the agreed class list sized the model
        self.data, self._prepared_for = data, key
        if rebuild:
            self._build_model()

    def _statistics(self, config: Mapping[str, Any]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The statistics round: this node's statistics of its raw train split (`flower_app.data.statistics_reply`)."""
        try:
            arrays, n, metrics = statistics_reply(self.raw, config, self.privacy.secagg_clipping_range,
                                                  self.privacy.secagg_max_weight)
        except ValueError as err:
            raise NodeDataError(f"{self.node_name} cannot send statistics: {err}") from err
        return arrays, n, dict[str, Scalar](metrics)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self._own(get_weights(self.model, self.spec))

    def _own(self, arrays: NDArrays) -> NDArrays:
        """``arrays`` (views of the model) as they may leave this client: copies unless ``send_views``."""
        return arrays if self.send_views else [a.copy() for a in arrays]

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if STATS_REQUEST_KEY in config:  # federated preprocessing's statistics round: no training
            return self._statistics(config)
        self._prepare(config)
        self._check_agreement(config)
        self.node = node = self.store.open(config, fit=True)  # what this node kept, as of the previous round
        n = len(self.spec)
        global_weights, control = parameters[:n], parameters[n:]  # SCAFFOLD: c follows the weights
        set_weights(self.model, self.spec, global_weights)
        self.personal.restore(self.model, node)
        evaluation = None
        if config.get(EVALUATE_BEFORE_FIT):
            # The received model on the local validation split, before training changes it, as an evaluate
            # message would measure it (personal figures included); a personal evaluation that trained or
            # replaced the model (finetune, Ditto) has the received one loaded again before training.
            evaluation = self._evaluate_loaded(config, node, global_weights)
            if self.personal.evaluation_changes_model:
                set_weights(self.model, self.spec, global_weights)
                self.personal.restore(self.model, node)
        # Shuffling depends on (seed, round, partition) only, so a resumed run replays exactly; FedBuff may
        # give a node the same model version twice (REPEAT_KEY), which then shuffles anew.
        key = f"{self.cfg.seed}:{int(config.get('server-round', 0))}:{self.data.partition_id}"
        repeat = int(config.get(REPEAT_KEY, 0))
        seed = zlib.crc32((key + (f":{repeat}" if repeat else "")).encode())
        torch.manual_seed(seed)  # dropout and other random layers replay too (this is the client's process)
        loader = make_loader(self.data.train.x, self.data.train.y, self.work.batch_size, shuffle=True, seed=seed)
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
        if evaluation is not None:  # what a separate evaluate message would report, as exposed as that one
            metrics.update(fit_evaluation_metrics(*evaluation))
        return wire, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        self._prepare(config)
        self._check_agreement(config)
        self.node = node = self.store.open(config, fit=False)
        received = parameters[: len(self.spec)]
        set_weights(self.model, self.spec, received)
        self.personal.restore(self.model, node)
        return self._evaluate_loaded(config, node, received)

    def _evaluate_loaded(
        self, config: dict[str, Scalar], node: NodeState, received: NDArrays
    ) -> tuple[float, int, dict[str, Scalar]]:
        """The model as loaded now (and this node's personal model) on the local validation split: (loss, examples, metrics)."""
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

    def _check_agreement(self, config: dict[str, Scalar]) -> None:
        """Refuse to train or evaluate when this node's data disagrees with the server's (labels, shape, outputs)."""
        hint = ""
        if self.cfg.server_data == "none":
            hint = "; set the run config's input-shape and num-outputs (or class-names) to what the nodes hold"
        try:
            check_agreement(self.data, config, hint)
        except ValueError as err:
            raise NodeDataError(f"{self.node_name} refuses to take part: {err}") from err

    def _local_work(
        self, global_weights: NDArrays, control: NDArrays, loader: torch.utils.data.DataLoader
    ) -> tuple[NDArrays, NDArrays, dict[str, Scalar]]:
        """The rule's client step: the payload (weights, update or gradient), extra arrays, metrics."""
        if self.rule.client_mode == "gradient":
            gradient, loss = self._gradient_payload(global_weights, loader)
            batches = min(self.work.max_steps, len(loader)) if self.work.max_steps else len(loader)
            processed = min(len(self.data.train), batches * self.work.batch_size)
            return gradient, [], {"train_loss": loss, "local_steps": 1, WORK_METRIC: processed}
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
        payload = [w - g for w, g in zip(new_weights, global_weights)] if self.kind == "delta" else self._own(new_weights)
        metrics: dict[str, Scalar] = {
            "train_loss": result.loss,
            "local_steps": result.num_steps,
            WORK_METRIC: result.num_steps * self.work.batch_size * self.options.grad_accumulation_steps,
        }
        if result.accuracy is not None:
            metrics["train_accuracy"] = result.accuracy
        return payload, extras, metrics

    # ------------------------------------------------------------------------- FedSGD
    def _gradient_payload(self, global_weights: NDArrays, loader: torch.utils.data.DataLoader) -> tuple[NDArrays, float]:
        """Gradients for trainable arrays; for buffers, w_global - b_local (averages them)."""
        grads, loss = full_gradient(self.model, loader, self.data.info.task, self.device, self.work.max_steps)
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
    apply_threads(context.node_config)  # before torch builds anything: node-config torch-threads
    try:
        data = client_data(cfg, context.node_config)
    except (OSError, ValueError) as err:  # missing/unreadable file, bad CSV, bad node config
        raise NodeDataError(
            f"node {context.node_id} cannot load its data (node-config {dict(context.node_config)}): "
            f"{type(err).__name__}: {err}"
        ) from err
    try:
        work = work_plan(cfg, context.node_config, data.partition_id)
    except ValueError as err:  # a bad local-epochs / max-local-steps / batch-size, a bad device trace
        raise NodeDataError(
            f"node {context.node_id} cannot plan its work (node-config {dict(context.node_config)}): "
            f"{type(err).__name__}: {err}"
        ) from err
    source = f"partition {data.partition_id}" if data.partition_id >= 0 else f"data-path {context.node_config['data-path']}"
    return FlowerClient(cfg, data, context.state, work, context.node_config, node=f"node {context.node_id} ({source})")


# ------------------------------------------------------------------------- arrays to and from Flower
class ArrayClient(Client):
    """The legacy `Client` face of a `FlowerClient`, without the copies of `NumPyClient.to_client()`.

    Received arrays are read-only views of the message's bytes (`strategies.wire.from_parameters`;
    set_weights copies them into the model once) instead of `np.load` copies; sent arrays are the
    model's own tensors (`task.get_weights` views) written into the reply's bytes once. A reply is
    packed into one buffer (`strategies.serde.pack`) when the server's message was, except under
    SecAgg+, whose mod masks each array of the reply. Results are checked as Flower's wrapper checks them.
    """

    def __init__(self, numpy_client: NumPyClient) -> None:
        self.numpy_client = numpy_client
        self.may_pack = True
        if isinstance(numpy_client, FlowerClient):
            numpy_client.send_views = True  # its arrays are written into the reply before the model changes
            self.may_pack = not numpy_client.cfg.secure_aggregation

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        arrays = self.numpy_client.get_parameters(dict(ins.config))
        return GetParametersRes(status=Status(code=Code.OK, message="Success"), parameters=to_parameters(arrays))

    def fit(self, ins: FitIns) -> FitRes:
        result = self.numpy_client.fit(from_parameters(ins.parameters), dict(ins.config))
        if not (len(result) == 3 and isinstance(result[0], list) and isinstance(result[1], int) and isinstance(result[2], dict)):
            raise TypeError("FlowerClient.fit must return (list of arrays, int, dict)")
        arrays, num_examples, metrics = result
        packed = self.may_pack and is_packed(ins.parameters)
        return FitRes(status=Status(code=Code.OK, message="Success"), parameters=to_parameters(arrays, packed),
                      num_examples=num_examples, metrics=metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        result = self.numpy_client.evaluate(from_parameters(ins.parameters), dict(ins.config))
        if not (len(result) == 3 and isinstance(result[0], float) and isinstance(result[1], int) and isinstance(result[2], dict)):
            raise TypeError("FlowerClient.evaluate must return (float, int, dict)")
        loss, num_examples, metrics = result
        return EvaluateRes(status=Status(code=Code.OK, message="Success"), loss=loss, num_examples=num_examples,
                           metrics=metrics)


def client_fn(context: Context) -> Client:
    return ArrayClient(build_client(context))


app = ClientApp(client_fn=client_fn, mods=client_mods())  # SecAgg+ when the run config asks for it
