"""The run config's one way into the code: `AppConfig` -> the typed options each part reads.

server `strategy_options`, client training `train_options`, data `source_options` and
`partition_options`, compression `compression_config`, fine-tuning `finetune_options`, privacy
`privacy_options`, personalization `personal_options`, the scheduler `scheduler_options`, simulated
devices `profile_options`, the work that fits a node `work_plan` (run config, device profile, node
config), and the payload a client sends, `payload_kind`. No other module turns `AppConfig` fields into
option objects; the ServerApp and the ClientApp both call these, so they agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datasets import FeatureTransform, PartitionOptions, SourceOptions
from flower_app.config import AGGREGATOR_PARAM_KEYS, SERVER_OPTIMIZER_KEYS, AppConfig, ConfigError
from flower_app.gguf_cache import resolve_model
from flower_app.hf_models import FineTuneOptions, LoraOptions, split_names
from flower_app.personal import PersonalOptions
from flower_app.task import TrainOptions
from strategies import get_rule
from strategies.aggregators import AggregatorParams
from strategies.base import StrategyOptions
from strategies.compression import CompressionConfig
from strategies.optimizers import ServerOptHParams
from strategies.profiles import DeviceProfile, ProfileOptions, profile_for, step_budget
from strategies.scheduling import StalenessParams, get_mode


@dataclass(frozen=True)
class PrivacyOptions:
    """Secure aggregation and differential privacy, as `client_privacy` and `server_privacy` read them."""

    secure_aggregation: bool = False
    dp_mode: str = "none"  # none | central-server | central-client | local
    adaptive_clipping: bool = False
    clipping_norm: float = 1.0  # C (the initial C with adaptive clipping)
    noise_multiplier: float = 1.0  # z
    delta: float = 1e-5
    target_epsilon: float = 0.0  # 0 = no limit
    population_size: int = 0  # 0 = the clients connected in the first round
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_count_stddev: float = 0.0  # 0 = max(clients per round / 20, z)
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.6
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_max_weight: float = 1000.0  # 1 under central DP, where every update has weight 1

    @property
    def enabled(self) -> bool:
        return self.secure_aggregation or self.dp_mode != "none"

    @property
    def client_dp(self) -> bool:
        """Clients clip and noise their own update."""
        return self.dp_mode in ("central-client", "local")

    @property
    def central_dp(self) -> bool:
        """The noise is calibrated to the sum of the round's updates, each of weight 1."""
        return self.dp_mode in ("central-server", "central-client")


def privacy_options(cfg: AppConfig) -> PrivacyOptions:
    central = cfg.dp_mode in ("central-server", "central-client")
    return PrivacyOptions(
        secure_aggregation=cfg.secure_aggregation,
        dp_mode=cfg.dp_mode,
        adaptive_clipping=cfg.dp_clipping == "adaptive",
        clipping_norm=cfg.dp_clipping_norm,
        noise_multiplier=cfg.dp_noise_multiplier,
        delta=cfg.dp_delta,
        target_epsilon=cfg.dp_target_epsilon,
        population_size=cfg.dp_population_size,
        target_quantile=cfg.dp_target_quantile,
        clip_learning_rate=cfg.dp_clip_learning_rate,
        clip_count_stddev=cfg.dp_clip_count_stddev,
        secagg_num_shares=cfg.secagg_num_shares,
        secagg_reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        secagg_clipping_range=cfg.secagg_clipping_range,
        secagg_quantization_range=cfg.secagg_quantization_range,
        # Central DP sends every update with weight 1, so SecAgg+ then scales by 1 / 1 (no precision lost).
        secagg_max_weight=1.0 if central else cfg.secagg_max_weight,
    )


def payload_kind(cfg: AppConfig) -> str:
    """What clients send: ``gradient`` (gradient rules), ``delta`` or ``weights``.

    Client-side DP clips and noises the update, and FedBuff's server keeps only the newest model while
    clients train on older ones, so their clients send the update whatever ``send-delta`` says (the
    server decodes every kind into an update anyway).
    """
    deltas = cfg.send_delta or privacy_options(cfg).client_dp or get_mode(cfg.mode).sends_deltas
    return get_rule(cfg.strategy).payload_kind(deltas)


def strategy_options(cfg: AppConfig) -> StrategyOptions:
    def value(key: str) -> Any:
        return getattr(cfg, key.replace("-", "_"))

    return StrategyOptions(
        rule=cfg.strategy,
        aggregator=cfg.aggregator,
        aggregator_params=AggregatorParams(**{f: value(k) for f, k in AGGREGATOR_PARAM_KEYS.items()}),
        optimizer=ServerOptHParams(**{f: value(k) for f, k in SERVER_OPTIMIZER_KEYS.items()}),
        fraction_fit=cfg.fraction_fit,
        min_fit_clients=cfg.min_fit_clients,
        fraction_evaluate=cfg.fraction_evaluate,
        min_evaluate_clients=cfg.min_evaluate_clients,
        min_available_clients=cfg.min_available_clients,
        client_wait_timeout=cfg.client_wait_timeout,
        max_failure_fraction=cfg.max_failure_fraction,
        seed=cfg.seed,
        send_delta=payload_kind(cfg) == "delta",
        compression=compression_config(cfg),
        # hardening (issue 10)
        max_count_ratio=cfg.max_count_ratio,
        max_update_norm_ratio=cfg.max_update_norm_ratio,
        # FedBuff sends its own fit messages (no fit-time evaluation) and evaluates once, after its last step:
        # that evaluation is the run's federated figure, as with 'separate'.
        federated_evaluation="separate" if get_mode(cfg.mode).asynchronous and cfg.federated_evaluation == "fit" else cfg.federated_evaluation,
        num_rounds=cfg.num_server_rounds,
        over_selection=cfg.over_selection,
        pack_arrays=cfg.pack_arrays and not cfg.secure_aggregation,  # SecAgg+'s mod masks each array of a reply
    )


def train_options(cfg: AppConfig) -> TrainOptions:
    """Local training; the proximal term only for rules that have one (`RuleSpec.proximal`)."""
    return TrainOptions(
        epochs=cfg.local_epochs,
        learning_rate=cfg.learning_rate,
        momentum=cfg.client_momentum,
        weight_decay=cfg.weight_decay,
        grad_accumulation_steps=cfg.grad_accumulation_steps,
        proximal_mu=cfg.proximal_mu if get_rule(cfg.strategy).proximal else 0.0,
        optimizer=cfg.client_optimizer,
        max_steps=cfg.max_local_steps,
    )


def compression_config(cfg: AppConfig) -> CompressionConfig:
    return CompressionConfig(
        codec=cfg.compression,
        block_size=cfg.compression_block_size,
        topk_fraction=cfg.topk_fraction,
        error_feedback=cfg.error_feedback,
    )


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


def source_options(cfg: AppConfig, path: str | None = None, num_partitions: int | None = None) -> SourceOptions:
    """The data source; ``path`` (a node's own file) and ``num_partitions`` (a node's count) override the run's."""
    root = cfg.data_root or os.path.join(os.path.expanduser("~"), ".cache", "flower_app", "data")
    return SourceOptions(
        root=root,
        download=cfg.download,
        path=cfg.data_path if path is None else path,
        label_column=cfg.label_column,
        class_names=cfg.class_names,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        num_features=cfg.num_features,
        synthetic_alpha=cfg.synthetic_alpha,
        synthetic_beta=cfg.synthetic_beta,
        num_partitions=num_partitions if num_partitions is not None else max(cfg.num_partitions, 1),
        image_size=cfg.image_size,
        text_column=cfg.text_column,
        tokenizer=resolve_model(cfg.hf_model, cfg.model_cache_dir),  # a GGUF file: its converted directory
        max_length=cfg.max_length,
        prompt_column=cfg.prompt_column,
        response_column=cfg.response_column,
        # federated / fixed preprocessing: raw features; the agreed transform is applied to the node's raw partition
        # (partitions hash the features, so the split must not depend on the transform) and to the server's split.
        normalization="local" if cfg.preprocessing == "local" else "none",
    )


def configured_transform(cfg: AppConfig) -> FeatureTransform | None:
    """The transform of preprocessing-offset / -scale (preprocessing 'fixed'; the SecAgg+ reference of 'federated'), or None."""
    if not cfg.preprocessing_offset:
        return None
    return FeatureTransform.from_strings(cfg.preprocessing_kind, cfg.preprocessing_offset, cfg.preprocessing_scale)


def partition_options(cfg: AppConfig, num_partitions: int) -> PartitionOptions:
    return PartitionOptions(
        num_partitions=num_partitions,
        seed=cfg.seed,
        dirichlet_alpha=cfg.dirichlet_alpha,
        classes_per_partition=cfg.classes_per_partition,
        quantity_alpha=cfg.quantity_alpha,
        min_partition_size=cfg.min_partition_size,
    )


# ------------------------------------------------------------------------------- scheduling and devices
# What clients and the scheduler say to each other besides the rule's own metrics:
WORK_METRIC = "num_examples_processed"  # fit metric: optimizer steps x effective batch (the unit of simulated work)
REPEAT_KEY = "repeat"  # fit config: the n-th time this node trains from the same model version (FedBuff)


@dataclass(frozen=True)
class SchedulerOptions:
    """How the server schedules client work (`flower_app.scheduler`): mode, deadline, FedBuff's knobs."""

    mode: str = "sync"
    round_deadline: float = 0.0  # seconds; simulated when there are device profiles
    round_timeout: float = 0.0  # the messages' time to live (0 = Flower's default)
    concurrency: int = 0  # async: 0 = the sync cohort
    buffer_size: int = 2
    staleness_weighting: str = "polynomial"
    staleness: StalenessParams = field(default_factory=StalenessParams)
    max_staleness: int = 0
    fraction_fit: float = 1.0
    min_fit_clients: int = 2
    fraction_evaluate: float = 1.0
    seed: int = 0
    poll_interval: float = 0.5  # seconds between pulls of replies (Flower's own grids poll every 3 s)

    @property
    def asynchronous(self) -> bool:
        return get_mode(self.mode).asynchronous


def scheduler_options(cfg: AppConfig) -> SchedulerOptions:
    return SchedulerOptions(
        mode=cfg.mode,
        round_deadline=cfg.round_deadline,
        round_timeout=cfg.round_timeout,
        concurrency=cfg.async_concurrency,
        buffer_size=cfg.async_buffer_size,
        staleness_weighting=cfg.staleness_weighting,
        staleness=StalenessParams(exponent=cfg.staleness_exponent, cutoff=cfg.staleness_cutoff),
        max_staleness=cfg.max_staleness,
        fraction_fit=cfg.fraction_fit,
        min_fit_clients=cfg.min_fit_clients,
        fraction_evaluate=cfg.fraction_evaluate,
        seed=cfg.seed,
    )


def uses_scheduler(cfg: AppConfig) -> bool:
    """Whether the run needs `flower_app.scheduler` rather than Flower's legacy loop (or SecAgg+'s workflow)."""
    return (get_mode(cfg.mode).asynchronous or cfg.device_profiles != "none" or cfg.round_deadline > 0
            or cfg.over_selection > 1.0)


def profile_options(cfg: AppConfig) -> ProfileOptions | None:
    """The simulated devices, or None without device profiles."""
    if cfg.device_profiles == "none":
        return None
    return ProfileOptions(
        family=cfg.device_profiles,
        seed=cfg.seed,
        speed=cfg.device_speed,
        spread=cfg.device_speed_spread,
        upload_bandwidth=cfg.device_upload_bandwidth,
        download_bandwidth=cfg.device_download_bandwidth,
        dropout=cfg.device_dropout,
        availability=cfg.device_availability,
        period=cfg.device_availability_period,
        trace=cfg.device_trace,
        work_budget=cfg.device_work_budget,
    )


@dataclass(frozen=True)
class WorkPlan:
    """The local work of one node: epochs, a cap on optimizer steps (0 = none) and the batch size."""

    epochs: int
    max_steps: int
    batch_size: int
    source: str = "run config"  # where the values come from, for the log


# node-config keys a SuperNode may set to fit the work to its device (`--node-config "batch-size=8"`)
NODE_WORK_KEYS: dict[str, tuple[str, int]] = {  # key -> (WorkPlan field, smallest value)
    "local-epochs": ("epochs", 1),
    "max-local-steps": ("max_steps", 0),
    "batch-size": ("batch_size", 1),
}


def work_plan(cfg: AppConfig, node_config: Mapping[str, Any], partition: int) -> WorkPlan:
    """The work this node does each round: the run config's, then its device profile's (simulation), then its
    node config's (deployment), each overriding the one before.

    A profile (``device-profiles``, by partition) may carry its own epochs, step cap and batch size (trace
    columns), and ``device-work-budget`` caps the steps at what the device computes in that many simulated
    seconds (`strategies.profiles.step_budget`), so a slow device trains less. Node-config keys
    (`NODE_WORK_KEYS`) must be integers in range; anything else raises `ConfigError` naming the key.
    """
    epochs, max_steps, batch = cfg.local_epochs, cfg.max_local_steps, cfg.batch_size
    sources = []
    options = profile_options(cfg)
    if options is not None and partition >= 0:
        profile: DeviceProfile = profile_for(options, partition)
        epochs = profile.local_epochs or epochs
        max_steps = profile.max_local_steps or max_steps
        batch = profile.batch_size or batch
        cap = step_budget(profile, options.work_budget, batch * cfg.grad_accumulation_steps)
        if cap:
            max_steps = min(max_steps, cap) if max_steps else cap
        sources.append(f"device profile of partition {partition}")
    values = {"epochs": epochs, "max_steps": max_steps, "batch_size": batch}
    for key, (name, smallest) in NODE_WORK_KEYS.items():
        if key not in node_config:
            continue
        value = node_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ConfigError(
                f"node-config key '{key}' must be an integer >= {smallest}, got {value!r}; the node-config keys that "
                f"fit the work to a device are {', '.join(NODE_WORK_KEYS)}"
            )
        values[name] = value
        if "node config" not in sources:
            sources.append("node config")
    return WorkPlan(**values, source=", ".join(sources) or "run config")


def personal_options(cfg: AppConfig) -> PersonalOptions:
    """Personalization: the method, which modules stay local, and the personal training's settings."""
    return PersonalOptions(
        method=cfg.personalization,
        modules=split_names(cfg.personal_modules),
        epochs=cfg.personal_epochs,
        steps=cfg.personal_steps,
        learning_rate=cfg.personal_learning_rate or cfg.learning_rate,
        ditto_lambda=cfg.ditto_lambda,
    )
