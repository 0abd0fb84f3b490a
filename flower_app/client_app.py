"""ClientApp: a `NumPyClient` around the local PyTorch training in `flower_app.task`."""

from __future__ import annotations

import zlib

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import ArrayRecord, Context, RecordDict, Scalar

from flower_app.config import AppConfig, parse_run_config
from flower_app.data import ClientData, client_data, label_counts
from flower_app.hf_models import FineTuneOptions, LoraOptions, split_names
from flower_app.privacy import client_mods, private_fit_report, privatize_fit
from flower_app.task import (
    NDArrays,
    TrainOptions,
    build_model,
    evaluate,
    full_gradient,
    get_weights,
    make_loader,
    resolve_device,
    set_weights,
    train,
    weight_spec,
)
from strategies import get_rule
from strategies.compression import CompressionConfig, compress, wire_nbytes

CONTROL_KEY = "scaffold-control"  # this client's SCAFFOLD control variate c_i
RESIDUAL_KEY = "compression-residual"  # what compression has not sent yet (error feedback)


def finetune_options(cfg: AppConfig, cache: bool) -> FineTuneOptions:
    """Transformers / LoRA settings; clients cache the built model across rounds (`hf_models`)."""
    lora = LoraOptions(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=split_names(cfg.lora_target_modules),
        modules_to_save=split_names(cfg.lora_modules_to_save),
    )
    return FineTuneOptions(
        hf_model=cfg.hf_model, dtype=cfg.hf_dtype, lora=lora, cache=cache,
        model_cache_dir=cfg.model_cache_dir, gradient_checkpointing=cfg.gradient_checkpointing,
    )


def compression_config(cfg: AppConfig) -> CompressionConfig:
    return CompressionConfig(
        codec=cfg.compression,
        block_size=cfg.compression_block_size,
        topk_fraction=cfg.topk_fraction,
        error_feedback=cfg.error_feedback,
    )


def _load(state: RecordDict, key: str) -> NDArrays | None:
    record = state.get(key)
    return record.to_numpy_ndarrays() if isinstance(record, ArrayRecord) else None


def _store(state: RecordDict, key: str, arrays: NDArrays | None) -> None:
    if arrays is None:
        if key in state:
            del state[key]
        return
    state[key] = ArrayRecord(numpy_ndarrays=[np.ascontiguousarray(a) for a in arrays])


class FlowerClient(NumPyClient):
    """Trains the shared model on this node's data; sends weights, an update or a gradient."""

    def __init__(self, cfg: AppConfig, data: ClientData, state: RecordDict) -> None:
        self.cfg = cfg
        self.data = data
        self.state = state
        self.rule = get_rule(cfg.strategy)
        self.device = resolve_device(cfg.device)
        self.model = build_model(cfg.model, data.info, cfg.hidden_size, seed=cfg.seed, finetune=finetune_options(cfg, cache=True))
        self.spec = weight_spec(self.model)
        self.codec = compression_config(cfg)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model, self.spec)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        n = len(self.spec)
        global_weights, control = parameters[:n], parameters[n:]
        set_weights(self.model, self.spec, global_weights)
        rnd = int(config.get("server-round", 0))
        # Shuffling depends on (seed, round, partition) only, so a resumed run replays exactly.
        seed = zlib.crc32(f"{self.cfg.seed}:{rnd}:{self.data.partition_id}".encode())
        torch.manual_seed(seed)  # dropout and other random layers replay too (this is the client's process)
        loader = make_loader(self.data.train.x, self.data.train.y, self.cfg.batch_size, shuffle=True, seed=seed)
        metrics: dict[str, Scalar] = {}
        extras: NDArrays = []
        if self.rule.client_mode == "gradient":
            payload, loss = self._gradient_payload(global_weights, loader)
            metrics.update(train_loss=loss, local_steps=1)
        else:
            options = TrainOptions(
                epochs=self.cfg.local_epochs,
                learning_rate=self.cfg.learning_rate,
                momentum=self.cfg.client_momentum,
                weight_decay=self.cfg.weight_decay,
                grad_accumulation_steps=self.cfg.grad_accumulation_steps,
                proximal_mu=float(config.get("proximal-mu", 0.0)),
                optimizer=self.cfg.client_optimizer,
                max_steps=self.cfg.max_local_steps,
            )
            # SCAFFOLD: this client's c_i, read once from node state (zeros before its first round).
            own = (_load(self.state, CONTROL_KEY) or [np.zeros_like(c) for c in control]) if self.rule.scaffold else []
            correction = self._scaffold_correction(control, own) if self.rule.scaffold else None
            result = train(self.model, loader, self.data.info.task, options, self.device, correction)
            new_weights = get_weights(self.model, self.spec)
            if self.rule.scaffold:
                extras = self._scaffold_control_delta(global_weights, new_weights, control, own, result.num_steps)
            payload = [w - g for w, g in zip(new_weights, global_weights)] if self.cfg.send_delta else new_weights
            metrics.update(train_loss=result.loss, local_steps=result.num_steps)
            if result.accuracy is not None:
                metrics["train_accuracy"] = result.accuracy
        payload, private_extras = privatize_fit(self.cfg, config, payload, global_weights)  # DP: clip + noise
        wire, residual = compress(payload, self.codec, _load(self.state, RESIDUAL_KEY))
        _store(self.state, RESIDUAL_KEY, residual)
        wire = wire + extras + private_extras
        metrics.update(
            num_upload_bytes=wire_nbytes(wire),
            data_partition=self.data.partition_id,
            data_num_examples=len(self.data.train),
            **label_counts(self.data.train, self.data.num_classes),
        )
        num_examples, metrics = private_fit_report(self.cfg, wire, len(self.data.train), metrics)
        return wire, num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, self.spec, parameters[: len(self.spec)])
        loader = make_loader(self.data.val.x, self.data.val.y, self.cfg.batch_size, shuffle=False)
        loss, accuracy, n = evaluate(self.model, loader, self.data.info.task, self.device)
        return loss, n, ({"accuracy": accuracy} if accuracy is not None else {})

    # ------------------------------------------------------------------------- FedSGD
    def _gradient_payload(self, global_weights: NDArrays, loader: torch.utils.data.DataLoader) -> tuple[NDArrays, float]:
        """Gradients for trainable arrays; for buffers, w_global - b_local (averages them)."""
        grads, loss = full_gradient(self.model, loader, self.data.info.task, self.device, self.cfg.max_local_steps)
        local = get_weights(self.model, self.spec)
        it = iter(grads)
        payload = [
            next(it).numpy() if trainable else (g - b)
            for trainable, g, b in zip(self.spec.trainable, global_weights, local)
        ]
        return payload, loss

    # ----------------------------------------------------------------------- SCAFFOLD
    def _scaffold_correction(self, control: NDArrays, own: NDArrays) -> list[torch.Tensor]:
        """c - c_i per trainable parameter (Karimireddy et al. 2020, Algorithm 1 line 10)."""
        return [torch.from_numpy(np.asarray(c, dtype=np.float32) - ci) for c, ci in zip(control, own)]

    def _scaffold_control_delta(
        self, start: NDArrays, end: NDArrays, control: NDArrays, own: NDArrays, steps: int
    ) -> NDArrays:
        """Option II: c_i+ = c_i - c + (x - y_i) / (K * lr); returns c_i+ - c_i and stores c_i+."""
        scale = 1.0 / (max(steps, 1) * self.cfg.learning_rate)
        x = [w for w, t in zip(start, self.spec.trainable) if t]
        y = [w for w, t in zip(end, self.spec.trainable) if t]
        new_own = [ci - c + (xi - yi) * scale for ci, c, xi, yi in zip(own, control, x, y)]
        _store(self.state, CONTROL_KEY, [a.astype(np.float32) for a in new_own])
        return [(n - o).astype(np.float32) for n, o in zip(new_own, own)]


# --------------------------------------------------------------- fault injection (tests only)
# TEST-ONLY HOOK: a SuperNode started with `--node-config "... fault=nan"` (or `fault=shape`) sends
# a malformed update from every fit, so the deployment tests (tests/test_faults.py) can check that
# the server rejects it and the global model is unharmed. Never set `fault` on a real node.
FAULTS = ("nan", "shape")


def corrupt_update(kind: str, arrays: NDArrays) -> NDArrays:
    """A malformed copy of a fit reply: a NaN in its first float array, or its first array one element short."""
    bad = [np.array(a, copy=True) for a in arrays]
    if kind == "nan":
        target = next(i for i, a in enumerate(bad) if np.issubdtype(a.dtype, np.floating))
        bad[target].reshape(-1)[0] = np.nan
    elif kind == "shape":
        bad[0] = bad[0].reshape(-1)[:-1]
    else:
        raise ValueError(f"node-config fault: unknown value {kind!r}; choose one of: {', '.join(FAULTS)}")
    return bad


class FaultInjectingClient(FlowerClient):
    """TEST-ONLY: a FlowerClient whose fit replies are corrupted by `corrupt_update`."""

    def __init__(self, cfg: AppConfig, data: ClientData, state: RecordDict, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"node-config fault: unknown value {fault!r}; choose one of: {', '.join(FAULTS)}")
        super().__init__(cfg, data, state)
        self.fault = fault

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        arrays, num_examples, metrics = super().fit(parameters, config)
        return corrupt_update(self.fault, arrays), num_examples, metrics


class NodeDataError(RuntimeError):
    """This node's data could not be loaded; the server logs the message as the client's failure."""


def client_fn(context: Context):  # type: ignore[no-untyped-def]
    """Build this node's client from the run config and its node config."""
    cfg = parse_run_config(context.run_config)
    try:
        data = client_data(cfg, context.node_config)
    except (OSError, ValueError) as err:  # missing/unreadable file, bad CSV, bad node config
        raise NodeDataError(
            f"node {context.node_id} cannot load its data (node-config {dict(context.node_config)}): "
            f"{type(err).__name__}: {err}"
        ) from err
    fault = str(context.node_config.get("fault", ""))
    if fault:
        return FaultInjectingClient(cfg, data, context.state, fault).to_client()
    return FlowerClient(cfg, data, context.state).to_client()


app = ClientApp(client_fn=client_fn, mods=client_mods())  # SecAgg+ when the run config asks for it
