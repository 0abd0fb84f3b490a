"""ServerApp: builds the model, the strategy and the run's outputs from the run config, and runs
the legacy server loop, or Flower's SecAgg+ workflow when the run asks for secure aggregation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common import Context, Scalar
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.compat import LegacyContext, start_grid
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from flower_app.config import AppConfig, check_privacy_model, parse_run_config
from flower_app.data import model_info, server_source
from flower_app.hf_models import save_pretrained
from flower_app.instruct import instruction_evaluator
from flower_app.node_state import RUN_NAME_CONFIG_KEY
from flower_app.options import PrivacyOptions, finetune_options, personal_options, privacy_options, strategy_options
from flower_app.outputs import RunRecorder
from flower_app.personal import personal_split
from flower_app.server_privacy import privacy_hooks
from flower_app.task import (
    FINETUNE_MODELS,
    build_model,
    evaluate,
    get_weights,
    make_loader,
    resolve_device,
    resolve_model_name,
    set_weights,
)
from strategies.base import EvaluateFn, FederatedStrategy, RoundObserver


def make_strategy(
    cfg: AppConfig,
    weights: list[np.ndarray],
    trainable: Sequence[bool],
    evaluate_fn: EvaluateFn | None = None,
    observers: Sequence[RoundObserver] = (),
    start_round: int = 0,
) -> FederatedStrategy:
    """The strategy shell for this run config, with its hooks (privacy), around the given initial weights."""
    options, privacy = strategy_options(cfg), privacy_options(cfg)
    return FederatedStrategy(
        options, weights, trainable, evaluate_fn, observers, start_round,
        hooks=privacy_hooks(privacy, options, cfg.num_server_rounds),
        preaggregated=privacy.secure_aggregation,  # SecAgg+ hands the strategy one aggregate
    )


def build_strategy(cfg: AppConfig, flower_run_id: int | None = None) -> tuple[FederatedStrategy, int]:
    """The strategy for this run (restored from the checkpoint when resuming) and rounds left."""
    source = server_source(cfg)
    info = model_info(source)
    model = build_model(cfg.model, info, cfg.hidden_size, seed=cfg.seed, finetune=finetune_options(cfg, cache=False))
    split = personal_split(personal_options(cfg), model)  # personalization: personal entries stay on the nodes
    spec = split.shared  # what travels, is aggregated and checkpointed
    device = resolve_device(cfg.device)
    # Transformers evaluate at the training batch size: 256 sequences of vocabulary-sized logits may not fit.
    eval_batch = cfg.batch_size if resolve_model_name(cfg.model, info) in FINETUNE_MODELS else max(cfg.batch_size, 256)
    test_loader = make_loader(source.test.x, source.test.y, batch_size=eval_batch, shuffle=False)
    instructions = instruction_evaluator(cfg, source, device, eval_batch)  # perplexity, answer accuracy

    def evaluate_fn(weights: list[np.ndarray]) -> tuple[float, dict[str, Scalar]]:
        set_weights(model, spec, weights)
        if instructions is not None:
            return instructions(model)  # type: ignore[return-value]
        loss, accuracy, _ = evaluate(model, test_loader, info.task, device)
        return loss, ({"accuracy": accuracy} if accuracy is not None else {})

    def save_model(weights: list[np.ndarray], path: Path) -> None:
        set_weights(model, spec, weights)
        state = model.state_dict()
        if save_pretrained(model, path.parent) is not None or split.personal.keys:
            # Transformers: adapter/ (or hf_model/) loads with peft / transformers; model.pt keeps what trained.
            # Personalization: the personal entries are each node's own; the server's copies were never trained.
            state = {k: state[k].detach() for k in spec.keys}
        with open(path, "wb") as f:  # a Python file: a full disk is an OSError with its errno
            torch.save({k: v.cpu() for k, v in state.items()}, f)

    check_privacy_model(cfg, spec.trainable, resolve_model_name(cfg.model, info))
    recorder = RunRecorder(cfg, spec, save_model, flower_run_id)  # on resume: locks the run, reads its checkpoint
    # A model whose personal part stays on the nodes is incomplete on the server: no centralized evaluation.
    central = evaluate_fn if split.personal.keys == () else None
    if central is None:
        log(INFO, "personalization '%s': the personal part of the model stays on the nodes, so the server's model is "
            "incomplete and is not evaluated centrally; federated evaluation reports each node's model", cfg.personalization)
    strategy = make_strategy(cfg, get_weights(model, spec), spec.trainable, central, [recorder], recorder.start_round)
    recorder.start(strategy)  # output-dir/<run-name>/, locked; restores the checkpoint's state when resuming
    strategy.client_config[RUN_NAME_CONFIG_KEY] = recorder.dir.name  # nodes key what they keep by the run's name
    return strategy, recorder.rounds_left


def server_fn(context: Context) -> ServerAppComponents:
    cfg = parse_run_config(context.run_config)
    strategy, rounds = build_strategy(cfg, context.run_id)
    log(INFO, "strategy %s (aggregator %s), %d rounds, dataset %s", cfg.strategy, cfg.aggregator, rounds, cfg.dataset)
    timeout = cfg.round_timeout if cfg.round_timeout > 0 else None
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds, round_timeout=timeout))


app = ServerApp()


def secagg_workflow(options: PrivacyOptions, round_timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the run's settings (counts > 1 become ints)."""

    def count_or_fraction(value: float) -> int | float:
        return int(value) if value > 1 else float(value)

    return SecAggPlusWorkflow(
        num_shares=count_or_fraction(options.secagg_num_shares),
        reconstruction_threshold=count_or_fraction(options.secagg_reconstruction_threshold),
        max_weight=options.secagg_max_weight,
        clipping_range=options.secagg_clipping_range,
        quantization_range=options.secagg_quantization_range,
        timeout=round_timeout if round_timeout > 0 else None,
    )


def run_server(grid: Grid, context: Context, server_fn: Callable[[Context], ServerAppComponents] = server_fn) -> None:
    """The ServerApp's main: the legacy loop, or the SecAgg+ workflow when the run asks for it.

    Without secure aggregation this is exactly what ``ServerApp(server_fn=...)`` does
    (`start_grid` with the components); with it, Flower's `DefaultWorkflow` runs the same
    strategy with `SecAggPlusWorkflow` as its fit step.
    """
    cfg = parse_run_config(context.run_config)
    components = server_fn(context)
    if not cfg.secure_aggregation:
        start_grid(
            grid=grid,
            server=components.server,
            config=components.config,
            strategy=components.strategy,
            client_manager=components.client_manager,
        )
        return
    options = privacy_options(cfg)
    log(INFO, "secure aggregation: SecAgg+ (shares %g, threshold %g, clipping range %g, quantization range %d)",
        options.secagg_num_shares, options.secagg_reconstruction_threshold, options.secagg_clipping_range,
        options.secagg_quantization_range)
    legacy = LegacyContext(
        context=context,
        config=components.config,
        strategy=components.strategy,
        client_manager=components.client_manager,
    )
    DefaultWorkflow(fit_workflow=secagg_workflow(options, cfg.round_timeout))(grid, legacy)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
