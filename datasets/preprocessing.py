"""Federated preprocessing, the data side: feature statistics that merge across nodes, and the transform.

Each node standardizing with its own statistics makes the same raw value a different input on each
node. Instead, every node computes statistics of its *raw* features (a source loaded with
``SourceOptions(normalization="none")``), the server merges them into the statistics of the pooled
data, turns them into one :class:`~datasets.core.FeatureTransform`, and every node and the server
apply that transform (``SourceOptions(normalization="fixed", transform=...)``, or
:func:`transform_source` on the raw source). Nothing here knows about Flower; the functions are the
pieces a statistics round is built from:

node::

    raw = load_source(name, replace(options, normalization="none"))
    train, val = load_partition(raw, partitioner, partition_options, partition_id)  # or raw.train, raw.test
    reply = feature_stats(train.x).to_array()             # plain aggregation: min, max, mean, variance
    reply = sum_stats(train.x, reference).to_array()      # SecAgg+: sums only
    ...                                                   # later, with the agreed transform:
    train, val = transform_data(train, transform), transform_data(val, transform)

server::

    stats = merge_stats(FeatureStats.from_array(a) for a in replies)
    stats = SumStats.from_array(summed_replies, reference)       # under SecAgg+
    transform = transform_from_stats(stats, "standardize")       # or "min-max" (FeatureStats only)
    kind, offset, scale = transform.to_strings()                 # Flower config values are scalars

Partitions are drawn from example keys that hash the features (:func:`datasets.partitioners.example_keys`),
so a source loaded with ``local``, ``none`` or ``fixed`` normalization is split differently among the same
clients. A node that computed its statistics on a raw partition keeps that partition and applies the
agreed transform to it with :func:`transform_data`; only the server's held-out split (never partitioned)
may be reloaded with ``normalization="fixed"``.

Statistics are per index of axis 1 of the features: per column of tabular ``N x F`` data, per
channel of ``N x C x H x W`` images (every pixel of the channel is one observation).

Two wire forms, one flat ``float64`` array each:

:class:`FeatureStats` ``[count, mean (F), M2 (F), min (F), max (F)]``
    Count, mean and sum of squared deviations ``M2`` (numerically stable: no cancellation), merged
    exactly with Chan, Golub and LeVeque's parallel update (1979; "Updating formulae and a pairwise
    algorithm for computing sample variances"), plus min and max. The server sees each node's
    statistics, so this form is for plain aggregation only: mean, M2, min and max are not sums, and
    a sum of two such arrays means nothing. It is what min-max scaling needs.
:class:`SumStats` ``[count, sum z (F), sum z^2 (F)]`` with ``z = reference.apply(x)``
    Pure sums: the elementwise sum of the nodes' arrays is the array of the pooled data, which is all
    that secure aggregation (SecAgg+) reveals to the server. Any positive multiple works too (only
    ``count`` scales; mean and variance are ratios), so SecAgg+'s weighting of each reply by
    ``n / max-weight`` is harmless. The variance is ``E[z^2] - E[z]^2``, which cancels when the mean
    is large against the spread: with the sums known to a relative precision ``p`` its relative error
    is about ``p (1 + (mean / std)^2)``, negligible in float64 (``p`` = 1e-16) but not under SecAgg+,
    which clips every value to ``[-clipping-range, clipping-range]`` and rounds it to a step of
    ``2 range / levels`` (16 / 2^22 = 4e-6 with the project's defaults). The public ``reference``
    transform (agreed before the round: a rough centre and scale of each feature, from the run config
    or domain knowledge) keeps ``z`` near zero and of order one, so the sums neither clip nor cancel;
    send per-example means (``to_array() / count``) so that SecAgg+'s weighting keeps them in range.
    Min and max are not sums: SecAgg+ can give standardization, never min-max scaling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from .core import MIN_MAX, STANDARDIZE, TRANSFORM_KINDS, FeatureTransform, Source, TensorData

__all__ = [
    "FeatureStats",
    "SumStats",
    "feature_stats",
    "merge_stats",
    "sum_stats",
    "transform_data",
    "transform_from_stats",
    "transform_source",
]

# Rows per chunk when computing statistics: bounds the float64 working copy (about 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


def _observations(x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, int]:
    """``x`` as a tensor with features (or channels) on axis 1, and their number.

    Raises:
        ValueError: If ``x`` has fewer than two dimensions or is not floating point.
    """
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if tensor.dim() < 2:
        raise ValueError(f"feature statistics need N x F (or N x C x ...) features, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"feature statistics need float features, got {tensor.dtype} (token ids are not features)")
    return tensor.detach().cpu(), int(tensor.shape[1])


def _chunks(x: torch.Tensor) -> Iterable[np.ndarray]:
    """``x`` in blocks of rows, each as a float64 ``F x observations`` array."""
    per_row = max(1, math.prod(x.shape[1:]))
    rows = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, int(x.shape[0]), rows):
        block = x[start : start + rows].to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        yield block.numpy()


def _check_finite_block(block: np.ndarray) -> None:
    """Refuse a ``F x observations`` block holding NaN or inf, naming the features."""
    finite = np.isfinite(block).all(axis=1)
    if not bool(finite.all()):
        bad = np.flatnonzero(~finite).tolist()
        raise ValueError(f"feature statistics: features (axis-1 indices) {bad[:10]} hold non-finite values (NaN or inf)")


def _check_finite_array(what: str, values: np.ndarray) -> None:
    if not bool(np.all(np.isfinite(values))):
        bad = np.flatnonzero(~np.isfinite(values)).tolist()
        raise ValueError(f"{what}: positions {bad[:10]} hold non-finite values (NaN or inf)")


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Count, mean, ``M2`` (sum of squared deviations from the mean), min and max of each feature.

    Build with :func:`feature_stats`, merge with :func:`merge_stats` (or :meth:`merge`). An empty set
    of observations has count 0, mean and M2 0, min ``+inf`` and max ``-inf`` (the identity of merge).

    Attributes:
        count: Number of observations per feature (rows, or rows x pixels for images).
        mean: ``float64`` array, one value per feature.
        m2: ``float64`` array: ``sum((x - mean)^2)`` per feature.
        minimum: ``float64`` array.
        maximum: ``float64`` array.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray

    def __post_init__(self) -> None:
        arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (self.mean, self.m2, self.minimum, self.maximum)]
        if len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
            raise ValueError(f"feature statistics need one mean, M2, min and max per feature, got sizes {[a.size for a in arrays]}")
        if self.count < 0 or int(self.count) != self.count:
            raise ValueError(f"feature statistics count must be an integer >= 0, got {self.count}")
        for name, array in zip(("mean", "m2", "minimum", "maximum"), arrays, strict=True):
            object.__setattr__(self, name, array)
        object.__setattr__(self, "count", int(self.count))

    @property
    def num_features(self) -> int:
        return int(self.mean.size)

    @classmethod
    def empty(cls, num_features: int) -> FeatureStats:
        """The statistics of no observation (the identity of :meth:`merge`)."""
        zeros = np.zeros(num_features)
        return cls(0, zeros, zeros, np.full(num_features, np.inf), np.full(num_features, -np.inf))

    def variance(self) -> np.ndarray:
        """Population variance ``M2 / count`` (as the sources' local standardization uses); 0 when empty."""
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    def std(self) -> np.ndarray:
        """Population standard deviation."""
        return np.sqrt(self.variance())

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets of observations together (Chan et al.'s parallel update).

        ``delta = mean_b - mean_a``, ``n = n_a + n_b``; ``mean = mean_a + delta n_b / n``,
        ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``; min of the mins, max of the maxes. Exact in real
        arithmetic; in floating point as accurate as a two-pass computation over the pooled data.

        Raises:
            ValueError: If the two have different numbers of features.
        """
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge statistics of {self.num_features} and {other.num_features} features")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return FeatureStats(n, mean, m2, np.minimum(self.minimum, other.minimum), np.maximum(self.maximum, other.maximum))

    def to_array(self) -> np.ndarray:
        """``[count, mean, M2, min, max]`` as one flat ``float64`` array (finite: an empty set sends 0 for min/max)."""
        low = self.minimum if self.count else np.zeros_like(self.minimum)
        high = self.maximum if self.count else np.zeros_like(self.maximum)
        return np.concatenate([[float(self.count)], self.mean, self.m2, low, high])

    @classmethod
    def from_array(cls, array: np.ndarray) -> FeatureStats:
        """The statistics of :meth:`to_array`'s array, checked.

        Raises:
            ValueError: If the array is not ``1 + 4 F`` finite values, the count is not a whole number
                >= 0, an M2 is negative, or a min is above its max.
        """
        values = np.asarray(array, dtype=np.float64).reshape(-1)
        if values.size < 5 or (values.size - 1) % 4:
            raise ValueError(f"feature statistics arrays hold 1 + 4 x features values, got {values.size}")
        _check_finite_array("feature statistics array", values)
        f = (values.size - 1) // 4
        count, mean, m2, low, high = values[0], values[1 : 1 + f], values[1 + f : 1 + 2 * f], values[1 + 2 * f : 1 + 3 * f], values[1 + 3 * f :]
        if count < 0 or count != int(count):
            raise ValueError(f"feature statistics count must be a whole number >= 0, got {count}")
        if count == 0:
            return cls.empty(f)
        if bool(np.any(m2 < 0)) or bool(np.any(low > high)):
            raise ValueError("feature statistics array is inconsistent: a negative M2, or a min above its max")
        return cls(int(count), mean, m2, low, high)


def feature_stats(x: torch.Tensor | np.ndarray) -> FeatureStats:
    """The :class:`FeatureStats` of raw features ``x`` (``N x F``, or ``N x C x ...`` per channel).

    Computed in float64 in blocks of rows (memory stays bounded for large image sets), each block in
    two passes and merged with :meth:`FeatureStats.merge`.

    Raises:
        ValueError: If ``x`` is not float, has fewer than two dimensions, or holds NaN or inf.
    """
    tensor, num_features = _observations(x)
    stats = FeatureStats.empty(num_features)
    for block in _chunks(tensor):
        if block.shape[1] == 0:
            continue
        _check_finite_block(block)
        mean = block.mean(axis=1)
        m2 = ((block - mean[:, None]) ** 2).sum(axis=1)
        stats = stats.merge(FeatureStats(block.shape[1], mean, m2, block.min(axis=1), block.max(axis=1)))
    return stats


def merge_stats(stats: Iterable[FeatureStats]) -> FeatureStats:
    """The merged statistics of several nodes (see :meth:`FeatureStats.merge`).

    Raises:
        ValueError: If there is nothing to merge, or the numbers of features differ.
    """
    items = list(stats)
    if not items:
        raise ValueError("no feature statistics to merge")
    # Pairwise, as Chan et al. recommend: rounding grows with log(nodes), not with the number of nodes.
    while len(items) > 1:
        items = [items[i].merge(items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


@dataclass(frozen=True, eq=False)
class SumStats:
    """Count, ``sum z`` and ``sum z^2`` per feature, with ``z = reference.apply(x)``: sums only (SecAgg+).

    Build with :func:`sum_stats`; the sum of two is ``a + b`` (elementwise, as secure aggregation
    computes it). ``reference`` is public, agreed before the round, and never sent.

    Attributes:
        count: Number of observations (any positive multiple of it; see the module docstring).
        total: ``float64`` array, ``sum z`` per feature.
        total_sq: ``float64`` array, ``sum z^2`` per feature.
        reference: The public transform ``z`` is taken relative to; ``None`` means ``z = x``.
    """

    count: float
    total: np.ndarray
    total_sq: np.ndarray
    reference: FeatureTransform | None = None

    def __post_init__(self) -> None:
        total = np.asarray(self.total, dtype=np.float64).reshape(-1)
        total_sq = np.asarray(self.total_sq, dtype=np.float64).reshape(-1)
        if total.size == 0 or total.size != total_sq.size:
            raise ValueError(f"sum statistics need one sum and one sum of squares per feature, got {total.size} and {total_sq.size}")
        if self.reference is not None and self.reference.num_features != total.size:
            raise ValueError(f"the reference transform is for {self.reference.num_features} features, the sums for {total.size}")
        if not self.count >= 0:
            raise ValueError(f"sum statistics count must be >= 0, got {self.count}")
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "total_sq", total_sq)
        object.__setattr__(self, "count", float(self.count))

    @property
    def num_features(self) -> int:
        return int(self.total.size)

    def __add__(self, other: SumStats) -> SumStats:
        if other.reference != self.reference or other.num_features != self.num_features:
            raise ValueError("sum statistics add up only with the same reference transform and number of features")
        return SumStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq, self.reference)

    @property
    def mean(self) -> np.ndarray:
        """Mean of the raw features ``x`` (``reference`` undone), as :attr:`FeatureStats.mean`.

        Raises:
            ValueError: If the count is zero.
        """
        if self.count <= 0:
            raise ValueError("sum statistics of no observation have no mean")
        mean_z = self.total / self.count
        if self.reference is None:
            return mean_z
        return np.asarray(self.reference.offset) + np.asarray(self.reference.scale) * mean_z

    def variance(self) -> np.ndarray:
        """Population variance of the raw features, ``scale^2 (E[z^2] - E[z]^2)``, clipped at 0 (rounding)."""
        if self.count <= 0:
            raise ValueError("sum statistics of no observation have no variance")
        mean_z = self.total / self.count
        var_z = np.maximum(self.total_sq / self.count - mean_z**2, 0.0)
        if self.reference is None:
            return var_z
        return np.asarray(self.reference.scale) ** 2 * var_z

    def std(self) -> np.ndarray:
        return np.sqrt(self.variance())

    def to_array(self) -> np.ndarray:
        """``[count, sum z, sum z^2]`` as one flat ``float64`` array; arrays of nodes add up elementwise."""
        return np.concatenate([[self.count], self.total, self.total_sq])

    @classmethod
    def from_array(cls, array: np.ndarray, reference: FeatureTransform | None = None) -> SumStats:
        """The statistics of :meth:`to_array`'s array (or of the sum of several, or a positive multiple).

        Raises:
            ValueError: If the array is not ``1 + 2 F`` finite values, or the count is negative.
        """
        values = np.asarray(array, dtype=np.float64).reshape(-1)
        if values.size < 3 or (values.size - 1) % 2:
            raise ValueError(f"sum statistics arrays hold 1 + 2 x features values, got {values.size}")
        _check_finite_array("sum statistics array", values)
        f = (values.size - 1) // 2
        return cls(float(values[0]), values[1 : 1 + f], values[1 + f :], reference)


def sum_stats(x: torch.Tensor | np.ndarray, reference: FeatureTransform | None = None) -> SumStats:
    """The :class:`SumStats` of raw features ``x``, relative to the public ``reference`` transform.

    Raises:
        ValueError: If ``x`` is not float, has fewer than two dimensions, holds NaN or inf, or does not
            fit ``reference``.
    """
    tensor, num_features = _observations(x)
    if reference is not None and reference.num_features != num_features:
        raise ValueError(f"the reference transform is for {reference.num_features} features, the data have {num_features}")
    total = np.zeros(num_features)
    total_sq = np.zeros(num_features)
    count = 0
    for block in _chunks(tensor):
        _check_finite_block(block)
        if reference is not None:
            block = (block - np.asarray(reference.offset)[:, None]) / np.asarray(reference.scale)[:, None]
        total += block.sum(axis=1)
        total_sq += (block**2).sum(axis=1)
        count += block.shape[1]
    return SumStats(count, total, total_sq, reference)


def transform_from_stats(stats: FeatureStats | SumStats, kind: str) -> FeatureTransform:
    """The transform every node applies, from merged statistics.

    ``"standardize"``: offset = mean, scale = population std (a feature without spread is only
    centred). ``"min-max"``: offset = min, scale = max - min; it needs :class:`FeatureStats`.

    Raises:
        ValueError: For an unknown kind (listing the kinds); for min-max from :class:`SumStats` (min and
            max are not sums, so secure aggregation cannot give them); for statistics of no observation.
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind '{kind}'; choose one of: {', '.join(TRANSFORM_KINDS)}")
    if stats.count <= 0:
        raise ValueError("feature statistics of no observation cannot define a transform")
    if kind == STANDARDIZE:
        return FeatureTransform.standardize(stats.mean.tolist(), stats.std().tolist())
    assert kind == MIN_MAX
    if not isinstance(stats, FeatureStats):
        raise ValueError(  # noqa: TRY004 - a request the statistics cannot serve, as every other refusal here
            "min-max scaling needs each feature's min and max, which are not sums: statistics summed under secure "
            "aggregation (SumStats) give standardization only"
        )
    return FeatureTransform.min_max(stats.minimum.tolist(), stats.maximum.tolist())


def transform_data(data: TensorData, transform: FeatureTransform) -> TensorData:
    """``data`` with ``transform`` applied to its features (labels shared, not copied)."""
    return TensorData(x=transform.apply(data.x).contiguous(), y=data.y)


def transform_source(source: Source, transform: FeatureTransform) -> Source:
    """A raw source (loaded with ``normalization="none"``) with ``transform`` applied to train and test.

    Raises:
        ValueError: If the source is already normalized (its ``feature_transform`` is set): transforms
            are defined on raw features.
    """
    if source.feature_transform is not None:
        raise ValueError(
            f"source '{source.name}' is already normalized ({source.feature_transform.kind}); load it with "
            "normalization='none' to apply a transform to its raw features"
        )
    return replace(
        source,
        train=transform_data(source.train, transform),
        test=transform_data(source.test, transform),
        feature_transform=transform,
    )
