"""The embedded medical sources (breast-cancer, diabetes) and the normalization option of every source."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import FeatureTransform, Source, SourceOptions, load_source, load_source_cached, transform_source

# ----------------------------------------------------------------------------------------------
# breast-cancer, diabetes
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sources ship inside scikit-learn: any socket is a download, and fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a source opened a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _check_common(source: Source, name: str, rows: int, features: int) -> None:
    assert source.name == name
    assert len(source.train) + len(source.test) == rows
    assert len(source.test) == round(0.2 * rows)
    assert source.input_shape == (features,)
    assert source.train.x.shape == (len(source.train), features) and source.train.x.dtype == torch.float32
    assert source.test.x.shape == (len(source.test), features) and source.test.x.dtype == torch.float32
    for part in (source.train, source.test):
        assert bool(torch.isfinite(part.x).all()) and bool(torch.isfinite(part.y.float()).all())
    assert source.feature_names is not None and len(source.feature_names) == features
    # local normalization (the default): the train split standardized with its own statistics.
    assert source.feature_transform is not None and source.feature_transform.kind == "standardize"
    torch.testing.assert_close(source.train.x.mean(0), torch.zeros(features), atol=1e-5, rtol=0)
    torch.testing.assert_close(source.train.x.std(0, unbiased=False), torch.ones(features), atol=1e-5, rtol=0)


def test_breast_cancer_source() -> None:
    source = load_source("breast-cancer", SourceOptions(seed=0))
    _check_common(source, "breast-cancer", 569, 30)
    assert source.task == "classification" and source.num_classes == 2
    assert source.class_names == ("malignant", "benign")
    assert source.feature_names is not None
    assert source.feature_names[:3] == ("mean radius", "mean texture", "mean perimeter")
    assert source.feature_names[-1] == "worst fractal dimension"
    assert source.train.y.dtype == torch.int64
    # 212 malignant, 357 benign in all; the split is stratified (malignant 42.4 of the 114 test tumours).
    counts = np.bincount(np.concatenate([source.train.y.numpy(), source.test.y.numpy()]))
    assert counts.tolist() == [212, 357]
    assert np.bincount(source.test.y.numpy()).tolist() == [42, 72]


def test_diabetes_source() -> None:
    source = load_source("diabetes", SourceOptions(seed=0))
    _check_common(source, "diabetes", 442, 10)
    assert source.task == "regression" and source.num_classes is None and source.class_names is None
    assert source.target_dim == 1
    assert source.feature_names == ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
    assert source.train.y.shape == (len(source.train), 1) and source.train.y.dtype == torch.float32
    targets = torch.cat([source.train.y, source.test.y]).numpy().ravel()
    assert targets.min() == 25.0 and targets.max() == 346.0  # disease progression, never scaled


def test_diabetes_raw_features_are_the_published_units() -> None:
    raw = load_source("diabetes", SourceOptions(seed=0, normalization="none"))
    assert raw.feature_transform is None
    x = torch.cat([raw.train.x, raw.test.x])
    assert set(x[:, 1].unique().tolist()) == {1.0, 2.0}  # sex, coded 1 / 2
    assert 19.0 <= float(x[:, 0].min()) and float(x[:, 0].max()) <= 79.0  # age in years
    assert 18.0 <= float(x[:, 2].min()) and float(x[:, 2].max()) <= 43.0  # body mass index


@pytest.mark.parametrize("name", ["breast-cancer", "diabetes"])
def test_split_is_seeded(name: str) -> None:
    a = load_source(name, SourceOptions(seed=3))
    b = load_source(name, SourceOptions(seed=3))
    c = load_source(name, SourceOptions(seed=4))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.y, c.test.y)
    # The split is a partition of the same rows: the raw rows of train + test are the whole set.
    raw = [load_source(name, SourceOptions(seed=s, normalization="none")) for s in (3, 4)]
    rows = [sorted(map(tuple, torch.cat([r.train.x, r.test.x]).tolist())) for r in raw]
    assert rows[0] == rows[1]


# ----------------------------------------------------------------------------------------------
# normalization: local (today), none (raw), fixed (one transform for every node)
# ----------------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[tuple[float, float, str]]) -> str:
    path.write_text("a,b,label\n" + "".join(f"{a},{b},{label}\n" for a, b, label in rows))
    return str(path)


@pytest.mark.parametrize("name", ["breast-cancer", "diabetes", "digits", "linear"])
def test_fixed_equals_the_transform_applied_to_raw_bit_for_bit(name: str) -> None:
    raw = load_source(name, SourceOptions(normalization="none", num_samples=50))
    width = raw.train.x.shape[1]
    transform = FeatureTransform.standardize([0.5 + i for i in range(width)], [2.0 + i for i in range(width)])
    fixed = load_source(name, SourceOptions(normalization="fixed", transform=transform, num_samples=50))
    later = transform_source(raw, transform)
    assert fixed.feature_transform == transform == later.feature_transform
    for a, b in ((fixed.train, later.train), (fixed.test, later.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(fixed.train.x, raw.train.x)
    # Options carrying a transform are hashable: the in-process cache keys on them.
    options = SourceOptions(normalization="fixed", transform=transform, num_samples=50)
    assert load_source_cached(name, options) is load_source_cached(name, replace(options))


def test_fixed_transform_gives_every_node_the_same_input_for_the_same_raw_value(tmp_path: Path) -> None:
    # Two data owners with different data share one raw row, (3.0, 40.0).
    rng = np.random.default_rng(0)
    a_rows = [(3.0, 40.0, "x")] + [(float(v), float(w), "xy"[i % 2]) for i, (v, w) in enumerate(rng.normal(0, 1, (40, 2)))]
    b_rows = [(3.0, 40.0, "x")] + [(float(v), float(w), "xy"[i % 2]) for i, (v, w) in enumerate(rng.normal(9, 5, (40, 2)))]
    paths = [_csv(tmp_path / "a.csv", a_rows), _csv(tmp_path / "b.csv", b_rows)]

    def shared_row(options: SourceOptions, path: str) -> torch.Tensor:
        raw = load_source("csv", replace(options, normalization="none", transform=None, path=path))
        source = load_source("csv", replace(options, path=path))
        x_raw = torch.cat([raw.train.x, raw.test.x])
        x = torch.cat([source.train.x, source.test.x])
        return x[int(np.flatnonzero((x_raw == torch.tensor([3.0, 40.0])).all(1).numpy())[0])]

    local = [shared_row(SourceOptions(), p) for p in paths]
    assert not torch.allclose(local[0], local[1])  # the problem: each owner's own statistics
    transform = FeatureTransform.standardize([4.5, 12.0], [2.5, 6.0])
    fixed = [shared_row(SourceOptions(normalization="fixed", transform=transform), p) for p in paths]
    assert torch.equal(fixed[0], fixed[1])
    assert fixed[0].tolist() == pytest.approx([(3.0 - 4.5) / 2.5, (40.0 - 12.0) / 6.0], rel=1e-6)


def test_local_normalization_is_unchanged(tmp_path: Path) -> None:
    # The default keeps the earlier arithmetic exactly: float64 standardization of the train split.
    rows = [(float(i), float(i * i % 7), "ab"[i % 2]) for i in range(20)]
    source = load_source("csv", SourceOptions(path=_csv(tmp_path / "t.csv", rows), seed=1))
    raw = load_source("csv", SourceOptions(path=str(tmp_path / "t.csv"), seed=1, normalization="none"))
    features = raw.train.x.double().numpy()
    mean, std = features.mean(0), features.std(0)
    np.testing.assert_array_equal(source.train.x.numpy(), ((features - mean) / std).astype(np.float32))
    assert source.feature_transform is not None
    np.testing.assert_array_equal(np.array(source.feature_transform.offset), mean)
    digits = load_source("digits", SourceOptions())
    assert digits.feature_transform == FeatureTransform("standardize", (0.3053,), (0.3760,))


def test_image_folder_size_and_raw_pixels(tmp_path: Path) -> None:
    from PIL import Image

    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.new("RGB", (20, 12), colour).save(tmp_path / c / f"{i}.png")
    raw = load_source("image-folder", SourceOptions(path=str(tmp_path), image_size=16, normalization="none"))
    assert raw.input_shape == (3, 16, 16) and raw.feature_transform is None
    x = torch.cat([raw.train.x, raw.test.x])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # scaled to [0, 1], not standardized
    transform = FeatureTransform.min_max([0.0, 0.0, 0.0], [0.5, 1.0, 2.0])  # per channel
    fixed = load_source("image-folder", SourceOptions(path=str(tmp_path), image_size=16, normalization="fixed", transform=transform))
    assert torch.equal(fixed.train.x, raw.train.x / torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"normalization": "global"}, "unknown normalization 'global'; choose one of: local, none, fixed"),
        ({"normalization": "fixed"}, "normalization 'fixed' needs a transform"),
        ({"transform": FeatureTransform.standardize([0.0], [1.0])}, "a transform needs normalization 'fixed'"),
    ],
)
def test_invalid_normalization_options(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceOptions(**overrides)  # type: ignore[arg-type]


def test_fixed_transform_of_the_wrong_width_names_both() -> None:
    transform = FeatureTransform.standardize([0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match=r"for 3 features or channels \(axis 1\), got data of shape \(442, 10\)"):
        load_source("diabetes", SourceOptions(normalization="fixed", transform=transform))


def test_text_sources_refuse_a_fixed_transform() -> None:
    transform = FeatureTransform.standardize([0.0], [1.0])
    with pytest.raises(ValueError, match="text sources hold token ids"):
        load_source("text", SourceOptions(normalization="fixed", transform=transform, path="unused.csv"))
