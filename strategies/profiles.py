"""Simulated devices: how fast each client computes and communicates, when it is online, how often it drops out.

A `DeviceProfile` describes one simulated device:

* ``speed``: compute, in *examples per simulated second*. The unit of work is one example through one
  training step's forward and backward pass: a client that takes ``K`` optimizer steps on batches of
  ``B`` examples (``B`` = batch size x gradient-accumulation steps) does ``K * B`` examples of work;
  a FedSGD client does its data set (or the batches it is capped at) once. Calibrating a profile means
  measuring a device's training throughput in examples per second for the model at hand.
* ``upload_bandwidth`` / ``download_bandwidth``: bytes per simulated second.
* availability: a duty cycle. The device is online during the first ``availability`` fraction of every
  ``period`` seconds, shifted by its own ``phase`` (online at ``t`` iff ``(t + phase) mod period <
  availability * period``). Work only progresses while it is online; an offline device picks up where it
  left off when it comes back.
* ``dropout``: the probability that a piece of work is abandoned part-way (the device leaves the round);
  where it leaves is uniform over the work's busy time.
* ``local_epochs``, ``max_local_steps``, ``batch_size``: work that fits the device (0 = the run's setting).

Simulated duration of a dispatch that starts at ``t0`` (`busy_seconds`, `finish_time`)::

    busy   = download_bytes / download_bandwidth + work / speed + upload_bytes / upload_bandwidth
    finish = the first t >= t0 at which the device has been online for ``busy`` seconds since t0

Where profiles come from (`PROFILE_FAMILIES`): ``uniform`` (every device has the medians), ``lognormal``
(speed and both bandwidths are the medians times ``exp(sigma z)``, ``z ~ N(0, 1)`` drawn per device),
its presets ``mild`` (sigma 0.5: the slowest of 20 devices is about 2.5x slower than the median) and
``heavy`` (sigma 1.5: about 16x; the 95th percentile is 12x), and ``trace``, a CSV file the user supplies
(`read_trace`; `write_trace` writes one). Every draw is a function of ``(seed, partition id)`` only, so the
same run config gives every node, and the server, the same profile in every process.

Pure Python and numpy; no Flower, no torch.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "PROFILE_FAMILIES",
    "TRACE_COLUMNS",
    "DeviceProfile",
    "ProfileFamily",
    "ProfileOptions",
    "TraceError",
    "busy_seconds",
    "dropout_point",
    "finish_time",
    "get_family",
    "profile_for",
    "read_trace",
    "step_budget",
    "write_trace",
]


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device (see the module docstring for the units and the model of time)."""

    speed: float = 100.0
    upload_bandwidth: float = 1e6
    download_bandwidth: float = 4e6
    dropout: float = 0.0
    availability: float = 1.0
    period: float = 3600.0
    phase: float = 0.0
    local_epochs: int = 0
    max_local_steps: int = 0
    batch_size: int = 0

    def __post_init__(self) -> None:
        problem = _profile_problem(self)
        if problem:
            raise ValueError(f"device profile: {problem}")

    def online(self, t: float) -> bool:
        """Whether the device is online at simulated time ``t``."""
        return (t + self.phase) % self.period < self.availability * self.period


def _profile_problem(p: DeviceProfile) -> str:
    for name in ("speed", "upload_bandwidth", "download_bandwidth", "period"):
        value = getattr(p, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            return f"{name} must be a finite number > 0, got {value!r}"
    if not (0.0 <= p.dropout < 1.0):
        return f"dropout must be in [0, 1), got {p.dropout!r}"
    if not (0.0 < p.availability <= 1.0):
        return f"availability must be in (0, 1], got {p.availability!r}"
    if not (math.isfinite(p.phase) and 0.0 <= p.phase < p.period):
        return f"phase must be in [0, period={p.period:g}), got {p.phase!r}"
    for name in ("local_epochs", "max_local_steps", "batch_size"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an integer >= 0 (0 = the run's setting), got {value!r}"
    return ""


@dataclass(frozen=True)
class ProfileFamily:
    """Where a family's profiles come from.

    Attributes:
        name: registry key (run-config ``device-profiles``).
        sigma: spread of log speed and log bandwidth; None = read from ``device-speed-spread``.
        from_trace: the profiles are rows of a CSV trace (``device-trace``).
        description: one line for the README.
    """

    name: str
    sigma: float | None = 0.0
    from_trace: bool = False
    description: str = ""

    @property
    def reads_spread(self) -> bool:
        return self.sigma is None and not self.from_trace


PROFILE_FAMILIES: dict[str, ProfileFamily] = {
    "uniform": ProfileFamily("uniform", 0.0, description="every device has the median speed and bandwidths"),
    "mild": ProfileFamily("mild", 0.5, description="log-normal, sigma 0.5: the slowest of 20 devices ~2.5x the median"),
    "heavy": ProfileFamily("heavy", 1.5, description="log-normal, sigma 1.5 (heavy-tailed): the slowest of 20 ~16x"),
    "lognormal": ProfileFamily("lognormal", None, description="log-normal with sigma = device-speed-spread"),
    "trace": ProfileFamily("trace", from_trace=True, description="one row per partition of the CSV device-trace"),
}


def get_family(name: str) -> ProfileFamily:
    """The registered family ``name``; unknown names raise with the valid choices."""
    try:
        return PROFILE_FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown device-profiles '{name}'; choose one of: none, {', '.join(PROFILE_FAMILIES)}") from None


@dataclass(frozen=True)
class ProfileOptions:
    """How a run's profiles are made: the family, the medians (defaults of a trace's empty cells), the seed."""

    family: str = "uniform"
    seed: int = 0
    speed: float = 100.0
    spread: float = 1.0  # sigma of the lognormal family
    upload_bandwidth: float = 1e6
    download_bandwidth: float = 4e6
    dropout: float = 0.0
    availability: float = 1.0
    period: float = 3600.0
    trace: str = ""
    work_budget: float = 0.0  # simulated seconds of computation per dispatch (0 = no cap): `step_budget`

    def __post_init__(self) -> None:
        family = get_family(self.family)
        if family.from_trace and not self.trace:
            raise ValueError("device-profiles 'trace' needs device-trace: the path of a CSV file of profiles")
        if self.spread < 0 or not math.isfinite(self.spread):
            raise ValueError(f"device-speed-spread must be a finite number >= 0, got {self.spread!r}")
        _ = self.defaults  # validates the medians

    @property
    def sigma(self) -> float:
        family = get_family(self.family)
        return self.spread if family.sigma is None else family.sigma

    @property
    def defaults(self) -> DeviceProfile:
        """A device with the medians (phase 0): the uniform family's profile and a trace's empty cells."""
        return DeviceProfile(
            speed=self.speed, upload_bandwidth=self.upload_bandwidth, download_bandwidth=self.download_bandwidth,
            dropout=self.dropout, availability=self.availability, period=self.period,
        )


def _draws(seed: int, partition: int, salt: int, n: int) -> np.ndarray:
    """``n`` standard draws that depend on (seed, partition, salt) only."""
    return np.random.default_rng([int(seed), int(partition), salt]).standard_normal(n)


def profile_for(options: ProfileOptions, partition: int) -> DeviceProfile:
    """The profile of the device that holds ``partition`` (deterministic in ``options.seed`` and ``partition``).

    Raises:
        ValueError: for a negative partition (a node with its own data file has none), or a trace without a
            row for it.
        TraceError: for a trace file that cannot be used (naming the file, line and column).
    """
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise ValueError(
            f"device profiles are per partition, got partition {partition!r} (a node that trains on its own "
            "data file has none: use device-profiles='none' in deployments)"
        )
    base = options.defaults
    if get_family(options.family).from_trace:
        rows = read_trace(options.trace, base)
        if partition not in rows:
            have = sorted(rows)
            raise ValueError(
                f"{options.trace}: no row for partition {partition} (the trace has partitions "
                f"{_ranges(have)}); add one row per partition"
            )
        return rows[partition]
    z = _draws(options.seed, partition, 0x0DE71CE, 4)
    sigma = options.sigma
    phase = float(np.random.default_rng([int(options.seed), int(partition), 0xFA5E]).uniform(0.0, options.period))
    return replace(
        base,
        speed=float(base.speed * math.exp(sigma * z[0])),
        upload_bandwidth=float(base.upload_bandwidth * math.exp(sigma * z[1])),
        download_bandwidth=float(base.download_bandwidth * math.exp(sigma * z[2])),
        phase=phase if options.availability < 1.0 else 0.0,
    )


def _ranges(values: Sequence[int]) -> str:
    if not values:
        return "(none)"
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


# ----------------------------------------------------------------------------------------------------- time
def busy_seconds(profile: DeviceProfile, work: float, download_bytes: float, upload_bytes: float) -> float:
    """Online seconds a dispatch takes: download, ``work`` examples of computation, upload."""
    if work < 0 or download_bytes < 0 or upload_bytes < 0:
        raise ValueError(f"work and bytes must be >= 0, got {work}, {download_bytes}, {upload_bytes}")
    return (download_bytes / profile.download_bandwidth + work / profile.speed
            + upload_bytes / profile.upload_bandwidth)


def finish_time(profile: DeviceProfile, start: float, busy: float) -> float:
    """The simulated time at which a device that starts at ``start`` has been online for ``busy`` seconds."""
    if busy < 0 or not math.isfinite(busy) or not math.isfinite(start):
        raise ValueError(f"start and busy must be finite and busy >= 0, got {start}, {busy}")
    if profile.availability >= 1.0:
        return start + busy
    period, online = profile.period, profile.availability * profile.period
    t, left = start, busy
    pos = (t + profile.phase) % period
    if pos >= online:  # offline: wait for the next online window
        t += period - pos
        pos = 0.0
    first = online - pos  # what is left of the current online window
    if left <= first:
        return t + left
    left -= first
    t += first + (period - online)  # through the offline part to the next window
    cycles = math.floor(left / online)
    if cycles and left == cycles * online:  # ends exactly at the close of a window
        return t + (cycles - 1) * period + online
    return t + cycles * period + (left - cycles * online)


def dropout_point(profile: DeviceProfile, seed: int, partition: int, dispatch: int) -> float | None:
    """Where a dispatch is abandoned, as a fraction of its busy time in (0, 1), or None if it completes.

    A function of (seed, partition, dispatch number) only: the same run drops the same work.
    """
    if profile.dropout <= 0.0:
        return None
    u, v = np.random.default_rng([int(seed), int(partition), int(dispatch), 0xD409]).uniform(size=2)
    return float(v) if u < profile.dropout else None


def step_budget(profile: DeviceProfile, budget_seconds: float, examples_per_step: int) -> int:
    """Optimizer steps a device can take in ``budget_seconds`` of computation (at least 1; 0 = no budget)."""
    if budget_seconds <= 0:
        return 0
    return max(1, math.floor(budget_seconds * profile.speed / max(examples_per_step, 1)))


# ---------------------------------------------------------------------------------------------------- traces
class TraceError(ValueError):
    """A device trace that cannot be used; the message names the file, the line and the column."""


TRACE_COLUMNS: dict[str, type] = {f.name: (int if f.type in ("int", int) else float) for f in fields(DeviceProfile)}
TRACE_COLUMNS = {"partition": int, **TRACE_COLUMNS}
REQUIRED_COLUMNS = ("partition", "speed")


def read_trace(path: str | Path, defaults: DeviceProfile | None = None) -> dict[int, DeviceProfile]:
    """Profiles by partition from a CSV trace.

    The header names columns of `TRACE_COLUMNS` (``partition`` and ``speed`` required); an empty cell, or a
    column left out, takes ``defaults`` (the run's medians). One row per partition. Anything else raises
    `TraceError` naming the file, the line (1 = the header) and the column.
    """
    stat = Path(path).stat() if Path(path).exists() else None
    key = (str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    return dict(_read_trace_cached(key, defaults or DeviceProfile()))


@lru_cache(maxsize=8)
def _read_trace_cached(key: tuple[str, int, int], defaults: DeviceProfile) -> tuple[tuple[int, DeviceProfile], ...]:
    path = Path(key[0])
    if not path.exists():
        raise TraceError(f"device trace {path} does not exist")
    if not path.is_file():
        raise TraceError(f"device trace {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TraceError(f"device trace {path} is not UTF-8 text: {err}") from None
    reader = csv.reader(text.splitlines())
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise TraceError(f"device trace {path} is empty: it needs a header ({', '.join(TRACE_COLUMNS)})") from None
    unknown = [h for h in header if h not in TRACE_COLUMNS]
    if unknown:
        raise TraceError(
            f"{path}, line 1: unknown column(s) {', '.join(repr(u) for u in unknown)}; valid columns: "
            f"{', '.join(TRACE_COLUMNS)}"
        )
    if len(set(header)) != len(header):
        raise TraceError(f"{path}, line 1: a column is named twice: {header}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{path}, line 1: missing required column(s) {', '.join(missing)}")
    rows: dict[int, DeviceProfile] = {}
    for line, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise TraceError(f"{path}, line {line}: {len(cells)} fields, the header has {len(header)}")
        values: dict[str, float | int] = {}
        for name, cell in zip(header, cells):
            cell = cell.strip()
            if cell == "":
                if name in REQUIRED_COLUMNS:
                    raise TraceError(f"{path}, line {line}, column '{name}': empty, but the column is required")
                continue
            values[name] = _parse_cell(path, line, name, cell)
        partition = int(values.pop("partition"))
        if partition < 0:
            raise TraceError(f"{path}, line {line}, column 'partition': must be >= 0, got {partition}")
        if partition in rows:
            raise TraceError(f"{path}, line {line}, column 'partition': partition {partition} appears twice")
        try:
            rows[partition] = replace(defaults, **values)  # type: ignore[arg-type]
        except ValueError as err:
            column = _column_of(str(err))
            raise TraceError(f"{path}, line {line}{f', column {column!r}' if column else ''}: {err}") from None
    if not rows:
        raise TraceError(f"device trace {path} has a header but no rows")
    return tuple(sorted(rows.items()))


def _parse_cell(path: Path, line: int, name: str, cell: str) -> float | int:
    kind = TRACE_COLUMNS[name]
    where = f"{path}, line {line}, column '{name}'"
    try:
        number = float(cell)
    except ValueError:
        raise TraceError(f"{where}: {cell!r} is not a number") from None
    if not math.isfinite(number):
        raise TraceError(f"{where}: {cell!r} is not a finite number")
    if kind is int:
        if number != int(number):
            raise TraceError(f"{where}: {cell!r} must be an integer")
        return int(number)
    return number


def _column_of(message: str) -> str:
    for name in TRACE_COLUMNS:
        if message.startswith(f"device profile: {name} "):
            return name
    return ""


def write_trace(path: str | Path, profiles: Mapping[int, DeviceProfile] | Iterable[tuple[int, DeviceProfile]]) -> None:
    """Write profiles as a CSV trace that `read_trace` reads back to the same profiles (floats as repr)."""
    items = sorted(profiles.items() if isinstance(profiles, Mapping) else profiles)
    names = [f.name for f in fields(DeviceProfile)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["partition", *names])
        for partition, profile in items:
            writer.writerow([partition, *(repr(getattr(profile, n)) for n in names)])

