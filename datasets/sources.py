"""Data sources: whole data sets loaded into memory as tensors.

A *source* turns a name and a :class:`SourceOptions` into a :class:`Source`: a train split, a held-out
test split for centralized evaluation, and the metadata a model needs (task, number of classes, input
shape). Sources do no partitioning; :mod:`datasets.partitioners` splits ``Source.train`` among clients.

Registered sources (see :data:`SOURCES`):

``digits``
    scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes). Needs no download;
    the project's default.
``mnist``, ``fashion-mnist``, ``cifar10``
    Read through :mod:`torchvision.datasets` from ``root``; downloaded only when ``download`` is true.
``csv``
    A tabular classification data set from a CSV file.
``image-folder``
    A :class:`torchvision.datasets.ImageFolder` directory (one sub-folder per class).
``linear``
    Synthetic linear regression, ``y = X w* + b* + noise``.
``synthetic``
    Synthetic(alpha, beta) of FedProx (Li et al., 2020), with one natural partition per device.
``text``, ``text-lm``
    Labelled texts (sequence classification) and running text (causal language modelling) from
    txt/csv/tsv/jsonl files, tokenized with ``tokenizer``; one natural partition group per file
    (:mod:`datasets.text`).
``instructions``
    Prompt/response pairs (jsonl, csv) for instruction tuning, formatted with the tokenizer's chat
    template, labels on the response only (:mod:`datasets.instructions`).

Conventions for every source: features are ``float32``; images are ``N x C x H x W``, scaled to
``[0, 1]`` and then normalized per channel; classification labels are ``int64`` class indices in
``[0, num_classes)``; regression targets are ``float32``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "SOURCES",
    "Source",
    "SourceOptions",
    "TensorData",
    "default_data_root",
    "linear_true_parameters",
    "load_source",
]

logger = logging.getLogger(__name__)

CLASSIFICATION = "classification"
REGRESSION = "regression"
CAUSAL_LM = "causal-lm"  # x: token ids, y: the same ids with -100 at padding (datasets.text)

# Per-channel (mean, std) of the [0, 1]-scaled training images, the usual published constants.
# ``digits`` is computed over all 1,797 images of scikit-learn's copy (values / 16).
_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

# Number of classes of the FedProx Synthetic(alpha, beta) data set.
_SYNTHETIC_CLASSES = 10


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
    """

    name: str
    task: str
    num_classes: int | None
    input_shape: tuple[int, ...]
    train: TensorData
    test: TensorData
    natural_partitions: tuple[np.ndarray, ...] | None = None
    target_dim: int | None = None

    def __post_init__(self) -> None:
        if self.task not in (CLASSIFICATION, REGRESSION, CAUSAL_LM):
            raise ValueError(f"task must be '{CLASSIFICATION}', '{REGRESSION}' or '{CAUSAL_LM}', got '{self.task}'")
        if self.task == CLASSIFICATION and (self.num_classes is None or self.num_classes < 1):
            raise ValueError("a classification source needs num_classes >= 1")
        if self.task in (REGRESSION, CAUSAL_LM) and self.num_classes is not None:
            raise ValueError(f"a {self.task} source must have num_classes=None")


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
        class_names: ``csv``, ``image-folder``: comma-separated class names; label ``name`` (a CSV
            value, or a folder name) gets the index of ``name`` in this list, and ``num_classes`` is
            its length. Set it when data owners hold separate files: without it each file's own
            sorted distinct labels define the classes, and a file missing a class would disagree
            with the others about what each index means.
        text_column: ``text``, ``text-lm``: column (csv, tsv, jsonl) holding the text.
        tokenizer: ``text``, ``text-lm``: the model directory or hub id whose tokenizer encodes the text.
        max_length: ``text``, ``text-lm``, ``instructions``: tokens per example (longer texts are cut, shorter ones padded).
        prompt_column, response_column: ``instructions``: the columns of the instruction and its answer.
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

    def __post_init__(self) -> None:
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


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalize ``N x C x H x W`` images per channel: ``(x - mean[c]) / std[c]``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


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


def _split_indices(
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


def _take(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> TensorData:
    """Return the examples ``idx`` of ``(x, y)`` as a new :class:`TensorData`."""
    index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    return TensorData(x=x[index].contiguous(), y=y[index].contiguous())


def _resolve_root(options: SourceOptions) -> str:
    return os.path.expanduser(options.root) if options.root else default_data_root()


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def load_digits_source(options: SourceOptions) -> Source:
    """Load scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); never downloads.

    Pixel values ``0..16`` are scaled to ``[0, 1]`` and normalized with the data set's mean and std.
    The test split is a seeded stratified ``options.test_fraction`` of the images.
    """
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x = torch.from_numpy((features / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    x = _normalize(x, *_NORMALIZATION["digits"])
    y = torch.from_numpy(labels.astype(np.int64))
    train_idx, test_idx = _split_indices(len(y), labels, options.test_fraction, options.seed)
    return Source(
        name="digits",
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=(1, 8, 8),
        train=_take(x, y, train_idx),
        test=_take(x, y, test_idx),
    )


def _torchvision_split(cls: Any, name: str, options: SourceOptions, train: bool) -> Any:
    """Instantiate a torchvision data set class, turning "not found" into a clear FileNotFoundError."""
    root = _resolve_root(options)
    try:
        return cls(root=root, train=train, download=options.download)
    except RuntimeError as err:
        if options.download:
            raise
        raise FileNotFoundError(
            f"{name} files not found (or corrupted) under data root '{root}'; "
            f"set download=true to fetch them, or point root at a directory that holds them"
        ) from err


def _mnist_like(name: str, options: SourceOptions) -> Source:
    """Load an MNIST-format data set (``mnist`` or ``fashion-mnist``) through torchvision."""
    import torchvision.datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    splits = []
    for train in (True, False):
        ds = _torchvision_split(cls, name, options, train)
        # ``.data`` is uint8 N x H x W; read it whole instead of iterating PIL images.
        x = ds.data.to(torch.float32).div_(255.0).unsqueeze(1)
        x = _normalize(x, *_NORMALIZATION[name])
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(TensorData(x=x.contiguous(), y=y))
    train_data, test_data = splits
    logger.info("loaded %s: %d train, %d test examples", name, len(train_data), len(test_data))
    return Source(
        name=name,
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=tuple(train_data.x.shape[1:]),
        train=train_data,
        test=test_data,
    )


def load_mnist_source(options: SourceOptions) -> Source:
    """Load MNIST (60,000 train / 10,000 test 28x28 digits) from ``options.root``.

    Raises:
        FileNotFoundError: If the files are missing and ``options.download`` is false.
    """
    return _mnist_like("mnist", options)


def load_fashion_mnist_source(options: SourceOptions) -> Source:
    """Load Fashion-MNIST (60,000 train / 10,000 test 28x28 clothing images) from ``options.root``.

    Raises:
        FileNotFoundError: If the files are missing and ``options.download`` is false.
    """
    return _mnist_like("fashion-mnist", options)


def load_cifar10_source(options: SourceOptions) -> Source:
    """Load CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images) from ``options.root``.

    Raises:
        FileNotFoundError: If the files are missing and ``options.download`` is false.
    """
    import torchvision.datasets as tvd

    splits = []
    for train in (True, False):
        ds = _torchvision_split(tvd.CIFAR10, "cifar10", options, train)
        # ``.data`` is a uint8 N x H x W x C array; convert to N x C x H x W in one go.
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = _normalize(x, *_NORMALIZATION["cifar10"])
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(TensorData(x=x.contiguous(), y=y))
    train_data, test_data = splits
    logger.info("loaded cifar10: %d train, %d test examples", len(train_data), len(test_data))
    return Source(
        name="cifar10",
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=tuple(train_data.x.shape[1:]),
        train=train_data,
        test=test_data,
    )


def _codes_from_names(values: np.ndarray, class_names: str, what: str) -> tuple[list[str], np.ndarray]:
    """Map label values to their index in the comma-separated ``class_names``."""
    names = [n.strip() for n in class_names.split(",")]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"class_names must be distinct, non-empty comma-separated names, got '{class_names}'")
    index = {n: i for i, n in enumerate(names)}
    as_text = np.asarray(values).astype(str)
    unknown = sorted(set(as_text.tolist()) - set(index))
    if unknown:
        raise ValueError(f"{what} holds labels not in class_names ({', '.join(names)}): {', '.join(unknown[:10])}")
    return names, np.array([index[v] for v in as_text.tolist()], dtype=np.int64)


def load_csv_source(options: SourceOptions) -> Source:
    """Load a tabular classification data set from the CSV file ``options.path``.

    The column ``options.label_column`` holds the class label (integers or strings); labels are
    mapped to the codes of their sorted distinct values, so ``num_classes`` is the number of distinct
    labels. Every other column is a numeric feature. Features are standardized with the mean and std
    of the train split (a constant column is only centred).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the label column is missing (the message lists the columns), a feature
            column is not numeric or has missing values, a label is missing, or there is no feature.
    """
    path = Path(os.path.expanduser(options.path)) if options.path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"CSV file not found: '{options.path}' (set path to an existing file)")
    frame = pd.read_csv(path)
    if options.label_column not in frame.columns:
        raise ValueError(
            f"label column '{options.label_column}' not in {path}; available columns: "
            + ", ".join(str(c) for c in frame.columns)
        )
    feature_columns = [c for c in frame.columns if c != options.label_column]
    if not feature_columns:
        raise ValueError(f"{path} has no feature column besides the label column '{options.label_column}'")
    for column in feature_columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise ValueError(f"feature column '{column}' of {path} is not numeric (dtype {frame[column].dtype})")
        if frame[column].isna().any():
            raise ValueError(f"feature column '{column}' of {path} has missing values")
    label_series = frame[options.label_column]
    if label_series.isna().any():
        raise ValueError(f"label column '{options.label_column}' of {path} has missing values")
    label_values = label_series.to_numpy()
    if not pd.api.types.is_numeric_dtype(label_series):
        label_values = label_values.astype(str)
    if options.class_names:
        classes, codes = _codes_from_names(label_values, options.class_names, f"label column '{options.label_column}' of {path}")
    else:
        classes, codes = np.unique(label_values, return_inverse=True)
    codes = codes.astype(np.int64).reshape(-1)
    logger.debug("csv %s: label classes %s -> codes 0..%d", path, list(classes), len(classes) - 1)

    features = frame[feature_columns].to_numpy(dtype=np.float64)
    train_idx, test_idx = _split_indices(len(codes), codes, options.test_fraction, options.seed)
    mean = features[train_idx].mean(axis=0)
    std = features[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    y = torch.from_numpy(codes)
    return Source(
        name="csv",
        task=CLASSIFICATION,
        num_classes=len(classes),
        input_shape=(len(feature_columns),),
        train=_take(x, y, train_idx),
        test=_take(x, y, test_idx),
    )


def load_image_folder_source(options: SourceOptions) -> Source:
    """Load an image classification data set from the directory ``options.path``.

    The layout is torchvision's :class:`~torchvision.datasets.ImageFolder`: one sub-folder per class
    (classes are the sorted folder names). Images are converted to RGB, resized to
    ``options.image_size`` squared, scaled to ``[0, 1]`` and normalized per channel with the mean and
    std of the train split.

    Raises:
        FileNotFoundError: If the directory does not exist or holds no class folder with images.
    """
    import torchvision.datasets as tvd
    import torchvision.transforms as tvt

    root = Path(os.path.expanduser(options.path)) if options.path else None
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"image folder not found: '{options.path}' (set path to a directory of class folders)")
    size = options.image_size
    transform = tvt.Compose([tvt.Resize((size, size)), tvt.ToTensor()])
    try:
        folder = tvd.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image folder '{root}' holds no class sub-folder with images ({err})") from err
    if len(folder) == 0:
        raise FileNotFoundError(f"image folder '{root}' holds no images")
    # Images must be decoded one by one here; there is no array to read whole.
    images = [folder[i][0] for i in range(len(folder))]
    x = torch.stack(images).to(torch.float32)
    labels = np.asarray(folder.targets, dtype=np.int64)
    num_classes = len(folder.classes)
    if options.class_names:
        folder_names = np.asarray(folder.classes, dtype=str)[labels]
        classes, labels = _codes_from_names(folder_names, options.class_names, f"class folders of {root}")
        labels = labels.astype(np.int64)
        num_classes = len(classes)
    train_idx, test_idx = _split_indices(len(labels), labels, options.test_fraction, options.seed)
    index = torch.from_numpy(train_idx)
    mean = x[index].mean(dim=(0, 2, 3))
    std = x[index].std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
    x = _normalize(x, tuple(mean.tolist()), tuple(std.tolist()))
    y = torch.from_numpy(labels)
    logger.info("loaded image folder %s: %d images, %d classes", root, len(labels), num_classes)
    return Source(
        name="image-folder",
        task=CLASSIFICATION,
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
        train=_take(x, y, train_idx),
        test=_take(x, y, test_idx),
    )


def linear_true_parameters(options: SourceOptions) -> tuple[np.ndarray, float]:
    """Return the true ``(w*, b*)`` that :func:`load_linear_source` uses for these options.

    ``w*`` has shape ``(num_features,)``; both are drawn from ``N(0, 1)`` with ``options.seed``.
    """
    rng = np.random.default_rng([options.seed, 1])
    weights = rng.standard_normal(options.num_features)
    bias = float(rng.standard_normal())
    return weights, bias


def load_linear_source(options: SourceOptions) -> Source:
    """Generate a seeded multivariate linear regression data set.

    ``x ~ N(0, I)`` with ``num_features`` features and ``y = x . w* + b* + eps`` with
    ``eps ~ N(0, noise_std^2)``; ``y`` has shape ``(N, 1)``. The true parameters are returned by
    :func:`linear_true_parameters`. ``num_samples`` examples are split randomly into train and test.
    """
    if options.num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a train/test split, got {options.num_samples}")
    weights, bias = linear_true_parameters(options)
    rng = np.random.default_rng([options.seed, 2])
    features = rng.standard_normal((options.num_samples, options.num_features))
    targets = features @ weights + bias + options.noise_std * rng.standard_normal(options.num_samples)
    x = torch.from_numpy(features.astype(np.float32))
    y = torch.from_numpy(targets.astype(np.float32)).view(-1, 1)
    train_idx, test_idx = _split_indices(options.num_samples, None, options.test_fraction, options.seed)
    return Source(
        name="linear",
        task=REGRESSION,
        num_classes=None,
        input_shape=(options.num_features,),
        train=_take(x, y, train_idx),
        test=_take(x, y, test_idx),
        target_dim=1,
    )


def _device_sample_counts(rng: np.random.Generator, num_samples: int, num_devices: int) -> np.ndarray:
    """Split ``num_samples`` among devices with power-law (lognormal) sizes, as FedProx does.

    FedProx draws ``lognormal(4, 2) + 50`` samples per device; here the lognormal draws are weights of
    the samples left after a floor of ``min(50, num_samples // (2 * num_devices))`` (at least 2, so
    every device has a train and a test example), allocated by largest remainder so the total is
    exactly ``num_samples``.
    """
    floor = max(2, min(50, num_samples // (2 * num_devices)))
    if floor * num_devices > num_samples:
        raise ValueError(
            f"num_samples={num_samples} is too small for {num_devices} synthetic devices "
            f"(need at least {2 * num_devices})"
        )
    weights = rng.lognormal(mean=4.0, sigma=2.0, size=num_devices)
    spare = num_samples - floor * num_devices
    quota = spare * weights / weights.sum()
    counts: np.ndarray = np.floor(quota).astype(np.int64)
    for k in np.argsort(-(quota - counts), kind="stable")[: spare - int(counts.sum())]:
        counts[k] += 1
    counts += floor
    return counts


def load_synthetic_source(options: SourceOptions) -> Source:
    """Generate Synthetic(alpha, beta) of FedProx, one device per partition.

    Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, section 5.1: for each
    device ``k``,

    * ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``;
    * ``W_k ~ N(u_k, 1)`` (``classes x dim``), ``b_k ~ N(u_k, 1)`` (``classes``);
    * ``v_k[j] ~ N(B_k, 1)``; ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^(-1.2)``;
    * ``y = argmax(softmax(W_k x + b_k))`` over 10 classes.

    As in the paper's reference generator, the second argument of ``N(., .)`` for ``u_k`` and ``B_k``
    is used as a standard deviation. ``alpha`` controls how much local models differ, ``beta`` how
    much local data differ. Device sizes follow a lognormal (power law); see
    :func:`_device_sample_counts`. Each device keeps ``test_fraction`` of its samples (at least one)
    for the shared test split; its remaining samples form its natural partition of ``train``.
    """
    num_devices = options.num_partitions
    dim = options.num_features
    rng = np.random.default_rng(options.seed)
    counts = _device_sample_counts(rng, options.num_samples, num_devices)
    model_means = rng.normal(0.0, options.synthetic_alpha, num_devices)  # u_k
    data_means = rng.normal(0.0, options.synthetic_beta, num_devices)  # B_k
    sigma_sqrt = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2 / 2.0)

    train_x: list[np.ndarray] = []
    train_y: list[np.ndarray] = []
    test_x: list[np.ndarray] = []
    test_y: list[np.ndarray] = []
    partitions: list[np.ndarray] = []
    offset = 0
    for k in range(num_devices):
        weights = rng.normal(model_means[k], 1.0, (_SYNTHETIC_CLASSES, dim))
        bias = rng.normal(model_means[k], 1.0, _SYNTHETIC_CLASSES)
        centre = rng.normal(data_means[k], 1.0, dim)  # v_k
        features = centre + sigma_sqrt * rng.standard_normal((int(counts[k]), dim))
        # softmax is monotone, so the argmax of the logits is the argmax of the softmax.
        labels = np.argmax(features @ weights.T + bias, axis=1)
        num_test = min(max(round(options.test_fraction * counts[k]), 1), int(counts[k]) - 1)
        num_train = int(counts[k]) - num_test
        train_x.append(features[:num_train])
        train_y.append(labels[:num_train])
        test_x.append(features[num_train:])
        test_y.append(labels[num_train:])
        partitions.append(np.arange(offset, offset + num_train, dtype=np.int64))
        offset += num_train

    def as_data(xs: list[np.ndarray], ys: list[np.ndarray]) -> TensorData:
        return TensorData(
            x=torch.from_numpy(np.concatenate(xs).astype(np.float32)),
            y=torch.from_numpy(np.concatenate(ys).astype(np.int64)),
        )

    logger.info(
        "generated synthetic(%g, %g): %d devices, sizes %s",
        options.synthetic_alpha,
        options.synthetic_beta,
        num_devices,
        counts.tolist(),
    )
    return Source(
        name="synthetic",
        task=CLASSIFICATION,
        num_classes=_SYNTHETIC_CLASSES,
        input_shape=(dim,),
        train=as_data(train_x, train_y),
        test=as_data(test_x, test_y),
        natural_partitions=tuple(partitions),
    )


SOURCES: dict[str, Callable[[SourceOptions], Source]] = {
    "cifar10": load_cifar10_source,
    "csv": load_csv_source,
    "digits": load_digits_source,
    "fashion-mnist": load_fashion_mnist_source,
    "image-folder": load_image_folder_source,
    "linear": load_linear_source,
    "mnist": load_mnist_source,
    "synthetic": load_synthetic_source,
    "text": lambda options: _text_module().load_text_source(options),
    "text-lm": lambda options: _text_module().load_text_lm_source(options),
    "instructions": lambda options: _instructions_module().load_instructions_source(options),
}
"""Registry of sources by name; :func:`load_source` is the entry point."""


def _text_module() -> Any:
    # datasets.text imports this module; importing it lazily avoids the cycle (and transformers).
    from . import text

    return text


def _instructions_module() -> Any:
    from . import instructions  # imports this module and transformers: loaded when used

    return instructions


def load_source(name: str, options: SourceOptions) -> Source:
    """Load the source registered as ``name`` with ``options``.

    Raises:
        ValueError: If ``name`` is not a key of :data:`SOURCES` (the message lists the valid names).
    """
    try:
        loader = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(SOURCES))}") from None
    source = loader(options)
    logger.debug("source %s: %d train / %d test examples", name, len(source.train), len(source.test))
    return source
