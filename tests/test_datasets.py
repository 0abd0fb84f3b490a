"""Tests of datasets.sources: every registered source, on embedded, generated or tiny fake files."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import SOURCES, Source, SourceOptions, TensorData, linear_true_parameters, load_source, load_source_cached

# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert sorted(SOURCES) == [
        "breast-cancer",
        "cifar10",
        "csv",
        "diabetes",
        "digits",
        "fashion-mnist",
        "image-folder",
        "instructions",
        "linear",
        "mnist",
        "synthetic",
        "text",
        "text-lm",
    ]


def test_unknown_source_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'; choose one of: breast-cancer, cifar10, csv, diabetes, digits"):
        load_source("mnsit", SourceOptions())


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_features": 0}, "num_features"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"synthetic_alpha": -1.0}, "synthetic_alpha"),
        ({"synthetic_beta": -1.0}, "synthetic_beta"),
        ({"num_partitions": 0}, "num_partitions"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_invalid_source_options(overrides: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        SourceOptions(**overrides)  # type: ignore[arg-type]


def test_package_does_not_import_flower() -> None:
    code = "import sys, datasets; assert 'flwr' not in sys.modules, 'datasets imported flwr'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_tensor_data_length_mismatch() -> None:
    with pytest.raises(ValueError, match="same number of examples"):
        TensorData(x=torch.zeros(3, 2), y=torch.zeros(2, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Source:
    return load_source("digits", SourceOptions(seed=0))


def test_digits_shapes_and_counts(digits: Source) -> None:
    assert (digits.name, digits.task, digits.num_classes, digits.input_shape) == (
        "digits",
        "classification",
        10,
        (1, 8, 8),
    )
    assert digits.target_dim is None and digits.natural_partitions is None
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == 359  # round(0.2 * 1797)
    assert digits.train.x.shape == (1438, 1, 8, 8) and digits.train.x.dtype == torch.float32
    assert digits.train.y.dtype == torch.int64
    assert set(digits.train.y.tolist()) == set(range(10))


def test_digits_normalized(digits: Source) -> None:
    x = torch.cat([digits.train.x, digits.test.x])
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1.0) < 1e-3
    # A blank pixel (0/16) maps to -mean/std.
    assert x.min().item() == pytest.approx(-0.3053 / 0.3760, abs=1e-5)


def test_digits_split_stratified_and_seeded(digits: Source) -> None:
    # 1797 images, 174..183 per class: every class gives 35-37 images to the test split.
    test_counts = np.bincount(digits.test.y.numpy(), minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37
    again = load_source("digits", SourceOptions(seed=0))
    assert torch.equal(again.test.x, digits.test.x)
    other = load_source("digits", SourceOptions(seed=1))
    assert not torch.equal(other.test.x, digits.test.x)
    assert len(load_source("digits", SourceOptions(test_fraction=0.5)).test) == 898  # round(898.5) -> 898


def test_load_source_cached_returns_same_object() -> None:
    options = SourceOptions(seed=3)
    assert load_source_cached("digits", options) is load_source_cached("digits", SourceOptions(seed=3))


# ----------------------------------------------------------------------------------------------
# csv
# ----------------------------------------------------------------------------------------------


def _write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_loads_and_standardizes(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{(i * 7) % 5},{'cat' if i % 3 else 'ant'}" for i in range(30)]
    path = _write_csv(tmp_path / "t.csv", "\n".join(rows) + "\n")
    source = load_source("csv", SourceOptions(path=path, test_fraction=0.2))
    assert (source.task, source.num_classes, source.input_shape) == ("classification", 2, (2,))
    assert len(source.train) == 24 and len(source.test) == 6
    # Sorted category codes: "ant" -> 0, "cat" -> 1; ant rows are i % 3 == 0 (10 of 30).
    labels = torch.cat([source.train.y, source.test.y])
    assert labels.dtype == torch.int64 and int((labels == 0).sum()) == 10
    # Stratified: 2 of the 10 ants are in the test split.
    assert int((source.test.y == 0).sum()) == 2
    # Standardized with train statistics.
    assert torch.allclose(source.train.x.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(source.train.x.std(0, unbiased=False), torch.ones(2), atol=1e-5)
    # One affine map for both splits: column a (= row number) stays evenly spaced.
    a = np.sort(torch.cat([source.train.x[:, 0], source.test.x[:, 0]]).numpy())
    assert np.allclose(np.diff(a), np.diff(a)[0], atol=1e-5)


def test_csv_integer_labels_keep_order(tmp_path: Path) -> None:
    rows = ["x,label"] + [f"{i},{[3, 7, 5][i % 3]}" for i in range(30)]
    source = load_source("csv", SourceOptions(path=_write_csv(tmp_path / "t.csv", "\n".join(rows))))
    assert source.num_classes == 3
    # Codes follow sorted values: 3 -> 0, 5 -> 1, 7 -> 2; x = i, so x's order tells the row.
    x = torch.cat([source.train.x[:, 0], source.test.x[:, 0]])
    y = torch.cat([source.train.y, source.test.y])
    rank = torch.argsort(torch.argsort(x))
    assert torch.equal(y, torch.tensor([0, 2, 1])[rank % 3])


def test_csv_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_source("csv", SourceOptions(path=missing))


def test_csv_missing_label_column_lists_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", "f1,f2,target\n1,2,0\n3,4,1\n")
    with pytest.raises(ValueError, match="label column 'label' not in .*available columns: f1, f2, target"):
        load_source("csv", SourceOptions(path=path))


def test_csv_non_numeric_feature_names_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", "f1,colour,label\n1,red,0\n2,blue,1\n3,red,0\n4,blue,1\n")
    with pytest.raises(ValueError, match="feature column 'colour'.*not numeric"):
        load_source("csv", SourceOptions(path=path))


def test_csv_missing_feature_value(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", "f1,f2,label\n1,,0\n2,3,1\n3,3,0\n4,4,1\n")
    with pytest.raises(ValueError, match="feature column 'f2' .* missing values"):
        load_source("csv", SourceOptions(path=path))


# ----------------------------------------------------------------------------------------------
# torchvision formats, with tiny fake files
# ----------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the MNIST idx format (big-endian header, type code 0x08)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str) -> tuple[np.ndarray, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(12, dtype=np.uint8) % 10
    _write_idx(raw / "train-images-idx3-ubyte", images)
    _write_idx(raw / "train-labels-idx1-ubyte", labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:5])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[:5])
    return images, labels


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion-mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_like_from_fake_files(tmp_path: Path, name: str, folder: str, mean: float, std: float) -> None:
    images, labels = _fake_mnist(tmp_path, folder)
    source = load_source(name, SourceOptions(root=str(tmp_path)))
    assert (source.num_classes, source.input_shape) == (10, (1, 28, 28))
    assert source.train.x.shape == (12, 1, 28, 28) and len(source.test) == 5
    assert source.train.x.dtype == torch.float32 and source.train.y.dtype == torch.int64
    assert source.train.y.tolist() == labels.tolist()
    assert source.train.x[0, 0, 0, 0].item() == pytest.approx((0.0 - mean) / std, abs=1e-6)
    assert source.train.x[0, 0, 0, 1].item() == pytest.approx((1.0 - mean) / std, abs=1e-6)
    expected = (torch.from_numpy(images[3]).float() / 255 - mean) / std
    assert torch.allclose(source.train.x[3, 0], expected, atol=1e-6)


def _fake_cifar(root: Path) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(6, 3 * 32 * 32), dtype=np.uint8)
    # Row layout is 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    rows[0, :] = 0
    rows[0, 1024 + 32 * 2 + 5] = 255  # green channel, h=2, w=5
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[i : i + 1], "labels": [i]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rows[5:6], "labels": [9]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f)
    return rows


def test_cifar10_from_fake_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    # The fake batches cannot match the real MD5 sums; check only that the files exist.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    rows = _fake_cifar(tmp_path)
    source = load_source("cifar10", SourceOptions(root=str(tmp_path)))
    assert (source.num_classes, source.input_shape) == (10, (3, 32, 32))
    assert source.train.x.shape == (5, 3, 32, 32) and source.test.x.shape == (1, 3, 32, 32)
    assert source.train.y.tolist() == [0, 1, 2, 3, 4] and source.test.y.tolist() == [9]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    pixels = source.train.x[0] * std + mean  # back to [0, 1]
    assert pixels[1, 2, 5].item() == pytest.approx(1.0, abs=1e-5)
    pixels[1, 2, 5] = 0.0
    assert torch.allclose(pixels, torch.zeros(3, 32, 32), atol=1e-5)
    expected = torch.from_numpy(rows[5].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(source.test.x[0] * std + mean, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_torchvision_missing_files_clear_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"under data root '{tmp_path}'.*set download=true"):
        load_source(name, SourceOptions(root=str(tmp_path), download=False))


# ----------------------------------------------------------------------------------------------
# image-folder
# ----------------------------------------------------------------------------------------------


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for cls, value in (("b_class", 200), ("a_class", 20)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (10, 6), (value, value + i, 0)).save(tmp_path / cls / f"{i}.png")
    source = load_source("image-folder", SourceOptions(path=str(tmp_path), image_size=4, test_fraction=0.2))
    assert (source.num_classes, source.input_shape) == (2, (3, 4, 4))
    assert len(source.train) == 8 and len(source.test) == 2
    # Classes are the sorted folder names: a_class (dark) -> 0, b_class (bright) -> 1.
    red = torch.cat([source.train.x, source.test.x])[:, 0].mean(dim=(1, 2))
    y = torch.cat([source.train.y, source.test.y])
    assert red[y == 1].min() > red[y == 0].max()
    assert sorted(source.test.y.tolist()) == [0, 1]  # stratified
    assert abs(source.train.x[:, 0].mean().item()) < 1e-5  # normalized with train statistics


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_source("image-folder", SourceOptions(path=str(tmp_path / "none")))


def test_image_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no class sub-folder"):
        load_source("image-folder", SourceOptions(path=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------


def test_linear_regression_recovers_true_weights() -> None:
    options = SourceOptions(num_samples=500, num_features=4, noise_std=0.1, seed=2)
    source = load_source("linear", options)
    assert (source.task, source.num_classes, source.target_dim, source.input_shape) == ("regression", None, 1, (4,))
    assert source.train.y.shape == (400, 1) and source.train.y.dtype == torch.float32
    assert len(source.test) == 100
    weights, bias = linear_true_parameters(options)
    design = np.hstack([source.train.x.numpy(), np.ones((400, 1), dtype=np.float32)])
    solution, *_ = np.linalg.lstsq(design, source.train.y.numpy()[:, 0], rcond=None)
    assert np.allclose(solution[:4], weights, atol=0.03)
    assert solution[4] == pytest.approx(bias, abs=0.03)
    residual = source.test.y.numpy()[:, 0] - (source.test.x.numpy() @ weights + bias)
    assert residual.std() == pytest.approx(0.1, abs=0.03)


def test_linear_without_noise_is_exact() -> None:
    options = SourceOptions(num_samples=50, num_features=3, noise_std=0.0)
    source = load_source("linear", options)
    weights, bias = linear_true_parameters(options)
    assert np.allclose(source.train.x.numpy() @ weights + bias, source.train.y.numpy()[:, 0], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# synthetic (FedProx)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> Source:
    return load_source("synthetic", SourceOptions(num_samples=3000, num_features=60, num_partitions=10, seed=0))


def test_synthetic_shapes_and_partitions(synthetic: Source) -> None:
    assert (synthetic.task, synthetic.num_classes, synthetic.input_shape) == ("classification", 10, (60,))
    assert len(synthetic.train) + len(synthetic.test) == 3000
    parts = synthetic.natural_partitions
    assert parts is not None and len(parts) == 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(synthetic.train)))
    assert all(p.size >= 1 for p in parts)
    assert synthetic.train.y.dtype == torch.int64
    assert 0 <= int(synthetic.train.y.min()) and int(synthetic.train.y.max()) <= 9
    # Test split: 20% of each device, so about 600 in all.
    assert abs(len(synthetic.test) - 600) <= 10
    # Power-law sizes: the largest device is much bigger than the smallest.
    sizes = sorted(p.size for p in parts)
    assert sizes[-1] > 4 * sizes[0]


def test_synthetic_feature_covariance(synthetic: Source) -> None:
    """Within a device, feature j has variance j^-1.2 (FedProx's diagonal Sigma)."""
    assert synthetic.natural_partitions is not None
    x = synthetic.train.x.numpy().astype(np.float64)
    centred = np.concatenate([x[p] - x[p].mean(axis=0) for p in synthetic.natural_partitions])
    variance = centred.var(axis=0) * centred.shape[0] / (centred.shape[0] - 10)
    expected = np.arange(1, 61) ** -1.2
    assert np.allclose(variance / expected, 1.0, atol=0.15)


def test_synthetic_seeded_and_heterogeneous() -> None:
    options = SourceOptions(num_samples=400, num_features=5, num_partitions=4, seed=4)
    a, b = load_source("synthetic", options), load_source("synthetic", options)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    c = load_source("synthetic", SourceOptions(num_samples=400, num_features=5, num_partitions=4, seed=5))
    assert not torch.equal(a.train.x[:10], c.train.x[:10])


def test_synthetic_beta_controls_feature_shift() -> None:
    """Device feature means are v_k ~ N(B_k, 1) with B_k ~ N(0, beta): beta spreads the devices apart."""

    def spread_of_device_means(beta: float) -> float:
        options = SourceOptions(num_samples=1000, num_features=20, num_partitions=10, synthetic_beta=beta)
        source = load_source("synthetic", options)
        assert source.natural_partitions is not None
        x = source.train.x.numpy()
        return float(np.std([x[p].mean() for p in source.natural_partitions]))

    # beta 0: a device's mean over 20 features is about N(0, 1/20); beta 10: about N(0, 100).
    assert spread_of_device_means(0.0) < 0.6
    assert spread_of_device_means(10.0) > 3.0


def test_synthetic_too_few_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        load_source("synthetic", SourceOptions(num_samples=10, num_partitions=10))


def test_class_names_fix_label_indices_across_files_that_miss_classes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two data owners' CSVs: one lacks class 'b'. With class-names both agree on indices and size."""
    import pandas as pd

    from datasets import SourceOptions, load_source

    full = tmp_path / "full.csv"
    partial = tmp_path / "partial.csv"
    pd.DataFrame({"f": range(12), "label": ["a", "b", "c"] * 4}).to_csv(full, index=False)
    pd.DataFrame({"f": range(8), "label": ["a", "c"] * 4}).to_csv(partial, index=False)
    loose = load_source("csv", SourceOptions(path=str(partial)))
    assert loose.num_classes == 2  # without class names, 'c' would become index 1
    fixed = [load_source("csv", SourceOptions(path=str(p), class_names="a,b,c")) for p in (full, partial)]
    assert [s.num_classes for s in fixed] == [3, 3]
    partial_labels = set(torch.cat([fixed[1].train.y, fixed[1].test.y]).tolist())
    assert partial_labels == {0, 2}
    import pytest

    with pytest.raises(ValueError, match="labels not in class_names \\(a, b\\): c"):
        load_source("csv", SourceOptions(path=str(full), class_names="a,b"))
