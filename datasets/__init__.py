"""Data for the federated app: whole data sets (sources) and their split among clients (partitioners).

Plain PyTorch, NumPy and pandas; nothing here imports Flower.

Typical use::

    from datasets import PartitionOptions, SourceOptions, load_partition, load_source

    source = load_source("digits", SourceOptions(seed=0))
    train, local_test = load_partition(source, "dirichlet", PartitionOptions(num_partitions=10), 3)

Federated preprocessing (statistics merged across nodes, one transform for all): :mod:`datasets.preprocessing`.
"""

from .cache import load_source_cached
from .core import NORMALIZATIONS, DataFileError, FeatureTransform, Source, SourceOptions, TensorData, default_data_root
from .labels import (
    LabelMismatch,
    agree_class_names,
    check_class_names,
    check_held_out,
    check_node_labels,
    class_names_option,
    compare_class_names,
    pack_class_names,
    parse_class_names,
    present_class_names,
    unpack_class_names,
)
from .partitioners import (
    CLASS_LABEL_PARTITIONERS,
    PARTITIONER_NAMES,
    PARTITIONERS,
    PartitionOptions,
    clear_partition_cache,
    example_keys,
    load_partition,
    partition,
    partition_summary,
)
from .preprocessing import (
    FeatureStats,
    SumStats,
    feature_stats,
    merge_stats,
    sum_stats,
    transform_data,
    transform_from_stats,
    transform_source,
)
from .registry import SOURCE_KINDS, SOURCES, SourceKind, load_source
from .sources import linear_true_parameters

__all__ = [
    "CLASS_LABEL_PARTITIONERS",
    "NORMALIZATIONS",
    "PARTITIONERS",
    "PARTITIONER_NAMES",
    "SOURCES",
    "SOURCE_KINDS",
    "DataFileError",
    "FeatureStats",
    "FeatureTransform",
    "LabelMismatch",
    "PartitionOptions",
    "Source",
    "SourceKind",
    "SourceOptions",
    "SumStats",
    "TensorData",
    "agree_class_names",
    "check_class_names",
    "check_held_out",
    "check_node_labels",
    "class_names_option",
    "clear_partition_cache",
    "compare_class_names",
    "default_data_root",
    "example_keys",
    "feature_stats",
    "linear_true_parameters",
    "load_partition",
    "load_source",
    "load_source_cached",
    "merge_stats",
    "pack_class_names",
    "parse_class_names",
    "partition",
    "partition_summary",
    "present_class_names",
    "sum_stats",
    "transform_data",
    "transform_from_stats",
    "transform_source",
    "unpack_class_names",
]
