"""ServerApp: builds the model, the strategy and the run's outputs from the run config, and runs
the legacy server loop, Flower's SecAgg+ workflow when the run asks for secure aggregation, or the
scheduler (`flower_app.scheduler`) for FedBuff, deadlines, over-selection and simulated devices."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common import Context, Scalar
from flwr.common.logger import log
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext, start_grid
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from torch import nn

from datasets import SOURCE_KINDS, FeatureTransform, Source, feature_stats, parse_class_names, transform_data
from flower_app.config import AppConfig, ConfigError, check_privacy_model, parse_run_config
from flower_app.data import agreement_config, configured_model_info, model_info, server_source, transform_config
from flower_app.hf_models import is_finetune_model, save_pretrained
from flower_app.instruct import instruction_evaluator
from flower_app.node_state import RUN_NAME_CONFIG_KEY
from flower_app.options import (
    PrivacyOptions,
    configured_transform,
    finetune_options,
    personal_options,
    privacy_options,
    profile_options,
    scheduler_options,
    strategy_options,
    uses_scheduler,
)
from flower_app.outputs import RunRecorder
from flower_app.personal import personal_split
from flower_app.reply_poll import PollingGrid
from flower_app.scheduler import SchedulerState, run_scheduled
from flower_app.server_preprocessing import FederatedStatistics, StatisticsOptions, preprocessing_record
from flower_app.server_privacy import privacy_hooks
from flower_app.task import (
    FINETUNE_MODELS,
    ModelInfo,
    WeightSpec,
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
    round_config: Mapping[str, Scalar] | None = None,
    statistics: FederatedStatistics | None = None,
) -> FederatedStrategy:
    """The strategy shell for this run config, with its hooks (privacy, the scheduler) and statistics step (federated
    preprocessing), around the given initial weights."""
    options, privacy = strategy_options(cfg), privacy_options(cfg)
    hooks = privacy_hooks(privacy, options, cfg.num_server_rounds)
    if uses_scheduler(cfg):
        hooks = [*hooks, SchedulerState(scheduler_options(cfg))]
    return FederatedStrategy(
        options, weights, trainable, evaluate_fn, observers, start_round,
        hooks=hooks,
        preaggregated=privacy.secure_aggregation,  # SecAgg+ hands the strategy one aggregate
        round_config=round_config,
        statistics=statistics,
    )


def statistics_step(cfg: AppConfig, info: ModelInfo, source: Source | None) -> FederatedStatistics:
    """The statistics step of preprocessing 'federated' (`flower_app.server_preprocessing`), from the run config.

    Under SecAgg+ the sums are taken relative to a public reference: preprocessing-offset / -scale, else the
    statistics of the server's raw held-out split, else (images, in [0, 1]) the raw values.
    """
    shape = tuple(info.input_shape)
    reference: FeatureTransform | None = None
    if cfg.secure_aggregation:
        reference = configured_transform(cfg)
        if reference is None and source is not None:
            held = feature_stats(source.test.x)
            reference = FeatureTransform.standardize(held.mean.tolist(), held.std().tolist())
        if reference is None and len(shape) == 1:
            raise ConfigError(
                "preprocessing 'federated' with secure-aggregation and server-data 'none': SecAgg+ clips every value to "
                f"+-secagg-clipping-range ({cfg.secagg_clipping_range:g}), so the nodes' sums are taken relative to a "
                "public reference; set preprocessing-offset and preprocessing-scale to a rough centre and spread of each "
                "feature (public values, e.g. from the literature)"
            )
    labels = None
    if SOURCE_KINDS[cfg.dataset].labels_from_files and not cfg.class_names and source is not None:
        labels = source.class_names  # the nodes' labels must be among the server model's; they re-index to it
    return FederatedStatistics(StatisticsOptions(
        kind=cfg.preprocessing_kind, secure=cfg.secure_aggregation, num_features=shape[0],
        observations_per_example=int(np.prod(shape[1:])) if len(shape) > 1 else 1, reference=reference,
        labels=labels, min_replies=cfg.min_fit_clients, max_failure_fraction=cfg.max_failure_fraction,
        max_count_ratio=cfg.max_count_ratio,
    ))


def build_strategy(cfg: AppConfig, flower_run_id: int | None = None) -> tuple[FederatedStrategy, int]:
    """The strategy for this run (restored from the checkpoint when resuming) and rounds left.

    With server-data='held-out' the server loads the source: its test split is the central
    evaluation set, its description builds the model and its class names are the agreed ones
    (unless class-names fixes them). With server-data='none' it loads no data at all: the model is
    built from the run config (`configured_model_info`), and there is no central evaluation.
    """
    source = server_source(cfg) if cfg.server_data == "held-out" else None
    if source is None:
        info = configured_model_info(cfg)
        agreed = parse_class_names(cfg.class_names) if cfg.class_names else None
        log(INFO, "server-data 'none': the server loads no data; model for %s (from the run config); metrics and "
            "the best model come from federated evaluation", info.describe())
    else:
        info, agreed = model_info(source), source.class_names
    # Preprocessing 'fixed': the run config's transform; 'federated': the statistics round's (None until then).
    fixed = configured_transform(cfg) if cfg.preprocessing == "fixed" else None
    if fixed is not None and fixed.num_features != info.input_shape[0]:
        raise ConfigError(
            f"preprocessing-offset / preprocessing-scale give {fixed.num_features} values, but the data has "
            f"{info.input_shape[0]} {'channels' if len(info.input_shape) > 1 else 'features'} ({info.describe()})"
        )
    statistics = statistics_step(cfg, info, source) if cfg.preprocessing == "federated" else None

    def agreed_transform() -> FeatureTransform | None:
        return fixed if statistics is None else statistics.transform

    model = build_model(cfg.model, info, cfg.hidden_size, seed=cfg.seed, finetune=finetune_options(cfg, cache=False))
    split = personal_split(personal_options(cfg), model)  # personalization: personal entries stay on the nodes
    spec = split.shared  # what travels, is aggregated and checkpointed
    # A model whose personal part stays on the nodes is incomplete on the server: no centralized evaluation.
    evaluate_fn = None
    if source is not None and not split.personal.keys:
        evaluate_fn = central_evaluation(cfg, source, model, spec, info,
                                         agreed_transform if cfg.preprocessing != "local" else None)
    elif source is not None:
        log(INFO, "personalization '%s': the personal part of the model stays on the nodes, so the server's model is "
            "incomplete and is not evaluated centrally; federated evaluation reports each node's model", cfg.personalization)

    def save_model(weights: list[np.ndarray], path: Path, library_format: bool = True) -> None:
        set_weights(model, spec, weights)
        state = model.state_dict()
        pretrained = save_pretrained(model, path.parent) if library_format else None
        if pretrained is not None or (not library_format and is_finetune_model(model)) or split.personal.keys:
            # Transformers: adapter/ (or hf_model/) loads with peft / transformers; the .pt keeps what trained.
            # Personalization: the personal entries are each node's own; the server's copies were never trained.
            state = {k: state[k].detach() for k in spec.keys}
        with open(path, "wb") as f:  # a Python file: a full disk is an OSError with its errno
            torch.save({k: v.cpu() for k, v in state.items()}, f)

    check_privacy_model(cfg, spec.trainable, resolve_model_name(cfg.model, info))
    def preprocessing() -> dict[str, object] | None:  # preprocessing.json: the transform to apply at inference time
        transform = agreed_transform()
        if transform is None:
            return None
        names = statistics.class_names if statistics is not None else None
        return preprocessing_record(cfg.preprocessing, transform, names, statistics.summary if statistics else {})

    recorder = RunRecorder(cfg, spec, save_model, flower_run_id, preprocessing=preprocessing)  # on resume: reads its checkpoint
    initial = [w.copy() for w in get_weights(model, spec)]  # the strategy's own arrays, not views of the model
    strategy = make_strategy(
        cfg, initial, spec.trainable, evaluate_fn, [recorder], recorder.start_round,
        round_config={**agreement_config(info, agreed), **(transform_config(fixed) if fixed else {})},
        statistics=statistics,
    )
    recorder.start(strategy)  # output-dir/<run-name>/, locked; restores the checkpoint's state when resuming
    strategy.client_config[RUN_NAME_CONFIG_KEY] = recorder.dir.name  # nodes key what they keep by the run's name
    return strategy, recorder.rounds_left


def central_evaluation(
    cfg: AppConfig, source: Source, model: nn.Module, spec: WeightSpec, info: ModelInfo,
    transform: Callable[[], FeatureTransform | None] | None = None,
) -> EvaluateFn:
    """Evaluation of a set of weights on the source's test split (the server's held-out data).

    With ``transform`` (federated or fixed preprocessing) the split is raw and the agreed transform, known
    only after the statistics round, is applied to it before the first evaluation.
    """
    device = resolve_device(cfg.device)
    # Transformers evaluate at the training batch size: 256 sequences of vocabulary-sized logits may not fit.
    eval_batch = cfg.batch_size if resolve_model_name(cfg.model, info) in FINETUNE_MODELS else max(cfg.batch_size, 256)
    loaders: dict[FeatureTransform | None, torch.utils.data.DataLoader] = {}
    instructions = instruction_evaluator(cfg, source, device, eval_batch)  # perplexity, answer accuracy

    def test_loader() -> torch.utils.data.DataLoader:
        agreed = transform() if transform is not None else None
        if transform is not None and agreed is None:
            raise RuntimeError("central evaluation before the statistics round agreed on a transform")
        if agreed not in loaders:
            test = transform_data(source.test, agreed) if agreed is not None else source.test
            loaders.clear()
            loaders[agreed] = make_loader(test.x, test.y, batch_size=eval_batch, shuffle=False)
        return loaders[agreed]

    def evaluate_fn(weights: list[np.ndarray]) -> tuple[float, dict[str, Scalar]]:
        set_weights(model, spec, weights)
        if instructions is not None:
            return instructions(model)  # type: ignore[return-value]
        loss, accuracy, _ = evaluate(model, test_loader(), info.task, device)
        return loss, ({"accuracy": accuracy} if accuracy is not None else {})

    return evaluate_fn


class CohortClientManager(SimpleClientManager):
    """Flower's client manager, which also sizes the server's sender pool to the clients a round samples from.

    The legacy `Server` sends a round's messages from a thread pool of `max_workers` threads (Flower's
    default ``min(32, CPUs + 4)``: 6 on a 2-core server), one blocking request per client, so a larger
    cohort goes out in waves and each wave waits for the previous one's replies. Every time the
    strategy lists the connected clients to sample a round's cohort (`all`), this calls
    ``server.set_max_workers(n)`` with their number, an upper bound of the cohort; the pool starts
    threads only for the messages it has, so each round's whole cohort is sent at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.server: Server | None = None

    def all(self) -> dict[str, ClientProxy]:
        clients = super().all()
        if self.server is not None:
            self.server.set_max_workers(max(1, len(clients)))
        return clients


def cohort_server(strategy: FederatedStrategy) -> Server:
    """A legacy `Server` around ``strategy`` whose sender pool follows the cohort (`CohortClientManager`)."""
    manager = CohortClientManager()
    server = Server(client_manager=manager, strategy=strategy)
    manager.server = server
    return server


def server_fn(context: Context) -> ServerAppComponents:
    cfg = parse_run_config(context.run_config)
    strategy, rounds = build_strategy(cfg, context.run_id)
    log(INFO, "strategy %s (aggregator %s), %d rounds, dataset %s", cfg.strategy, cfg.aggregator, rounds, cfg.dataset)
    timeout = cfg.round_timeout if cfg.round_timeout > 0 else None
    server = cohort_server(strategy)
    return ServerAppComponents(
        server=server, strategy=strategy, client_manager=server.client_manager(),
        config=ServerConfig(num_rounds=rounds, round_timeout=timeout),
    )


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


def run_server(
    grid: Grid, context: Context, server_fn: Callable[[Context], ServerAppComponents] = server_fn
) -> Strategy | None:
    """The ServerApp's main: the legacy loop, the SecAgg+ workflow, or the scheduler; returns the strategy it ran.

    Without secure aggregation this is exactly what ``ServerApp(server_fn=...)`` does
    (`start_grid` with the components); with it, Flower's `DefaultWorkflow` runs the same
    strategy with `SecAggPlusWorkflow` as its fit step. FedBuff, a round deadline, over-selection
    or simulated devices (`options.uses_scheduler`) run the same strategy through
    `scheduler.run_scheduled`, over the same grid.
    """
    cfg = parse_run_config(context.run_config)
    grid = PollingGrid(grid)  # replies collected every 0.25 s, not every 3 s (flower_app.reply_poll)
    components = server_fn(context)
    strategy = components.strategy
    if isinstance(strategy, FederatedStrategy) and strategy.statistics_phase:
        run_statistics_round(grid, context, cfg, strategy)
        strategy.finish_statistics()  # raises with the reason when the step did not complete
    if uses_scheduler(cfg):
        assert isinstance(components.strategy, FederatedStrategy) and components.config is not None
        run_scheduled(grid, components.strategy, scheduler_options(cfg), profile_options(cfg),
                      components.config.num_rounds)
        return strategy
    if not cfg.secure_aggregation:
        start_grid(
            grid=grid,
            server=components.server,
            config=components.config,
            strategy=components.strategy if components.server is None else None,  # the server holds its strategy
            client_manager=components.client_manager,
        )
        return strategy
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
    return strategy


def run_statistics_round(grid: Grid, context: Context, cfg: AppConfig, strategy: FederatedStrategy) -> None:
    """The statistics step of federated preprocessing: one round of the run's own driver before training.

    The legacy loop, SecAgg+'s workflow or the scheduler's sync rounds (real time: the simulated devices' clock
    is for training) run the strategy for one round, which it answers as its statistics round
    (`FederatedStrategy.statistics_phase`); each gets a client manager of its own, as each registers the nodes.
    """
    config = ServerConfig(num_rounds=1, round_timeout=cfg.round_timeout if cfg.round_timeout > 0 else None)
    if uses_scheduler(cfg):
        run_scheduled(grid, strategy, scheduler_options(cfg), None, 1)
    elif not cfg.secure_aggregation:
        start_grid(grid=grid, server=cohort_server(strategy), config=config)
    else:
        legacy = LegacyContext(context=context, config=config, strategy=strategy, client_manager=CohortClientManager())
        DefaultWorkflow(fit_workflow=secagg_workflow(privacy_options(cfg), cfg.round_timeout))(grid, legacy)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
