"""From the run config to tensors: which data a client trains on and the server evaluates on."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

# Simulation keeps client processes (Ray actors) alive across rounds: sources load once per process.
from datasets import Source, TensorData, load_partition, load_source_cached
from flower_app.config import AppConfig, ConfigError
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
        return ClientData(source.train, source.test, model_info(source), -1, source.num_classes)
    if "partition-id" not in node_config:
        raise ConfigError("node-config must set either data-path, or partition-id and num-partitions")
    partition_id = int(node_config["partition-id"])  # type: ignore[call-overload]
    num_partitions = cfg.num_partitions or int(node_config.get("num-partitions", 0))  # type: ignore[call-overload]
    if num_partitions < 1:
        raise ConfigError("set num-partitions in the node-config or the run config")
    source = load_source_cached(cfg.dataset, source_options(cfg, num_partitions=num_partitions))
    train, val = load_partition(source, cfg.partitioner, partition_options(cfg, num_partitions), partition_id)
    return ClientData(train, val, model_info(source), partition_id, source.num_classes)


def label_counts(data: TensorData, num_classes: int | None) -> dict[str, int]:
    """Per-class example counts as scalar metrics (`data_label_<c>`), for the partition summary."""
    if num_classes is None:
        return {}
    counts = np.bincount(data.y.numpy().astype(np.int64), minlength=num_classes)
    return {f"data_label_{c}": int(n) for c, n in enumerate(counts)}
