"""Tests of datasets.partitioners: contract tests over every partitioner, then each one's own shape."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from datasets import (
    CLASS_LABEL_PARTITIONERS,
    PARTITIONER_NAMES,
    PARTITIONERS,
    PartitionOptions,
    Source,
    SourceOptions,
    TensorData,
    clear_partition_cache,
    example_keys,
    load_partition,
    load_source,
    partition,
    partition_summary,
)
from datasets import partitioners as partitioners_module

NUM_CLASSES = 6
# Imbalanced classes: 30, 50, ..., 130 examples (480 in all).
CLASS_SIZES = [30 + 20 * c for c in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and keys of a small imbalanced classification set, shuffled."""
    rng = np.random.default_rng(123)
    labels = np.concatenate([np.full(size, c) for c, size in enumerate(CLASS_SIZES)]).astype(np.int64)
    features = rng.standard_normal((labels.size, 4)).astype(np.float32)
    perm = rng.permutation(labels.size)
    features, labels = features[perm], labels[perm]
    return features, labels, example_keys(features, labels)


def _options(**overrides: object) -> PartitionOptions:
    base: dict[str, object] = {"num_partitions": 8, "seed": 0, "min_partition_size": 5}
    base.update(overrides)
    return PartitionOptions(**base)  # type: ignore[arg-type]


def _key_sets(parts: list[np.ndarray], keys: np.ndarray) -> list[frozenset[int]]:
    return [frozenset(keys[p].tolist()) for p in parts]


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------------
# Contract tests, run over every registered partitioner
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
class TestPartitionerContract:
    def test_disjoint_cover_sorted_int64(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        parts = partition(name, labels, keys, _options())
        assert len(parts) == 8
        for part in parts:
            assert part.dtype == np.int64
            assert np.all(np.diff(part) > 0), "sorted and without repeats"
        everything = np.concatenate(parts)
        assert everything.size == labels.size
        assert np.array_equal(np.sort(everything), np.arange(labels.size))

    def test_deterministic(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        first = partition(name, labels, keys, _options(seed=7))
        second = partition(name, labels, keys, _options(seed=7))
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))

    def test_order_independent(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        perm = np.random.default_rng(5).permutation(labels.size)
        original = partition(name, labels, keys, _options(seed=3))
        permuted = partition(name, labels[perm], keys[perm], _options(seed=3))
        assert _key_sets(original, keys) == _key_sets(permuted, keys[perm])

    def test_min_partition_size(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        for seed in range(3):
            parts = partition(name, labels, keys, _options(seed=seed, num_partitions=12, min_partition_size=15))
            assert min(p.size for p in parts) >= 15

    def test_impossible_min_size(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        with pytest.raises(ValueError, match="min_partition_size"):
            partition(name, labels, keys, _options(num_partitions=10, min_partition_size=49))

    def test_too_many_partitions(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        with pytest.raises(ValueError, match="num_partitions"):
            partition(name, labels, keys, _options(num_partitions=labels.size + 1, min_partition_size=0))

    def test_different_seed_different_split(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        a = partition(name, labels, keys, _options(seed=0))
        b = partition(name, labels, keys, _options(seed=1))
        assert _key_sets(a, keys) != _key_sets(b, keys)

    def test_single_partition_is_everything(self, name: str, data: tuple[np.ndarray, ...]) -> None:
        _, labels, keys = data
        parts = partition(name, labels, keys, _options(num_partitions=1, classes_per_partition=NUM_CLASSES))
        assert len(parts) == 1
        assert np.array_equal(parts[0], np.arange(labels.size))


# ----------------------------------------------------------------------------------------------
# Each partitioner's own behaviour
# ----------------------------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    sizes = [p.size for p in partition("iid", labels, keys, _options(num_partitions=7))]
    # 480 = 7 * 68 + 4: four partitions of 69, three of 68.
    assert sorted(sizes) == [68, 68, 68, 69, 69, 69, 69]


def test_iid_accepts_regression_targets() -> None:
    targets = np.linspace(0.0, 1.0, 50, dtype=np.float32).reshape(-1, 1)
    keys = example_keys(targets)
    parts = partition("iid", targets, keys, PartitionOptions(num_partitions=5))
    assert [p.size for p in parts] == [10] * 5


@pytest.mark.parametrize("per", [1, 2, 3])
def test_shards_hold_exactly_k_classes(data: tuple[np.ndarray, ...], per: int) -> None:
    _, labels, keys = data
    parts = partition("shards", labels, keys, _options(classes_per_partition=per))
    for part in parts:
        assert np.unique(labels[part]).size == per
    # Every class is used by 8 * per / 6 partitions, rounded down or up.
    users = np.zeros(NUM_CLASSES, dtype=int)
    for part in parts:
        users[np.unique(labels[part])] += 1
    assert users.sum() == 8 * per
    assert users.max() - users.min() <= 1


def test_shards_split_each_class_evenly(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    parts = partition("shards", labels, keys, _options(num_partitions=6, classes_per_partition=1))
    # One class per partition and six classes: each partition is exactly one whole class.
    assert sorted(p.size for p in parts) == CLASS_SIZES


def test_shards_need_enough_class_slots(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    with pytest.raises(ValueError, match="classes_per_partition"):
        partition("shards", labels, keys, _options(num_partitions=2, classes_per_partition=2))


def test_dirichlet_smaller_alpha_more_skew(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data

    def mean_entropy(alpha: float) -> float:
        parts = partition("dirichlet", labels, keys, _options(dirichlet_alpha=alpha, min_partition_size=1))
        return float(np.mean([_entropy(np.bincount(labels[p], minlength=NUM_CLASSES)) for p in parts]))

    skewed, near_iid = mean_entropy(0.1), mean_entropy(100.0)
    global_entropy = _entropy(np.bincount(labels))
    assert skewed < 0.6 * global_entropy
    assert near_iid > 0.95 * global_entropy
    assert skewed < near_iid


def test_dirichlet_repairs_to_min_size(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    # alpha 0.01 with 40 partitions leaves most partitions empty on every draw: repair must fill them.
    parts = partition(
        "dirichlet", labels, keys, _options(num_partitions=40, dirichlet_alpha=0.01, min_partition_size=10)
    )
    assert min(p.size for p in parts) >= 10
    assert sum(p.size for p in parts) == labels.size


def test_quantity_skew_sizes_vary_labels_iid(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    parts = partition(
        "quantity-skew", labels, keys, _options(num_partitions=4, quantity_alpha=0.5, min_partition_size=1)
    )
    sizes = np.array([p.size for p in parts])
    assert sizes.max() > 2 * sizes.min()
    global_share = np.bincount(labels) / labels.size
    biggest = parts[int(np.argmax(sizes))]
    share = np.bincount(labels[biggest], minlength=NUM_CLASSES) / biggest.size
    assert np.abs(share - global_share).max() < 0.08


def test_quantity_skew_large_alpha_near_equal(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    sizes = [p.size for p in partition("quantity-skew", labels, keys, _options(quantity_alpha=1e4))]
    assert max(sizes) - min(sizes) < 10  # 60 each on average


@pytest.mark.parametrize("name", ["dirichlet", "shards"])
def test_label_skew_needs_class_labels(name: str) -> None:
    targets = np.linspace(0.0, 1.0, 20)
    with pytest.raises(ValueError, match="needs class labels.*regression data can use one of: iid, quantity-skew, sorted$"):
        partition(name, targets, example_keys(targets.reshape(-1, 1)), PartitionOptions(num_partitions=2))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_regression_targets_split_or_refused_as_the_registry_says(name: str) -> None:
    # (N, 1) float32 targets, as the regression sources (linear, diabetes) hold them.
    targets = np.random.default_rng(0).normal(150.0, 70.0, (90, 1)).astype(np.float32)
    keys = example_keys(targets)
    options = PartitionOptions(num_partitions=4, min_partition_size=5)
    if name in CLASS_LABEL_PARTITIONERS:
        with pytest.raises(ValueError, match=f"partitioner '{name}' needs class labels"):
            partition(name, targets, keys, options)
        return
    parts = partition(name, targets, keys, options)
    assert sorted(np.concatenate(parts).tolist()) == list(range(90))
    assert min(p.size for p in parts) >= 5


def test_sorted_cuts_the_target_order_into_equal_blocks() -> None:
    targets = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 7.0])
    keys = example_keys(targets.reshape(-1, 1))
    parts = partition("sorted", targets, keys, PartitionOptions(num_partitions=3))
    # Order by target: 5 (0.0), 1, 3, 4, 2, 0, 6 (7.0); blocks of 3, 2, 2.
    assert [p.tolist() for p in parts] == [[1, 3, 5], [2, 4], [0, 6]]
    # Distinct targets leave nothing to the seed; an (N, 1) column is read as (N,).
    other = partition("sorted", targets.reshape(-1, 1), keys, PartitionOptions(num_partitions=3, seed=9))
    assert [p.tolist() for p in other] == [p.tolist() for p in parts]


def test_sorted_breaks_label_ties_by_seed(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    parts = partition("sorted", labels, keys, _options(num_partitions=6))
    # Blocks of 80 in label order: every partition's labels are a contiguous range of classes.
    for p in parts:
        held = np.unique(labels[p])
        assert held.tolist() == list(range(held.min(), held.max() + 1))
    assert max(labels[parts[0]]) <= min(labels[parts[-1]])


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (np.zeros((10, 2)), r"shape \(N,\) or \(N, 1\)"),
        (np.array([0.0, np.nan, 1.0, 2.0]), "NaN or infinite"),
        (np.array(["a", "b", "c"]), "numeric"),
    ],
)
def test_sorted_refuses_what_it_cannot_order(targets: np.ndarray, message: str) -> None:
    keys = np.arange(len(targets), dtype=np.uint64)
    with pytest.raises(ValueError, match=message):
        partition("sorted", targets, keys, PartitionOptions(num_partitions=2))


def test_unknown_partitioner_lists_names(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    with pytest.raises(ValueError, match="unknown partitioner 'dirichet'; choose one of: dirichlet, iid, natural"):
        partition("dirichet", labels, keys, _options())
    assert set(PARTITIONER_NAMES) == {*PARTITIONERS, "natural"}


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
        ({"dirichlet_alpha": -1.0}, "dirichlet_alpha"),
        ({"classes_per_partition": 0}, "classes_per_partition"),
        ({"quantity_alpha": 0.0}, "quantity_alpha"),
        ({"min_partition_size": -1}, "min_partition_size"),
    ],
)
def test_invalid_options_name_the_option(overrides: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        _options(**overrides)


def test_classes_per_partition_above_class_count(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    with pytest.raises(ValueError, match="classes_per_partition=7 exceeds the number of classes present \\(6\\)"):
        partition("shards", labels, keys, _options(classes_per_partition=7))


def test_keys_must_match_labels(data: tuple[np.ndarray, ...]) -> None:
    _, labels, keys = data
    with pytest.raises(ValueError, match="keys"):
        partition("iid", labels, keys[:-1], _options())


# ----------------------------------------------------------------------------------------------
# Natural partitions
# ----------------------------------------------------------------------------------------------


def test_natural_returns_source_split() -> None:
    labels = np.zeros(6, dtype=np.int64)
    natural = (np.array([4, 0]), np.array([1, 2, 3]), np.array([5]))
    parts = partition("natural", labels, np.arange(6, dtype=np.uint64), PartitionOptions(3), natural=natural)
    assert [p.tolist() for p in parts] == [[0, 4], [1, 2, 3], [5]]
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize(
    ("natural", "message"),
    [
        (None, "natural partitions"),
        ((np.array([0, 1]), np.array([2, 3])), "num_partitions=3"),
        ((np.array([0, 1]), np.array([1, 2]), np.array([3])), "overlap"),
        ((np.array([0]), np.array([1]), np.array([9])), "indices"),
    ],
)
def test_natural_errors(natural: tuple[np.ndarray, ...] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(
            "natural", np.zeros(6, dtype=np.int64), np.arange(6, dtype=np.uint64), PartitionOptions(3), natural=natural
        )


# ----------------------------------------------------------------------------------------------
# Keys and summary
# ----------------------------------------------------------------------------------------------


def test_example_keys_definition_and_order() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    y = np.array([0, 1, 0], dtype=np.int64)
    keys = example_keys(x, y)
    assert keys.dtype == np.uint64
    digest = hashlib.blake2b(x[1].tobytes(), digest_size=8)
    digest.update(y[1].tobytes())
    assert int(keys[1]) == int.from_bytes(digest.digest(), "little")
    # Keys follow the examples, not their positions; torch and numpy inputs agree.
    assert np.array_equal(example_keys(x[::-1].copy(), y[::-1].copy()), keys[::-1])
    assert np.array_equal(example_keys(torch.from_numpy(x), torch.from_numpy(y)), keys)
    # The label is part of the key.
    assert example_keys(x[:1], np.array([1]))[0] != keys[0]
    assert len(set(keys.tolist())) == 3


def test_partition_summary_hand_computed() -> None:
    labels = np.array([0, 1, 1, 2, 0, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 5, 6]), np.array([4])]
    summary = partition_summary(labels, parts, num_classes=4)
    expected = pd.DataFrame(
        {
            "partition": [0, 1, 2],
            "num_examples": [3, 3, 1],
            "label_0": [1, 0, 1],
            "label_1": [2, 0, 0],
            "label_2": [0, 3, 0],
            "label_3": [0, 0, 0],
        }
    )
    pd.testing.assert_frame_equal(summary, expected, check_dtype=False)


def test_partition_summary_regression() -> None:
    summary = partition_summary(np.linspace(0, 1, 5), [np.array([0, 1]), np.array([2, 3, 4])], num_classes=None)
    assert list(summary.columns) == ["partition", "num_examples"]
    assert summary["num_examples"].tolist() == [2, 3]


# ----------------------------------------------------------------------------------------------
# load_partition
# ----------------------------------------------------------------------------------------------


def _small_source(n: int = 200) -> Source:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, 3)).astype(np.float32))
    y = torch.from_numpy(np.arange(n) % 4)
    data = TensorData(x=x, y=y)
    return Source(name="toy", task="classification", num_classes=4, input_shape=(3,), train=data, test=data)


def test_load_partition_local_split() -> None:
    clear_partition_cache()
    source = _small_source()
    options = PartitionOptions(num_partitions=4)
    parts = partition("iid", source.train.y.numpy(), example_keys(source.train.x, source.train.y), options)
    for pid in range(4):
        train, local = load_partition(source, "iid", options, pid)
        assert (len(train), len(local)) == (45, 5)  # 50 per partition, 10% held out
        rows = {tuple(r) for r in torch.cat([train.x, local.x]).tolist()}
        assert rows == {tuple(r) for r in source.train.x[torch.from_numpy(parts[pid])].tolist()}
        assert not {tuple(r) for r in train.x.tolist()} & {tuple(r) for r in local.x.tolist()}


def test_load_partition_small_partitions() -> None:
    clear_partition_cache()
    source = _small_source(n=3)
    options = PartitionOptions(num_partitions=2)
    sizes = sorted((len(t), len(v)) for t, v in (load_partition(source, "iid", options, pid) for pid in range(2)))
    assert sizes == [(1, 0), (1, 1)]  # partitions of 1 and 2 examples


def test_load_partition_memoized(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_partition_cache()
    calls: list[str] = []
    original = PARTITIONERS["dirichlet"]

    def counting(labels: np.ndarray, keys: np.ndarray, options: PartitionOptions) -> list[np.ndarray]:
        calls.append("dirichlet")
        return original(labels, keys, options)

    monkeypatch.setitem(partitioners_module.PARTITIONERS, "dirichlet", counting)
    options = PartitionOptions(num_partitions=4)
    first = load_partition(_small_source(), "dirichlet", options, 1)
    # A new but identical source object hits the same cache entry.
    second = load_partition(_small_source(), "dirichlet", options, 1)
    load_partition(_small_source(), "dirichlet", options, 2)
    assert calls == ["dirichlet"]
    assert first[0] is second[0]
    load_partition(_small_source(), "dirichlet", PartitionOptions(num_partitions=4, seed=1), 1)
    assert calls == ["dirichlet", "dirichlet"]
    clear_partition_cache()


@pytest.mark.parametrize("pid", [-1, 4])
def test_load_partition_id_out_of_range(pid: int) -> None:
    with pytest.raises(ValueError, match="partition_id"):
        load_partition(_small_source(), "iid", PartitionOptions(num_partitions=4), pid)


def test_load_partition_natural_synthetic() -> None:
    clear_partition_cache()
    source = load_source("synthetic", SourceOptions(num_samples=600, num_partitions=5, num_features=8))
    assert source.natural_partitions is not None
    options = PartitionOptions(num_partitions=5)
    for pid, natural in enumerate(source.natural_partitions):
        train, local = load_partition(source, "natural", options, pid)
        assert len(train) + len(local) == natural.size
    with pytest.raises(ValueError, match="num_partitions=4"):
        load_partition(source, "natural", PartitionOptions(num_partitions=4), 0)
    clear_partition_cache()


@pytest.mark.parametrize("name", ["quantity-skew", "sorted"])
def test_load_partition_diabetes_non_iid(name: str) -> None:
    clear_partition_cache()
    source = load_source("diabetes", SourceOptions())
    options = PartitionOptions(num_partitions=4, quantity_alpha=0.5, min_partition_size=10)
    loaded = [load_partition(source, name, options, p) for p in range(4)]
    assert sum(len(t) + len(v) for t, v in loaded) == len(source.train)
    assert all(t.y.shape[1:] == (1,) and t.y.dtype == torch.float32 for t, _ in loaded)
    if name == "sorted":  # each site a range of disease progression, in order
        assert [float(t.y.max()) <= float(u.y.min()) for (t, _), (u, _) in itertools.pairwise(loaded)] == [True] * 3
    else:
        sizes = [len(t) for t, _ in loaded]
        assert max(sizes) > 2 * min(sizes), sizes
    clear_partition_cache()


def test_load_partition_regression_iid() -> None:
    clear_partition_cache()
    source = load_source("linear", SourceOptions(num_samples=200))
    train, local = load_partition(source, "iid", PartitionOptions(num_partitions=4), 0)
    assert train.y.shape[1:] == (1,) and len(train) + len(local) == 40
    with pytest.raises(ValueError, match="needs class labels"):
        load_partition(source, "dirichlet", PartitionOptions(num_partitions=4), 0)
    clear_partition_cache()
