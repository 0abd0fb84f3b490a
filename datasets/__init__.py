"""Data for the federated app: whole data sets (sources) and their split among clients (partitioners).

Plain PyTorch, NumPy and pandas; nothing here imports Flower.

Typical use::

    from datasets import PartitionOptions, SourceOptions, load_partition, load_source

    source = load_source("digits", SourceOptions(seed=0))
    train, local_test = load_partition(source, "dirichlet", PartitionOptions(num_partitions=10), 3)
"""

from .cache import load_source_cached
from .core import DataFileError, Source, SourceOptions, TensorData, default_data_root
from .labels import (
    LabelMismatch,
    check_class_names,
    check_held_out,
    compare_class_names,
    parse_class_names,
    present_class_names,
)
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
    "DataFileError",
    "LabelMismatch",
    "PartitionOptions",
    "Source",
    "SourceOptions",
    "TensorData",
    "check_class_names",
    "check_held_out",
    "clear_partition_cache",
    "compare_class_names",
    "default_data_root",
    "example_keys",
    "linear_true_parameters",
    "load_partition",
    "load_source",
    "load_source_cached",
    "parse_class_names",
    "partition",
    "partition_summary",
    "present_class_names",
]
