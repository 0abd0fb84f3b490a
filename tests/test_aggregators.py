"""Tests for strategies.aggregators: hand-computed values, a float64 reference, streaming, robustness."""

from __future__ import annotations

import gc
import re
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from strategies.aggregators import (
    AGGREGATOR_PARAMS_USED,
    AGGREGATORS,
    AggregatorParams,
    NDArrays,
    coordinate_median,
    fednova_combine,
    get_aggregator,
    krum,
    krum_scores,
    trimmed_mean,
    weighted_mean,
)


def _arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _assert_arrays_equal(got: NDArrays, want: NDArrays, atol: float = 0.0) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == np.shape(w)
        np.testing.assert_allclose(g, w, rtol=0.0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# weighted_mean
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_mean_hand_computed() -> None:
    clients = [
        [_arr(1.0, 2.0), np.array(3.0, dtype=np.float32)],
        [_arr(3.0, 6.0), np.array(7.0, dtype=np.float32)],
    ]
    # (1 * [1, 2] + 3 * [3, 6]) / 4 = [10, 20] / 4 = [2.5, 5];  (1 * 3 + 3 * 7) / 4 = 24 / 4 = 6
    out = weighted_mean(clients, [1.0, 3.0])
    _assert_arrays_equal(out, [_arr(2.5, 5.0), np.array(6.0)])
    assert all(x.dtype == np.float32 for x in out)


def test_weighted_mean_matches_numpy_float64_reference() -> None:
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (13,), (), (2, 3, 4)]
    clients = [
        [rng.normal(size=s).astype(np.float32 if j % 2 == 0 else np.float64) for j, s in enumerate(shapes)]
        for _ in range(10)
    ]
    weights = rng.integers(1, 1000, size=10).astype(float).tolist()
    out = weighted_mean(clients, weights)
    for j, shape in enumerate(shapes):
        ref = np.average(np.stack([np.asarray(c[j], dtype=np.float64) for c in clients]), axis=0, weights=weights)
        assert out[j].shape == shape and out[j].dtype == np.float32
        np.testing.assert_allclose(out[j], ref, rtol=1e-6, atol=1e-6)


class _Client(list):  # type: ignore[type-arg]
    """A list that can be weakly referenced, to see when the aggregator lets go of a client."""


def test_weighted_mean_streams_a_generator_once_one_client_at_a_time() -> None:
    rng = np.random.default_rng(1)
    values = [rng.normal(size=(50,)).astype(np.float32) for _ in range(6)]
    refs: list[weakref.ref[_Client]] = []
    produced = 0

    def clients() -> Iterator[_Client]:
        nonlocal produced
        for k, v in enumerate(values):
            # When client k is requested, only client k - 1 may still be referenced (by the caller's loop variable).
            alive = [i for i, r in enumerate(refs[: max(k - 1, 0)]) if r() is not None]
            assert not alive, f"clients {alive} still referenced while producing client {k}"
            client = _Client([v.copy()])
            refs.append(weakref.ref(client))
            produced += 1
            yield client
            del client

    gen = clients()
    out = weighted_mean(gen, [1.0] * 6)
    assert produced == 6
    assert next(gen, None) is None  # exhausted, not restarted
    np.testing.assert_allclose(out[0], np.mean(values, axis=0), rtol=1e-6, atol=1e-6)


def test_weighted_mean_streaming_test_can_fail_on_a_hoarding_aggregator() -> None:
    """The reference check above must catch an aggregator that materializes all clients first."""
    refs: list[weakref.ref[_Client]] = []

    def clients() -> Iterator[_Client]:
        for k in range(4):
            alive = [i for i, r in enumerate(refs[: max(k - 1, 0)]) if r() is not None]
            assert not alive
            client = _Client([np.ones(3, dtype=np.float32)])
            refs.append(weakref.ref(client))
            yield client
            del client

    with pytest.raises(AssertionError):
        weighted_mean(list(clients()), [1.0] * 4)


def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:
        return False
    return True


def test_weighted_mean_peak_memory_is_about_one_model() -> None:
    if not _reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    size = 4_000_000
    model_kib = size * 4 // 1024
    rng = np.random.default_rng(2)
    clients = [[rng.standard_normal(size, dtype=np.float32)] for _ in range(5)]
    # Warm up torch's thread pool with arrays small enough not to leave a model-sized block in the heap.
    weighted_mean([[np.ones(100_000, np.float32)]] * 2, [1.0, 2.0])
    gc.collect()
    assert _reset_peak_rss()
    before = _proc_status_kib("VmRSS")
    out = weighted_mean(iter(clients), [1.0, 2.0, 3.0, 4.0, 5.0])
    extra_kib = _proc_status_kib("VmHWM") - before
    # The result itself is one model; a weighted temporary per client would make it at least two.
    assert extra_kib < 1.5 * model_kib, f"peak extra {extra_kib} KiB for a {model_kib} KiB model"
    np.testing.assert_allclose(
        out[0][:1000], np.average([c[0][:1000] for c in clients], axis=0, weights=[1, 2, 3, 4, 5]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_weighted_mean_rejects_bad_weights(bad: float) -> None:
    with pytest.raises(ValueError, match="client 1 has weight"):
        weighted_mean([[_arr(1.0)], [_arr(2.0)]], [1.0, bad])


def test_weighted_mean_rejects_count_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="got 2 clients but 3 weights"):
        weighted_mean([[_arr(1.0)], [_arr(2.0)]], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="more clients than the 1 weights"):
        weighted_mean([[_arr(1.0)], [_arr(2.0)]], [1.0])
    with pytest.raises(ValueError, match=r"client 1, array 1: shape \(3,\) differs from client 0's \(2,\)"):
        weighted_mean([[_arr(1.0), _arr(1.0, 2.0)], [_arr(1.0), _arr(1.0, 2.0, 3.0)]], [1.0, 1.0])
    with pytest.raises(ValueError, match="client 1 has 1 arrays; client 0 has 2"):
        weighted_mean([[_arr(1.0), _arr(1.0)], [_arr(1.0)]], [1.0, 1.0])
    with pytest.raises(ValueError, match="non-empty"):
        weighted_mean([], [])


def test_weighted_mean_accepts_read_only_and_non_contiguous_arrays_without_warning() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    a.flags.writeable = False
    b = np.arange(12, dtype=np.float32).reshape(2, 6)[:, ::-2]  # negative stride view
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = weighted_mean([[a], [b]], [1.0, 1.0])
    np.testing.assert_allclose(out[0], (a + b) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Coordinate-wise robust rules
# ---------------------------------------------------------------------------------------------------------------


def test_coordinate_median_hand_computed_odd_and_even() -> None:
    odd = [[_arr(1, 5, 2)], [_arr(10, -1, 4)], [_arr(3, 0, 100)]]
    # med(1, 10, 3) = 3; med(5, -1, 0) = 0; med(2, 4, 100) = 4
    _assert_arrays_equal(coordinate_median(odd, [1, 1, 1]), [_arr(3, 0, 4)])
    even = [*odd, [_arr(0, 0, 0)]]
    # sorted (0, 1, 3, 10) -> (1 + 3) / 2 = 2; (-1, 0, 0, 5) -> 0; (0, 2, 4, 100) -> (2 + 4) / 2 = 3
    _assert_arrays_equal(coordinate_median(even, [1, 1, 1, 1]), [_arr(2, 0, 3)])


def test_coordinate_median_ignores_weights() -> None:
    clients = [[_arr(1.0)], [_arr(2.0)], [_arr(30.0)]]
    assert coordinate_median(clients, [1, 1, 1])[0][0] == coordinate_median(clients, [1, 1, 1000])[0][0] == 2.0


def test_trimmed_mean_hand_computed() -> None:
    clients = [[_arr(v, w)] for v, w in [(1, -50), (2, 0), (3, 1), (4, 2), (100, 3)]]
    # trim 0.2 of 5 -> k = 1 from each end: mean(2, 3, 4) = 3; mean(0, 1, 2) = 1
    _assert_arrays_equal(trimmed_mean(clients, [1] * 5, 0.2), [_arr(3, 1)])
    # trim 0 -> plain unweighted mean: 110 / 5 = 22; -44 / 5 = -8.8
    _assert_arrays_equal(trimmed_mean(clients, [1] * 5, 0.0), [_arr(22, -8.8)], atol=1e-5)
    # trim 0.29 of 100 values trims 29 from each end, despite 0.29 * 100 == 28.999999999999996
    many = [[_arr(float(i))] for i in range(100)]
    _assert_arrays_equal(trimmed_mean(many, [1] * 100, 0.29), [_arr(49.5)])


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_rejects_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean([[_arr(1.0)]] * 3, [1, 1, 1], bad)


# ---------------------------------------------------------------------------------------------------------------
# Krum
# ---------------------------------------------------------------------------------------------------------------


def _krum_clients() -> list[NDArrays]:
    # One scalar coordinate per client (values 0, 1, 2, 4, 100) plus a zero block that adds no distance.
    return [[_arr(v), np.zeros((2, 2), np.float32)] for v in (0.0, 1.0, 2.0, 4.0, 100.0)]


def test_krum_scores_hand_computed() -> None:
    # n = 5, f = 1 -> each client sums its n - f - 2 = 2 smallest squared distances:
    # 0: {1, 4, 16, 10000} -> 1 + 4 = 5       1: {1, 1, 9, 9801} -> 2        2: {4, 1, 4, 9604} -> 5
    # 4: {16, 9, 4, 9216} -> 4 + 9 = 13      100: {10000, 9801, 9604, 9216} -> 9216 + 9604 = 18820
    np.testing.assert_allclose(krum_scores(_krum_clients(), 1), [5, 2, 5, 13, 18820], rtol=1e-12)


def test_krum_picks_the_central_client_and_multi_krum_averages_the_best() -> None:
    clients = _krum_clients()
    out = krum(clients, [1, 1, 2, 1, 1], num_byzantine=1)
    _assert_arrays_equal(out, [_arr(1.0), np.zeros((2, 2))])
    # m = 3: clients 1 (score 2), 0 and 2 (score 5): (1 * 0 + 1 * 1 + 2 * 2) / (1 + 1 + 2) = 5 / 4
    out = krum(clients, [1, 1, 2, 1, 1], num_byzantine=1, num_selected=3)
    _assert_arrays_equal(out, [_arr(1.25), np.zeros((2, 2))])


def test_krum_requires_2f_plus_3_clients() -> None:
    with pytest.raises(ValueError, match=r"n=4 with f=1 \(needs at least 5\)"):
        krum(_krum_clients()[:4], [1] * 4, num_byzantine=1)
    with pytest.raises(ValueError, match="num_selected"):
        krum(_krum_clients(), [1] * 5, num_byzantine=1, num_selected=6)
    with pytest.raises(ValueError, match="num_byzantine"):
        krum(_krum_clients(), [1] * 5, num_byzantine=-1)


def test_krum_distances_are_accurate_far_from_the_origin_and_across_chunks() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=300_000).astype(np.float64) * 1e5  # > one distance chunk, large offset
    clients = [[(base + rng.normal(size=base.size) * s).astype(np.float32)] for s in (1.0, 1.0, 1.0, 1.0, 5.0)]
    flat = [c[0].astype(np.float64) for c in clients]
    dist = np.array([[np.sum((a - b) ** 2) for b in flat] for a in flat])
    want = [np.sort(np.delete(dist[i], i))[:2].sum() for i in range(5)]
    np.testing.assert_allclose(krum_scores(clients, 1), want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Robustness: 2 of 10 clients corrupted
# ---------------------------------------------------------------------------------------------------------------

_SIGMA = 0.1
_ROBUST = {
    "median": AggregatorParams(),
    "trimmed-mean": AggregatorParams(trim_fraction=0.2),
    "krum": AggregatorParams(num_byzantine=2),
    "multi-krum": AggregatorParams(num_byzantine=2),
}


def _corrupt(update: NDArrays, attack: str, rng: np.random.Generator) -> NDArrays:
    if attack == "scaled":
        return [x * 1e6 for x in update]
    if attack == "sign-flip":
        return [x * -10.0 for x in update]
    if attack == "gaussian":
        return [rng.normal(0.0, 100.0, size=x.shape).astype(np.float32) for x in update]
    if attack == "nan":
        return [np.full_like(x, np.nan) for x in update]
    raise AssertionError(attack)


@pytest.mark.parametrize("attack", ["scaled", "sign-flip", "gaussian", "nan"])
@pytest.mark.parametrize("name", sorted(_ROBUST))
def test_robust_aggregators_resist_two_corrupted_clients(name: str, attack: str) -> None:
    rng = np.random.default_rng(4)
    shapes = [(40,), (5, 6)]
    mu = [rng.normal(size=s).astype(np.float32) for s in shapes]
    honest = [[(m + _SIGMA * rng.normal(size=m.shape)).astype(np.float32) for m in mu] for _ in range(10)]
    clients = [_corrupt(u, attack, rng) if i in (3, 7) else u for i, u in enumerate(honest)]
    weights = [100.0] * 10
    honest_mean = weighted_mean([u for i, u in enumerate(honest) if i not in (3, 7)], [1.0] * 8)

    def err(out: NDArrays) -> float:
        return float(
            np.sqrt(sum(np.sum((o.astype(np.float64) - h) ** 2) for o, h in zip(out, honest_mean, strict=True)))
        )

    within_honest_spread = 2 * _SIGMA * np.sqrt(sum(np.prod(s) for s in shapes))  # ~ 2x one honest client's distance
    robust_err = err(get_aggregator(name)(clients, weights, _ROBUST[name]))
    assert robust_err < within_honest_spread
    mean_err = err(weighted_mean(clients, weights))
    assert not np.isfinite(mean_err) or mean_err > 10 * within_honest_spread


# ---------------------------------------------------------------------------------------------------------------
# Contract tests over the registry
# ---------------------------------------------------------------------------------------------------------------


def _contract_clients(rng: np.random.Generator, n: int = 7) -> list[NDArrays]:
    return [[rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)] for _ in range(n)]


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_registry_rules_are_translation_equivariant(name: str) -> None:
    rng = np.random.default_rng(5)
    clients = _contract_clients(rng)
    weights = rng.integers(1, 50, size=len(clients)).astype(float).tolist()
    shift = [np.full((3, 2), 3.0, np.float32), np.full((4,), -2.0, np.float32)]
    params = AggregatorParams(num_byzantine=1)
    base = AGGREGATORS[name](clients, weights, params)
    moved = AGGREGATORS[name]([[x + s for x, s in zip(c, shift, strict=True)] for c in clients], weights, params)
    assert [x.dtype for x in base] == [np.float32, np.float32]
    assert [x.shape for x in base] == [(3, 2), (4,)]
    _assert_arrays_equal(moved, [b + s for b, s in zip(base, shift, strict=True)], atol=1e-5)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_registry_rules_return_the_common_value_of_identical_clients(name: str) -> None:
    value = [np.arange(6, dtype=np.float32).reshape(3, 2), _arr(-1.0, 0.5)]
    out = AGGREGATORS[name]([[x.copy() for x in value] for _ in range(5)], [1, 2, 3, 4, 5], AggregatorParams())
    _assert_arrays_equal(out, value, atol=1e-6)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_registry_rules_reject_inconsistent_shapes_and_do_not_mutate_inputs(name: str) -> None:
    rng = np.random.default_rng(6)
    clients = _contract_clients(rng)
    before = [[x.copy() for x in c] for c in clients]
    AGGREGATORS[name](clients, [1.0] * 7, AggregatorParams())
    for c, b in zip(clients, before, strict=True):
        _assert_arrays_equal(c, b)
    clients[4] = [clients[4][0], np.zeros((5,), np.float32)]
    with pytest.raises(ValueError, match="client 4, array 1"):
        AGGREGATORS[name](clients, [1.0] * 7, AggregatorParams())


def test_registry_names_and_params_table_agree() -> None:
    assert set(AGGREGATORS) == set(AGGREGATOR_PARAMS_USED) == {"mean", "median", "trimmed-mean", "krum", "multi-krum"}
    fields = set(AggregatorParams.__dataclass_fields__)
    assert all(used <= fields for used in AGGREGATOR_PARAMS_USED.values())


def test_get_aggregator_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        get_aggregator("avg")
    assert str(info.value) == "unknown aggregator 'avg'; choose one of: krum, mean, median, multi-krum, trimmed-mean"
    assert get_aggregator("median") is AGGREGATORS["median"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"trim_fraction": -0.1}, "trim_fraction"),
        ({"num_byzantine": -1}, "num_byzantine"),
        ({"num_byzantine": 1.5}, "num_byzantine"),
        ({"num_selected": -1}, "num_selected"),
    ],
)
def test_aggregator_params_validate_themselves(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AggregatorParams(**kwargs)  # type: ignore[arg-type]


def test_multi_krum_default_selects_n_minus_f() -> None:
    clients = _krum_clients()  # scores 5, 2, 5, 13, 18820; f = 1 -> m = 4 drops client 4 (value 100)
    out = AGGREGATORS["multi-krum"](clients, [1] * 5, AggregatorParams(num_byzantine=1))
    _assert_arrays_equal(out, [_arr((0 + 1 + 2 + 4) / 4), np.zeros((2, 2))], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# FedNova
# ---------------------------------------------------------------------------------------------------------------


def test_fednova_equal_steps_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(7)
    updates = _contract_clients(rng, n=4)
    weights = [10.0, 20.0, 5.0, 65.0]
    _assert_arrays_equal(fednova_combine(updates, weights, [8, 8, 8, 8]), weighted_mean(updates, weights), atol=1e-6)


def test_fednova_hand_computed_unequal_steps() -> None:
    # p = [1, 3] / 4 = [0.25, 0.75]; tau = [1, 4]; d_1 = [2, -1] / 1, d_2 = [4, 8] / 4 = [1, 2]
    # tau_eff = 0.25 * 1 + 0.75 * 4 = 3.25; sum p d = [0.5 + 0.75, -0.25 + 1.5] = [1.25, 1.25]
    # update = 3.25 * [1.25, 1.25] = [4.0625, 4.0625]   (the weighted mean would be [3.5, 5.75])
    out = fednova_combine(iter([[_arr(2.0, -1.0)], [_arr(4.0, 8.0)]]), [1.0, 3.0], [1, 4])
    _assert_arrays_equal(out, [_arr(4.0625, 4.0625)], atol=1e-6)


def test_fednova_rejects_bad_steps() -> None:
    with pytest.raises(ValueError, match="client 1 has 0"):
        fednova_combine([[_arr(1.0)], [_arr(1.0)]], [1.0, 1.0], [3, 0])
    with pytest.raises(ValueError, match="2 weights but 1 local step counts"):
        fednova_combine([[_arr(1.0)], [_arr(1.0)]], [1.0, 1.0], [3])
