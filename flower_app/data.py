"""From the run config to tensors: which data a client trains on and the server evaluates on."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Simulation keeps client processes (Ray actors) alive across rounds: sources load once per process.
from datasets import (
    SOURCE_KINDS,
    Source,
    TensorData,
    check_class_names,
    load_partition,
    load_source_cached,
    parse_class_names,
)
from flower_app.config import AppConfig, ConfigError, Scalar, parse_input_shape
from flower_app.options import partition_options, source_options
from flower_app.task import ModelInfo

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
    `num-partitions`, which Flower's simulation sets for every SuperNode).
    """
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        if cfg.dataset not in LOCAL_FILE_SOURCES:
            raise ConfigError(
                f"node-config data-path needs run-config dataset to be one of {', '.join(LOCAL_FILE_SOURCES)}, got '{cfg.dataset}'"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"node data file '{path}' (node-config data-path) does not exist")
        source = load_source_cached(cfg.dataset, source_options(cfg, path=path))
        return ClientData(source.train, source.test, model_info(source), -1, source.num_classes, source.class_names)
    if "partition-id" not in node_config:
        raise ConfigError("node-config must set either data-path, or partition-id and num-partitions")
    partition_id = int(node_config["partition-id"])  # type: ignore[call-overload]
    num_partitions = cfg.num_partitions or int(node_config.get("num-partitions", 0))  # type: ignore[call-overload]
    if num_partitions < 1:
        raise ConfigError("set num-partitions in the node-config or the run config")
    source = load_source_cached(cfg.dataset, source_options(cfg, num_partitions=num_partitions))
    train, val = load_partition(source, cfg.partitioner, partition_options(cfg, num_partitions), partition_id)
    return ClientData(train, val, model_info(source), partition_id, source.num_classes, source.class_names)


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
