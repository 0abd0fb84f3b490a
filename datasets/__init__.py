"""Data for the federated app: whole data sets (sources) and their split among clients (partitioners).

Plain PyTorch, NumPy and pandas; nothing here imports Flower.

Typical use::

    from datasets import PartitionOptions, SourceOptions, load_partition, load_source

    source = load_source("digits", SourceOptions(seed=0))
    train, local_test = load_partition(source, "dirichlet", PartitionOptions(num_partitions=10), 3)
"""

from .cache import load_source_cached
from .core import Source, SourceOptions, TensorData, default_data_root
from .partitioners import (
    PARTITIONER_NAMES,
    PARTITIONERS,
    PartitionOptions,
    clear_partition_cache,
    example_keys,
    load_partition,
    partition,
    partition_summary,
)
from .registry import SOURCES, load_source
from .sources import linear_true_parameters

__all__ = [
    "PARTITIONERS",
    "PARTITIONER_NAMES",
    "SOURCES",
    "PartitionOptions",
    "Source",
    "SourceOptions",
    "TensorData",
    "clear_partition_cache",
    "default_data_root",
    "example_keys",
    "linear_true_parameters",
    "load_partition",
    "load_source",
    "load_source_cached",
    "partition",
    "partition_summary",
]
