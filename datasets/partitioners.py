"""Partitioners: split a source's training examples among federated clients.

A partitioner maps ``(labels, keys, options)`` to a list of ``options.num_partitions`` sorted
``int64`` index arrays that are disjoint and together cover every example. ``keys`` are stable
per-example identifiers (:func:`example_keys`); every partitioner first puts the examples in a
canonical order, by ``(label, key)`` or by key alone, before any seeded random draw, and maps the
result back to input positions. The same example therefore lands in the same partition whatever the
order of the input arrays, and the same inputs and seed always give the same partitions.

Registered partitioners (:data:`PARTITIONERS`):

``iid``
    Uniformly random, sizes differing by at most one.
``dirichlet``
    Label skew of Hsu et al. (2019), "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification": each class is split among partitions in proportions drawn from
    ``Dirichlet(dirichlet_alpha)``. Small alpha: each client sees few classes; large alpha: near IID.
``shards``
    Pathological non-IID of McMahan et al. (2017), generalized: each partition holds exactly
    ``classes_per_partition`` classes, and each class is shared evenly by the partitions holding it.
``quantity-skew``
    Partition sizes drawn from ``Dirichlet(quantity_alpha)``, labels IID (Li et al., 2022, "Federated
    Learning on Non-IID Data Silos: An Experimental Study").
``sorted``
    Examples sorted by label or regression target and cut into equal contiguous blocks: partition
    ``p`` holds the ``p``-th quantile range of the target (McMahan et al.'s sort-and-partition with one
    shard each). The non-IID split for regression, where there are no classes to skew.

``dirichlet`` and ``shards`` need class labels (:data:`CLASS_LABEL_PARTITIONERS`) and refuse regression
targets; the others accept any labels.

:func:`partition` also accepts ``"natural"``: the split a source ships with
(``Source.natural_partitions``, e.g. the devices of FedProx's Synthetic data).
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .core import Source, TensorData

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CLASS_LABEL_PARTITIONERS",
    "PARTITIONERS",
    "PARTITIONER_NAMES",
    "PartitionOptions",
    "clear_partition_cache",
    "example_keys",
    "load_partition",
    "partition",
    "partition_summary",
]

logger = logging.getLogger(__name__)

# Fraction of a partition held out for federated evaluation by :func:`load_partition`.
_LOCAL_TEST_FRACTION = 0.1
# How many Dirichlet draws to try before repairing the last one to meet ``min_partition_size``.
_DIRICHLET_TRIES = 10
# How many class assignments ``shards`` tries before giving up on ``min_partition_size``.
_SHARDS_TRIES = 10


@dataclass(frozen=True)
class PartitionOptions:
    """Options of the partitioners; each partitioner reads the fields it needs.

    Attributes:
        num_partitions: Number of partitions (clients), at least 1 and at most the number of examples.
        seed: Seed of every random draw.
        dirichlet_alpha: Concentration of the ``dirichlet`` label skew; smaller is more skewed.
        classes_per_partition: Number of distinct classes each ``shards`` partition holds.
        quantity_alpha: Concentration of the ``quantity-skew`` sizes; smaller is more unequal.
        min_partition_size: Every partition gets at least this many examples; a split that cannot
            meet it raises :class:`ValueError`.
    """

    num_partitions: int
    seed: int = 0
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    quantity_alpha: float = 1.0
    min_partition_size: int = 1

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.classes_per_partition < 1:
            raise ValueError(f"classes_per_partition must be >= 1, got {self.classes_per_partition}")
        if not self.quantity_alpha > 0:
            raise ValueError(f"quantity_alpha must be > 0, got {self.quantity_alpha}")
        if self.min_partition_size < 0:
            raise ValueError(f"min_partition_size must be >= 0, got {self.min_partition_size}")


# ----------------------------------------------------------------------------------------------
# Keys and canonical order
# ----------------------------------------------------------------------------------------------


def example_keys(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Return a stable ``uint64`` key per example, computed from its content.

    The key of example ``i`` is the first 8 bytes (little endian) of the BLAKE2b digest of the raw
    bytes of row ``x[i]`` (C order, its own dtype), followed by the bytes of ``y[i]`` when ``y`` is
    given. Keys depend only on the example, not on its position, so partitions computed from them
    do not depend on example order. Identical examples get identical keys, and are interchangeable.

    Args:
        x: Features, ``N x ...``.
        y: Optional labels or targets, ``N x ...``; include them so that equal inputs with different
            labels get different keys.
    """
    rows = _as_rows(x)
    labels = None if y is None else _as_rows(y)
    if labels is not None and labels.shape[0] != rows.shape[0]:
        raise ValueError(f"x and y must have the same number of examples, got {rows.shape[0]} and {labels.shape[0]}")
    keys = np.empty(rows.shape[0], dtype=np.uint64)
    for i in range(rows.shape[0]):
        digest = hashlib.blake2b(rows[i].tobytes(), digest_size=8)
        if labels is not None:
            digest.update(labels[i].tobytes())
        keys[i] = int.from_bytes(digest.digest(), "little")
    return keys


def _as_rows(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """View ``a`` as a C-contiguous ``N x D`` numpy array."""
    array = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(array.reshape(array.shape[0], -1))


def _canonical_order(keys: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Positions of the examples sorted by ``(label, key)``, or by key when ``labels`` is None."""
    if labels is None:
        return np.argsort(keys, kind="stable")
    return np.lexsort((keys, labels))


def _class_labels(labels: np.ndarray, partitioner: str) -> np.ndarray:
    """Return ``labels`` as 1-D int64 class labels, or raise if they are regression targets."""
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        others = sorted(set(PARTITIONERS) - CLASS_LABEL_PARTITIONERS)
        raise ValueError(
            f"partitioner '{partitioner}' needs class labels (1-D integers), got {labels.dtype} labels "
            f"of shape {labels.shape}; regression data can use one of: {', '.join(others)}"
        )
    return labels.astype(np.int64, copy=False)


def _check_common(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> int:
    """Validate inputs shared by all partitioners and return the number of examples."""
    n = int(labels.shape[0])
    if keys.shape != (n,):
        raise ValueError(f"keys must have shape ({n},) to match labels, got {keys.shape}")
    if options.num_partitions > n:
        raise ValueError(f"num_partitions={options.num_partitions} exceeds the number of examples ({n})")
    if options.num_partitions * options.min_partition_size > n:
        raise ValueError(
            f"min_partition_size={options.min_partition_size} is impossible: {options.num_partitions} "
            f"partitions x {options.min_partition_size} > {n} examples"
        )
    return n


def _from_assignment(order: np.ndarray, owner: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Turn ``owner[j]`` (partition of the example at canonical position ``j``) into index arrays."""
    return [np.sort(order[owner == p]).astype(np.int64) for p in range(num_partitions)]


def _owners_from_sizes(sizes: np.ndarray) -> np.ndarray:
    """``[0]*sizes[0] + [1]*sizes[1] + ...`` as an array."""
    return np.repeat(np.arange(len(sizes)), sizes)


def _rng(options: PartitionOptions, stream: int) -> np.random.Generator:
    """A generator for one partitioner, so partitioners do not share random streams."""
    return np.random.default_rng([options.seed, stream])


# ----------------------------------------------------------------------------------------------
# Partitioners
# ----------------------------------------------------------------------------------------------


def iid_partition(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> list[np.ndarray]:
    """Split uniformly at random into partitions whose sizes differ by at most one.

    Labels are not used (any shape or dtype is accepted).
    """
    n = _check_common(labels, keys, options)
    order = _canonical_order(keys, None)
    shuffled = order[_rng(options, 0).permutation(n)]
    return [np.sort(part).astype(np.int64) for part in np.array_split(shuffled, options.num_partitions)]


def dirichlet_partition(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> list[np.ndarray]:
    """Label-skewed split: class ``c`` is divided among partitions in proportions ``~ Dir(alpha)``.

    For each class, proportions ``p ~ Dirichlet(dirichlet_alpha * 1_K)`` are drawn and the class's
    examples (in seeded random order) are cut at ``cumsum(p) * n_c``. The whole draw is repeated up to
    ten times until every partition has ``min_partition_size`` examples; if none does, the last draw
    is repaired by moving examples from the largest partitions to the short ones.

    Raises:
        ValueError: If the labels are not class labels (regression).
    """
    class_labels = _class_labels(labels, "dirichlet")
    n = _check_common(class_labels, keys, options)
    k = options.num_partitions
    order = _canonical_order(keys, class_labels)
    sorted_labels = class_labels[order]
    classes, starts = np.unique(sorted_labels, return_index=True)
    bounds = np.append(starts, n)
    rng = _rng(options, 1)
    owner = np.empty(n, dtype=np.int64)
    for attempt in range(_DIRICHLET_TRIES):
        for c in range(len(classes)):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            proportions = rng.dirichlet(np.full(k, options.dirichlet_alpha))
            cuts = np.round(np.cumsum(proportions)[:-1] * (hi - lo)).astype(np.int64)
            sizes = np.diff(np.concatenate(([0], cuts, [hi - lo])))
            # Shuffle within the class so that which examples go where is random too.
            owner[lo + rng.permutation(hi - lo)] = _owners_from_sizes(sizes)
        counts = np.bincount(owner, minlength=k)
        if counts.min() >= options.min_partition_size:
            break
        logger.debug("dirichlet draw %d left a partition with %d examples; redrawing", attempt, counts.min())
    else:
        _repair_min_size(owner, k, options.min_partition_size)
        logger.info("dirichlet: repaired partitions to min_partition_size=%d", options.min_partition_size)
    return _from_assignment(order, owner, k)


def _repair_min_size(owner: np.ndarray, num_partitions: int, min_size: int) -> None:
    """Move examples from the largest partitions to those below ``min_size``, in place.

    Deterministic: the moved example is the last (in canonical order) of the currently largest
    partition. Requires ``num_partitions * min_size <= len(owner)``.
    """
    counts = np.bincount(owner, minlength=num_partitions)
    for p in range(num_partitions):
        while counts[p] < min_size:
            donor = int(np.argmax(counts))
            position = int(np.flatnonzero(owner == donor)[-1])
            owner[position] = p
            counts[donor] -= 1
            counts[p] += 1


def shards_partition(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> list[np.ndarray]:
    """Pathological non-IID split: every partition holds exactly ``classes_per_partition`` classes.

    Partitions pick their classes in turn, each taking the ``classes_per_partition`` classes used by
    the fewest partitions so far (ties broken at random), so every class is used by ``m`` or ``m + 1``
    partitions and, since ``num_partitions * classes_per_partition >= num_classes`` is required, every
    example is assigned. Each class's examples, in seeded random order, are then cut into equal
    shards (sizes differing by at most one), one per partition using it. Up to ten class assignments
    are tried to meet ``min_partition_size``.

    Raises:
        ValueError: If the labels are not class labels; if ``classes_per_partition`` exceeds the number
            of classes present; if ``num_partitions * classes_per_partition`` is below the number of
            classes (some examples could not be assigned); if a class has fewer examples than
            partitions that must share it; or if ``min_partition_size`` cannot be met.
    """
    class_labels = _class_labels(labels, "shards")
    n = _check_common(class_labels, keys, options)
    k = options.num_partitions
    per = options.classes_per_partition
    order = _canonical_order(keys, class_labels)
    sorted_labels = class_labels[order]
    classes, starts, class_sizes = np.unique(sorted_labels, return_index=True, return_counts=True)
    num_classes = len(classes)
    if per > num_classes:
        raise ValueError(f"classes_per_partition={per} exceeds the number of classes present ({num_classes})")
    if k * per < num_classes:
        raise ValueError(
            f"classes_per_partition={per} with num_partitions={k} gives {k * per} class slots, fewer than "
            f"the {num_classes} classes, so some examples would be left out; raise one of them"
        )
    rng = _rng(options, 2)
    owner = np.empty(n, dtype=np.int64)
    for attempt in range(_SHARDS_TRIES):
        usage = np.zeros(num_classes, dtype=np.int64)
        users: list[list[int]] = [[] for _ in range(num_classes)]
        for p in range(k):
            # Least-used classes first; a random tie-break varies which classes go together.
            chosen = np.lexsort((rng.random(num_classes), usage))[:per]
            for c in chosen:
                users[int(c)].append(p)
            usage[chosen] += 1
        short = [int(classes[c]) for c in range(num_classes) if class_sizes[c] < len(users[c])]
        if short:
            raise ValueError(
                f"classes {short} have fewer examples than the partitions that must share them; "
                f"lower num_partitions or classes_per_partition"
            )
        for c in range(num_classes):
            lo = int(starts[c])
            size = int(class_sizes[c])
            shuffled = lo + rng.permutation(size)
            for p, shard in zip(users[c], np.array_split(shuffled, len(users[c])), strict=True):
                owner[shard] = p
        counts = np.bincount(owner, minlength=k)
        if counts.min() >= options.min_partition_size:
            return _from_assignment(order, owner, k)
        logger.debug("shards assignment %d left a partition with %d examples; retrying", attempt, counts.min())
    raise ValueError(
        f"shards cannot give every partition min_partition_size={options.min_partition_size} examples "
        f"with classes_per_partition={per} and num_partitions={k}"
    )


def quantity_skew_partition(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> list[np.ndarray]:
    """Quantity-skewed split: sizes ``~ Dirichlet(quantity_alpha)``, examples assigned uniformly.

    Each partition first gets ``min_partition_size`` examples; the remaining examples are divided in
    proportions ``q ~ Dirichlet(quantity_alpha * 1_K)`` (largest-remainder rounding). Examples are
    assigned in seeded random order, so every partition's label mix is IID. Labels are not used.
    """
    n = _check_common(labels, keys, options)
    k = options.num_partitions
    rng = _rng(options, 3)
    proportions = rng.dirichlet(np.full(k, options.quantity_alpha))
    spare = n - k * options.min_partition_size
    quota = spare * proportions
    sizes = np.floor(quota).astype(np.int64)
    for p in np.argsort(-(quota - sizes), kind="stable")[: spare - int(sizes.sum())]:
        sizes[p] += 1
    sizes += options.min_partition_size
    order = _canonical_order(keys, None)
    shuffled = order[rng.permutation(n)]
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(part).astype(np.int64) for part in np.split(shuffled, cuts)]


def sorted_partition(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> list[np.ndarray]:
    """Sort-and-cut split: examples sorted by label or target, cut into equal contiguous blocks.

    Partition ``p`` gets the ``p``-th block (sizes differing by at most one) of the examples in order
    of their label or regression target; equal values are ordered at random (seeded, by key, so the
    split does not depend on example order). For regression this is the strongest shift of the target
    a split can make (one site sees mild cases, another severe ones); for classification each
    partition holds one or a few adjacent classes.

    Raises:
        ValueError: If the labels are not one number per example (shape ``(N,)`` or ``(N, 1)``), or
            hold NaN or inf.
    """
    values = np.asarray(labels)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    numeric = np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_
    if values.ndim != 1 or not numeric:
        raise ValueError(
            f"partitioner 'sorted' needs one numeric label or target per example (shape (N,) or (N, 1)), got "
            f"{values.dtype} labels of shape {np.asarray(labels).shape}"
        )
    if np.issubdtype(values.dtype, np.floating) and not bool(np.all(np.isfinite(values))):
        raise ValueError("partitioner 'sorted' cannot order NaN or infinite targets")
    n = _check_common(values, keys, options)
    tie_break = np.empty(n, dtype=np.int64)
    tie_break[_canonical_order(keys, None)] = _rng(options, 5).permutation(n)
    order = np.lexsort((tie_break, values))
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, options.num_partitions)]


PARTITIONERS: dict[str, Callable[[np.ndarray, np.ndarray, PartitionOptions], list[np.ndarray]]] = {
    "dirichlet": dirichlet_partition,
    "iid": iid_partition,
    "quantity-skew": quantity_skew_partition,
    "shards": shards_partition,
    "sorted": sorted_partition,
}
"""Registry of the partitioners that split by labels and keys. ``"natural"`` is handled by
:func:`partition`, since it needs the source's own split."""

NATURAL = "natural"

CLASS_LABEL_PARTITIONERS: frozenset[str] = frozenset({"dirichlet", "shards"})
"""The partitioners that split by class: they refuse regression targets (the others accept any labels)."""

PARTITIONER_NAMES: tuple[str, ...] = tuple(sorted([*PARTITIONERS, NATURAL]))
"""Every name :func:`partition` accepts: the keys of :data:`PARTITIONERS` and ``"natural"``."""


def _natural_partition(n: int, natural: Sequence[np.ndarray] | None, options: PartitionOptions) -> list[np.ndarray]:
    """Validate and return a source's own partitions as sorted int64 arrays."""
    if natural is None:
        raise ValueError(
            "partitioner 'natural' needs a source with natural partitions (e.g. 'synthetic'); this one has none"
        )
    if len(natural) != options.num_partitions:
        raise ValueError(
            f"the source has {len(natural)} natural partitions but num_partitions={options.num_partitions}; "
            "set them equal"
        )
    parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in natural]
    seen = np.zeros(n, dtype=np.int64)
    for part in parts:
        if part.size and (part[0] < 0 or part[-1] >= n):
            raise ValueError(f"natural partition indices must be in [0, {n})")
        np.add.at(seen, part, 1)
    if (seen > 1).any():
        raise ValueError("natural partitions overlap")
    small = min(len(p) for p in parts)
    if small < options.min_partition_size:
        raise ValueError(
            f"a natural partition has {small} examples, fewer than min_partition_size={options.min_partition_size}"
        )
    return parts


def partition(
    name: str,
    labels: np.ndarray,
    keys: np.ndarray,
    options: PartitionOptions,
    natural: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Split examples into ``options.num_partitions`` partitions with the partitioner ``name``.

    Args:
        name: A key of :data:`PARTITIONERS`, or ``"natural"`` to use ``natural``.
        labels: Per-example class labels (``int``, shape ``(N,)``), or regression targets.
        keys: Per-example stable keys, shape ``(N,)`` (see :func:`example_keys`).
        options: Partitioning options.
        natural: The source's own partitions (``Source.natural_partitions``), for ``"natural"``.

    Returns:
        ``num_partitions`` sorted, disjoint ``int64`` index arrays covering all ``N`` examples.

    Raises:
        ValueError: For an unknown name (listing the valid ones) or options the data cannot satisfy.
    """
    labels = np.asarray(labels)
    keys = np.asarray(keys)
    if name == NATURAL:
        return _natural_partition(int(labels.shape[0]), natural, options)
    try:
        partitioner = PARTITIONERS[name]
    except KeyError:
        raise ValueError(f"unknown partitioner '{name}'; choose one of: {', '.join(PARTITIONER_NAMES)}") from None
    return partitioner(labels, keys, options)


def partition_summary(labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int | None) -> pd.DataFrame:
    """Tabulate partitions: one row per partition with its size and per-class counts.

    Args:
        labels: Labels of all examples (class labels when ``num_classes`` is given).
        partitions: Index arrays into ``labels``.
        num_classes: Number of classes, or ``None`` for regression.

    Returns:
        Columns ``partition``, ``num_examples`` and, for classification, ``label_0`` ...
        ``label_{num_classes-1}`` with the count of each class.
    """
    import pandas as pd  # here, not at the top: the clients' import path stays free of pandas

    labels = np.asarray(labels)
    rows: list[dict[str, int]] = []
    for p, part in enumerate(partitions):
        idx = np.asarray(part, dtype=np.int64)
        row = {"partition": p, "num_examples": int(idx.size)}
        if num_classes is not None:
            part_labels = labels[idx].astype(np.int64)
            if part_labels.size and (part_labels.min() < 0 or part_labels.max() >= num_classes):
                raise ValueError(f"partition {p} has labels outside [0, {num_classes})")
            counts = np.bincount(part_labels, minlength=num_classes)
            row.update({f"label_{c}": int(counts[c]) for c in range(num_classes)})
        rows.append(row)
    columns = ["partition", "num_examples"]
    if num_classes is not None:
        columns += [f"label_{c}" for c in range(num_classes)]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# Per-client loading, memoized
# ----------------------------------------------------------------------------------------------

_Fingerprint = tuple[str, int, str]

# Source object -> (fingerprint of its training data, example keys of its training data).
_SOURCE_KEYS: weakref.WeakKeyDictionary[Source, tuple[_Fingerprint, np.ndarray]] = weakref.WeakKeyDictionary()
# (fingerprint, partitioner, options) -> partitions.
_PARTITIONS: dict[tuple[_Fingerprint, str, PartitionOptions], list[np.ndarray]] = {}
# (fingerprint, partitioner, options, partition_id) -> (train, local test).
_LOADED: dict[tuple[_Fingerprint, str, PartitionOptions, int], tuple[TensorData, TensorData]] = {}


def clear_partition_cache() -> None:
    """Forget every memoized partitioning and partition (frees their memory)."""
    _SOURCE_KEYS.clear()
    _PARTITIONS.clear()
    _LOADED.clear()


def _source_keys(source: Source) -> tuple[_Fingerprint, np.ndarray]:
    """Return the source's content fingerprint and example keys, computed once per source object.

    The fingerprint is ``(name, number of train examples, digest of the keys and natural partitions)``,
    so an identical source loaded again maps to the same cache entries.
    """
    cached = _SOURCE_KEYS.get(source)
    if cached is None:
        keys = example_keys(source.train.x, source.train.y)
        digest = hashlib.blake2b(keys.tobytes(), digest_size=16)
        for part in source.natural_partitions or ():
            digest.update(b"|" + np.asarray(part, dtype=np.int64).tobytes())
        cached = ((source.name, len(source.train), digest.hexdigest()), keys)
        _SOURCE_KEYS[source] = cached
    return cached


def load_partition(
    source: Source, partitioner: str, options: PartitionOptions, partition_id: int
) -> tuple[TensorData, TensorData]:
    """Return one client's training data and a local held-out split for federated evaluation.

    The source's training data are partitioned with ``partitioner`` and ``options`` (see
    :func:`partition`); partition ``partition_id`` is then split, with a seed derived from
    ``options.seed`` and ``partition_id``, into a local test split of ``round(0.1 * size)`` examples
    (at least one when the partition has two or more; none for a partition of one) and the rest for
    training. Results are memoized in-process, keyed by the source's content fingerprint, the
    partitioner and the options, so repeated calls (even with a reloaded but identical source) do not
    recompute. The returned tensors are shared between calls: do not modify them in place.

    Raises:
        ValueError: If ``partition_id`` is not in ``[0, num_partitions)``, or as :func:`partition`.
    """
    if not 0 <= partition_id < options.num_partitions:
        raise ValueError(f"partition_id must be in [0, {options.num_partitions}), got {partition_id}")
    fingerprint, keys = _source_keys(source)
    cache_key = (fingerprint, partitioner, options, partition_id)
    cached = _LOADED.get(cache_key)
    if cached is not None:
        return cached
    partitions_key = (fingerprint, partitioner, options)
    parts = _PARTITIONS.get(partitions_key)
    if parts is None:
        labels = source.train.y.numpy()
        parts = partition(partitioner, labels, keys, options, natural=source.natural_partitions)
        _PARTITIONS[partitions_key] = parts
        logger.info(
            "partitioned %s (%d examples) with %s into %d partitions",
            source.name,
            len(source.train),
            partitioner,
            options.num_partitions,
        )
    idx = parts[partition_id]
    # Local split in key order, so it does not depend on example order either.
    idx = idx[np.argsort(keys[idx], kind="stable")]
    num_test = max(1, round(_LOCAL_TEST_FRACTION * idx.size)) if idx.size >= 2 else 0
    shuffled = idx[np.random.default_rng([options.seed, 4, partition_id]).permutation(idx.size)]
    train_idx = np.sort(shuffled[num_test:])
    test_idx = np.sort(shuffled[:num_test])
    result = (_subset(source.train, train_idx), _subset(source.train, test_idx))
    _LOADED[cache_key] = result
    return result


def _subset(data: TensorData, idx: np.ndarray) -> TensorData:
    """Return the examples ``idx`` of ``data``."""
    index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    return TensorData(x=data.x[index], y=data.y[index])
