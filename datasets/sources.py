"""The built-in sources: embedded, downloaded, generated, and the user's CSV file or image folder.

Each ``load_*_source(options)`` returns a :class:`~datasets.core.Source`; :mod:`datasets.registry` names
them. Sources do no partitioning; :mod:`datasets.partitioners` splits ``Source.train`` among clients.

``digits``
    scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes). Needs no download;
    the project's default.
``mnist``, ``fashion-mnist``, ``cifar10``
    Read through :mod:`torchvision.datasets` from ``root``; downloaded only when ``download`` is true.
``breast-cancer``
    scikit-learn's embedded Wisconsin diagnostic breast cancer data (569 tumours x 30 features,
    malignant or benign). Needs no download.
``diabetes``
    scikit-learn's embedded diabetes data (442 patients x 10 baseline features, regression target:
    disease progression one year later). Needs no download.
``csv``
    A tabular classification data set from a CSV file.
``image-folder``
    A :class:`torchvision.datasets.ImageFolder` directory (one sub-folder per class).
``linear``
    Synthetic linear regression, ``y = X w* + b* + noise``.
``synthetic``
    Synthetic(alpha, beta) of FedProx (Li et al., 2020), with one natural partition per device.

The text sources (``text``, ``text-lm``) are in :mod:`datasets.text`; instruction tuning data
(``instructions``: prompt/response pairs, labels on the response only) in :mod:`datasets.instructions`.

Every source here honours :attr:`~datasets.core.SourceOptions.normalization`: ``local`` normalizes as
described per source, ``none`` returns raw features (images in ``[0, 1]``), ``fixed`` applies the given
:class:`~datasets.core.FeatureTransform` to the raw ``float32`` features (so loading with ``fixed`` equals
applying the transform to what ``none`` returns, bit for bit).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import (
    CLASSIFICATION,
    REGRESSION,
    STANDARDIZE,
    DataFileError,
    FeatureTransform,
    Source,
    SourceOptions,
    TensorData,
    default_data_root,
    split_indices,
    take,
)
from .files import IMAGE_EXTENSIONS, Table, decode_text, is_blank_row, parse_table, read_bytes, scan_image_folder
from .labels import MISSING_MARKERS, encode_labels, label_name

__all__ = [
    "linear_true_parameters",
    "load_breast_cancer_source",
    "load_cifar10_source",
    "load_csv_source",
    "load_diabetes_source",
    "load_digits_source",
    "load_fashion_mnist_source",
    "load_image_folder_source",
    "load_linear_source",
    "load_mnist_source",
    "load_synthetic_source",
]

logger = logging.getLogger(__name__)

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


def _resolve_root(options: SourceOptions) -> str:
    return os.path.expanduser(options.root) if options.root else default_data_root()


def _normalized(
    raw: torch.Tensor, options: SourceOptions, local: FeatureTransform | None
) -> tuple[torch.Tensor, FeatureTransform | None]:
    """``raw`` features as ``options.normalization`` asks, and the transform applied (None: raw).

    ``local`` is what this source applies by default (None: it leaves the features as they are).
    """
    transform = options.transform if options.normalization == "fixed" else None
    if options.normalization == "local":
        transform = local
    if transform is None:
        return raw, None
    return transform.apply(raw).contiguous(), transform


def _standardized_table(
    features: np.ndarray, train_idx: np.ndarray, options: SourceOptions
) -> tuple[torch.Tensor, FeatureTransform | None]:
    """Tabular float64 ``features`` as float32, normalized as ``options.normalization`` asks.

    ``local``: standardized with the mean and std of the train split, in float64 (a constant column is
    only centred); ``none`` and ``fixed`` start from the features rounded to float32.
    """
    if options.normalization != "local":
        return _normalized(torch.from_numpy(features.astype(np.float32)), options, None)
    mean = features[train_idx].mean(axis=0)
    std = features[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    return x, FeatureTransform(STANDARDIZE, tuple(mean.tolist()), tuple(std.tolist()))


def _published(name: str) -> FeatureTransform:
    """The per-channel standardization of an image data set with its published mean and std."""
    mean, std = _NORMALIZATION[name]
    return FeatureTransform(STANDARDIZE, mean, std)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def load_digits_source(options: SourceOptions) -> Source:
    """Load scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); never downloads.

    Pixel values ``0..16`` are scaled to ``[0, 1]`` (the raw features) and, with ``local``
    normalization, standardized with the data set's mean and std. The test split is a seeded
    stratified ``options.test_fraction`` of the images.
    """
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    raw = torch.from_numpy((features / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    x, transform = _normalized(raw, options, _published("digits"))
    y = torch.from_numpy(labels.astype(np.int64))
    train_idx, test_idx = split_indices(len(y), labels, options.test_fraction, options.seed)
    return Source(
        name="digits",
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=(1, 8, 8),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        feature_transform=transform,
    )


def load_breast_cancer_source(options: SourceOptions) -> Source:
    """Load scikit-learn's Wisconsin diagnostic breast cancer data (569 x 30, two classes); never downloads.

    Street, Wolberg and Mangasarian (1993): 30 features of the cell nuclei in a fine-needle aspirate
    image (mean, standard error and worst value of radius, texture, perimeter, area, ...), read from
    the copy that ships inside scikit-learn. Class 0 is ``malignant`` (212 tumours), class 1 ``benign``
    (357), as scikit-learn numbers them. The test split is a seeded stratified ``options.test_fraction``;
    with ``local`` normalization the features are standardized with the train split's mean and std.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    features = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = split_indices(len(labels), labels, options.test_fraction, options.seed)
    x, transform = _standardized_table(features, train_idx, options)
    y = torch.from_numpy(labels)
    return Source(
        name="breast-cancer",
        task=CLASSIFICATION,
        num_classes=2,
        input_shape=(features.shape[1],),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        class_names=tuple(str(n) for n in bunch.target_names),
        feature_names=tuple(str(n) for n in bunch.feature_names),
        feature_transform=transform,
    )


def load_diabetes_source(options: SourceOptions) -> Source:
    """Load scikit-learn's diabetes data (442 patients x 10 features, regression); never downloads.

    Efron, Hastie, Johnstone and Tibshirani (2004), "Least Angle Regression": age, sex, body mass
    index, mean blood pressure and six blood serum measurements (``s1`` .. ``s6``) at baseline; the
    target is a measure of disease progression one year later (25 to 346), ``float32`` of shape
    ``(N, 1)``. The features are scikit-learn's unscaled copy (``scaled=False``: years, mmHg, ...),
    the raw features of ``normalization="none"``; ``local`` standardizes them with the train split's
    mean and std (scikit-learn's own scaled copy instead divides by ``std * sqrt(N)`` of all rows).
    The target is never scaled. The test split is a seeded random ``options.test_fraction``.
    """
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    features = np.asarray(bunch.data, dtype=np.float64)
    targets = np.asarray(bunch.target, dtype=np.float64)
    train_idx, test_idx = split_indices(len(targets), None, options.test_fraction, options.seed)
    x, transform = _standardized_table(features, train_idx, options)
    y = torch.from_numpy(targets.astype(np.float32)).view(-1, 1)
    return Source(
        name="diabetes",
        task=REGRESSION,
        num_classes=None,
        input_shape=(features.shape[1],),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        target_dim=1,
        feature_names=tuple(str(n) for n in bunch.feature_names),
        feature_transform=transform,
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
        x, transform = _normalized(x, options, _published(name))
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(TensorData(x=x.contiguous(), y=y))
        # MNIST's own names are "0 - zero", ...: its labels are the digits, "0".."9" (the default).
        class_names = tuple(ds.classes) if name == "fashion-mnist" else None
    train_data, test_data = splits
    logger.info("loaded %s: %d train, %d test examples", name, len(train_data), len(test_data))
    return Source(
        name=name,
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=tuple(train_data.x.shape[1:]),
        train=train_data,
        test=test_data,
        class_names=class_names,
        feature_transform=transform,
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
        x, transform = _normalized(x, options, _published("cifar10"))
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(TensorData(x=x.contiguous(), y=y))
        class_names = tuple(str(c) for c in ds.classes)  # "airplane", ..., from batches.meta
    train_data, test_data = splits
    logger.info("loaded cifar10: %d train, %d test examples", len(train_data), len(test_data))
    return Source(
        name="cifar10",
        task=CLASSIFICATION,
        num_classes=10,
        input_shape=tuple(train_data.x.shape[1:]),
        train=train_data,
        test=test_data,
        class_names=class_names,
        feature_transform=transform,
    )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _existing_path(options: SourceOptions, what: str, hint: str) -> Path:
    """``options.path`` expanded; FileNotFoundError naming it when nothing is there (a broken link included)."""
    if not options.path:
        raise FileNotFoundError(f"{what} not found: '' ({hint})")
    path = Path(os.path.expanduser(options.path))
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: '{options.path}' ({hint})")
    return path


def _feature_column(table: Table, name: str) -> np.ndarray:
    """The cells of feature column ``name`` as finite float64 values within the float32 range.

    Raises:
        DataFileError: At the first cell that is missing, not a number, not finite, or beyond float32.
    """
    cells = table.column(name)
    try:
        values = np.fromiter((float(cell.strip()) for cell in cells), dtype=np.float64, count=len(cells))  # as below
    except ValueError:
        values = None
    if values is not None and bool(np.all(np.abs(values) <= _FLOAT32_MAX)):  # False for NaN and inf
        return values
    for cell, line in zip(cells, table.lines, strict=True):
        text = cell.strip()
        try:
            value = float(text)
        except ValueError:
            if text in MISSING_MARKERS:
                problem = f"feature column '{name}' has missing values ({'an empty cell' if not text else repr(text)})"
            else:
                problem = f"feature column '{name}' is not numeric: {text!r}"
            raise DataFileError(table.path, problem, line=line, column=name) from None
        if not np.isfinite(value):
            problem = f"feature column '{name}' holds the non-finite value {text!r}; features must be finite numbers"
            raise DataFileError(table.path, problem, line=line, column=name)
        if abs(value) > _FLOAT32_MAX:
            problem = f"feature column '{name}' holds {text!r}, beyond the float32 range (largest {_FLOAT32_MAX:.4g})"
            raise DataFileError(table.path, problem, line=line, column=name)
    raise AssertionError("unreachable: a column failed the vectorized check but no cell did")


def _label_column(table: Table, name: str) -> list[str]:
    """The class name of each row's label (:func:`datasets.labels.label_name`)."""
    names = []
    for cell, line in zip(table.column(name), table.lines, strict=True):
        try:
            label = label_name(cell)
        except ValueError as err:
            raise DataFileError(table.path, f"label column '{name}': {err}", line=line, column=name) from None
        if label is None:
            raise DataFileError(table.path, f"label column '{name}' has missing values", line=line, column=name)
        names.append(label)
    return names


def _clean_csv(text: str, label_column: str) -> tuple[list[str], np.ndarray, list[str]] | None:
    """Feature names, features and label names of a clean CSV, read with pandas' C parser; else None.

    The fast path for the common case (several times faster than the exact reader on large files, and
    the parser the first version used). It accepts a file only when the header has distinct names,
    every feature is an int or float column of finite values within float32, and every label parses.
    Anything unusual returns None, and the exact reader (:func:`datasets.files.parse_table` and the
    cell checks) reads the file again and names the first bad cell.

    Where pandas could read another table than the exact reader: a first data row longer than the
    header (pandas takes its first field for an index and shifts every value, or drops the extra
    field) is checked here with the csv module; a later longer row is a pandas error; a shorter row
    leaves NaN, which the checks refuse.
    """
    first: list[list[str]] = []
    try:
        for row in csv.reader(io.StringIO(text, newline="")):
            if not is_blank_row(row):
                first.append(row)
                if len(first) == 2:
                    break
    except csv.Error:
        return None
    if len(first) < 2 or len(first[1]) != len(first[0]):
        return None
    header = [name.strip() or f"Unnamed: {i}" for i, name in enumerate(first[0])]
    if len(set(header)) != len(header) or label_column not in header:
        return None
    import pandas as pd  # here, not at the top: a client whose data is not a CSV never imports pandas

    try:
        # From bytes: pandas' C parser decodes faster than it reads a Python string.
        frame = pd.read_csv(io.BytesIO(text.encode("utf-8")), index_col=False, on_bad_lines="error")
    except Exception:  # noqa: BLE001 - any doubt goes to the exact reader, which explains it
        return None
    if frame.shape[1] != len(header) or len(frame) < 1:
        return None
    frame.columns = pd.Index(header)
    feature_columns = [c for c in header if c != label_column]
    if not feature_columns or not all(frame[c].dtype.kind in "iuf" for c in feature_columns):  # bool is kind "b"
        return None
    features = frame[feature_columns].to_numpy(dtype=np.float64)
    if not bool(np.all(np.abs(features) <= _FLOAT32_MAX)):  # False for NaN (a missing cell) and inf
        return None
    labels = frame[label_column]
    if labels.dtype.kind == "b" or bool(labels.isna().any()):
        return None
    values = labels.to_numpy() if labels.dtype.kind in "iu" else labels.to_numpy(dtype=object).astype(str)
    distinct, inverse = np.unique(values, return_inverse=True)
    try:
        names = [label_name(v) for v in distinct.tolist()]
    except ValueError:
        return None
    if any(n is None for n in names):
        return None
    return feature_columns, features, [str(names[i]) for i in inverse.reshape(-1)]


def _read_csv(path: Path, label_column: str) -> tuple[list[str], np.ndarray, list[str], Callable[[int], int]]:
    """Feature names, features (float64), label names, and a map from row to file line (for messages)."""
    text = decode_text(read_bytes(path), path)
    clean = _clean_csv(text, label_column)
    if clean is not None:
        # Only a message about a label (outside class_names) needs a line: the exact reader finds it then.
        return (*clean, lambda i: parse_table(text, path).lines[i])
    table = parse_table(text, path)
    if label_column not in table.header:
        raise DataFileError(
            path, f"label column '{label_column}' not in the header; available columns: " + ", ".join(table.header)
        )
    feature_columns = [c for c in table.header if c != label_column]
    if not feature_columns:
        raise DataFileError(path, f"no feature column besides the label column '{label_column}'")
    features = np.stack([_feature_column(table, c) for c in feature_columns], axis=1)
    return feature_columns, features, _label_column(table, label_column), table.lines.__getitem__


def load_csv_source(options: SourceOptions) -> Source:
    """Load a tabular classification data set from the CSV file ``options.path``.

    The file is UTF-8 with a header row (:func:`datasets.files.read_table`). The column
    ``options.label_column`` holds the class label (integers or names, :mod:`datasets.labels`); labels
    are mapped to the index of their sorted distinct values (by value when all are integers), or to
    their place in ``options.class_names``. Every other column is a numeric feature: finite and within
    the float32 range. With ``local`` normalization features are standardized with the mean and std of
    the train split (a constant column is only centred); ``none`` keeps them raw; ``fixed`` applies the
    given transform. The column names are the source's ``feature_names``.

    Raises:
        FileNotFoundError: If the file does not exist.
        DataFileError: (a ValueError) naming the file, and the line where one is to blame: the file is
            not a regular file, empty, header-only, not UTF-8, ragged; the label column is missing (the
            message lists the columns); a feature is missing, not numeric, not finite or beyond
            float32; a label is missing or a non-integer number; a label is outside ``class_names``;
            without ``class_names``, the file holds a single class.
        OSError: If the file cannot be read.
    """
    path = _existing_path(options, "CSV file", "set path to an existing file")
    feature_columns, features, names, line_of = _read_csv(path, options.label_column)
    classes, codes = encode_labels(
        names, options.class_names, where=str(path), example_at=lambda i: f"line {line_of(i)}"
    )
    logger.debug("csv %s: label classes %s -> codes 0..%d", path, list(classes), len(classes) - 1)

    train_idx, test_idx = split_indices(len(codes), codes, options.test_fraction, options.seed)
    x, transform = _standardized_table(features, train_idx, options)
    y = torch.from_numpy(codes)
    return Source(
        name="csv",
        task=CLASSIFICATION,
        num_classes=len(classes),
        input_shape=(len(feature_columns),),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        class_names=classes,
        feature_names=tuple(feature_columns),
        feature_transform=transform,
    )


def _decode_image(path: Path, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """One image file as a ``3 x H x W`` tensor in ``[0, 1]`` (converted to RGB, then ``transform``)."""
    from PIL import Image

    data = read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return transform(image.convert("RGB"))
    except Exception as err:  # hostile bytes: PIL's decoders raise many types (OSError, SyntaxError, ...)
        raise DataFileError(path, f"cannot be read as an image ({type(err).__name__}: {err})") from err


def load_image_folder_source(options: SourceOptions) -> Source:
    """Load an image classification data set from the directory ``options.path``.

    The layout is torchvision's :class:`~torchvision.datasets.ImageFolder`: one sub-folder per class
    (classes are the sorted folder names, or their place in ``options.class_names``), image files
    anywhere below it (:func:`datasets.files.scan_image_folder`). Special files with an image name
    (FIFO, socket, device, broken link) and hidden entries are skipped with a warning; they are never
    opened. Images are converted to RGB, resized to ``options.image_size`` squared and scaled to
    ``[0, 1]`` (the raw features); ``local`` normalization then standardizes them per channel with the
    mean and std of the train split.

    Raises:
        FileNotFoundError: If the directory does not exist, holds no class folder with images, or
            (without ``class_names``) a class folder holds no image.
        DataFileError: (a ValueError) naming the file: an image that cannot be decoded; a class
            folder outside ``class_names``; without ``class_names``, a single class folder.
        OSError: If a file cannot be read (permission), naming it.
    """
    import torchvision.transforms as tvt

    root = _existing_path(options, "image folder", "set path to a directory of class folders")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: '{options.path}' is not a directory of class folders")
    scan = scan_image_folder(root)
    if scan.skipped:
        logger.warning(
            "image folder %s: skipped %d entries: %s", root, len(scan.skipped),
            "; ".join(f"{p} ({why})" for p, why in scan.skipped[:10]),
        )
    if not scan.images:
        raise FileNotFoundError(
            f"image folder '{root}' holds no class sub-folder with images (class folders: "
            f"{', '.join(scan.classes) or 'none'}; image files end in {', '.join(IMAGE_EXTENSIONS)})"
        )
    empty = sorted(set(scan.classes) - {c for _, c in scan.images})
    if empty and not options.class_names:
        raise FileNotFoundError(
            f"image folder '{root}': class folder(s) {', '.join(empty)} hold no image (image files end in "
            f"{', '.join(IMAGE_EXTENSIONS)}); remove them, or set class-names to list every class"
        )
    size = options.image_size
    transform = tvt.Compose([tvt.Resize((size, size)), tvt.ToTensor()])
    # Images must be decoded one by one here; there is no array to read whole.
    x = torch.stack([_decode_image(path, transform) for path, _ in scan.images]).to(torch.float32)
    folder_of = [c for _, c in scan.images]
    classes, labels = encode_labels(
        folder_of, options.class_names, where=str(root), numeric_order=False,
        example_at=lambda i: str(scan.images[i][0]),
    )
    train_idx, test_idx = split_indices(len(labels), labels, options.test_fraction, options.seed)
    local = None
    if options.normalization == "local":
        index = torch.from_numpy(train_idx)
        mean = x[index].mean(dim=(0, 2, 3))
        std = x[index].std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
        local = FeatureTransform(STANDARDIZE, tuple(mean.tolist()), tuple(std.tolist()))
    x, transform = _normalized(x, options, local)
    y = torch.from_numpy(labels)
    logger.info("loaded image folder %s: %d images, %d classes", root, len(labels), len(classes))
    return Source(
        name="image-folder",
        task=CLASSIFICATION,
        num_classes=len(classes),
        input_shape=tuple(x.shape[1:]),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        class_names=classes,
        feature_transform=transform,
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
    The features are left as drawn unless ``normalization`` is ``fixed``.
    """
    if options.num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a train/test split, got {options.num_samples}")
    weights, bias = linear_true_parameters(options)
    rng = np.random.default_rng([options.seed, 2])
    features = rng.standard_normal((options.num_samples, options.num_features))
    targets = features @ weights + bias + options.noise_std * rng.standard_normal(options.num_samples)
    x, transform = _normalized(torch.from_numpy(features.astype(np.float32)), options, None)
    y = torch.from_numpy(targets.astype(np.float32)).view(-1, 1)
    train_idx, test_idx = split_indices(options.num_samples, None, options.test_fraction, options.seed)
    return Source(
        name="linear",
        task=REGRESSION,
        num_classes=None,
        input_shape=(options.num_features,),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        target_dim=1,
        feature_transform=transform,
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
        x, _ = _normalized(torch.from_numpy(np.concatenate(xs).astype(np.float32)), options, None)
        return TensorData(x=x, y=torch.from_numpy(np.concatenate(ys).astype(np.int64)))

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
        feature_transform=options.transform,
    )
