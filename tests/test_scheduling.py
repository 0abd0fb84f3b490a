"""Pure scheduling math: cohort sizes, over-selection, deadline selection, staleness weights by hand."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.scheduling import (
    MODES,
    STALENESS_FUNCTIONS,
    StalenessParams,
    cohort_size,
    get_mode,
    over_selected,
    select_in_time,
    staleness_weight,
)


def test_staleness_weights_by_hand() -> None:
    # FedBuff's 1/sqrt(1 + tau)
    assert staleness_weight("polynomial", 0) == 1.0
    assert staleness_weight("polynomial", 3) == pytest.approx(0.5)
    assert staleness_weight("polynomial", 8) == pytest.approx(1 / 3)
    assert staleness_weight("polynomial", 1, StalenessParams(exponent=1.0)) == pytest.approx(0.5)
    assert staleness_weight("polynomial", 3, StalenessParams(exponent=0.0)) == 1.0
    assert staleness_weight("constant", 100) == 1.0
    hinge = StalenessParams(exponent=0.5, cutoff=2)
    assert [staleness_weight("hinge", t, hinge) for t in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 1 / 1.5, 1 / 3.0])


@pytest.mark.parametrize("name", sorted(STALENESS_FUNCTIONS))
def test_every_staleness_function_is_one_when_fresh_and_never_grows(name: str) -> None:
    params = StalenessParams(exponent=0.7, cutoff=3)
    weights = [staleness_weight(name, t, params) for t in range(40)]
    assert weights[0] == 1.0
    assert all(0 < b <= a for a, b in itertools.pairwise(weights))


def test_bad_staleness_arguments() -> None:
    with pytest.raises(ValueError, match="choose one of: constant, polynomial, hinge"):
        staleness_weight("linear", 1)
    with pytest.raises(ValueError, match="integer >= 0"):
        staleness_weight("polynomial", -1)
    with pytest.raises(ValueError, match="exponent"):
        StalenessParams(exponent=-1.0)


def test_cohort_and_over_selection() -> None:
    assert cohort_size(20, 0.5, 2) == 10
    assert cohort_size(3, 0.1, 2) == 2
    assert cohort_size(1, 0.1, 2) == 1
    assert over_selected(10, 20, 1.3) == 13
    assert over_selected(10, 20, 1.1) == 11  # 10 x 1.1 is 11.000000000000002 in floating point
    assert over_selected(10, 12, 2.0) == 12
    with pytest.raises(ValueError, match=">= 1"):
        over_selected(10, 20, 0.5)


def test_deadline_drops_exactly_the_late_reports() -> None:
    arrivals = [5.0, 12.0, 3.0, 10.0, 10.0, 30.0]
    sel = select_in_time(arrivals, start=0.0, deadline=10.0, needed=0)
    assert sel.accepted == (2, 0, 3, 4) and sel.late == (1, 5) and sel.end == 10.0
    # Over-selection: the round closes at the 3rd report, before the deadline.
    sel = select_in_time(arrivals, start=0.0, deadline=10.0, needed=3)
    assert sel.accepted == (2, 0, 3) and sel.late == (4, 1, 5) and sel.end == 10.0
    sel = select_in_time(arrivals, start=0.0, deadline=0.0, needed=2)
    assert sel.accepted == (2, 0) and sel.end == 5.0
    # No deadline, no over-selection: everyone, and the round lasts until the last report.
    sel = select_in_time(arrivals, start=1.0, deadline=0.0, needed=0)
    assert sel.accepted == (2, 0, 3, 4, 1, 5) and sel.late == () and sel.end == 30.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 100, allow_nan=False), max_size=12), st.floats(0, 50), st.integers(0, 12),
)
def test_selection_properties(arrivals: list[float], deadline: float, needed: int) -> None:
    sel = select_in_time(arrivals, 0.0, deadline, needed)
    assert sorted(sel.accepted + sel.late) == list(range(len(arrivals)))
    limit = deadline if deadline > 0 else math.inf
    assert all(arrivals[i] <= limit for i in sel.accepted)
    if needed:
        assert len(sel.accepted) <= needed
    if sel.accepted and sel.late:
        # Nothing dropped arrived before something kept.
        assert max(arrivals[i] for i in sel.accepted) <= min(arrivals[i] for i in sel.late)
    assert all(arrivals[i] <= sel.end for i in sel.accepted)


def test_modes_registry() -> None:
    assert get_mode("async").asynchronous and get_mode("async").sends_deltas
    assert not get_mode("sync").secagg_conflict and "SecAgg+" in get_mode("async").secagg_conflict
    assert get_mode("async").dp_conflict
    with pytest.raises(ValueError, match="choose one of: sync, async"):
        get_mode("asynch")
    assert set(MODES) == {"sync", "async"}
