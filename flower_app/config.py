"""The run config: `[tool.flwr.app.config]` parsed once into a frozen, typed `AppConfig`.

The TOML table in `pyproject.toml` is the schema users see; this dataclass mirrors it field for
field (kebab-case keys there, snake_case here). `parse_run_config` rejects unknown keys,
ill-typed values and out-of-range values with a message that names the key and the valid
choices, so a typo stops the run before any client trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from strategies import STRATEGIES, get_rule
from strategies.aggregators import AGGREGATOR_PARAMS_USED, AGGREGATOR_SPECS, AGGREGATORS, AggregatorParams
from strategies.optimizers import OPTIMIZER_HPARAMS_USED
from strategies.personalization import PERSONALIZATION, get_personalization

Scalar = bool | int | float | str


def _opt(default: Any, help: str, **checks: Any) -> Any:
    """A config field: its default, a one-line help and optional checks.

    checks: ``choices`` (an iterable or a zero-argument callable returning one), ``min``/``max``
    (inclusive), ``gt``/``lt`` (exclusive), ``why`` (the reason for ``max``, quoted in the message),
    ``allow_inf`` (floats: ``inf`` is allowed; the help must say what it means), ``path`` (strings:
    a file system path, so no NUL character) and ``required`` (strings: may not be empty).

    Every float must be finite (NaN never passes) unless ``allow_inf``; every int must fit in
    TOML's 64-bit integers (`INT_MAX`) unless a smaller ``max`` is given.
    """
    return field(default=default, metadata={"help": help, **checks})


INT_MAX = 2**63 - 1  # TOML integers are 64-bit; torch and numpy seeds accept up to here
MEMORY = "larger values exhaust memory"
TIME = "larger values run for ever"
MAX_SECONDS = 30 * 86400.0  # 30 days; Python's thread waits overflow near 2^33 s
# The synthetic and linear sources generate num-samples x num-features float64 values at once.
MAX_GENERATED_VALUES = 10**8


def _strategy_names() -> list[str]:
    return sorted(STRATEGIES)


def _aggregator_names() -> list[str]:
    return sorted(AGGREGATORS)


def _dataset_names() -> list[str]:
    from datasets import SOURCES

    return sorted(SOURCES)


def _partitioner_names() -> list[str]:
    from datasets import PARTITIONER_NAMES

    return sorted(PARTITIONER_NAMES)


def _codec_names() -> list[str]:
    from strategies.compression import CODECS

    return sorted(CODECS)


def _asynchronous(mode: str) -> bool:
    """Whether scheduling mode ``mode`` is asynchronous (`strategies.scheduling.ModeSpec`)."""
    from strategies.scheduling import get_mode

    return get_mode(mode).asynchronous


def _mode_names() -> list[str]:
    from strategies.scheduling import MODES

    return list(MODES)


def _staleness_names() -> list[str]:
    from strategies.scheduling import STALENESS_FUNCTIONS

    return list(STALENESS_FUNCTIONS)


def _profile_names() -> list[str]:
    from strategies.profiles import PROFILE_FAMILIES

    return ["none", *PROFILE_FAMILIES]


def _personalization_names() -> list[str]:
    from strategies.personalization import PERSONALIZATION

    return sorted(PERSONALIZATION)


def _model_names() -> list[str]:
    from flower_app.task import FINETUNE_MODELS, MODELS

    return sorted(["auto", *MODELS, *FINETUNE_MODELS])


# Run-config keys that only some rules or aggregators read. The server optimizer's and the aggregator's
# keys feed the fields named in `strategies.optimizers.OPTIMIZER_HPARAMS_USED` and
# `strategies.aggregators.AGGREGATOR_PARAMS_USED`; `flower_app.options` builds those options from these tables.
SERVER_OPTIMIZER_KEYS: dict[str, str] = {  # ServerOptHParams field -> run-config key
    "learning_rate": "server-learning-rate",
    "momentum": "server-momentum",
    "beta1": "server-beta1",
    "beta2": "server-beta2",
    "tau": "server-tau",
    "bias_correction": "server-bias-correction",
}
AGGREGATOR_PARAM_KEYS: dict[str, str] = {  # AggregatorParams field -> run-config key
    "trim_fraction": "trim-fraction",
    "num_byzantine": "num-byzantine",
    "num_selected": "num-selected",
}
PROXIMAL_KEYS = ("proximal-mu",)  # read by rules with `RuleSpec.proximal`
LOCAL_TRAINING_KEYS = (  # read by rules with `RuleSpec.local_training`
    "local-epochs", "learning-rate", "client-momentum", "weight-decay", "grad-accumulation-steps", "client-optimizer",
)
RULE_KEYS = (*SERVER_OPTIMIZER_KEYS.values(), *PROXIMAL_KEYS, *LOCAL_TRAINING_KEYS)
# Keys read in one mode only (`strategies.scheduling.MODES`) or with device profiles (`strategies.profiles`).
SYNC_KEYS = ("round-deadline", "over-selection")
ASYNC_KEYS = (
    "async-concurrency", "async-buffer-size", "staleness-weighting", "staleness-exponent", "staleness-cutoff",
    "max-staleness",
)
DEVICE_KEYS = (
    "device-speed", "device-speed-spread", "device-upload-bandwidth", "device-download-bandwidth", "device-dropout",
    "device-availability", "device-availability-period", "device-trace", "device-work-budget",
)
AGGREGATOR_KEYS = tuple(AGGREGATOR_PARAM_KEYS.values())
# Personalization keys and the `PersonalizationSpec` property that makes a method read each.
PERSONAL_TRAINING_KEYS = ("personal-epochs", "personal-steps", "personal-learning-rate")
PERSONALIZATION_KEYS = ("personal-modules", *PERSONAL_TRAINING_KEYS, "ditto-lambda")


def personalization_keys(method: str) -> tuple[str, ...]:
    """The keys of `PERSONALIZATION_KEYS` that the personalization ``method`` reads, from its spec."""
    spec = get_personalization(method)
    keys = ["personal-modules"] if spec.uses_modules else []
    keys += list(PERSONAL_TRAINING_KEYS) if spec.personal_training else []
    keys += ["ditto-lambda"] if spec.proximal else []
    return tuple(keys)


def rule_keys(strategy: str) -> tuple[str, ...]:
    """The keys of `RULE_KEYS` that the rule ``strategy`` reads, from its `RuleSpec`."""
    rule = get_rule(strategy)
    used = OPTIMIZER_HPARAMS_USED[rule.server_optimizer]
    keys = [key for f, key in SERVER_OPTIMIZER_KEYS.items() if f in used]
    keys += list(PROXIMAL_KEYS) if rule.proximal else []
    keys += list(LOCAL_TRAINING_KEYS) if rule.local_training else []
    return tuple(keys)


def aggregator_keys(aggregator: str) -> tuple[str, ...]:
    """The keys of `AGGREGATOR_KEYS` that ``aggregator`` reads."""
    used = AGGREGATOR_PARAMS_USED[aggregator]
    return tuple(key for f, key in AGGREGATOR_PARAM_KEYS.items() if f in used)


def _readers(key: str) -> str:
    """For the help table: which rules or aggregators read a key that not all of them read."""
    families = (
        ("strategy", "strategies", list(STRATEGIES), RULE_KEYS, rule_keys),
        ("aggregator", "aggregators", list(AGGREGATORS), AGGREGATOR_KEYS, aggregator_keys),
        ("personalization", "personalizations", list(PERSONALIZATION), PERSONALIZATION_KEYS, personalization_keys),
    )
    for one, many, names, family, keys_of in families:
        if key not in family:
            continue
        readers = [n for n in names if key in keys_of(n)]
        others = [n for n in names if n not in readers]
        if not others:
            return ""
        if len(others) < len(readers):
            return f"; read by all {many} but {', '.join(others)}"
        return f"; read by {one if len(readers) == 1 else many} {', '.join(readers)}"
    return ""


def _one_of(names: Sequence[str]) -> str:
    """``'mean'`` for one name, ``one of 'a', 'b'`` for more."""
    if len(names) == 1:
        return f"'{names[0]}'"
    return "one of " + ", ".join(f"'{n}'" for n in names)


@dataclass(frozen=True)
class AppConfig:
    """Every knob of a run. Field docs are the README's run-config table."""

    # --- rounds and client sampling ---
    num_server_rounds: int = _opt(20, "rounds to run (in total, counting resumed rounds)", min=1, max=10**6, why=TIME)
    fraction_fit: float = _opt(1.0, "fraction of available clients sampled to train each round", gt=0.0, max=1.0)
    min_fit_clients: int = _opt(2, "minimum clients sampled to train each round", min=1, max=10**6)
    fraction_evaluate: float = _opt(
        1.0, "fraction of clients in federated evaluation (0 = none): with federated-evaluation 'fit', of each "
        "round's training clients, and of the available clients in one evaluate round after the last; with "
        "'separate', of the available clients each round", min=0.0, max=1.0,
    )
    min_evaluate_clients: int = _opt(2, "minimum clients for federated evaluation", min=0, max=10**6)
    min_available_clients: int = _opt(2, "clients that must be connected before a round starts", min=1, max=10**6)
    client_wait_timeout: float = _opt(
        120.0, "seconds to wait for min-available-clients before going on with whoever is there", gt=0.0,
        max=MAX_SECONDS,
    )
    round_timeout: float = _opt(0.0, "seconds to wait for client replies in a round (0 = no limit)", min=0.0, max=MAX_SECONDS)
    max_failure_fraction: float = _opt(
        0.5, "largest fraction of failed or rejected client results a round tolerates", min=0.0, max=1.0
    )
    # --- server update rule ---
    strategy: str = _opt("fedavg", "server update rule", choices=_strategy_names)
    aggregator: str = _opt("mean", "how client updates are combined", choices=_aggregator_names)
    server_learning_rate: float = _opt(1.0, "server step size (1.0 with the sgd server optimizer = plain averaging)", gt=0.0)
    server_momentum: float = _opt(0.9, "server momentum", min=0.0, lt=1.0)
    server_beta1: float = _opt(0.9, "first-moment decay of the adaptive server optimizers", min=0.0, lt=1.0)
    server_beta2: float = _opt(0.99, "second-moment decay of the adaptive server optimizers", min=0.0, lt=1.0)
    server_tau: float = _opt(1e-3, "adaptivity / epsilon of the adaptive server optimizers", gt=0.0)
    server_bias_correction: bool = _opt(False, "Adam-style bias correction of the server moments")
    proximal_mu: float = _opt(0.01, "proximal weight mu of the clients' local objective (Li et al. 2020)", min=0.0)
    trim_fraction: float = _opt(0.2, "fraction cut at each end per coordinate", min=0.0, lt=0.5)
    num_byzantine: int = _opt(1, "assumed number of bad clients", min=0, max=10**6)
    num_selected: int = _opt(0, "clients averaged (0 = n - num-byzantine)", min=0, max=10**6)
    # --- local training ---
    local_epochs: int = _opt(2, "local epochs per round", min=1, max=10**4, why=TIME)
    batch_size: int = _opt(32, "local mini-batch size", min=1, max=2**16, why=MEMORY)
    learning_rate: float = _opt(0.05, "client learning rate", gt=0.0)
    client_momentum: float = _opt(0.0, "client SGD momentum", min=0.0, lt=1.0)
    weight_decay: float = _opt(0.0, "client weight decay", min=0.0)
    grad_accumulation_steps: int = _opt(1, "micro-batches per optimizer step (effective batch = batch-size x this)", min=1, max=2**16, why=TIME)
    device: str = _opt("auto", "where clients train: auto (CUDA if available), cpu, cuda", choices=("auto", "cpu", "cuda"))
    # --- data ---
    dataset: str = _opt("digits", "data source", choices=_dataset_names)
    data_root: str = _opt("", "directory for downloaded datasets ('' = ~/.cache/flower_app/data)", path=True)
    download: bool = _opt(False, "allow torchvision datasets to download when missing")
    data_path: str = _opt("", "CSV file or image folder for the csv / image-folder sources", path=True)
    label_column: str = _opt("label", "label column of a CSV source")
    class_names: str = _opt(
        "", "csv / image-folder / text: class names fixing label indices across data owners, comma-separated or a "
        "JSON list of strings for names with commas ('' = from the data)"
    )
    test_fraction: float = _opt(0.2, "held-out fraction for centralized evaluation (sources without a test split)", gt=0.0, lt=1.0)
    num_samples: int = _opt(2000, "examples generated by the linear and synthetic sources", min=10, max=10**7, why=MEMORY)
    num_features: int = _opt(10, "features of the linear and synthetic sources", min=1, max=10**5, why=MEMORY)
    synthetic_alpha: float = _opt(1.0, "Synthetic(alpha, beta): model heterogeneity", min=0.0, max=1000.0)
    synthetic_beta: float = _opt(1.0, "Synthetic(alpha, beta): feature heterogeneity", min=0.0, max=1000.0)
    partitioner: str = _opt("dirichlet", "how the data is split across clients", choices=_partitioner_names)
    num_partitions: int = _opt(
        0, "number of partitions (0 = take it from each node's node-config num-partitions)", min=0, max=10**5,
        why=MEMORY,
    )
    dirichlet_alpha: float = _opt(0.5, "dirichlet partitioner: label-skew concentration", gt=0.0)
    classes_per_partition: int = _opt(2, "shards partitioner: classes per client", min=1, max=10**5)
    quantity_alpha: float = _opt(1.0, "quantity-skew partitioner: size concentration", gt=0.0)
    min_partition_size: int = _opt(10, "smallest partition the partitioners may produce", min=1, max=10**9)
    image_size: int = _opt(
        32, "image-folder: images are resized to image-size x image-size pixels (all held in memory: 256 is 0.75 MiB each)",
        min=8, max=256,
    )
    # --- federated preprocessing (README "Federated preprocessing") ---
    preprocessing: str = _opt(
        "local", "feature normalization: local (each node normalizes with its own statistics, or the source's published "
        "constants), federated (a statistics step before round 1 merges every node's statistics into one transform "
        "that every node and the server apply), fixed (the transform given by preprocessing-offset and "
        "preprocessing-scale)", choices=("local", "federated", "fixed"),
    )
    preprocessing_kind: str = _opt(
        "standardize", "federated / fixed preprocessing: standardize ((x - mean) / std) or min-max ((x - min) / "
        "(max - min)), per feature or image channel", choices=("standardize", "min-max"),
    )
    preprocessing_offset: str = _opt(
        "", "fixed: the transform's offset of each feature or image channel, comma-separated; federated with "
        "secure-aggregation: a rough public centre of each feature that SecAgg+'s sums are taken relative to "
        "('' = from the server's held-out data; 0 for images)"
    )
    preprocessing_scale: str = _opt(
        "", "fixed: the transform's scale (> 0) of each feature or image channel, comma-separated; federated with "
        "secure-aggregation: a rough public spread of each feature ('' = as preprocessing-offset)"
    )
    # --- model ---
    model: str = _opt(
        "auto", "model: auto (cnn for images, mlp for tabular, linear for regression), a registered name, or your "
        "own factory 'package.module:factory' (README \"Your own model\")"
    )
    hidden_size: int = _opt(128, "hidden width of the mlp", min=1, max=2**16, why=MEMORY)
    # --- compressed updates ---
    send_delta: bool = _opt(False, "clients send w_local - w_global instead of their weights")
    compression: str = _opt("none", "codec for client updates", choices=_codec_names)
    compression_block_size: int = _opt(256, "int8-block: elements per quantization scale", min=1, max=2**24)
    topk_fraction: float = _opt(0.1, "topk: fraction of entries sent per tensor", gt=0.0, max=1.0)
    error_feedback: bool = _opt(True, "keep what compression dropped on the client and send it later")
    # --- run bookkeeping ---
    seed: int = _opt(42, "seed for sampling, partitioning and initialisation", min=0)
    output_dir: str = _opt("outputs", "folder of the runs: each run writes into output-dir/<run-name>/", path=True, required=True)
    resume: bool = _opt(False, "continue run-name (or, if empty, the run with the newest checkpoint) from its checkpoint")
    checkpoint_every: int = _opt(1, "save a checkpoint every this many rounds (the last round always)", min=1, max=10**6)
    # --- privacy: secure aggregation and differential privacy (README "Privacy") ---
    secure_aggregation: bool = _opt(False, "SecAgg+: the server only sees the sum of the client updates")
    secagg_num_shares: float = _opt(
        1.0, "SecAgg+ shares per client secret: a fraction of the round's clients (<= 1) or a count (odd, >= 3)", gt=0.0,
        max=10**6,
    )
    secagg_reconstruction_threshold: float = _opt(
        0.6, "SecAgg+ shares needed to rebuild a secret: a fraction of the shares (<= 1) or a count (>= 2)", gt=0.0,
        max=10**6,
    )
    secagg_clipping_range: float = _opt(8.0, "SecAgg+ clips every sent value to [-range, range] before quantizing", gt=0.0)
    secagg_quantization_range: int = _opt(4194304, "SecAgg+ quantization levels per value (2^22)", min=2, max=2**30)
    secagg_max_weight: float = _opt(
        1000.0, "SecAgg+ weights an update by num_examples / this (keep it >= the largest client's examples)", gt=0.0
    )
    dp_mode: str = _opt(
        "none", "differential privacy: none, central-server, central-client or local",
        choices=("none", "central-server", "central-client", "local"),
    )
    dp_clipping: str = _opt("fixed", "update clipping: fixed norm, or adaptive (Andrew et al. 2021)", choices=("fixed", "adaptive"))
    dp_clipping_norm: float = _opt(1.0, "L2 norm each client update is clipped to (initial norm when adaptive)", gt=0.0)
    dp_noise_multiplier: float = _opt(1.0, "Gaussian noise std on the sum of updates, in units of the clipping norm", min=0.0)
    dp_delta: float = _opt(1e-5, "delta of the (epsilon, delta) guarantee that is reported", gt=0.0, lt=1.0)
    dp_target_epsilon: float = _opt(0.0, "stop training before epsilon would exceed this (0 = no limit)", min=0.0)
    dp_population_size: int = _opt(
        0, "clients in the federation, for the sampling rate (0 = clients connected in the first round)", min=0,
        max=10**9,
    )
    dp_target_quantile: float = _opt(0.5, "adaptive clipping: fraction of updates meant to be left unclipped", gt=0.0, lt=1.0)
    dp_clip_learning_rate: float = _opt(0.2, "adaptive clipping: geometric step of the clipping norm", gt=0.0)
    dp_clip_count_stddev: float = _opt(
        0.0, "adaptive clipping: noise std on the unclipped count (0 = max(clients per round / 20, dp-noise-multiplier))", min=0.0
    )
    # --- transformers / LoRA (flower_app/hf_models.py; README "Fine-tuning transformers with LoRA") ---
    hf_model: str = _opt(
        "", "Hugging Face model, a local directory, a hub id or a GGUF file: the hf-* models' weights and the text datasets' tokenizer",
        path=True,
    )
    hf_dtype: str = _opt(
        "float32", "dtype the hf-* model's weights load in (LoRA adapters stay float32)",
        choices=("float32", "bfloat16", "float16"),
    )
    lora_rank: int = _opt(8, "LoRA rank of the hf-* and vit-lora models (0 = no adapters: every weight trains)", min=0, max=4096, why=MEMORY)
    lora_alpha: float = _opt(16.0, "LoRA scale alpha: the adapted layer adds (alpha / rank) B A x", gt=0.0)
    lora_dropout: float = _opt(0.0, "dropout on the adapters' input", min=0.0, lt=1.0)
    lora_target_modules: str = _opt(
        "", "comma-separated names of the modules that get adapters ('' = peft's default for the architecture)"
    )
    lora_modules_to_save: str = _opt(
        "", "comma-separated modules that train fully and travel besides the adapters ('' = the task head)"
    )
    client_optimizer: str = _opt(
        "sgd", "client optimizer: sgd, or adamw (fresh moments each round; usual for transformers)",
        choices=("sgd", "adamw"),
    )
    text_column: str = _opt("text", "text column of csv, tsv and jsonl files (datasets text, text-lm)")
    max_length: int = _opt(128, "tokens per example of the text datasets (longer texts are cut)", min=2, max=2**16, why=MEMORY)
    # --- LLM instruction tuning (README "Instruction tuning of an LLM") ---
    model_cache_dir: str = _opt(
        "", "where a node keeps the safetensors conversion of a GGUF hf-model ('' = ~/.cache/flower_app/models)",
        path=True,
    )
    prompt_column: str = _opt("prompt", "instruction column of the instructions dataset's files")
    response_column: str = _opt("response", "answer column of the instructions dataset's files")
    answer_scoring: str = _opt(
        "sum", "instructions with candidates: pick the answer by sum or mean log-likelihood, or greedy generation",
        choices=("sum", "mean", "greedy"),
    )
    gradient_checkpointing: bool = _opt(False, "hf-* models: recompute activations in the backward pass (less memory)")
    max_local_steps: int = _opt(
        0, "at most this many optimizer steps per round (fedsgd: batches per gradient); 0 = local-epochs decide", min=0
    )
    # --- outputs and experiment tracking (flower_app/outputs.py; README "Outputs") ---
    run_name: str = _opt(
        "", "this run's folder in output-dir ('' = a new generated name, YYYYmmdd-HHMMSS-<strategy>-<dataset>)",
        path=True,
    )
    tensorboard: bool = _opt(False, "also log every metric per round for TensorBoard (needs the tracking extra)")
    # --- a server without data (README "A server without data") ---
    server_data: str = _opt(
        "held-out", "what the server holds: held-out (the source's test split: central evaluation) or none (it loads "
        "no data; metrics and the best model come from federated evaluation)", choices=("held-out", "none"),
    )
    input_shape: str = _opt(
        "", "server-data none: the shape of one example, comma-separated ('1,8,8', '30'), to build the model"
    )
    num_outputs: int = _opt(
        0, "server-data none: number of classes or regression targets (0 = the number of class-names)", min=0
    )
    # --- hardening: bounds on what one client can do (issue 10; README "What the server refuses") ---
    max_count_ratio: float = _opt(
        1000.0, "a client's weight (num_examples) is capped at this multiple of the round's lower-median count, and "
        "a FedNova local_steps above this multiple of the median is rejected (inf = no cap)", min=1.0, allow_inf=True,
    )
    max_update_norm_ratio: float = _opt(
        100.0, "an update whose L2 norm exceeds this multiple of the round's lower-median update norm is rejected "
        "(inf = no bound)", min=1.0, allow_inf=True,
    )
    # --- speed (issue 12; README "Deployment speed: warm ClientApp processes") ---
    federated_evaluation: str = _opt(
        "fit", "federated evaluation: fit (each training client first evaluates the model it received, in the same "
        "message), separate (an evaluate message per client and round), none",
        choices=("fit", "separate", "none"),
    )
    data_cache: bool = _opt(True, "clients keep their prepared data on their own disk and map it in later messages")
    data_cache_dir: str = _opt(
        "", "folder of the clients' prepared data (node-config data-cache-dir overrides; '' = ~/.cache/flower_app/prepared)"
    )
    pack_arrays: bool = _opt(
        True, "each message's arrays travel as one packed buffer, not one Flower Array per tensor (fewer transport "
        "requests a message; off under secure-aggregation, whose mod masks each array)"
    )
    # --- scheduling and heterogeneous devices (flower_app/scheduler.py; README "Heterogeneous devices") ---
    mode: str = _opt(
        "sync", "sync: rounds; async: FedBuff, buffered asynchronous aggregation (Nguyen et al. 2022)",
        choices=_mode_names,
    )
    round_deadline: float = _opt(
        0.0, "a round aggregates the replies that arrive within this many seconds (simulated with device-profiles, "
        "real otherwise) and drops later ones (0 = no deadline)", min=0.0,
    )
    over_selection: float = _opt(
        1.0, "sample this factor more clients than a round needs and aggregate the first that report "
        "(Bonawitz et al. 2019)", min=1.0,
    )
    async_concurrency: int = _opt(
        0, "clients training at all times (0 = the sync cohort, max(fraction-fit x available, min-fit-clients))", min=0
    )
    async_buffer_size: int = _opt(2, "updates per server step (K of FedBuff)", min=1)
    staleness_weighting: str = _opt(
        "polynomial", "weight s(tau) of an update tau server steps old: constant 1, polynomial (1+tau)^-a, hinge "
        "(1 up to b, then 1/(1+a(tau-b)))", choices=_staleness_names,
    )
    staleness_exponent: float = _opt(0.5, "a of the staleness weighting (0.5: FedBuff's 1/sqrt(1+tau))", min=0.0)
    staleness_cutoff: int = _opt(4, "b of the hinge staleness weighting", min=0)
    max_staleness: int = _opt(0, "drop updates more than this many server steps old (0 = keep all)", min=0)
    device_profiles: str = _opt(
        "none", "simulated devices: none, uniform, mild or heavy (log-normal speeds and bandwidths, sigma 0.5 / 1.5), "
        "lognormal (sigma device-speed-spread), trace (device-trace)", choices=_profile_names,
    )
    device_speed: float = _opt(100.0, "median compute speed, examples per simulated second", gt=0.0)
    device_speed_spread: float = _opt(1.0, "sigma of log speed and log bandwidth of the lognormal profiles", min=0.0)
    device_upload_bandwidth: float = _opt(1e6, "median upload bandwidth, bytes per simulated second", gt=0.0)
    device_download_bandwidth: float = _opt(4e6, "median download bandwidth, bytes per simulated second", gt=0.0)
    device_dropout: float = _opt(0.0, "probability that a device drops out part-way through its work", min=0.0, lt=1.0)
    device_availability: float = _opt(
        1.0, "fraction of each availability period a device is online (each device its own phase)", gt=0.0, max=1.0
    )
    device_availability_period: float = _opt(3600.0, "simulated seconds of one online/offline cycle", gt=0.0)
    device_trace: str = _opt("", "CSV of device profiles, one row per partition (device-profiles='trace')")
    device_work_budget: float = _opt(
        0.0, "simulated seconds of computation a device gets per round: at most budget x speed examples of steps "
        "(0 = no cap)", min=0.0,
    )
    # --- personalization (strategies/personalization.py; README "Personalization") ---
    personalization: str = _opt(
        "none", "personalized FL: none, finetune, fedbn, fedper, fedrep or ditto (README \"Personalization\")",
        choices=_personalization_names,
    )
    personal_modules: str = _opt(
        "", "comma-separated modules that stay on each node (fedper, fedrep; '' = the model's last layer)"
    )
    personal_epochs: int = _opt(
        1, "epochs of the personal training: fine-tuning (finetune), the personal model (ditto), the head (fedrep)", min=1
    )
    personal_steps: int = _opt(0, "at most this many optimizer steps of the personal training (0 = personal-epochs decide)", min=0)
    personal_learning_rate: float = _opt(0.0, "learning rate of the personal training (0 = learning-rate)", min=0.0)
    ditto_lambda: float = _opt(0.1, "Ditto's lambda: weight of (lambda/2)||v - w||^2 pulling the personal model to the global one", min=0.0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Reject settings that cannot work together; rule and aggregator facts come from their registries."""
        if self.min_available_clients < self.min_fit_clients:
            raise ConfigError(
                f"min-available-clients ({self.min_available_clients}) must be >= "
                f"min-fit-clients ({self.min_fit_clients})"
            )
        self._check_round_size()
        if self.num_samples * self.num_features > MAX_GENERATED_VALUES:
            raise ConfigError(
                f"num-samples x num-features = {self.num_samples} x {self.num_features} must be <= "
                f"{MAX_GENERATED_VALUES} values ({MEMORY})"
            )
        rule = get_rule(self.strategy)
        means = [a for a, spec in AGGREGATOR_SPECS.items() if not spec.per_client]
        if rule.aggregator_conflict and AGGREGATOR_SPECS[self.aggregator].per_client:
            raise ConfigError(
                f"strategy '{self.strategy}' {rule.aggregator_conflict}; aggregator must be {_one_of(means)}, "
                f"got '{self.aggregator}'"
            )
        kind = rule.payload_kind(self.send_delta)
        if self.compression == "topk" and kind == "weights":
            raise ConfigError("compression 'topk' sparsifies updates: set send-delta=true (sparse weights make no sense)")
        if kind == "gradient" and self.send_delta:
            raise ConfigError(f"strategy '{self.strategy}' sends gradients; send-delta must be false")
        self._check_unread_keys()
        if self.client_optimizer == "adamw" and rule.adamw_conflict:
            fits = [name for name, r in STRATEGIES.items() if not r.adamw_conflict]
            raise ConfigError(
                f"client-optimizer 'adamw' does not fit strategy '{self.strategy}' ({rule.adamw_conflict}); "
                f"it fits {_one_of(fits)}"
            )
        if self.dataset == "synthetic" and self.num_partitions == 0:
            # The source generates one device per partition: a server reading num-partitions=0 would
            # generate (and evaluate on) a different, one-device data set than the clients train on.
            raise ConfigError(
                "dataset 'synthetic' generates one device per client: set num-partitions to the number of clients "
                "(0 would let the server and the clients generate different data)"
            )
        self._check_model()
        self._check_finetune()
        self._check_privacy()
        self._check_server_data()
        self._check_scheduling()
        self._check_personalization()
        self._check_preprocessing()

    def _check_preprocessing(self) -> None:
        """Federated and fixed preprocessing: what each reads, and what cannot run with it."""
        from datasets import SOURCE_KINDS, FeatureTransform

        keys = ("preprocessing-kind", "preprocessing-offset", "preprocessing-scale")
        changed = [k for k in keys if getattr(self, _snake(k)) != FIELD_DEFAULTS[k]]
        if self.preprocessing == "local":
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} read by preprocessing 'federated' or "
                    "'fixed'; preprocessing is 'local' (each node its own statistics): set preprocessing, or leave "
                    f"{'it' if len(changed) == 1 else 'them'} at the default"
                )
            return
        kind = SOURCE_KINDS[self.dataset]
        if kind.input_kind == "tokens":
            raise ConfigError(
                f"preprocessing '{self.preprocessing}': dataset '{self.dataset}' holds token ids, which are not "
                "normalized; leave preprocessing at 'local'"
            )
        given = bool(self.preprocessing_offset) or bool(self.preprocessing_scale)
        if given and not (self.preprocessing_offset and self.preprocessing_scale):
            raise ConfigError("preprocessing-offset and preprocessing-scale go together: set both (one value per "
                              "feature or image channel) or neither")
        if given:
            try:
                FeatureTransform.from_strings(self.preprocessing_kind, self.preprocessing_offset, self.preprocessing_scale)
            except ValueError as err:
                raise ConfigError(f"preprocessing-offset / preprocessing-scale: {err}") from err
        if self.preprocessing == "fixed":
            if not given:
                raise ConfigError(
                    "preprocessing 'fixed' applies the transform of preprocessing-offset and preprocessing-scale: set "
                    "both, one value per feature or image channel (e.g. the 'offset' and 'scale' of an earlier run's "
                    "preprocessing.json)"
                )
            return
        if self.mode != "sync":
            raise ConfigError(
                f"preprocessing 'federated' needs one statistics round in which the sampled nodes all report, before "
                f"training starts; mode '{self.mode}' (FedBuff) has no such round: use mode='sync', or preprocessing="
                "'fixed' with the offset and scale of a sync run's preprocessing.json"
            )
        if not self.secure_aggregation:
            if given:
                raise ConfigError(
                    "preprocessing-offset / preprocessing-scale are read by preprocessing 'fixed', and by 'federated' "
                    "only with secure-aggregation (as the public reference of SecAgg+'s sums); leave them empty"
                )
            return
        if self.preprocessing_kind == "min-max":
            raise ConfigError(
                "preprocessing 'federated' with secure-aggregation: min-max scaling needs each feature's min and max, "
                "which are not sums, and SecAgg+ reveals only sums; use preprocessing-kind='standardize'"
            )
        if kind.labels_from_files and not self.class_names:
            raise ConfigError(
                f"preprocessing 'federated' with secure-aggregation: dataset '{self.dataset}' takes its labels from "
                "each node's files, and agreeing on them would reveal each node's label names, which SecAgg+ cannot "
                "hide; set class-names to the full list"
            )

    def _check_model(self) -> None:
        """A registered model, or the syntax of an own factory's import path (imported only when the model is built)."""
        from flower_app.model_factory import import_path_problem, is_import_path

        names = _model_names()
        if self.model in names:
            return
        if not is_import_path(self.model):
            raise ConfigError(
                f"run-config key 'model': unknown value {self.model!r}; choose one of: {', '.join(names)}, or your own "
                "factory as 'package.module:factory' (README \"Your own model\")"
            )
        problem = import_path_problem(self.model)
        if problem is not None:
            raise ConfigError(f"run-config key 'model': {problem}")
        if self.hidden_size != FIELD_DEFAULTS["hidden-size"]:
            raise ConfigError(
                f"hidden-size is the width of the built-in mlp; model '{self.model}' is your own factory, which gets "
                "only the data's ModelInfo: leave hidden-size at the default"
            )

    def _check_server_data(self) -> None:
        """A server without data builds the model from input-shape (and num-outputs); it needs federated evaluation."""
        if self.class_names:
            from datasets.labels import parse_class_names

            try:
                parse_class_names(self.class_names)
            except ValueError as err:
                raise ConfigError(f"run-config key 'class-names': {err}") from err
        if self.server_data == "held-out":
            unread = [k for k in ("input-shape", "num-outputs") if getattr(self, _snake(k)) != FIELD_DEFAULTS[k]]
            if unread:
                raise ConfigError(
                    f"{', '.join(unread)} {'describes' if len(unread) == 1 else 'describe'} the data to a server without data "
                    "(server-data='none'); with "
                    "server-data='held-out' the server reads them from its own data: leave them at the default"
                )
            return
        if not self.input_shape:
            raise ConfigError(
                "server-data='none': the server builds the model before round 1 without seeing any data; set "
                "input-shape to the shape of one example (e.g. input-shape='1,8,8' for 8x8 grey images, '30' for 30 "
                "features); every node checks its data against it"
            )
        parse_input_shape(self.input_shape)
        if self.fraction_evaluate == 0:
            raise ConfigError(
                "server-data='none' leaves federated evaluation as the only measure of the model (its metrics and the "
                "choice of the best model): fraction-evaluate must be > 0"
            )
        if self.class_names and self.num_outputs:
            from datasets.labels import parse_class_names

            count = len(parse_class_names(self.class_names))
            if count != self.num_outputs:
                raise ConfigError(
                    f"num-outputs ({self.num_outputs}) differs from the number of class-names ({count}); set one of them"
                )

    def max_round_clients(self) -> int | None:
        """The most clients a round can train, or None when the federation's size is not bounded by the config.

        With num-partitions > 0 every client trains on one of num-partitions partitions, so at most that many
        connect; a round samples max(fraction-fit x available, min-fit-clients) of them (`FederatedStrategy`).
        With mode 'async' every server step aggregates exactly async-buffer-size updates (FedBuff's K).
        """
        if _asynchronous(self.mode):
            return self.async_buffer_size
        p = self.num_partitions
        if p == 0:
            return None
        return min(p, max(int(self.fraction_fit * p), self.min_fit_clients))

    def _check_round_size(self) -> None:
        """Refuse what no round can ever satisfy: too few clients for the sampling or for the aggregator."""
        p = self.num_partitions
        if p > 0 and self.min_available_clients > p:
            raise ConfigError(
                f"min-available-clients ({self.min_available_clients}) can never connect: num-partitions={p} "
                f"bounds the federation to {p} clients (one per partition)"
            )
        n = self.max_round_clients()
        if n is None:
            return
        spec = AGGREGATOR_SPECS[self.aggregator]
        params = AggregatorParams(self.trim_fraction, self.num_byzantine, self.num_selected)
        reason = spec.requirement(n, params) or spec.weakness(n, params)
        keys = aggregator_keys(self.aggregator)
        change = f"change {', '.join(keys)}" if keys else "choose another aggregator"
        if reason and _asynchronous(self.mode):
            raise ConfigError(
                f"aggregator '{self.aggregator}' can never do its job here: every FedBuff server step aggregates "
                f"async-buffer-size={n} updates, and {reason}; raise async-buffer-size, or {change}"
            )
        if reason:
            raise ConfigError(
                f"aggregator '{self.aggregator}' can never do its job here: a round has at most {n} clients "
                f"(num-partitions={p}, fraction-fit={self.fraction_fit:g}, min-fit-clients={self.min_fit_clients}), "
                f"and {reason}; raise num-partitions or min-fit-clients, or {change}"
            )

    def _check_personalization(self) -> None:
        """Personalized FL: the method must fit the update rule and the evaluation (from the registries' properties)."""
        method, rule = get_personalization(self.personalization), get_rule(self.strategy)
        if method.local_training_conflict and not rule.local_training:
            fits = [name for name, r in STRATEGIES.items() if r.local_training]
            raise ConfigError(
                f"personalization '{self.personalization}' {method.local_training_conflict}, but strategy "
                f"'{self.strategy}' sends a gradient without training locally; choose strategy {_one_of(fits)}"
            )
        if method.evaluation_only and self.fraction_evaluate == 0:
            raise ConfigError(
                f"personalization '{self.personalization}' acts only in federated evaluation, which "
                "fraction-evaluate=0 switches off; set fraction-evaluate > 0"
            )

    def _check_unread_keys(self) -> None:
        """A rule- or aggregator-specific key set to a non-default value that this run does not read is a mistake."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        optimizer = get_rule(self.strategy).server_optimizer
        for what, family, read in (
            (f"strategy '{self.strategy}' (server optimizer '{optimizer}')", RULE_KEYS, rule_keys(self.strategy)),
            (f"aggregator '{self.aggregator}'", AGGREGATOR_KEYS, aggregator_keys(self.aggregator)),
            (f"personalization '{self.personalization}'", PERSONALIZATION_KEYS, personalization_keys(self.personalization)),
        ):
            unread = [k for k in family if k not in read and getattr(self, _snake(k)) != defaults[_snake(k)]]
            if unread:
                them = "it" if len(unread) == 1 else "them"
                reads = ", ".join(read) if read else f"none of {', '.join(family)}"
                raise ConfigError(
                    f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} set but {what} does not read {them} "
                    f"(it reads {reads}); leave {them} at the default or choose another {what.split()[0]}"
                )

    def _check_privacy(self) -> None:
        """Secure aggregation and differential privacy: refuse settings that cannot work."""
        rule = get_rule(self.strategy)
        per_client = AGGREGATOR_SPECS[self.aggregator].per_client
        means = [a for a, spec in AGGREGATOR_SPECS.items() if not spec.per_client]
        if self.secure_aggregation:
            if per_client:
                raise ConfigError(
                    f"secure-aggregation: the server only sees the sum of the updates, so the per-client rule "
                    f"aggregator='{self.aggregator}' cannot run; use aggregator={_one_of(means)}"
                )
            if rule.secagg_conflict:
                fits = [name for name, r in STRATEGIES.items() if not r.secagg_conflict]
                raise ConfigError(
                    f"secure-aggregation: strategy '{self.strategy}' {rule.secagg_conflict}, but SecAgg+ returns one "
                    f"example-weighted mean of everything the clients send; choose {_one_of(fits)}"
                )
            if self.compression != "none":
                raise ConfigError(
                    f"secure-aggregation: compression '{self.compression}' cannot be summed under masking (SecAgg+ sends "
                    "its own quantized integer vector, and codec scales or top-k indices are not additive); "
                    "set compression='none'"
                )
            if self.dp_mode == "central-server":
                raise ConfigError(
                    "dp-mode 'central-server' clips each update on the server, which secure aggregation hides; "
                    "use dp-mode='central-client' (clients clip and add their share of the noise)"
                )
            self._check_secagg_counts()
            if self.min_fit_clients < 2:
                raise ConfigError("secure-aggregation needs at least 2 clients a round: set min-fit-clients >= 2")
        if self.dp_mode == "none":
            if self.dp_target_epsilon > 0:
                raise ConfigError("dp-target-epsilon is set but dp-mode is 'none': there is no privacy budget to track")
            return
        if rule.dp_conflict:
            fits = [name for name, r in STRATEGIES.items() if not r.dp_conflict]
            raise ConfigError(
                f"dp-mode '{self.dp_mode}': strategy '{self.strategy}' {rule.dp_conflict}, which clipping and noise "
                f"do not cover; choose {_one_of(fits)}"
            )
        if self.dp_mode != "local" and per_client:
            raise ConfigError(
                f"dp-mode '{self.dp_mode}': the noise is calibrated to the sum of clipped updates, so aggregator "
                f"'{self.aggregator}' is not covered; use aggregator={_one_of(means)} (or dp-mode='local')"
            )
        if self.dp_clipping == "adaptive" and self.dp_mode == "local":
            raise ConfigError("dp-clipping 'adaptive' estimates the norm from the clients' noisy count, a central-DP "
                              "mechanism; use dp-clipping='fixed' with dp-mode='local'")
        if self.secure_aggregation and self.secagg_clipping_range < self.dp_clipping_norm:
            raise ConfigError(
                f"secagg-clipping-range ({self.secagg_clipping_range:g}) is smaller than dp-clipping-norm "
                f"({self.dp_clipping_norm:g}): SecAgg+ would clip the clipped updates again; raise secagg-clipping-range"
            )
        if self.dp_target_epsilon > 0 and self.dp_noise_multiplier == 0:
            raise ConfigError("dp-target-epsilon needs noise: with dp-noise-multiplier=0 epsilon is infinite after one round")

    def _check_scheduling(self) -> None:
        """Modes, deadlines and device profiles: keys the run does not read, and what cannot run together."""
        from strategies.profiles import get_family
        from strategies.scheduling import STALENESS_PARAMS_USED, get_mode

        mode = get_mode(self.mode)
        read = set(ASYNC_KEYS if mode.asynchronous else SYNC_KEYS)
        if mode.asynchronous:
            used = STALENESS_PARAMS_USED[self.staleness_weighting]
            read -= {key for name, key in (("exponent", "staleness-exponent"), ("cutoff", "staleness-cutoff"))
                     if name not in used}
        if self.device_profiles != "none":
            family = get_family(self.device_profiles)
            read |= set(DEVICE_KEYS) - {"device-speed-spread", "device-trace"}
            read |= {"device-speed-spread"} if family.reads_spread else set()
            read |= {"device-trace"} if family.from_trace else set()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unread = [k for k in (*SYNC_KEYS, *ASYNC_KEYS, *DEVICE_KEYS)
                  if k not in read and getattr(self, _snake(k)) != defaults[_snake(k)]]
        if unread:
            them = "it" if len(unread) == 1 else "them"
            setting = f"mode '{self.mode}', device-profiles '{self.device_profiles}'"
            if self.mode == "async":
                setting += f", staleness-weighting '{self.staleness_weighting}'"
            raise ConfigError(
                f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} set but this run ({setting}) does not read "
                f"{them} (it reads {', '.join(k for k in (*SYNC_KEYS, *ASYNC_KEYS, *DEVICE_KEYS) if k in read)}); "
                f"leave {them} at the default or change the mode or device-profiles"
            )
        if self.device_profiles == "trace" and not self.device_trace:
            raise ConfigError("device-profiles 'trace' needs device-trace: the path of a CSV file with a row per partition")
        rule = get_rule(self.strategy)
        if mode.asynchronous:
            fits = [name for name, r in STRATEGIES.items() if not r.async_conflict]
            if rule.async_conflict:
                raise ConfigError(
                    f"mode 'async': strategy '{self.strategy}' {rule.async_conflict}, but FedBuff applies updates that "
                    f"started from different model versions; choose {_one_of(fits)}"
                )
            if self.secure_aggregation:
                raise ConfigError(f"mode 'async' cannot run with secure-aggregation: {mode.secagg_conflict}; use mode='sync'")
            if self.dp_mode != "none":
                raise ConfigError(f"mode 'async' cannot run with dp-mode '{self.dp_mode}': {mode.dp_conflict}; "
                                  "use mode='sync'")
            if self.async_concurrency and self.async_buffer_size > self.async_concurrency:
                raise ConfigError(
                    f"async-buffer-size ({self.async_buffer_size}) must be <= async-concurrency "
                    f"({self.async_concurrency}): a buffer larger than the clients training at once never fills"
                )
        if self.secure_aggregation:
            timed = [k for k in ("round-deadline", "over-selection") if getattr(self, _snake(k)) != defaults[_snake(k)]]
            if self.device_profiles != "none" or timed:
                what = ", ".join([*(["device-profiles"] if self.device_profiles != "none" else []), *timed])
                raise ConfigError(
                    f"secure-aggregation runs Flower's SecAgg+ workflow, whose rounds of keys, shares and masked "
                    f"vectors need every sampled client; {what} cannot apply to it: leave {what} at the default"
                )

    def _check_secagg_counts(self) -> None:
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares > 1 and (shares != int(shares) or shares < 3 or int(shares) % 2 == 0):
            raise ConfigError(
                f"secagg-num-shares: a count must be an odd integer >= 3 (each client shares with itself and the same "
                f"number of neighbours on either side), or a fraction <= 1; got {shares:g}"
            )
        if threshold > 1 and (threshold != int(threshold) or threshold < 2):
            raise ConfigError(
                f"secagg-reconstruction-threshold: a count must be an integer >= 2 (or a fraction <= 1), got {threshold:g}"
            )
        if shares > 1 and threshold > 1 and threshold >= shares:
            raise ConfigError(
                f"secagg-reconstruction-threshold ({threshold:g}) must be smaller than secagg-num-shares ({shares:g})"
            )
        if not math.isfinite(self.secagg_clipping_range):
            raise ConfigError("secagg-clipping-range must be finite")

    def _check_finetune(self) -> None:
        """The transformers / LoRA section: models, text data and tokenizer must fit together."""
        text_models = {"text": "hf-sequence-classification", "text-lm": "hf-causal-lm", "instructions": "hf-causal-lm"}
        hf_models = set(text_models.values())
        own = ":" in self.model  # the user's own factory gets input_kind 'tokens' (flower_app.task.ModelInfo)
        if self.dataset in text_models and self.model not in ("auto", text_models[self.dataset]) and not own:
            raise ConfigError(
                f"dataset '{self.dataset}' holds token ids: model must be 'auto' or '{text_models[self.dataset]}' "
                f"(or your own factory 'package.module:factory'), got '{self.model}'"
            )
        if self.model in hf_models and text_models.get(self.dataset) != self.model:
            wanted = " or ".join(f"'{d}'" for d, m in text_models.items() if m == self.model)
            raise ConfigError(f"model '{self.model}' reads token ids: set dataset={wanted}, got '{self.dataset}'")
        uses_hf = self.model in hf_models or self.dataset in text_models
        if uses_hf and not self.hf_model:
            raise ConfigError(
                f"model '{self.model}' / dataset '{self.dataset}' need hf-model: a model directory or a hub id"
            )
        adapted = uses_hf or self.model == "vit-lora"
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        lora_keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save")
        changed = [_kebab(k) for k in lora_keys if getattr(self, k) != defaults[k]]
        if changed and not adapted:
            raise ConfigError(
                f"{', '.join(changed)} apply to the models {', '.join(sorted([*hf_models, 'vit-lora']))}; "
                f"model is '{self.model}' (dataset '{self.dataset}')"
            )
        if self.hf_dtype != "float32" and not uses_hf:
            raise ConfigError(f"hf-dtype applies to the hf-* models; model is '{self.model}'")
        if self.hf_model and not uses_hf:
            raise ConfigError(
                f"hf-model is read by the hf-* models and the text datasets; model is '{self.model}', "
                f"dataset '{self.dataset}'"
            )
        text_keys = [_kebab(k) for k in ("text_column",) if getattr(self, k) != defaults[k]]
        if text_keys and self.dataset not in ("text", "text-lm"):
            raise ConfigError(f"{', '.join(text_keys)} apply to the datasets text and text-lm; dataset is '{self.dataset}'")
        if self.max_length != defaults["max_length"] and self.dataset not in text_models:
            raise ConfigError(f"max-length applies to the datasets {', '.join(text_models)}; dataset is '{self.dataset}'")
        keys = ("prompt_column", "response_column", "answer_scoring")
        instruction_keys = [_kebab(k) for k in keys if getattr(self, k) != defaults[k]]
        if instruction_keys and self.dataset != "instructions":
            raise ConfigError(f"{', '.join(instruction_keys)} apply to dataset 'instructions'; dataset is '{self.dataset}'")
        if self.gradient_checkpointing and not uses_hf:
            raise ConfigError(f"gradient-checkpointing applies to the hf-* models; model is '{self.model}'")
        if self.model_cache_dir and not self.hf_model.lower().endswith(".gguf"):
            raise ConfigError("model-cache-dir holds conversions of GGUF files; hf-model is not a .gguf file")
        if self.client_optimizer == "adamw" and self.client_momentum != 0.0:
            raise ConfigError("client-momentum is for client-optimizer 'sgd'; adamw keeps its own moments")

    def to_run_config(self) -> dict[str, Scalar]:
        """The kebab-case mapping that `parse_run_config` reads back."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_run_config(), indent=2, sort_keys=True)


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names the key and the valid choices."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(key: str) -> str:
    return key.replace("-", "_")


def _choices(meta: Mapping[str, Any]) -> list[str] | None:
    choices = meta.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def _check_field(f: dataclasses.Field[Any], value: Any) -> None:
    """One key's value on its own: type, choices, finiteness, bounds, paths. Every message names the key."""
    key = _kebab(f.name)
    expected: type = type(f.default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = _as_float(key, value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"run-config key '{key}' must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    value = cast(Any, value)  # of the field's type (isinstance over a runtime type narrows to object)
    meta = f.metadata
    choices = _choices(meta)
    if choices is not None and value not in choices:
        raise ConfigError(f"run-config key '{key}': unknown value {value!r}; choose one of: {', '.join(choices)}")
    if expected is float and math.isnan(value):
        raise ConfigError(f"run-config key '{key}' must be a number, got NaN")
    if expected is float and math.isinf(value) and not (meta.get("allow_inf") and value > 0):
        raise ConfigError(f"run-config key '{key}' must be finite, got {value}")
    if expected is str:
        if meta.get("required") and not value.strip():
            raise ConfigError(f"run-config key '{key}' must not be empty: it names a folder")
        if meta.get("path") and "\x00" in value:
            raise ConfigError(f"run-config key '{key}' is a path and may not contain a NUL character, got {value!r}")
    bounds: list[tuple[str, Callable[[Any, Any], bool], str]] = [
        ("min", lambda v, b: v >= b, ">="),
        ("max", lambda v, b: v <= b, "<="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    ]
    limits = dict(meta)
    if expected is int:
        limits.setdefault("max", INT_MAX)
    for name, ok, symbol in bounds:
        if name in limits and not ok(value, limits[name]):
            why = f" ({limits['why']})" if name == "max" and "why" in limits else ""
            raise ConfigError(f"run-config key '{key}' must be {symbol} {limits[name]}{why}, got {value!r}")


def _as_float(key: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"run-config key '{key}' must be a finite float, got the integer {value}") from None


FIELDS: dict[str, dataclasses.Field[Any]] = {_kebab(f.name): f for f in dataclasses.fields(AppConfig)}
FIELD_DEFAULTS: dict[str, Any] = {key: f.default for key, f in FIELDS.items()}


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``'1,8,8'`` -> ``(1, 8, 8)`` (the run-config key ``input-shape``); positive integers only.

    Raises:
        ConfigError: naming the key and the value.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(
            f"run-config key 'input-shape': {text!r} is not a shape; give positive integers separated by commas, "
            "e.g. '1,8,8' (channels, height, width) or '30' (features)"
        )
    return shape


def parse_run_config(run_config: Mapping[str, Scalar]) -> AppConfig:
    """Parse Flower's `context.run_config` into an `AppConfig`.

    Keys missing from ``run_config`` take the dataclass default (the same value as in
    `pyproject.toml`, which a test keeps in step). Unknown keys raise `ConfigError`.
    """
    unknown = sorted(set(run_config) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(FIELDS))}")
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        f = FIELDS[key]
        if type(f.default) is float and isinstance(value, int) and not isinstance(value, bool):
            value = _as_float(key, value)
        values[_snake(key)] = value
    try:
        return AppConfig(**values)
    except TypeError as err:  # pragma: no cover - defensive: dataclass signature mismatch
        raise ConfigError(str(err)) from err


def check_privacy_model(cfg: AppConfig, trainable: Sequence[bool], model_name: str) -> None:
    """DP covers what clients send; refuse models that also send data-dependent buffers."""
    if cfg.dp_mode != "none" and not all(trainable):
        raise ConfigError(
            f"dp-mode '{cfg.dp_mode}': model '{model_name}' shares {len(trainable) - sum(trainable)} buffers (BatchNorm "
            "running statistics), which depend on the data and would need clipping and noise too (noise can make "
            "a running variance negative); use a model without BatchNorm, e.g. model='mlp'"
        )


def help_table() -> list[tuple[str, Scalar, str]]:
    """(key, default, help) for every run-config key, in declaration order (for the README).

    Keys that only some rules or aggregators read say which, from the registries.
    """
    return [(k, cast(Scalar, f.default), f.metadata["help"] + _readers(k)) for k, f in FIELDS.items()]
