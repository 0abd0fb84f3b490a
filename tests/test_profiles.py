"""Device profiles: deterministic by seed and partition, traces round-trip, bad traces refused, simulated time by hand."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.profiles import (
    PROFILE_FAMILIES,
    DeviceProfile,
    ProfileOptions,
    TraceError,
    busy_seconds,
    dropout_point,
    finish_time,
    profile_for,
    read_trace,
    step_budget,
    write_trace,
)


def test_same_seed_same_profiles_other_seed_other_profiles() -> None:
    a = [profile_for(ProfileOptions("heavy", seed=7), p) for p in range(20)]
    b = [profile_for(ProfileOptions("heavy", seed=7), p) for p in range(20)]
    c = [profile_for(ProfileOptions("heavy", seed=8), p) for p in range(20)]
    assert a == b
    assert all(x.speed != y.speed for x, y in zip(a, c))
    # A partition's profile does not depend on which other partitions exist or on the order of asking.
    assert [profile_for(ProfileOptions("heavy", seed=7), p) for p in reversed(range(20))][::-1] == a


def test_lognormal_families_spread_as_documented() -> None:
    n = 4000
    for family, sigma in (("mild", 0.5), ("heavy", 1.5)):
        logs = np.log([profile_for(ProfileOptions(family, seed=1, speed=100.0), p).speed for p in range(n)])
        assert abs(np.median(logs) - math.log(100.0)) < 0.1
        assert abs(np.std(logs) - sigma) < 0.05 * sigma
    spread = ProfileOptions("lognormal", seed=1, spread=0.8)
    logs = np.log([profile_for(spread, p).speed for p in range(n)])
    assert abs(np.std(logs) - 0.8) < 0.04
    uniform = {profile_for(ProfileOptions("uniform", speed=50.0), p).speed for p in range(10)}
    assert uniform == {50.0}


def test_negative_partition_and_unknown_family_are_refused() -> None:
    with pytest.raises(ValueError, match="per partition"):
        profile_for(ProfileOptions("mild"), -1)
    with pytest.raises(ValueError, match="choose one of: none, uniform, mild, heavy, lognormal, trace"):
        ProfileOptions("hevy")
    with pytest.raises(ValueError, match="needs device-trace"):
        ProfileOptions("trace")


def test_trace_round_trip(tmp_path: Path) -> None:
    options = ProfileOptions("heavy", seed=3, availability=0.5, dropout=0.1)
    profiles = {p: profile_for(options, p) for p in range(6)}
    profiles[2] = replace(profiles[2], local_epochs=1, max_local_steps=3, batch_size=8)
    path = tmp_path / "trace.csv"
    write_trace(path, profiles)
    assert read_trace(path) == profiles
    trace = ProfileOptions("trace", trace=str(path))
    assert [profile_for(trace, p) for p in range(6)] == [profiles[p] for p in range(6)]


def test_trace_empty_cells_and_missing_columns_take_the_run_defaults(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("partition,speed,dropout\n0,10,\n1,20,0.25\n")
    options = ProfileOptions("trace", trace=str(path), upload_bandwidth=123.0, dropout=0.05)
    p0, p1 = profile_for(options, 0), profile_for(options, 1)
    assert (p0.speed, p0.dropout, p0.upload_bandwidth) == (10.0, 0.05, 123.0)
    assert (p1.speed, p1.dropout) == (20.0, 0.25)
    with pytest.raises(ValueError, match=r"no row for partition 2 \(the trace has partitions 0-1\)"):
        profile_for(options, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty: it needs a header"),
        ("partition,speed\n", "has a header but no rows"),
        ("partition,sped\n0,1\n", r"line 1: unknown column\(s\) 'sped'; valid columns: partition, speed"),
        ("partition,upload_bandwidth\n0,1\n", r"line 1: missing required column\(s\) speed"),
        ("partition,speed\n0,fast\n", r"line 2, column 'speed': 'fast' is not a number"),
        ("partition,speed\n0,1\n1,inf\n", r"line 3, column 'speed': 'inf' is not a finite number"),
        ("partition,speed\n0,-1\n", r"line 2, column 'speed': device profile: speed must be a finite number > 0"),
        ("partition,speed\n0.5,1\n", r"line 2, column 'partition': '0.5' must be an integer"),
        ("partition,speed\n-1,1\n", r"line 2, column 'partition': must be >= 0"),
        ("partition,speed\n0,1\n0,2\n", r"line 3, column 'partition': partition 0 appears twice"),
        ("partition,speed\n0,1,2\n", r"line 2: 3 fields, the header has 2"),
        ("partition,speed\n,1\n", r"line 2, column 'partition': empty, but the column is required"),
        ("partition,speed,dropout\n0,1,1.0\n", r"line 2, column 'dropout': device profile: dropout must be in \[0, 1\)"),
        ("partition,speed,batch_size\n0,1,-2\n", r"line 2, column 'batch_size'"),
        ("partition,speed,phase,period\n0,1,10,5\n", r"line 2, column 'phase'"),
    ],
)
def test_bad_traces_are_refused_naming_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message) as info:
        read_trace(path)
    assert str(path) in str(info.value)


def test_missing_or_binary_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="not UTF-8"):
        read_trace(tmp_path / "bin.csv")
    with pytest.raises(TraceError, match="not a regular file"):
        read_trace(tmp_path)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="0123456789.,-e\nabinf ", max_size=12), min_size=1, max_size=4))
def test_any_trace_text_loads_or_is_refused_cleanly(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    path = tmp_path_factory.mktemp("trace") / "t.csv"
    path.write_text("partition,speed,dropout\n" + "\n".join(lines) + "\n")
    try:
        rows = read_trace(path)
    except TraceError as err:
        assert str(path) in str(err)
        return
    for partition, profile in rows.items():
        assert partition >= 0 and profile.speed > 0 and 0 <= profile.dropout < 1


def test_busy_seconds_and_step_budget_by_hand() -> None:
    p = DeviceProfile(speed=50.0, upload_bandwidth=1000.0, download_bandwidth=4000.0)
    # 2000 bytes down at 4000 B/s, 100 examples at 50 per s, 500 bytes up at 1000 B/s: 0.5 + 2 + 0.5
    assert busy_seconds(p, 100, 2000, 500) == pytest.approx(3.0)
    assert step_budget(p, 2.0, 32) == 3  # 2 s x 50 examples/s = 100 examples = 3 whole batches of 32
    assert step_budget(p, 0.1, 32) == 1  # always at least one step
    assert step_budget(p, 0.0, 32) == 0  # no budget


def test_finish_time_with_availability_by_hand() -> None:
    # online during [0, 30) of every 100 s, shifted by phase 20: online iff (t + 20) % 100 < 30, i.e. [80, 110), ...
    p = DeviceProfile(availability=0.3, period=100.0, phase=20.0)
    assert finish_time(p, 0.0, 5.0) == pytest.approx(5.0)  # t in [0, 10) is online
    assert finish_time(p, 0.0, 15.0) == pytest.approx(85.0)  # 10 s until 10, offline to 80, 5 more
    assert finish_time(p, 20.0, 30.0) == pytest.approx(110.0)  # waits until 80, a whole window
    assert finish_time(p, 20.0, 65.0) == pytest.approx(80 + 200 + 5.0)  # two windows, then 5 s of the third
    always = DeviceProfile()
    assert finish_time(always, 7.0, 3.0) == 10.0


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.05, 1.0), st.floats(1.0, 500.0), st.floats(0.0, 0.999), st.floats(0.0, 1e4), st.floats(0.0, 1e3)
)
def test_finish_time_accrues_exactly_busy_online_seconds(
    availability: float, period: float, phase_fraction: float, start: float, busy: float
) -> None:
    p = DeviceProfile(availability=availability, period=period, phase=phase_fraction * period)
    end = finish_time(p, start, busy)
    assert end >= start + busy - 1e-9
    # Online seconds in [start, end], counted window by window, equal busy.
    online, t = 0.0, start
    while t < end - 1e-12:
        pos = (t + p.phase) % period
        boundary = min(end, t + ((availability * period - pos) if pos < availability * period else (period - pos)))
        if pos < availability * period:
            online += boundary - t
        t = boundary if boundary > t else t + 1e-9
    assert online == pytest.approx(busy, abs=1e-6 * max(1.0, busy + period))


def test_dropouts_are_deterministic_and_at_the_rate() -> None:
    p = DeviceProfile(dropout=0.2)
    points = [dropout_point(p, 1, 3, d) for d in range(5000)]
    assert points == [dropout_point(p, 1, 3, d) for d in range(5000)]
    dropped = [x for x in points if x is not None]
    assert abs(len(dropped) / 5000 - 0.2) < 0.02
    assert all(0 < x < 1 for x in dropped)
    assert dropout_point(DeviceProfile(), 1, 3, 0) is None


def test_registry_families_all_make_profiles(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("partition,speed\n0,1\n")
    for name, family in PROFILE_FAMILIES.items():
        options = ProfileOptions(name, trace=str(trace) if family.from_trace else "")
        assert profile_for(options, 0).speed > 0
