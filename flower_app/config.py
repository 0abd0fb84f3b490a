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
from strategies.aggregators import AGGREGATOR_PARAMS_USED, AGGREGATOR_SPECS, AGGREGATORS
from strategies.optimizers import OPTIMIZER_HPARAMS_USED
from strategies.personalization import PERSONALIZATION, get_personalization

Scalar = bool | int | float | str


def _opt(default: Any, help: str, **checks: Any) -> Any:
    """A config field: its default, a one-line help and optional checks.

    checks: ``choices`` (an iterable or a zero-argument callable returning one), ``min``/``max``
    (inclusive), ``gt``/``lt`` (exclusive).
    """
    return field(default=default, metadata={"help": help, **checks})


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
    num_server_rounds: int = _opt(20, "rounds to run (in total, counting resumed rounds)", min=1)
    fraction_fit: float = _opt(1.0, "fraction of available clients sampled to train each round", gt=0.0, max=1.0)
    min_fit_clients: int = _opt(2, "minimum clients sampled to train each round", min=1)
    fraction_evaluate: float = _opt(1.0, "fraction of clients sampled for federated evaluation (0 = none)", min=0.0, max=1.0)
    min_evaluate_clients: int = _opt(2, "minimum clients for federated evaluation", min=0)
    min_available_clients: int = _opt(2, "clients that must be connected before a round starts", min=1)
    client_wait_timeout: float = _opt(
        120.0, "seconds to wait for min-available-clients before going on with whoever is there", gt=0.0
    )
    round_timeout: float = _opt(0.0, "seconds to wait for client replies in a round (0 = no limit)", min=0.0)
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
    num_byzantine: int = _opt(1, "assumed number of bad clients", min=0)
    num_selected: int = _opt(0, "clients averaged (0 = n - num-byzantine)", min=0)
    # --- local training ---
    local_epochs: int = _opt(2, "local epochs per round", min=1)
    batch_size: int = _opt(32, "local mini-batch size", min=1)
    learning_rate: float = _opt(0.05, "client learning rate", gt=0.0)
    client_momentum: float = _opt(0.0, "client SGD momentum", min=0.0, lt=1.0)
    weight_decay: float = _opt(0.0, "client weight decay", min=0.0)
    grad_accumulation_steps: int = _opt(1, "micro-batches per optimizer step (effective batch = batch-size x this)", min=1)
    device: str = _opt("auto", "where clients train: auto (CUDA if available), cpu, cuda", choices=("auto", "cpu", "cuda"))
    # --- data ---
    dataset: str = _opt("digits", "data source", choices=_dataset_names)
    data_root: str = _opt("", "directory for downloaded datasets ('' = ~/.cache/flower_app/data)")
    download: bool = _opt(False, "allow torchvision datasets to download when missing")
    data_path: str = _opt("", "CSV file or image folder for the csv / image-folder sources")
    label_column: str = _opt("label", "label column of a CSV source")
    class_names: str = _opt(
        "", "csv / image-folder: comma-separated class names fixing label indices across data owners ('' = from the data)"
    )
    test_fraction: float = _opt(0.2, "held-out fraction for centralized evaluation (sources without a test split)", gt=0.0, lt=1.0)
    num_samples: int = _opt(2000, "examples generated by the linear and synthetic sources", min=10)
    num_features: int = _opt(10, "features of the linear and synthetic sources", min=1)
    synthetic_alpha: float = _opt(1.0, "Synthetic(alpha, beta): model heterogeneity", min=0.0)
    synthetic_beta: float = _opt(1.0, "Synthetic(alpha, beta): feature heterogeneity", min=0.0)
    partitioner: str = _opt("dirichlet", "how the data is split across clients", choices=_partitioner_names)
    num_partitions: int = _opt(
        0, "number of partitions (0 = take it from each node's node-config num-partitions)", min=0
    )
    dirichlet_alpha: float = _opt(0.5, "dirichlet partitioner: label-skew concentration", gt=0.0)
    classes_per_partition: int = _opt(2, "shards partitioner: classes per client", min=1)
    quantity_alpha: float = _opt(1.0, "quantity-skew partitioner: size concentration", gt=0.0)
    min_partition_size: int = _opt(10, "smallest partition the partitioners may produce", min=1)
    image_size: int = _opt(
        32, "image-folder: images are resized to image-size x image-size pixels (all held in memory: 256 is 0.75 MiB each)",
        min=8, max=256,
    )
    # --- model ---
    model: str = _opt("auto", "model: auto (cnn for images, mlp for tabular, linear for regression)", choices=_model_names)
    hidden_size: int = _opt(128, "hidden width of the mlp", min=1)
    # --- compressed updates ---
    send_delta: bool = _opt(False, "clients send w_local - w_global instead of their weights")
    compression: str = _opt("none", "codec for client updates", choices=_codec_names)
    compression_block_size: int = _opt(256, "int8-block: elements per quantization scale", min=1)
    topk_fraction: float = _opt(0.1, "topk: fraction of entries sent per tensor", gt=0.0, max=1.0)
    error_feedback: bool = _opt(True, "keep what compression dropped on the client and send it later")
    # --- run bookkeeping ---
    seed: int = _opt(42, "seed for sampling, partitioning and initialisation", min=0)
    output_dir: str = _opt("outputs", "folder of the runs: each run writes into output-dir/<run-name>/")
    resume: bool = _opt(False, "continue run-name (or, if empty, the run with the newest checkpoint) from its checkpoint")
    checkpoint_every: int = _opt(1, "save a checkpoint every this many rounds (the last round always)", min=1)
    # --- privacy: secure aggregation and differential privacy (README "Privacy") ---
    secure_aggregation: bool = _opt(False, "SecAgg+: the server only sees the sum of the client updates")
    secagg_num_shares: float = _opt(
        1.0, "SecAgg+ shares per client secret: a fraction of the round's clients (<= 1) or a count (odd, >= 3)", gt=0.0
    )
    secagg_reconstruction_threshold: float = _opt(
        0.6, "SecAgg+ shares needed to rebuild a secret: a fraction of the shares (<= 1) or a count (>= 2)", gt=0.0
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
        0, "clients in the federation, for the sampling rate (0 = clients connected in the first round)", min=0
    )
    dp_target_quantile: float = _opt(0.5, "adaptive clipping: fraction of updates meant to be left unclipped", gt=0.0, lt=1.0)
    dp_clip_learning_rate: float = _opt(0.2, "adaptive clipping: geometric step of the clipping norm", gt=0.0)
    dp_clip_count_stddev: float = _opt(
        0.0, "adaptive clipping: noise std on the unclipped count (0 = max(clients per round / 20, dp-noise-multiplier))", min=0.0
    )
    # --- transformers / LoRA (flower_app/hf_models.py; README "Fine-tuning transformers with LoRA") ---
    hf_model: str = _opt(
        "", "Hugging Face model, a local directory, a hub id or a GGUF file: the hf-* models' weights and the text datasets' tokenizer"
    )
    hf_dtype: str = _opt(
        "float32", "dtype the hf-* model's weights load in (LoRA adapters stay float32)",
        choices=("float32", "bfloat16", "float16"),
    )
    lora_rank: int = _opt(8, "LoRA rank of the hf-* and vit-lora models (0 = no adapters: every weight trains)", min=0)
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
    max_length: int = _opt(128, "tokens per example of the text datasets (longer texts are cut)", min=2)
    # --- LLM instruction tuning (README "Instruction tuning of an LLM") ---
    model_cache_dir: str = _opt(
        "", "where a node keeps the safetensors conversion of a GGUF hf-model ('' = ~/.cache/flower_app/models)"
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
        "", "this run's folder in output-dir ('' = a new generated name, YYYYmmdd-HHMMSS-<strategy>-<dataset>)"
    )
    tensorboard: bool = _opt(False, "also log every metric per round for TensorBoard (needs the tracking extra)")
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
        self._check_finetune()
        self._check_privacy()
        self._check_personalization()

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
        if self.dataset in text_models and self.model not in ("auto", text_models[self.dataset]):
            raise ConfigError(
                f"dataset '{self.dataset}' holds token ids: model must be 'auto' or '{text_models[self.dataset]}', "
                f"got '{self.model}'"
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
    key = _kebab(f.name)
    expected: type = type(f.default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"run-config key '{key}' must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    meta = f.metadata
    choices = _choices(meta)
    if choices is not None and value not in choices:
        raise ConfigError(f"run-config key '{key}': unknown value {value!r}; choose one of: {', '.join(choices)}")
    bounds: list[tuple[str, Callable[[Any, Any], bool], str]] = [
        ("min", lambda v, b: v >= b, ">="),
        ("max", lambda v, b: v <= b, "<="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, ok, symbol in bounds:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"run-config key '{key}' must be {symbol} {meta[name]}, got {value!r}")


FIELDS: dict[str, dataclasses.Field[Any]] = {_kebab(f.name): f for f in dataclasses.fields(AppConfig)}


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
            value = float(value)
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
