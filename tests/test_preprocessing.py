"""Federated preprocessing, the data side: mergeable statistics, the shared transform, label agreement."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from datasets import (
    FeatureStats,
    FeatureTransform,
    SourceOptions,
    SumStats,
    agree_class_names,
    check_node_labels,
    class_names_option,
    feature_stats,
    load_source,
    merge_stats,
    pack_class_names,
    present_class_names,
    sum_stats,
    transform_from_stats,
    transform_source,
    unpack_class_names,
)
from datasets import preprocessing as preprocessing_module

# ----------------------------------------------------------------------------------------------
# Statistics, by hand
# ----------------------------------------------------------------------------------------------

TABLE = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0]])


def test_feature_stats_by_hand() -> None:
    stats = feature_stats(torch.tensor(TABLE, dtype=torch.float32))
    assert stats.count == 3
    assert stats.mean.tolist() == [2.0, 30.0]
    # M2: (1-2)^2 + 0 + (3-2)^2 = 2; (10-30)^2 + (20-30)^2 + (60-30)^2 = 400 + 100 + 900 = 1400.
    assert stats.m2.tolist() == [2.0, 1400.0]
    assert stats.minimum.tolist() == [1.0, 10.0] and stats.maximum.tolist() == [3.0, 60.0]
    assert stats.variance().tolist() == pytest.approx([2 / 3, 1400 / 3])


def test_merge_by_hand() -> None:
    a = feature_stats(TABLE[:1])  # n 1, mean (1, 10), M2 0
    b = feature_stats(TABLE[1:])  # n 2, mean (2.5, 40), M2 (0.5, 800)
    assert b.mean.tolist() == [2.5, 40.0] and b.m2.tolist() == [0.5, 800.0]
    merged = a.merge(b)
    # delta = (1.5, 30); mean = a + delta * 2/3 = (2, 30); M2 = 0 + M2_b + delta^2 * 1*2/3 = (0.5 + 1.5, 800 + 600).
    assert merged.count == 3 and merged.mean.tolist() == [2.0, 30.0] and merged.m2.tolist() == [2.0, 1400.0]
    assert merged.minimum.tolist() == [1.0, 10.0] and merged.maximum.tolist() == [3.0, 60.0]


def test_image_statistics_are_per_channel() -> None:
    # 2 images, 2 channels, 1 x 2 pixels: channel 0 holds 0, 1, 2, 3; channel 1 holds 10, 10, 10, 50.
    x = torch.tensor([[[[0.0, 1.0]], [[10.0, 10.0]]], [[[2.0, 3.0]], [[10.0, 50.0]]]])
    stats = feature_stats(x)
    assert stats.count == 4 and stats.mean.tolist() == [1.5, 20.0]
    assert stats.m2.tolist() == [5.0, 1200.0]  # 2.25+0.25+0.25+2.25; 3 * 100 + 900
    assert stats.minimum.tolist() == [0.0, 10.0] and stats.maximum.tolist() == [3.0, 50.0]
    transform = transform_from_stats(stats, "min-max")
    assert transform.offset == (0.0, 10.0) and transform.scale == (3.0, 40.0)
    assert transform.apply(x)[1, 1].tolist() == [[0.0, 1.0]]


def test_sum_stats_by_hand_and_with_a_reference() -> None:
    plain = sum_stats(TABLE)
    assert plain.to_array().tolist() == [3.0, 6.0, 90.0, 14.0, 4100.0]  # 1+4+9; 100+400+3600
    assert plain.mean.tolist() == [2.0, 30.0] and plain.variance().tolist() == pytest.approx([2 / 3, 1400 / 3])
    reference = FeatureTransform.standardize([2.0, 30.0], [1.0, 10.0])  # z = (x - 2, (x - 30) / 10)
    shifted = sum_stats(TABLE, reference)
    assert shifted.to_array().tolist() == [3.0, 0.0, 0.0, 2.0, 14.0]
    assert shifted.mean.tolist() == [2.0, 30.0] and shifted.variance().tolist() == pytest.approx([2 / 3, 1400 / 3])


def test_chunked_statistics_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(5.0, 3.0, (100, 3, 2, 2)).astype(np.float32))
    whole = feature_stats(x)
    monkeypatch.setattr(preprocessing_module, "_CHUNK_ELEMENTS", 24)  # two images a block
    chunked = feature_stats(x)
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(chunked.m2, whole.m2, rtol=1e-12)
    assert np.array_equal(chunked.minimum, whole.minimum) and chunked.count == whole.count == 400


def test_statistics_refuse_what_is_not_features() -> None:
    with pytest.raises(ValueError, match=r"features \(axis-1 indices\) \[1\] hold non-finite"):
        feature_stats(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="token ids are not features"):
        feature_stats(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"N x F"):
        sum_stats(np.zeros(5))
    with pytest.raises(ValueError, match="cannot merge statistics of 2 and 3 features"):
        feature_stats(TABLE).merge(feature_stats(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="no feature statistics to merge"):
        merge_stats([])


# ----------------------------------------------------------------------------------------------
# The merge oracle: statistics merged across any split equal those of the pooled data
# ----------------------------------------------------------------------------------------------

_values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=64)


@st.composite
def _split_table(draw: st.DrawFn) -> tuple[np.ndarray, list[np.ndarray]]:
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 4))
    table = draw(arrays(np.float64, (rows, cols), elements=_values))
    # Random cut points (nodes may hold no row at all).
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=6)))
    return table, np.split(table, cuts)


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: np.ndarray) -> None:
    """|actual - expected| <= atol + rtol |expected|, with a tolerance per feature."""
    error = np.abs(actual - expected)
    assert bool(np.all(error <= atol + rtol * np.abs(expected))), (actual, expected, error)


def _assert_stats_equal(merged: FeatureStats, table: np.ndarray) -> None:
    assert merged.count == table.shape[0]
    np.testing.assert_array_equal(merged.minimum, table.min(0))  # exact: min and max are not rounded
    np.testing.assert_array_equal(merged.maximum, table.max(0))
    scale = np.abs(table).max(0) + 1.0
    # Two-pass float64 over the pooled table is the reference; rounding is relative to the magnitude.
    _assert_close(merged.mean, table.mean(0), 1e-9, 1e-12 * scale)
    pooled_m2 = ((table - table.mean(0)) ** 2).sum(0)
    _assert_close(merged.m2, pooled_m2, 1e-8, 1e-9 * scale**2)


@settings(max_examples=200, deadline=None)
@given(_split_table())
def test_merged_statistics_equal_the_pooled_statistics(case: tuple[np.ndarray, list[np.ndarray]]) -> None:
    table, parts = case
    node_stats = [feature_stats(p) if len(p) else FeatureStats.empty(table.shape[1]) for p in parts]
    # Through the wire form, as the nodes' replies travel.
    received = [FeatureStats.from_array(s.to_array()) for s in node_stats]
    _assert_stats_equal(merge_stats(received), table)
    _assert_stats_equal(merge_stats(reversed(received)), table)  # the order of replies does not matter


@settings(max_examples=200, deadline=None)
@given(_split_table())
def test_summed_statistics_equal_the_pooled_mean_and_variance(case: tuple[np.ndarray, list[np.ndarray]]) -> None:
    table, parts = case
    reference = FeatureTransform.standardize(np.median(table, 0).tolist(), (table.std(0) + 1.0).tolist())
    # What secure aggregation hands the server: the elementwise sum of the nodes' arrays, here with
    # each array weighted by n / 1000 as the project's SecAgg+ weights replies (only count scales).
    # The per-example means of each node (sums / n), weighted by n / 1000: the sum is (count, sum, sum z^2) / 1000.
    summed = sum(len(p) / 1000 * (sum_stats(p, reference).to_array() / len(p)) for p in parts if len(p))
    stats = SumStats.from_array(np.asarray(summed), reference)
    assert stats.count == pytest.approx(len(table) / 1000)  # only the count is scaled
    scale = np.abs(table).max(0) + 1.0
    _assert_close(stats.mean, table.mean(0), 1e-9, 1e-10 * scale)
    # E[z^2] - E[z]^2 cancels: its absolute error is about eps * (spread of z)^2, scaled back.
    _assert_close(stats.variance(), table.var(0), 1e-7, 1e-8 * scale**2)


def test_sum_stats_add_up_as_arrays_do() -> None:
    a, b = sum_stats(TABLE[:2]), sum_stats(TABLE[2:])
    np.testing.assert_array_equal((a + b).to_array(), a.to_array() + b.to_array())
    with pytest.raises(ValueError, match="same reference transform"):
        _ = a + sum_stats(TABLE, FeatureTransform.standardize([0.0, 0.0], [1.0, 2.0]))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(4), r"1 \+ 4 x features values, got 4"),
        (np.array([2.0, 0.0, -1.0, 0.0, 0.0]), "negative M2"),
        (np.array([2.0, 0.0, 0.0, 3.0, 1.0]), "min above its max"),
        (np.array([1.5, 0.0, 0.0, 0.0, 0.0]), "whole number"),
        (np.array([2.0, 0.0, 0.0, np.inf, 1.0]), r"positions \[3\] hold non-finite"),
    ],
)
def test_feature_stats_arrays_are_checked(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureStats.from_array(array)


def test_empty_node_travels_finite_and_merges_as_nothing() -> None:
    empty = FeatureStats.empty(2)
    wire = empty.to_array()
    assert bool(np.all(np.isfinite(wire))) and wire.tolist() == [0.0] * 9
    back = FeatureStats.from_array(wire)
    merged = merge_stats([back, feature_stats(TABLE), back])
    assert merged.mean.tolist() == [2.0, 30.0] and merged.minimum.tolist() == [1.0, 10.0]


# ----------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------


def test_standardize_and_min_max_by_hand() -> None:
    stats = feature_stats(TABLE)
    standardize = transform_from_stats(stats, "standardize")
    assert standardize.offset == (2.0, 30.0)
    assert standardize.scale == pytest.approx((math.sqrt(2 / 3), math.sqrt(1400 / 3)))
    min_max = transform_from_stats(stats, "min-max")
    assert min_max.offset == (1.0, 10.0) and min_max.scale == (2.0, 50.0)
    assert min_max.apply(torch.tensor(TABLE)).tolist() == [[0.0, 0.0], [0.5, 0.2], [1.0, 1.0]]


def test_a_constant_feature_is_only_shifted() -> None:
    table = np.array([[0.1, 1.0], [0.1, 2.0], [0.1, 4.0]])
    stats = feature_stats(table)
    assert 0.0 <= stats.std()[0] < 1e-15  # the rounding of a constant column, not a spread
    assert transform_from_stats(stats, "standardize").scale[0] == 1.0
    assert transform_from_stats(stats, "min-max").scale[0] == 1.0


def test_min_max_needs_min_and_max_which_secure_aggregation_cannot_sum() -> None:
    with pytest.raises(ValueError, match="not sums.*standardization only"):
        transform_from_stats(sum_stats(TABLE), "min-max")
    with pytest.raises(ValueError, match="unknown transform kind 'zscore'; choose one of: standardize, min-max"):
        transform_from_stats(feature_stats(TABLE), "zscore")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(_values, st.floats(min_value=1e-30, max_value=1e30)), min_size=1, max_size=8),
    st.sampled_from(["standardize", "min-max"]),
)
def test_transform_text_round_trips_exactly(pairs: list[tuple[float, float]], kind: str) -> None:
    transform = FeatureTransform(kind, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))
    assert FeatureTransform.from_strings(*transform.to_strings()) == transform


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("standardize", (0.0,), (0.0,)), "scales must be > 0"),
        (("standardize", (0.0, 1.0), (1.0,)), "one offset and one scale per feature"),
        (("standardize", (math.nan,), (1.0,)), "must be finite"),
        (("robust", (0.0,), (1.0,)), "unknown transform kind 'robust'"),
    ],
)
def test_invalid_transforms(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureTransform(*args)  # type: ignore[arg-type]


def test_transform_text_names_the_bad_number() -> None:
    with pytest.raises(ValueError, match="feature transform scale: 'x' is not a number"):
        FeatureTransform.from_strings("standardize", "1,2", "1,x")


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, (6, 3), elements=st.floats(-1e4, 1e4, width=32)), st.integers(0, 5), st.integers(0, 5))
def test_same_raw_value_same_input_on_two_nodes(rows: np.ndarray, i: int, j: int) -> None:
    # Node A holds row i among its rows; node B holds the same raw row among different rows (other batch,
    # other position, other neighbours). One transform: the same bits.
    transform = FeatureTransform.standardize([1.5, -20.0, 300.0], [0.7, 11.0, 4000.0])
    node_a = torch.from_numpy(rows)
    node_b = torch.cat([torch.from_numpy(rows[::-1].copy()) * 3, node_a[i : i + 1]])
    assert torch.equal(transform.apply(node_a)[i], transform.apply(node_b)[-1])
    assert torch.equal(transform.apply(node_a[i : i + 1])[0], transform.apply(node_a)[i])
    del j


# ----------------------------------------------------------------------------------------------
# The whole data-side pipeline on real data: nodes' raw statistics -> one transform -> pooled z-scores
# ----------------------------------------------------------------------------------------------


def test_federated_standardization_equals_standardizing_the_pooled_data() -> None:
    raw = load_source("breast-cancer", SourceOptions(normalization="none", seed=0))
    x = raw.train.x
    nodes = [x[:50], x[50:300], x[300:]]  # three hospitals of very different sizes
    merged = merge_stats(FeatureStats.from_array(feature_stats(n).to_array()) for n in nodes)
    transform = transform_from_stats(merged, "standardize")
    pooled = x.double()
    np.testing.assert_allclose(transform.offset, pooled.mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(transform.scale, pooled.std(0, unbiased=False).numpy(), rtol=1e-10)
    z = torch.cat([transform.apply(n) for n in nodes])
    torch.testing.assert_close(z.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(30), atol=1e-5, rtol=0)
    # The server applies the same transform to its held-out split.
    server = transform_source(raw, transform)
    assert torch.equal(server.train.x, transform.apply(x))
    with pytest.raises(ValueError, match="already normalized"):
        transform_source(server, transform)


# ----------------------------------------------------------------------------------------------
# Label agreement
# ----------------------------------------------------------------------------------------------


def test_agreed_class_names_are_the_sorted_union() -> None:
    assert agree_class_names([["benign"], ["malignant", "benign"], []]) == ("benign", "malignant")
    # Integer labels sort by value, as one file holding all of them would sort them.
    assert agree_class_names([["10", "2"], ["1"]]) == ("1", "2", "10")
    assert agree_class_names([["b", "10"], ["a"]]) == ("10", "a", "b")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["0", "1", "7", "12", "cat", "dog", "é"]), max_size=5), min_size=1, max_size=5), st.randoms())
def test_agreement_does_not_depend_on_the_order_of_reports(reports: list[list[str]], rnd: object) -> None:
    union = {n for r in reports for n in r}
    if len(union) < 2:
        with pytest.raises(ValueError, match="a classifier needs two or more"):
            agree_class_names(reports)
        return
    agreed = agree_class_names(reports)
    shuffled = [list(reversed(r)) for r in reversed(reports)]
    assert agree_class_names(shuffled) == agreed and set(agreed) == union
    for report in reports:
        mismatch = check_node_labels("node 1", report, agreed)
        assert set(mismatch.missing) == union - set(report) and not mismatch.extra


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "missing value"), (" cat", "not a label as the loaders read it"), ("1.5", "not an integer"), (3, "class names are text")],
)
def test_agreement_refuses_names_the_loaders_cannot_give(name: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"hospital-b: .*{message}"):
        agree_class_names([["a", "b"], ["a", name]], nodes=["hospital-a", "hospital-b"])  # type: ignore[list-item]


def test_a_node_with_a_label_outside_the_agreed_list_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"node 7: labels not in class_names \(benign, malignant\): unknown"):
        check_node_labels("node 7", ["benign", "unknown"], ("benign", "malignant"))


def test_agreed_list_reaches_the_loaders(tmp_path: Path) -> None:
    # Two owners: one holds classes b and c, the other a and b. Agreed: a, b, c; each loads with it.
    (tmp_path / "one.csv").write_text("f,label\n1,b\n2,c\n3,b\n4,c\n5,b\n")
    (tmp_path / "two.csv").write_text("f,label\n1,a\n2,b\n3,a\n4,b\n5,a\n")
    own = [load_source("csv", SourceOptions(path=str(tmp_path / f"{n}.csv"))) for n in ("one", "two")]
    assert own[0].class_names == ("b", "c") and own[1].class_names == ("a", "b")  # index 0 disagrees
    reports = [unpack_class_names(pack_class_names(present_class_names(s))) for s in own]
    agreed = agree_class_names(reports)
    assert agreed == ("a", "b", "c")
    option = class_names_option(agreed)
    loaded = [load_source("csv", SourceOptions(path=str(tmp_path / f"{n}.csv"), class_names=option)) for n in ("one", "two")]
    assert all(s.class_names == agreed for s in loaded)


def test_class_names_travel_as_text_and_commas_cannot_enter_the_option() -> None:
    names = ("a,b", 'quote"d', "é")
    assert unpack_class_names(pack_class_names(names)) == names
    with pytest.raises(ValueError, match="JSON list of strings"):
        unpack_class_names('["a", 1]')
    with pytest.raises(ValueError, match=r"\['a,b'\] hold a comma"):
        class_names_option(names)
