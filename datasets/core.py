"""Types and helpers that every source shares: the data containers, the options, the train/test split.

A *source* (:mod:`datasets.sources`, :mod:`datasets.text`) turns a name and a :class:`SourceOptions` into a
:class:`Source`: a train split, a held-out test split for centralized evaluation, and the metadata a model
needs (task, number of classes, input shape). The registry of sources is :mod:`datasets.registry`.

Conventions for every source: features are ``float32`` (token ids ``int64``); images are ``N x C x H x W``,
scaled to ``[0, 1]`` and then normalized per channel; classification labels are ``int64`` class indices in
``[0, num_classes)``; regression targets are ``float32``.

Normalization (:attr:`SourceOptions.normalization`): ``"local"`` (the default) normalizes as each source
always has (published constants for the image data sets, the statistics of the node's own train split
for ``csv``, ``image-folder``, ``breast-cancer`` and ``diabetes``); ``"none"`` returns the *raw* features
(images scaled to ``[0, 1]`` only), for statistics computed across nodes (:mod:`datasets.preprocessing`);
``"fixed"`` applies a given :class:`FeatureTransform`, the same on every node and on the server, so that
the same raw value becomes the same input everywhere.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CAUSAL_LM",
    "CLASSIFICATION",
    "MIN_MAX",
    "NORMALIZATIONS",
    "REGRESSION",
    "STANDARDIZE",
    "TRANSFORM_KINDS",
    "DataFileError",
    "FeatureTransform",
    "Source",
    "SourceOptions",
    "TensorData",
    "default_data_root",
    "split_indices",
    "take",
]

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
REGRESSION = "regression"
CAUSAL_LM = "causal-lm"  # x: token ids, y: the same ids with -100 at padding (datasets.text)

STANDARDIZE = "standardize"
MIN_MAX = "min-max"
TRANSFORM_KINDS = (STANDARDIZE, MIN_MAX)
"""Kinds of :class:`FeatureTransform`: what its offset and scale were made from."""

NORMALIZATIONS = ("local", "none", "fixed")
"""Values of :attr:`SourceOptions.normalization` (see the module docstring)."""

# A spread at most this fraction of a feature's magnitude is float rounding of a constant feature (the
# float32 resolution is 6e-8): such a feature is only shifted, not blown up by dividing by the rounding.
_TINY_SPREAD = 1e-6


class DataFileError(ValueError):
    """A data file that cannot be used as it is; the message names the file, and the line or row where known.

    A :class:`ValueError`, so every caller that turns bad data into a clear failure (the ClientApp turns
    ``ValueError`` and ``OSError`` into the node's error that the server logs) catches it.

    Attributes:
        path: The file (or, for a problem of several files together, the data path or glob).
        problem: What is wrong, without the location.
        line: 1-based line of the file where the problem is, if known.
        row: 1-based record number where lines do not apply (an item of a JSON array), if known.
        column: The column (CSV) or key (JSON) concerned, if any; the problem text names it too.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        line: int | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.row = row
        self.column = column
        where = self.path + (f", line {line}" if line is not None else "") + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields: rebuild through a helper so the error pickles (Ray ships client errors).
        return (_rebuild_data_file_error, (self.path, self.problem, self.line, self.row, self.column))


def _rebuild_data_file_error(
    path: str, problem: str, line: int | None, row: int | None, column: str | None
) -> DataFileError:
    return DataFileError(path, problem, line=line, row=row, column=column)


@dataclass(frozen=True)
class FeatureTransform:
    """An affine map of the features, the same on every node: ``x -> (x - offset[c]) / scale[c]``.

    ``c`` indexes axis 1 of the data: the feature of tabular data (``N x F``), the channel of images
    (``N x C x H x W``, applied per channel). Every node and the server apply the same transform, so a
    raw value becomes the same input everywhere; :mod:`datasets.preprocessing` computes it from
    statistics merged across nodes, or it is fixed in advance (:meth:`from_strings`).

    The arithmetic is elementwise in the data's own dtype (``float32`` for every source), so the same
    raw value and the same transform give the same bits on every node, whatever else the node holds.

    Hashable (tuples of floats), so it can be part of :class:`SourceOptions` and key caches.

    Attributes:
        kind: ``"standardize"`` (offset = mean, scale = std) or ``"min-max"`` (offset = min, scale =
            max - min, mapping the range to ``[0, 1]``).
        offset: One finite value per feature or channel.
        scale: One finite positive value per feature or channel.
    """

    kind: str
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORM_KINDS:
            raise ValueError(f"unknown transform kind '{self.kind}'; choose one of: {', '.join(TRANSFORM_KINDS)}")
        offset = tuple(float(v) for v in self.offset)
        scale = tuple(float(v) for v in self.scale)
        if not offset or len(offset) != len(scale):
            raise ValueError(
                f"a feature transform needs one offset and one scale per feature, got {len(offset)} offsets "
                f"and {len(scale)} scales"
            )
        if not all(math.isfinite(v) for v in offset + scale):
            raise ValueError(f"feature transform values must be finite, got offset {offset}, scale {scale}")
        if any(v <= 0 for v in scale):
            raise ValueError(f"feature transform scales must be > 0, got {scale}")
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "scale", scale)

    @classmethod
    def standardize(cls, mean: Sequence[float], std: Sequence[float]) -> FeatureTransform:
        """``(x - mean) / std``; a feature with no spread (std zero, or at most 1e-6 of its mean: the
        rounding of a constant column) is only centred."""
        if not all(math.isfinite(float(v)) and float(v) >= 0 for v in std):
            raise ValueError(f"standardize: every std must be a finite number >= 0, got {tuple(std)}")
        scale = [float(s) if s > _TINY_SPREAD * abs(float(m)) and s > 0 else 1.0 for m, s in zip(mean, std, strict=True)]
        return cls(STANDARDIZE, tuple(float(m) for m in mean), tuple(scale))

    @classmethod
    def min_max(cls, low: Sequence[float], high: Sequence[float]) -> FeatureTransform:
        """``(x - low) / (high - low)``, mapping ``[low, high]`` to ``[0, 1]``; a constant feature is only shifted."""
        spans = []
        for lo, hi in zip(low, high, strict=True):
            if hi < lo:
                raise ValueError(f"min-max transform: a minimum ({lo}) is above its maximum ({hi})")
            span = float(hi) - float(lo)
            spans.append(span if span > _TINY_SPREAD * max(abs(float(lo)), abs(float(hi))) and span > 0 else 1.0)
        return cls(MIN_MAX, tuple(float(v) for v in low), tuple(spans))

    @property
    def num_features(self) -> int:
        """Number of features (tabular) or channels (images) the transform applies to."""
        return len(self.offset)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed copy of ``x`` (``N x F`` or ``N x C x ...``), in ``x``'s dtype.

        Raises:
            ValueError: If ``x`` is not floating point, or axis 1 does not have :attr:`num_features` entries.
        """
        if not x.is_floating_point():
            raise ValueError(f"a feature transform applies to float features, got {x.dtype} (token ids are not features)")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"the {self.kind} transform is for {self.num_features} features or channels (axis 1), "
                f"got data of shape {tuple(x.shape)}"
            )
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        offset = torch.tensor(self.offset, dtype=x.dtype, device=x.device).view(shape)
        scale = torch.tensor(self.scale, dtype=x.dtype, device=x.device).view(shape)
        return (x - offset) / scale

    def to_strings(self) -> tuple[str, str, str]:
        """``(kind, offset, scale)`` as text, offsets and scales comma-separated: run-config and Flower
        config values are scalars. :meth:`from_strings` reads them back exactly (``repr`` of a float
        round-trips)."""
        return self.kind, ",".join(repr(v) for v in self.offset), ",".join(repr(v) for v in self.scale)

    @classmethod
    def from_strings(cls, kind: str, offset: str, scale: str) -> FeatureTransform:
        """The transform of :meth:`to_strings`' text (or of hand-written run-config values).

        Raises:
            ValueError: Naming the value that is not a number, or as the constructor.
        """

        def numbers(text: str, what: str) -> tuple[float, ...]:
            values = []
            for item in text.split(","):
                try:
                    values.append(float(item))
                except ValueError:
                    raise ValueError(
                        f"feature transform {what}: {item.strip()!r} is not a number (give comma-separated numbers, got {text!r})"
                    ) from None
            return tuple(values)

        return cls(kind.strip(), numbers(offset, "offset"), numbers(scale, "scale"))


@dataclass(frozen=True, eq=False)
class TensorData:
    """An in-memory labelled data set.

    Equality and hashing are by identity (``eq=False``): comparing tensors element-wise is neither
    cheap nor a boolean, and identity hashing lets instances key caches.

    Attributes:
        x: ``float32`` features, ``N x ...`` (images ``N x C x H x W``, tabular ``N x F``).
        y: ``int64`` class labels of shape ``(N,)`` for classification; ``float32`` targets of shape
            ``(N,)`` or ``(N, k)`` for regression.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x and y must have the same number of examples, got {self.x.shape[0]} and {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        """Return the number of examples."""
        return int(self.x.shape[0])


@dataclass(frozen=True, eq=False)
class Source:
    """A whole data set: train and test splits plus the metadata a model needs.

    Equality and hashing are by identity (see :class:`TensorData`).

    Attributes:
        name: The registry name the source was loaded under, e.g. ``"digits"``.
        task: ``"classification"`` or ``"regression"``.
        num_classes: Number of classes for classification; ``None`` for regression.
        input_shape: Shape of one example of ``x``, e.g. ``(1, 8, 8)`` or ``(64,)``.
        train: Training data, to be partitioned among clients.
        test: Held-out data for centralized evaluation.
        natural_partitions: For sources that come pre-split among devices (``synthetic``), one
            ``int64`` index array into ``train`` per device; ``None`` otherwise.
        target_dim: Output size for regression (``y`` is ``(N, target_dim)``); ``None`` for
            classification.
        class_names: Classification: the label of each class index, as text (``class_names[i]`` is
            what the data called class ``i``: a CSV label, a folder name, ``"airplane"``); when not
            given, ``"0"``, ``"1"``, ... ``None`` for the other tasks. Two data owners agree on what
            an index means exactly when their ``class_names`` are equal (:mod:`datasets.labels`).
        feature_names: Tabular sources: the name of each feature (a CSV column, ``"mean radius"``),
            one per entry of ``input_shape``; ``None`` where features have no names.
        feature_transform: The transform applied to the raw features (:attr:`SourceOptions.normalization`);
            ``None`` when the features are raw (or the source does not normalize, as ``linear``).
    """

    name: str
    task: str
    num_classes: int | None
    input_shape: tuple[int, ...]
    train: TensorData
    test: TensorData
    natural_partitions: tuple[np.ndarray, ...] | None = None
    target_dim: int | None = None
    class_names: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    feature_transform: FeatureTransform | None = None

    def __post_init__(self) -> None:
        if self.feature_names is not None:
            names = tuple(str(n) for n in self.feature_names)
            if len(self.input_shape) != 1 or len(names) != self.input_shape[0]:
                raise ValueError(
                    f"feature_names must name each of the features of a tabular input shape, got {len(names)} names "
                    f"for input shape {self.input_shape}"
                )
            object.__setattr__(self, "feature_names", names)
        if self.task not in (CLASSIFICATION, REGRESSION, CAUSAL_LM):
            raise ValueError(f"task must be '{CLASSIFICATION}', '{REGRESSION}' or '{CAUSAL_LM}', got '{self.task}'")
        if self.task == CLASSIFICATION:
            if self.num_classes is None or self.num_classes < 1:
                raise ValueError("a classification source needs num_classes >= 1")
            if self.class_names is None:
                object.__setattr__(self, "class_names", tuple(str(i) for i in range(self.num_classes)))
            else:
                names = tuple(str(n) for n in self.class_names)
                if len(names) != self.num_classes or len(set(names)) != len(names):
                    raise ValueError(
                        f"class_names must be {self.num_classes} distinct names (one per class), got {list(names)}"
                    )
                object.__setattr__(self, "class_names", names)
        else:
            if self.num_classes is not None:
                raise ValueError(f"a {self.task} source must have num_classes=None")
            if self.class_names is not None:
                raise ValueError(f"a {self.task} source has no class names")


@dataclass(frozen=True)
class SourceOptions:
    """Options shared by all sources; each source reads the fields it needs and ignores the rest.

    Attributes:
        root: Data directory for the torchvision data sets; ``""`` means :func:`default_data_root`.
        download: torchvision data sets: download when the files are missing. When false and the
            files are missing, loading raises :class:`FileNotFoundError`.
        path: The CSV file (``csv``) or image directory (``image-folder``).
        label_column: Name of the CSV column holding the class label.
        test_fraction: Fraction of examples held out as the test split for sources without an
            official test split (``digits``, ``csv``, ``image-folder``, ``linear``, ``synthetic``).
            The split is seeded and stratified by class where every class has two examples or more.
        seed: Seed of every random draw a source makes (splits, synthetic data).
        num_samples: Total number of examples of the synthetic sources (train + test).
        num_features: Number of features of ``linear``; dimension of ``synthetic`` (60 in FedProx).
        noise_std: Standard deviation of the Gaussian noise added to ``linear`` targets.
        synthetic_alpha: ``alpha`` of Synthetic(alpha, beta): how much local models differ.
        synthetic_beta: ``beta`` of Synthetic(alpha, beta): how much local feature means differ.
        num_partitions: Number of devices generated by ``synthetic`` (one natural partition each).
        image_size: ``image-folder`` images are resized to ``image_size x image_size``.
        class_names: ``csv``, ``image-folder``, ``text``: comma-separated class names (two or more);
            label ``name`` (a CSV or text label, or a folder name) gets the index of ``name`` in this
            list, and ``num_classes`` is its length; a label outside the list is refused, naming it.
            Set it when data owners hold separate files: without it each file's own sorted distinct
            labels define the classes, a file missing a class would disagree with the others about
            what each index means, and a file with a single class is refused.
        text_column: ``text``, ``text-lm``: column (csv, tsv, jsonl) holding the text.
        tokenizer: ``text``, ``text-lm``: the model directory or hub id whose tokenizer encodes the text.
        max_length: ``text``, ``text-lm``, ``instructions``: tokens per example (longer texts are cut,
            shorter ones padded).
        prompt_column, response_column: ``instructions``: the columns of the instruction and its answer.
        normalization: How features are normalized (:data:`NORMALIZATIONS`): ``"local"`` as each source
            always has, from the node's own data or published constants (the default); ``"none"``: raw
            features (images scaled to ``[0, 1]``), to compute statistics across nodes from; ``"fixed"``:
            ``transform``, the same on every node. The text sources accept ``local`` and ``none`` (token
            ids are not normalized).
        transform: The :class:`FeatureTransform` of ``normalization="fixed"``; ``None`` otherwise.
    """

    root: str = ""
    download: bool = False
    path: str = ""
    label_column: str = "label"
    test_fraction: float = 0.2
    seed: int = 0
    num_samples: int = 2000
    num_features: int = 10
    noise_std: float = 0.1
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    num_partitions: int = 10
    image_size: int = 32
    class_names: str = ""
    text_column: str = "text"
    tokenizer: str = ""
    max_length: int = 128
    prompt_column: str = "prompt"
    response_column: str = "response"
    normalization: str = "local"
    transform: FeatureTransform | None = None

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization '{self.normalization}'; choose one of: {', '.join(NORMALIZATIONS)}"
            )
        if (self.normalization == "fixed") != (self.transform is not None):
            raise ValueError(
                "normalization 'fixed' needs a transform, and a transform needs normalization 'fixed' "
                f"(got normalization '{self.normalization}' and transform {self.transform})"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.synthetic_alpha < 0:
            raise ValueError(f"synthetic_alpha must be >= 0, got {self.synthetic_alpha}")
        if self.synthetic_beta < 0:
            raise ValueError(f"synthetic_beta must be >= 0, got {self.synthetic_beta}")
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")


def default_data_root() -> str:
    """Return the directory used when ``SourceOptions.root`` is empty: ``~/.cache/flower_app/data``."""
    return str(Path.home() / ".cache" / "flower_app" / "data")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _allocate(quota: np.ndarray, total: int, upper: np.ndarray) -> np.ndarray:
    """Round real ``quota`` to integers in ``[1, upper]`` that sum to ``total`` (largest remainder).

    The caller guarantees ``len(quota) <= total <= upper.sum()``.
    """
    alloc: np.ndarray = np.clip(np.floor(quota).astype(np.int64), 1, upper)
    while alloc.sum() < total:
        gap = np.where(alloc < upper, quota - alloc, -np.inf)
        alloc[int(np.argmax(gap))] += 1
    while alloc.sum() > total:
        gap = np.where(alloc > 1, quota - alloc, np.inf)
        alloc[int(np.argmin(gap))] -= 1
    return alloc


def split_indices(
    num_examples: int, labels: np.ndarray | None, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(num_examples)`` into sorted train and test index arrays.

    The test split has ``round(test_fraction * num_examples)`` examples, clipped so that both splits
    are non-empty when ``num_examples >= 2``. When ``labels`` are given and every class has at least
    two examples, the split is stratified: each class contributes its share (largest-remainder
    rounding), with at least one example of each class on each side when the test split is large
    enough to hold every class.
    """
    if num_examples < 2:
        raise ValueError(f"need at least 2 examples to make a train/test split, got {num_examples}")
    rng = np.random.default_rng(seed)
    num_test = min(max(round(test_fraction * num_examples), 1), num_examples - 1)
    if labels is not None:
        classes, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and len(classes) <= num_test <= num_examples - len(classes):
            per_class = _allocate(counts * (num_test / num_examples), num_test, counts - 1)
            test_parts = []
            for c, k in zip(classes, per_class, strict=True):
                members = np.flatnonzero(labels == c)
                test_parts.append(rng.permutation(members)[:k])
            test = np.sort(np.concatenate(test_parts))
            train = np.setdiff1d(np.arange(num_examples), test)
            return train.astype(np.int64), test.astype(np.int64)
        logger.debug("test split not stratified: a class has fewer than 2 examples or too few test slots")
    perm = rng.permutation(num_examples)
    return np.sort(perm[num_test:]).astype(np.int64), np.sort(perm[:num_test]).astype(np.int64)


def take(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> TensorData:
    """Return the examples ``idx`` of ``(x, y)`` as a new :class:`TensorData`."""
    index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    return TensorData(x=x[index].contiguous(), y=y[index].contiguous())
