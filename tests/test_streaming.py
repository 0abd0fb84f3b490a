"""In-place weighted means: blocked over all clients, and streaming one client at a time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.aggregators import AGGREGATORS, AggregatorParams
from strategies.streaming import (
    BLOCK_ELEMENTS,
    StreamingMean,
    blocked_weighted_mean,
    finite_weighted_mean,
    weighted_mean,
)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


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
    with pytest.raises(ValueError, match="weights must be positive and finite; client 1 has weight 0.0"):
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


# --------------------------------------------------------------------------------------------- property tests
# One implementation behind every face: each must equal a float64 numpy reference, for any shapes, weights
# and block size, report exactly the clients holding NaN or Inf, and never write to its inputs.

_VALUES = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
_BLOCKS = st.sampled_from([1, 2, 3, 7, 64, BLOCK_ELEMENTS]) | st.integers(1, 400)


@st.composite
def _round(draw: st.DrawFn, non_empty: bool = False) -> tuple[list[list[np.ndarray]], list[float], int]:
    """Clients (same shapes, float32, read-only), weights and a block size."""
    n = draw(st.integers(1, 6))
    min_side = 1 if non_empty else 0
    shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=min_side, max_side=9)
    shapes = draw(st.lists(shape, min_size=1, max_size=4))
    clients = [[draw(hnp.arrays(np.float32, s, elements=_VALUES)) for s in shapes] for _ in range(n)]
    weights = draw(st.lists(st.integers(1, 10_000).map(float) | st.floats(1e-3, 1e6), min_size=n, max_size=n))
    for client in clients:
        for x in client:
            x.flags.writeable = False
    return clients, weights, draw(_BLOCKS)


def _reference(clients: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    return [
        np.average(np.stack([c[j].astype(np.float64) for c in clients]), axis=0, weights=weights)
        for j in range(len(clients[0]))
    ]


def _assert_close(got: list[np.ndarray] | None, clients: list[list[np.ndarray]], weights: list[float]) -> None:
    assert got is not None
    for j, (g, want) in enumerate(zip(got, _reference(clients, weights), strict=True)):
        assert g.dtype == np.float32 and g.shape == clients[0][j].shape
        scale = max((float(np.abs(c[j]).max()) for c in clients if c[j].size), default=0.0)
        # rtol 1e-5, and 1e-5 of the inputs' magnitude where terms cancel
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * scale + 1e-30)


@settings(max_examples=150, deadline=None)
@given(_round())
def test_every_face_of_the_mean_equals_a_float64_reference_and_leaves_inputs_alone(
    case: tuple[list[list[np.ndarray]], list[float], int],
) -> None:
    clients, weights, block = case
    before = [[x.copy() for x in c] for c in clients]
    blocked, bad = blocked_weighted_mean(clients, weights, block_elements=block)
    assert bad == []
    finite, dropped = finite_weighted_mean(clients, weights, block_elements=block)
    assert dropped == []
    streaming = StreamingMean()
    for c, w in zip(clients, weights):
        streaming.add(c, w)
    for got in (
        blocked,
        finite,
        weighted_mean(clients, weights, block_elements=block),
        weighted_mean(iter(clients), weights),
        AGGREGATORS["mean"](clients, weights, AggregatorParams()),
        streaming.result(),
    ):
        _assert_close(got, clients, weights)
    for c, b in zip(clients, before):
        for x, y in zip(c, b):
            np.testing.assert_array_equal(x, y)


@settings(max_examples=150, deadline=None)
@given(_round(non_empty=True), st.data())
def test_exactly_the_non_finite_clients_are_reported_and_left_out(
    case: tuple[list[list[np.ndarray]], list[float], int], data: st.DataObject
) -> None:
    clients, weights, block = case
    n = len(clients)
    bad = sorted(data.draw(st.sets(st.integers(0, n - 1)), label="bad clients"))
    huge = data.draw(st.booleans(), label="huge finite values in good clients")
    for i in range(n):
        if i in bad or huge:
            j = data.draw(st.integers(0, len(clients[i]) - 1))
            k = data.draw(st.integers(0, clients[i][j].size - 1))
            poison = [np.nan, np.inf, -np.inf] if i in bad else [3e38, -3e38]
            value = data.draw(st.sampled_from(poison))
            arrays = [x.copy() for x in clients[i]]
            arrays[j].reshape(-1)[k] = value
            if i not in bad:
                arrays[j][...] = value  # every value huge: their sum overflows, no value does
            for x in arrays:
                x.flags.writeable = False
            clients[i] = arrays
    assert blocked_weighted_mean(clients, weights, block_elements=block)[1] == bad
    mean, dropped = finite_weighted_mean(clients, weights, block_elements=block)
    assert dropped == bad
    good = [i for i in range(n) if i not in bad]
    if not good:
        assert mean is None
    elif not huge:
        _assert_close(mean, [clients[i] for i in good], [weights[i] for i in good])
    else:
        assert mean is not None and all(np.isfinite(m).all() for m in mean)


def test_finite_weighted_mean_hand_computed() -> None:
    # Client 1 holds a NaN and is left out: (1 * [1, 2] + 3 * [5, 6]) / 4 = [4, 5]
    a, b, c = _f32(1.0, 2.0), _f32(np.nan, 0.0), _f32(5.0, 6.0)
    mean, dropped = finite_weighted_mean([[a], [b], [c]], [1.0, 100.0, 3.0])
    assert dropped == [1]
    assert mean is not None
    np.testing.assert_array_equal(mean[0], [4.0, 5.0])
    assert finite_weighted_mean([[b]], [1.0]) == (None, [0])


def test_the_registered_mean_is_the_one_weighted_mean() -> None:
    data, weights = clients(), [1.0, 2.0, 3.0, 10.0]
    registered = AGGREGATORS["mean"](data, weights, AggregatorParams())
    for got, want in zip(registered, blocked_weighted_mean(data, weights)[0]):
        np.testing.assert_array_equal(got, want)  # bit for bit: the same pass


def test_streaming_mean_names_the_client_at_fault() -> None:
    mean = StreamingMean()
    mean.add([np.zeros(3, np.float32)], 2)
    with pytest.raises(ValueError, match="client 1 has weight -1.0"):
        mean.add([np.zeros(3, np.float32)], -1)
    with pytest.raises(ValueError, match=r"client 1, array 0: shape \(4,\) differs from client 0's \(3,\)"):
        mean.add([np.zeros(4, np.float32)], 1)
    with pytest.raises(ValueError, match="no client was added"):
        StreamingMean().result()
