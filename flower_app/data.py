"""From the run config to tensors: which data a client trains on and the server evaluates on.

A client's data (`client_data`) is prepared once per node and kept on the node's disk
(`datasets.prepared`, run-config ``data-cache``): a deployment starts a fresh ClientApp process for
every message, and with the cache each one maps the prepared arrays instead of reading, checking
and partitioning the source again.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Simulation keeps client processes (Ray actors) alive across rounds: sources load once per process.
from datasets import (
    SOURCE_KINDS,
    FeatureTransform,
    Source,
    SourceOptions,
    TensorData,
    check_class_names,
    feature_stats,
    load_partition,
    load_source_cached,
    parse_class_names,
    sum_stats,
    transform_data,
)
from datasets.core import STANDARDIZE
from datasets.labels import pack_class_names
from datasets.prepared import DiskCache, cache_key, code_fingerprint, path_fingerprint
from flower_app.config import AppConfig, ConfigError, Scalar, parse_input_shape
from flower_app.options import partition_options, source_options
from flower_app.task import ModelInfo

log = logging.getLogger(__name__)

LOCAL_FILE_SOURCES = ("csv", "image-folder", "text", "text-lm", "instructions")


@dataclass(frozen=True)
class ClientData:
    train: TensorData
    val: TensorData
    info: ModelInfo
    partition_id: int  # -1 for a node that brings its own data file
    num_classes: int | None
    class_names: tuple[str, ...] | None = None  # classification: the label of each index (labels agreement)


def model_info(source: Source) -> ModelInfo:
    outputs = source.num_classes if source.task == "classification" else (source.target_dim or 1)
    kind = "tokens" if source.train.x.dtype == torch.int64 else "dense"  # datasets.text: token ids
    return ModelInfo(task=source.task, input_shape=tuple(source.input_shape), num_outputs=int(outputs or 1), input_kind=kind)


def server_source(cfg: AppConfig) -> Source:
    """The run's data source as the server sees it (its test split is the centralized held-out set)."""
    return load_source_cached(cfg.dataset, source_options(cfg))


def client_data(cfg: AppConfig, node_config: Mapping[str, object]) -> ClientData:
    """The node's training data and a local validation split.

    A node either names its own file (`--node-config "data-path=..."`, a CSV or image folder read
    with the run's `dataset` kind) or a partition of the shared source (`partition-id` and
    `num-partitions`, which Flower's simulation sets for every SuperNode). With ``data-cache`` the
    result comes from the node's cache when everything that decides it is unchanged.
    """
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        if cfg.dataset not in LOCAL_FILE_SOURCES:
            raise ConfigError(
                f"node-config data-path needs run-config dataset to be one of {', '.join(LOCAL_FILE_SOURCES)}, got '{cfg.dataset}'"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"node data file '{path}' (node-config data-path) does not exist")
        return _cached(cfg, node_config, {"data-path": path}, lambda: _own_file_data(cfg, path))
    if "partition-id" not in node_config:
        raise ConfigError("node-config must set either data-path, or partition-id and num-partitions")
    partition_id = int(node_config["partition-id"])  # type: ignore[call-overload]
    num_partitions = cfg.num_partitions or int(node_config.get("num-partitions", 0))  # type: ignore[call-overload]
    if num_partitions < 1:
        raise ConfigError("set num-partitions in the node-config or the run config")
    where = {"partition-id": partition_id, "num-partitions": num_partitions}
    return _cached(cfg, node_config, where, lambda: _partition_data(cfg, partition_id, num_partitions))


def _own_file_data(cfg: AppConfig, path: str) -> ClientData:
    source = _source(cfg, source_options(cfg, path=path))
    return ClientData(source.train, source.test, model_info(source), -1, source.num_classes, source.class_names)


def _partition_data(cfg: AppConfig, partition_id: int, num_partitions: int) -> ClientData:
    source = _source(cfg, source_options(cfg, num_partitions=num_partitions))
    train, val = load_partition(source, cfg.partitioner, partition_options(cfg, num_partitions), partition_id)
    return ClientData(train, val, model_info(source), partition_id, source.num_classes, source.class_names)


_seen_files: dict[tuple[str, SourceOptions], Any] = {}


def _source(cfg: AppConfig, options: SourceOptions) -> Source:
    """The source, from this process's memo unless its files changed since it was read (then read again)."""
    files = _files_fingerprint(cfg, options)
    if _seen_files.get((cfg.dataset, options), files) != files:
        load_source_cached.cache_clear()
    _seen_files[(cfg.dataset, options)] = files
    return load_source_cached(cfg.dataset, options)


def _files_fingerprint(cfg: AppConfig, options: SourceOptions) -> dict[str, Any]:
    """Sizes and modification times of the files a source reads (its data file or folder, tokenizer, data root)."""
    files: dict[str, Any] = {}
    for name in sorted({options.path, options.tokenizer}):
        if name and (os.path.exists(name) or glob.has_magic(name)):
            files[name] = path_fingerprint(name)
    if cfg.dataset in ("mnist", "fashion-mnist", "cifar10"):
        files["root"] = path_fingerprint(options.root)
    return files


# --------------------------------------------------------------------------- the node's data cache
DATA_CACHE_NODE_KEY = "data-cache-dir"  # node-config: this node's cache folder (overrides the run config's)
_CODE_FILES = (*sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "datasets" / "*.py"))), __file__)
_code_fingerprint: str | None = None
_loaded: dict[str, ClientData] = {}  # this process's recent entries (simulation: an actor serves many rounds)
_MAX_LOADED = 8


def default_data_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "flower_app", "prepared")


def data_cache_dir(cfg: AppConfig, node_config: Mapping[str, object]) -> str:
    """Node config ``data-cache-dir``, else run config ``data-cache-dir``, else ``~/.cache/flower_app/prepared``."""
    value = node_config.get(DATA_CACHE_NODE_KEY, cfg.data_cache_dir)
    if not isinstance(value, str):
        raise ConfigError(f"node-config key '{DATA_CACHE_NODE_KEY}' must be a folder path (a string), got {value!r}")
    return os.path.expanduser(value) if value else default_data_cache_dir()


def client_data_key(cfg: AppConfig, where: Mapping[str, Any]) -> str:
    """The cache key of a client's data: every setting and file that decides it, and the code that prepares it."""
    global _code_fingerprint
    if _code_fingerprint is None:
        _code_fingerprint = code_fingerprint(_CODE_FILES)
    path = str(where.get("data-path", ""))
    num_partitions = int(where.get("num-partitions", 0))
    options = source_options(cfg, path=path or None, num_partitions=num_partitions or None)
    files = _files_fingerprint(cfg, options)
    parts = {
        "what": "client-data", "code": _code_fingerprint, "dataset": cfg.dataset, "where": dict(where),
        "source": dataclasses.asdict(options), "files": files, "partitioner": cfg.partitioner,
        "partition": dataclasses.asdict(partition_options(cfg, num_partitions)) if num_partitions else None,
        "torch": torch.__version__.split("+")[0], "numpy": np.__version__,
    }
    return cache_key(parts)


def _cached(cfg: AppConfig, node_config: Mapping[str, object], where: Mapping[str, Any], build: Any) -> ClientData:
    """``build()``'s result, from the node's cache when it holds this key; stored there after a miss."""
    if not cfg.data_cache:
        return build()  # type: ignore[no-any-return]
    key = client_data_key(cfg, where)
    if key in _loaded:
        return _loaded[key]
    cache = DiskCache(data_cache_dir(cfg, node_config))
    entry = cache.load(key)
    if entry is not None:
        try:
            data = _from_entry(entry.arrays, entry.meta)
        except (KeyError, TypeError, ValueError) as err:  # a file of an older layout under a colliding key
            log.warning("data cache: entry %s does not hold client data (%s); preparing it again", key[:12], err)
        else:
            return _remember(key, data)
    data = build()
    arrays, meta = _to_entry(data)
    cache.store(key, arrays, meta)
    return _remember(key, data)


def _remember(key: str, data: ClientData) -> ClientData:
    while len(_loaded) >= _MAX_LOADED:
        del _loaded[next(iter(_loaded))]
    _loaded[key] = data
    return data


def _to_entry(data: ClientData) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {
        "train_x": data.train.x.numpy(), "train_y": data.train.y.numpy(),
        "val_x": data.val.x.numpy(), "val_y": data.val.y.numpy(),
    }
    info = data.info
    meta = {
        "task": info.task, "input_shape": list(info.input_shape), "num_outputs": info.num_outputs,
        "input_kind": info.input_kind, "partition_id": data.partition_id, "num_classes": data.num_classes,
        "class_names": None if data.class_names is None else list(data.class_names),
    }
    return arrays, meta


def _from_entry(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ClientData:
    info = ModelInfo(
        task=str(meta["task"]), input_shape=tuple(int(d) for d in meta["input_shape"]),
        num_outputs=int(meta["num_outputs"]), input_kind=str(meta["input_kind"]),
    )
    num_classes = meta["num_classes"]
    train = TensorData(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    val = TensorData(torch.from_numpy(arrays["val_x"]), torch.from_numpy(arrays["val_y"]))
    names = meta.get("class_names")
    return ClientData(
        train, val, info, int(meta["partition_id"]), None if num_classes is None else int(num_classes),
        None if names is None else tuple(str(n) for n in names),
    )


def label_counts(data: TensorData, num_classes: int | None) -> dict[str, int]:
    """Per-class example counts as scalar metrics (`data_label_<c>`), for the partition summary."""
    if num_classes is None:
        return {}
    counts = np.bincount(data.y.numpy().astype(np.int64), minlength=num_classes)
    return {f"data_label_{c}": int(n) for c, n in enumerate(counts)}


# --------------------------------------------------- a server without data; agreement with the server
# Fit and evaluate config entries: what the server built its model for and, for classification, the
# agreed class names (JSON), so that every node can check its own data against them.
DESCRIPTION_KEY = "data-description"
CLASS_NAMES_KEY = "agreed-class-names"


def configured_model_info(cfg: AppConfig) -> ModelInfo:
    """The data description of a server without data (server-data='none'), from the run config alone.

    Raises:
        ConfigError: the dataset's task is unknown here, or the number of outputs or the class
            names it needs are not set.
    """
    source_kind = SOURCE_KINDS[cfg.dataset]  # every registered source has one (tests/test_datasets.py)
    task, kind = source_kind.task, source_kind.input_kind
    names = parse_class_names(cfg.class_names) if cfg.class_names else ()
    if task == "classification" and source_kind.labels_from_files and not names:
        raise ConfigError(
            f"server-data='none' with dataset '{cfg.dataset}': each data owner's labels come from its own files and "
            "the server holds none to agree on; set class-names to the full list (it fixes every label's index "
            "on every node, and num-outputs)"
        )
    outputs = cfg.num_outputs or len(names)
    if task == "causal-lm":
        if cfg.num_outputs:
            raise ConfigError("num-outputs does not apply to dataset 'text-lm' (causal-lm: the model's vocabulary); "
                              "leave it at 0")
        outputs = 1
    elif outputs < 1:
        what = "classes" if task == "classification" else "regression targets"
        raise ConfigError(
            f"server-data='none' with dataset '{cfg.dataset}' ({task}): set num-outputs to the number of {what}"
            + (" (or class-names)" if task == "classification" else "")
        )
    return ModelInfo(task=task, input_shape=parse_input_shape(cfg.input_shape), num_outputs=outputs, input_kind=kind)


def agreement_config(info: ModelInfo, class_names: Sequence[str] | None) -> dict[str, Scalar]:
    """What the server tells every sampled node each round: its model's data description and the agreed class names."""
    config: dict[str, Scalar] = {DESCRIPTION_KEY: json.dumps(dataclasses.asdict(info))}
    if class_names:
        config[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    return config


def check_agreement(data: ClientData, config: Mapping[str, object], hint: str = "") -> None:
    """Refuse this node's data when it disagrees with what the server sent (`agreement_config`).

    The node's data must have the description the server built the model for, and, for
    classification, the agreed class names in the agreed order (extra, missing or reordered labels
    mean that an index names different labels on different nodes). ``hint`` is added to a
    description mismatch (how to fix the run config).

    Raises:
        ValueError: naming what differs.
    """
    # Labels first: a label set that disagrees also changes the number of outputs, and this names the labels.
    names = config.get(CLASS_NAMES_KEY)
    if isinstance(names, str) and data.class_names is not None:
        check_class_names(data.class_names, json.loads(names), where="its labels disagree with the agreed class names")
    text = config.get(DESCRIPTION_KEY)
    if isinstance(text, str):
        d = json.loads(text)
        server = ModelInfo(str(d["task"]), tuple(int(n) for n in d["input_shape"]), int(d["num_outputs"]),
                           str(d["input_kind"]))
        if server != data.info:
            raise ValueError(
                f"its data is {data.info.describe()}, but the server's model was built for {server.describe()}{hint}"
            )


# ----------------------------------------------------- federated preprocessing: what travels, the node's side
# The statistics round (README "Federated preprocessing"): the fit config asks for statistics instead of
# training; the reply's one array is the node's statistics of its raw train split (`datasets.preprocessing`).
STATS_REQUEST_KEY = "preprocessing-statistics"  # "features": FeatureStats; "sums": SumStats per observation (SecAgg+)
STATS_FEATURES, STATS_SUMS = "features", "sums"
REFERENCE_KEYS = ("preprocessing-reference-offset", "preprocessing-reference-scale")  # SumStats' public reference
LABELS_REQUEST_KEY = "preprocessing-labels"  # True: report the class names the node holds (merged into the agreed list)
LABELS_METRIC = "preprocessing_labels"  # the reply's metric: a JSON list of class names
# Every later fit and evaluate config: the agreed transform, as `FeatureTransform.to_strings` writes it.
TRANSFORM_KEYS = ("agreed-transform-kind", "agreed-transform-offset", "agreed-transform-scale")


def transform_config(transform: FeatureTransform) -> dict[str, Scalar]:
    """The agreed transform as fit/evaluate config entries (text that reads back exactly)."""
    return dict(zip(TRANSFORM_KEYS, transform.to_strings()))


def config_transform(config: Mapping[str, object], keys: Sequence[str] = TRANSFORM_KEYS) -> FeatureTransform | None:
    """The transform a config carries under ``keys`` (kind, offset, scale; or offset, scale: standardize), or None.

    Raises:
        ValueError: If some keys are there and others not, or the values are not a transform.
    """
    values = [config.get(k) for k in keys]
    if all(v is None for v in values):
        return None
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"the server sent an incomplete or ill-typed transform: {dict(zip(keys, values))}")
    if len(values) == 2:
        return FeatureTransform.from_strings(STANDARDIZE, *values)  # type: ignore[arg-type]
    return FeatureTransform.from_strings(*values)  # type: ignore[arg-type]


def held_class_names(data: ClientData) -> tuple[str, ...]:
    """The class names of the labels this node holds (train and validation split), in index order."""
    if data.class_names is None:
        return ()
    held = np.union1d(np.unique(data.train.y.numpy()), np.unique(data.val.y.numpy()))
    return tuple(data.class_names[int(i)] for i in held)


def statistics_reply(
    data: ClientData, config: Mapping[str, object], clipping_range: float, max_weight: float
) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
    """This node's reply to a statistics request: ([statistics array], training examples, metrics).

    ``features``: `FeatureStats` of the raw train split. ``sums`` (SecAgg+): `SumStats` relative to the
    public reference, divided by the observation count (``[1, mean z, mean z^2]``), so that SecAgg+'s
    weighting by ``num_examples / max_weight`` gives the pooled means; every weighted value must stay
    within ``clipping_range`` or SecAgg+ would clip it silently, so this refuses instead.

    Raises:
        ValueError: An unknown request, data that cannot give statistics (token ids, NaN), or sums out of range.
    """
    request = config.get(STATS_REQUEST_KEY)
    x = data.train.x
    if request == STATS_FEATURES:
        array = feature_stats(x).to_array()
    elif request == STATS_SUMS:
        sums = sum_stats(x, config_transform(config, REFERENCE_KEYS))
        if sums.count <= 0:
            raise ValueError("the node holds no training example to compute statistics from")
        array = sums.to_array() / sums.count
        weighted = float(np.abs(array).max()) * max(1.0, len(data.train) / max_weight)
        if weighted > clipping_range:
            raise ValueError(
                f"its statistics relative to the reference transform reach {weighted:.4g}, beyond "
                f"secagg-clipping-range {clipping_range:g}, where SecAgg+ would clip them: set preprocessing-offset and "
                "preprocessing-scale to a closer rough centre and spread of each feature"
            )
    else:
        raise ValueError(f"unknown statistics request {request!r}; expected '{STATS_FEATURES}' or '{STATS_SUMS}'")
    metrics: dict[str, Scalar] = {}
    if config.get(LABELS_REQUEST_KEY):
        metrics[LABELS_METRIC] = pack_class_names(held_class_names(data))
    return [array], len(data.train), metrics


def prepared_data(data: ClientData, transform: FeatureTransform, agreed: Sequence[str] | None = None) -> ClientData:
    """``data`` (raw features) with the agreed transform applied and, given ``agreed``, its labels re-indexed to it.

    Raises:
        ValueError: If the node holds a label outside ``agreed`` (naming it), or the transform does not fit.
    """
    train, val = transform_data(data.train, transform), transform_data(data.val, transform)
    if agreed is None or data.class_names is None or tuple(agreed) == data.class_names:
        return dataclasses.replace(data, train=train, val=val)
    check_class_names(held_class_names(data), agreed, where="its labels disagree with the agreed class names",
                      allow_missing=True)
    index = {name: i for i, name in enumerate(agreed)}
    mapping = torch.tensor([index.get(name, -1) for name in data.class_names], dtype=torch.int64)
    train, val = TensorData(train.x, mapping[train.y]), TensorData(val.x, mapping[val.y])
    info = dataclasses.replace(data.info, num_outputs=len(agreed))
    return dataclasses.replace(data, train=train, val=val, info=info, num_classes=len(agreed),
                               class_names=tuple(agreed))
