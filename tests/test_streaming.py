"""In-place weighted means: blocked over all clients, and streaming one client at a time."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.streaming import StreamingMean, blocked_weighted_mean


def clients(n: int = 4, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=(37, 11)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)] for _ in range(n)]


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 17])
def test_blocked_mean_equals_numpy_average_for_any_block_size(block: int) -> None:
    data, weights = clients(), [1.0, 2.0, 3.0, 10.0]
    got, bad = blocked_weighted_mean(data, weights, block_elements=block)
    assert bad == []
    for j in range(2):
        want = np.average(np.stack([c[j].astype(np.float64) for c in data]), axis=0, weights=weights)
        np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-6)
        assert got[j].dtype == np.float32 and got[j].shape == data[0][j].shape


def test_blocked_mean_hand_computed_and_reads_read_only_views() -> None:
    a = np.array([1.0, 2.0], np.float32)
    b = np.array([3.0, 4.0], np.float32)
    a.flags.writeable = False
    got, _ = blocked_weighted_mean([[a], [b]], [1, 3])
    np.testing.assert_allclose(got[0], [2.5, 3.5])
    np.testing.assert_array_equal(a, [1.0, 2.0])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_blocked_mean_reports_non_finite_clients(bad_value: float) -> None:
    data = clients(5)
    data[3][1][2] = bad_value
    data[1][0][36, 10] = bad_value  # in the last block only
    _, bad = blocked_weighted_mean(data, [1.0] * 5, block_elements=16)
    assert bad == [1, 3]


def test_huge_but_finite_values_are_not_reported() -> None:
    data = [[np.full(8, 3e38, np.float32)], [np.full(8, 3e38, np.float32)]]  # the sum overflows, values do not
    _, bad = blocked_weighted_mean(data, [1.0, 1.0])
    assert bad == []


def test_bad_weights_and_shapes_raise() -> None:
    with pytest.raises(ValueError, match="weight of client 1 must be positive"):
        blocked_weighted_mean(clients(2), [1.0, 0.0])
    with pytest.raises(ValueError, match="client 1, array 0"):
        blocked_weighted_mean([[np.zeros(3, np.float32)], [np.zeros(4, np.float32)]], [1.0, 1.0])


def test_streaming_mean_equals_blocked_mean() -> None:
    data, weights = clients(), [3.0, 1.0, 4.0, 1.0]
    mean = StreamingMean()
    for c, w in zip(data, weights):
        mean.add(c, w)
    for s, b in zip(mean.result(), blocked_weighted_mean(data, weights)[0]):
        np.testing.assert_allclose(s, b, rtol=1e-5, atol=1e-6)
