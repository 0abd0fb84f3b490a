"""ServerApp: builds the model, the strategy and the run's outputs from the run config."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common import Context, Scalar
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.serverapp import Grid

from flower_app.client_app import compression_config, finetune_options
from flower_app.config import AppConfig, parse_run_config
from flower_app.data import model_info, server_source
from flower_app.hf_models import save_pretrained
from flower_app.instruct import instruction_evaluator
from flower_app.outputs import CHECKPOINT_NAME, RunRecorder, load_checkpoint
from flower_app.privacy import check_privacy_model, run_server, wrap_strategy
from flower_app.task import (
    FINETUNE_MODELS,
    build_model,
    evaluate,
    get_weights,
    make_loader,
    resolve_device,
    resolve_model_name,
    set_weights,
    weight_spec,
)
from strategies.aggregators import AggregatorParams
from strategies.base import FederatedStrategy, StrategyOptions
from strategies.optimizers import ServerOptHParams


def strategy_options(cfg: AppConfig) -> StrategyOptions:
    return StrategyOptions(
        rule=cfg.strategy,
        aggregator=cfg.aggregator,
        aggregator_params=AggregatorParams(
            trim_fraction=cfg.trim_fraction,
            num_byzantine=cfg.num_byzantine,
            num_selected=cfg.num_selected,
        ),
        optimizer=ServerOptHParams(
            learning_rate=cfg.server_learning_rate,
            momentum=cfg.server_momentum,
            beta1=cfg.server_beta1,
            beta2=cfg.server_beta2,
            tau=cfg.server_tau,
            bias_correction=cfg.server_bias_correction,
        ),
        fraction_fit=cfg.fraction_fit,
        min_fit_clients=cfg.min_fit_clients,
        fraction_evaluate=cfg.fraction_evaluate,
        min_evaluate_clients=cfg.min_evaluate_clients,
        min_available_clients=cfg.min_available_clients,
        client_wait_timeout=cfg.client_wait_timeout,
        max_failure_fraction=cfg.max_failure_fraction,
        proximal_mu=cfg.proximal_mu,
        seed=cfg.seed,
        send_delta=cfg.send_delta,
        compression=compression_config(cfg),
    )


def build_strategy(cfg: AppConfig) -> tuple[FederatedStrategy, int]:
    """The strategy for this run (restored from the checkpoint when resuming) and rounds left."""
    source = server_source(cfg)
    info = model_info(source)
    model = build_model(cfg.model, info, cfg.hidden_size, seed=cfg.seed, finetune=finetune_options(cfg, cache=False))
    spec = weight_spec(model)
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
        if save_pretrained(model, path.parent) is not None:
            # Transformers: adapter/ (or hf_model/) loads with peft / transformers; model.pt keeps what trained.
            state = model.state_dict()
            torch.save({k: state[k].detach().cpu() for k in spec.keys}, path)
            return
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)

    checkpoint = None
    if cfg.resume:
        checkpoint = load_checkpoint(Path(cfg.output_dir) / CHECKPOINT_NAME, cfg, spec)
    start_round = int(checkpoint["round"]) if checkpoint else 0
    recorder = RunRecorder(cfg, spec, save_model, start_round=start_round)
    strategy = FederatedStrategy(
        strategy_options(cfg), get_weights(model, spec), spec.trainable, evaluate_fn, [recorder], start_round
    )
    check_privacy_model(cfg, spec.trainable, resolve_model_name(cfg.model, info))
    strategy = wrap_strategy(cfg, strategy)  # itself unless secure aggregation or DP is on
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint["strategy"])
        log(INFO, "resuming from round %d of %d (%s)", start_round, cfg.num_server_rounds, cfg.output_dir)
    return strategy, max(cfg.num_server_rounds - start_round, 0)


def server_fn(context: Context) -> ServerAppComponents:
    cfg = parse_run_config(context.run_config)
    strategy, rounds = build_strategy(cfg)
    log(INFO, "strategy %s (aggregator %s), %d rounds, dataset %s", cfg.strategy, cfg.aggregator, rounds, cfg.dataset)
    timeout = cfg.round_timeout if cfg.round_timeout > 0 else None
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds, round_timeout=timeout))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # As ServerApp(server_fn=server_fn) would run it, or through the SecAgg+ workflow when the
    # run config asks for secure aggregation (flower_app/privacy.py).
    run_server(grid, context, server_fn)
