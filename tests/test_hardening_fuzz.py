"""Property-based hardening suite: no client, bad number or operator mistake crashes the server or poisons it.

For ANY reply (mutated ``.npy`` bytes and headers, random codec payloads, odd metric types, absurd counts,
finite but huge updates) `FederatedStrategy.aggregate_fit` / `aggregate_evaluate` either use it or reject it
with a reason, never raise, and the global model and the optimizer state stay finite and unpoisoned; every
run-config value either parses or raises `ConfigError` naming the key. Only the public entry points are
driven (the strategy shell, the wire decoder, the codecs, the metric aggregation, the config parser), with
their default settings, so the same file runs against older code too: ``HARDEN_TALLY=<file.json>`` turns
the assertions into a tally of outcomes per area (`tests/hardening_tally.py`).

Areas (issue 10): ``1-crash`` (one reply crashes the server), ``2-bounds`` (numbers clients report steer the
model or the figures), ``3-optimizer-state`` (one huge update poisons the server optimizer), ``4-run-config``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status, ndarrays_to_parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flower_app.config import FIELDS, AppConfig, ConfigError, parse_run_config
from strategies import STRATEGIES
from strategies.aggregators import AggregatorParams
from strategies.base import FederatedStrategy, StrategyOptions, aggregate_metrics
from strategies.compression import CompressionConfig, compress, decompress
from strategies.optimizers import ServerOptHParams
from strategies.serde import ndarray_view
from tests.hardening_tally import record, tallying
from tests.strategy_utils import FakeProxy, client_manager

SHAPES = [(3, 2), (2,), (2,)]  # a weight, a bias, a buffer
TRAINABLE = [True, True, False]
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
RULES = sorted(STRATEGIES)
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
CODECS = ("none", "fp16", "bf16", "int8", "int8-block", "topk")
HONEST_SCALE = 0.01  # honest clients move each weight by N(0, 0.01^2)
# One client may move the model by at most this many times the largest honest update (issue 10: a norm bound at
# a multiple of the round's typical update): anything beyond is a poisoned model.
POISON_FACTOR = 200.0

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------------------- set-up
def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def make(rule: str, aggregator: str = "mean", codec: str = "none", send_delta: bool = False,
         num_byzantine: int = 1, trim: float = 0.2) -> FederatedStrategy:
    if rule == "fednova":
        aggregator = "mean"
    if codec == "topk" and STRATEGIES[rule].client_mode == "train":
        send_delta = True
    lr = 0.1 if rule in ADAPTIVE else 1.0
    options = StrategyOptions(
        rule=rule,
        aggregator=aggregator,
        aggregator_params=AggregatorParams(trim_fraction=trim, num_byzantine=num_byzantine),
        optimizer=ServerOptHParams(learning_rate=lr, momentum=0.5 if rule == "fedavgm" else 0.0),
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        client_wait_timeout=0.01,
        max_failure_fraction=1.0,
        send_delta=send_delta,
        compression=CompressionConfig(codec, block_size=2, topk_fraction=0.5),
    )
    return FederatedStrategy(options, initial_weights(), TRAINABLE)


def start_round(strategy: FederatedStrategy, num_clients: int, server_round: int = 1) -> None:
    manager, _ = client_manager(num_clients)
    strategy.configure_fit(server_round, strategy.initialize_parameters(manager), manager)  # type: ignore[arg-type]


def local_weights(strategy: FederatedStrategy, rng: np.random.Generator, offset: float = 0.0) -> list[np.ndarray]:
    return [(w + HONEST_SCALE * rng.normal(size=w.shape) + offset).astype(np.float32) for w in strategy.weights]


def payload_of(strategy: FederatedStrategy, local: list[np.ndarray]) -> list[np.ndarray]:
    """What this rule's client sends for these local weights (weights, update, or a gradient lr 1 turns into them)."""
    if strategy.kind == "delta":
        return [(a - w).astype(np.float32) for a, w in zip(local, strategy.weights)]
    if strategy.kind == "gradient":
        return [(w - a).astype(np.float32) for a, w in zip(local, strategy.weights)]
    return local


def fit_reply(strategy: FederatedStrategy, local: list[np.ndarray], n: int, rng: np.random.Generator,
              metrics: dict[str, Any] | None = None, control_scale: float = HONEST_SCALE) -> FitRes:
    wire, _ = compress(payload_of(strategy, local), strategy.options.compression)
    if strategy.rule.scaffold:
        wire = wire + [(control_scale * rng.normal(size=s)).astype(np.float32) for s, t in zip(SHAPES, TRAINABLE) if t]
    reported = {"train_loss": 1.0, "local_steps": 4} if metrics is None else metrics
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(wire), n, dict(reported))


def honest_replies(strategy: FederatedStrategy, count: int, seed: int, counts: Sequence[int] | None = None) -> list[tuple[FakeProxy, FitRes]]:
    rng = np.random.default_rng(seed)
    ns = list(counts) if counts is not None else [int(rng.integers(10, 200)) for _ in range(count)]
    return [(FakeProxy(f"honest{i}"), fit_reply(strategy, local_weights(strategy, rng), ns[i], rng)) for i in range(count)]


def state_arrays(strategy: FederatedStrategy) -> list[np.ndarray]:
    arrays = list(strategy.weights)
    state = strategy.opt_state
    arrays += list(state.m or []) + list(state.v or [])
    if strategy.scaffold_state is not None:
        arrays += list(strategy.scaffold_state.control)
    return arrays


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    return all(bool(np.isfinite(np.asarray(a, dtype=np.float64)).all()) for a in arrays)


def max_dev(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(a, b))


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            self.messages.append(rec.getMessage())
        except Exception:  # noqa: BLE001 - a message that cannot be formatted is still a message
            self.messages.append(str(rec.msg))


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The WARNING (and worse) lines Flower's logger and the app's loggers emit inside the block."""
    handler = _Capture()
    loggers = [logging.getLogger("flwr"), logging.getLogger("strategies"), logging.getLogger("flower_app")]
    for logger in loggers:
        logger.disabled = False
        logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def figures_sane(strategy: FederatedStrategy) -> str:
    """Why the round's reported figures are wrong ("" = they are fine): a non-finite or ill-typed value."""
    record = strategy._record
    if record is None:
        return ""
    for name in ("train_loss", "train_accuracy", "federated_loss", "federated_accuracy"):
        value = getattr(record, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isinf(value):
            return f"record.{name} = {value!r}"
    if not math.isnan(record.federated_accuracy) and not 0.0 <= record.federated_accuracy <= 1.0:
        return f"federated accuracy {record.federated_accuracy} outside [0, 1]"
    if not math.isnan(record.federated_loss) and record.federated_loss < 0:
        return f"federated loss {record.federated_loss} < 0"
    for key, value in record.extra.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"record.extra[{key!r}] = {value!r}"
    for cid, entry in strategy.data_summary.items():
        if entry.get("client") != cid:
            return f"data summary of {cid} names client {entry.get('client')!r}"
        for key, value in entry.items():
            if key != "client" and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
                return f"data summary of {cid}: {key} = {value!r}"
    return ""


def run_fit(strategy: FederatedStrategy, results: list[tuple[FakeProxy, FitRes]], server_round: int = 1) -> tuple[str, list[str]]:
    """Call aggregate_fit; returns ("crashed: ..." or "", warnings)."""
    with warnings_logged() as logs:
        try:
            strategy.aggregate_fit(server_round, results, [])  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - the point: nothing may escape
            return f"{type(err).__name__}: {err}", logs
    return "", logs


def classify_fit(strategy: FederatedStrategy, results: list[tuple[FakeProxy, FitRes]], culprit: str,
                 reference: Sequence[np.ndarray], honest_scale: float) -> tuple[str, str]:
    """Outcome of one round with a bad reply from ``culprit``, against the honest-only ``reference`` model."""
    crash, logs = run_fit(strategy, results)
    if crash:
        return "crashed", crash
    if not all_finite(state_arrays(strategy)):
        return "silently_wrong", "non-finite model or optimizer state"
    dev = max_dev(strategy.weights, reference)
    if dev > POISON_FACTOR * honest_scale + 1e-4:
        return "silently_wrong", f"model moved {dev:.3g} from the honest result (honest scale {honest_scale:.3g})"
    bad_figure = figures_sane(strategy)
    if bad_figure:
        return "silently_wrong", bad_figure
    if any(culprit in m for m in logs):
        return "clear_error", ""
    return "handled", ""


def honest_reference(rule: str, aggregator: str, codec: str, send_delta: bool, n_honest: int, seed: int,
                     counts: Sequence[int] | None = None, **kw: Any) -> tuple[list[np.ndarray], float]:
    """The model after a round of honest replies only, and the largest honest update (the scale)."""
    strategy = make(rule, aggregator, codec, send_delta, **kw)
    start_round(strategy, n_honest)
    results = honest_replies(strategy, n_honest, seed, counts)
    strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    return [w.copy() for w in strategy.weights], 4 * HONEST_SCALE  # honest updates: |N(0, 0.01^2)| < 0.04


# ----------------------------------------------------------------------------------- wire mutations
def npy_bytes(header: dict[str, Any], body: bytes, major: int = 1) -> bytes:
    """An .npy file with this header dict (written by hand, so it may be absurd) and body."""
    text = repr(header).encode("utf-8")  # v1/v2 headers are latin-1 by the spec: other bytes are one more mutation
    prefix = 10 if major == 1 else 12
    pad = (64 - (prefix + len(text) + 1) % 64) % 64
    text = text + b" " * pad + b"\n"
    length = len(text).to_bytes(2 if major == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([major, 0]) + length + text + body


def npy_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def data_offset(blob: bytes) -> int:
    stream = io.BytesIO(blob)
    major, _ = np.lib.format.read_magic(stream)
    (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(stream)
    return stream.tell()


DESCRS = ["<f4", ">f4", "<f8", "<f2", "|i1", "<i4", "<i8", "|u1", "|b1", "<c8", "|O", "<U3", "|V4", "<M8[s]", "<f16", "<u2"]
ABSURD_DIMS = st.one_of(st.integers(0, 8), st.integers(-(2**70), -1), st.integers(2**31, 2**70), st.just(2**63 - 1))


@st.composite
def crafted_header(draw: st.DrawFn) -> bytes:
    shape = tuple(draw(st.lists(ABSURD_DIMS, max_size=4)))
    header: dict[str, Any] = {"descr": draw(st.sampled_from(DESCRS)), "fortran_order": draw(st.booleans()), "shape": shape}
    if draw(st.booleans()):
        header[draw(st.sampled_from(["descr", "shape", "extra"]))] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5)))
    body = draw(st.binary(max_size=64))
    return npy_bytes(header, body, major=draw(st.sampled_from([1, 2, 3])))


WIRE_KINDS = ("random-bytes", "truncated", "extended", "flipped-header", "flipped-data", "crafted-header", "dtype",
              "shape", "count", "non-finite", "codec-garbage")


def mutate_wire(draw: st.DrawFn, res: FitRes, kind: str) -> FitRes:
    tensors = list(res.parameters.tensors)
    j = draw(st.integers(0, len(tensors) - 1))
    blob = tensors[j]
    arrays = [ndarray_view(t).copy() for t in tensors]
    if kind == "random-bytes":
        tensors[j] = draw(st.binary(max_size=200))
    elif kind == "truncated":
        tensors[j] = blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]
    elif kind == "extended":
        tensors[j] = blob + draw(st.binary(min_size=1, max_size=16))
    elif kind in ("flipped-header", "flipped-data"):
        lo, hi = (0, min(len(blob), data_offset(blob))) if kind == "flipped-header" else (data_offset(blob), len(blob))
        if hi > lo:
            data = bytearray(blob)
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(lo, hi - 1))] ^= 1 << draw(st.integers(0, 7))
            tensors[j] = bytes(data)
    elif kind == "crafted-header":
        tensors[j] = draw(crafted_header())
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["float16", "float64", "int32", "int8", "uint8", "bool", "complex64", ">f4", "<f8"]))
        tensors[j] = npy_of(arrays[j].astype(dtype))
    elif kind == "shape":
        a = arrays[j]
        new = draw(st.sampled_from([a.reshape(-1), a.reshape(1, -1), a.T, a[:-1] if a.size > 1 else np.zeros(3, a.dtype), np.concatenate([a.reshape(-1), a.reshape(-1)])]))
        tensors[j] = npy_of(np.ascontiguousarray(new))
    elif kind == "count":
        if draw(st.booleans()) and len(tensors) > 1:
            del tensors[j]
        else:
            tensors.insert(j, npy_of(np.zeros(draw(st.integers(0, 4)), np.float32)))
    elif kind == "non-finite":
        a = arrays[j]
        if a.dtype.kind == "f" and a.size:
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        tensors[j] = npy_of(a)
    elif kind == "codec-garbage":
        dtype = draw(st.sampled_from(["int8", "float32", "int32", "int64", "float16", "uint16", "float64"]))
        size = draw(st.integers(0, 12))
        if np.dtype(dtype).kind == "f":
            values = draw(st.lists(st.floats(width=16 if dtype == "float16" else 32, allow_nan=True, allow_infinity=True), min_size=size, max_size=size))
        else:
            info = np.iinfo(dtype)
            values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
        tensors[j] = npy_of(np.array(values, dtype=dtype))
    return FitRes(res.status, Parameters(tensors=tensors, tensor_type=res.parameters.tensor_type), res.num_examples, dict(res.metrics))


METRIC_NAMES = ("local_steps", "train_loss", "train_accuracy", "data_client", "data_label_0", "data_label_1", "loss",
                "accuracy", "num_examples", "epsilon", "num_upload_bytes", "clip_max", "foo")
METRIC_VALUES = st.one_of(
    st.booleans(),
    st.binary(max_size=6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 1000),
    st.text(max_size=6),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)
METRICS = st.dictionaries(st.one_of(st.sampled_from(METRIC_NAMES), st.text(min_size=1, max_size=6)), METRIC_VALUES, max_size=5)


# ----------------------------------------------------------------------- area 1: one reply, any bytes
@FUZZ
@given(st.one_of(st.binary(max_size=300), crafted_header(), st.builds(lambda a: npy_of(a), st.sampled_from(
    [np.zeros((2, 3), np.float32), np.arange(5, dtype=np.int8), np.ones(0, np.float64)]))))
def test_the_wire_decoder_returns_an_array_or_raises_value_error(blob: bytes) -> None:
    try:
        array = ndarray_view(blob)
    except ValueError as err:
        record("1-crash", "decoder", "clear_error" if str(err) else "unclear_error")
        return
    except Exception as err:  # noqa: BLE001 - the point: whatever escapes is counted
        record("1-crash", "decoder", "crashed", f"{type(err).__name__}: {err}")
        return
    ok = isinstance(array, np.ndarray) and not array.dtype.hasobject and array.nbytes <= len(blob)
    record("1-crash", "decoder", "handled" if ok else "silently_wrong", f"{array.dtype} {array.shape}")


@FUZZ
@given(st.sampled_from(CODECS[1:] + ("none",)), st.data())
def test_every_codec_decodes_random_payloads_to_finite_arrays_or_raises_value_error(codec: str, data: st.DataObject) -> None:
    config = CompressionConfig(codec, block_size=data.draw(st.integers(1, 8)), topk_fraction=data.draw(st.sampled_from([0.1, 0.5, 1.0])))
    shapes = data.draw(st.lists(st.lists(st.integers(0, 4), max_size=2).map(tuple), min_size=1, max_size=3))
    per = 1 if codec in ("none", "fp16", "bf16") else 2
    wire: list[np.ndarray] = []
    for _ in range(data.draw(st.integers(0, per * len(shapes) + 1))):
        dtype = data.draw(st.sampled_from(["int8", "float32", "int32", "int64", "float16", "uint16", "float64"]))
        size = data.draw(st.integers(0, 20))
        if np.dtype(dtype).kind == "f":
            values = data.draw(st.lists(st.floats(width=16 if dtype == "float16" else 32), min_size=size, max_size=size))
        else:
            info = np.iinfo(dtype)
            values = data.draw(st.lists(st.integers(max(int(info.min), -40), min(int(info.max), 40)) | st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
        wire.append(np.array(values, dtype=dtype))
    try:
        out = decompress(wire, shapes, config)
    except ValueError:
        record("1-crash", "codec-payload", "clear_error")
        return
    except Exception as err:  # noqa: BLE001 - the point: whatever escapes is counted
        record("1-crash", "codec-payload", "crashed", f"{codec}: {type(err).__name__}: {err}")
        return
    ok = [o.shape for o in out] == [tuple(s) for s in shapes] and all(o.dtype == np.float32 for o in out) and all_finite(out)
    record("1-crash", "codec-payload", "handled" if ok else "silently_wrong", f"{codec}: decoded {out}")


@FUZZ
@given(st.sampled_from(RULES), st.sampled_from(AGGREGATORS), st.sampled_from(CODECS), st.booleans(),
       st.integers(3, 5), st.sampled_from(WIRE_KINDS), st.integers(0, 2**16), st.data())
def test_any_malformed_reply_is_used_or_rejected_and_never_crashes_a_round(
    rule: str, aggregator: str, codec: str, send_delta: bool, n_honest: int, kind: str, seed: int, data: st.DataObject
) -> None:
    kw = {"num_byzantine": 0}  # Krum's precondition is its own test: here every honest round satisfies it
    reference, scale = honest_reference(rule, aggregator, codec, send_delta, n_honest, seed, **kw)
    strategy = make(rule, aggregator, codec, send_delta, **kw)
    start_round(strategy, n_honest + 1)
    results = honest_replies(strategy, n_honest, seed)
    rng = np.random.default_rng(seed + 1)
    bad = fit_reply(strategy, local_weights(strategy, rng), int(rng.integers(10, 200)), rng)
    results.append((FakeProxy("evil"), mutate_wire(data.draw, bad, kind)))
    outcome, detail = classify_fit(strategy, results, "evil", reference, scale)
    record("1-crash", f"reply-{kind}", outcome, f"{rule}/{aggregator}/{codec}: {detail}")


@FUZZ
@given(st.sampled_from(RULES), st.sampled_from(AGGREGATORS), st.integers(3, 5), METRICS, st.booleans(), st.integers(0, 2**16))
def test_any_metrics_are_used_or_ignored_and_never_crash_the_round_or_its_bookkeeping(
    rule: str, aggregator: str, n_honest: int, metrics: dict[str, Any], keep_standard: bool, seed: int
) -> None:
    kw = {"num_byzantine": 0}
    strategy = make(rule, aggregator, **kw)
    start_round(strategy, n_honest + 1)
    results = honest_replies(strategy, n_honest, seed)
    rng = np.random.default_rng(seed + 1)
    reported = ({"train_loss": 1.0, "local_steps": 4} if keep_standard else {}) | metrics
    results.append((FakeProxy("evil"), fit_reply(strategy, local_weights(strategy, rng), 50, rng, metrics=reported)))
    crash, logs = run_fit(strategy, results)
    if crash:
        record("1-crash", "metrics", "crashed", f"{rule}: {metrics!r}: {crash}")
        return
    wrong = figures_sane(strategy) or ("" if all_finite(state_arrays(strategy)) else "non-finite state")
    if wrong:
        record("1-crash", "metrics", "silently_wrong", f"{rule}: {metrics!r}: {wrong}")
    else:
        record("1-crash", "metrics", "clear_error" if any("evil" in m for m in logs) else "handled")


@FUZZ
@given(st.lists(st.tuples(st.integers(-5, 10**6) | st.integers(-(2**70), 2**70), METRICS), min_size=1, max_size=5))
def test_metric_aggregation_takes_any_metric_dicts(replies: list[tuple[int, dict[str, Any]]]) -> None:
    try:
        with warnings_logged():
            out = aggregate_metrics(replies)
    except Exception as err:  # noqa: BLE001 - the point: whatever escapes is counted
        record("1-crash", "aggregate-metrics", "crashed", f"{replies!r}: {type(err).__name__}: {err}")
        return
    bad = {k: v for k, v in out.items() if not isinstance(v, float | int) or isinstance(v, bool) or math.isinf(v)}
    record("1-crash", "aggregate-metrics", "silently_wrong" if bad else "handled", f"{replies!r} -> {bad!r}")


@FUZZ
@given(st.sampled_from(["krum", "multi-krum"]), st.integers(1, 2), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2**16))
def test_a_round_that_cannot_satisfy_krum_keeps_the_model_and_says_why(
    aggregator: str, f: int, extra: int, malformed: int, seed: int
) -> None:
    n_honest = 2 * f + extra  # 2f .. 2f+3 valid replies: below and at Krum's n >= 2f + 3
    strategy = make("fedavg", aggregator, num_byzantine=f)
    start_round(strategy, n_honest + malformed)
    results = honest_replies(strategy, n_honest, seed)
    for i in range(malformed):
        res = results[0][1]
        results.append((FakeProxy(f"broken{i}"), FitRes(res.status, Parameters(tensors=res.parameters.tensors[:1], tensor_type=""), 10, {})))
    before = [w.copy() for w in strategy.weights]
    crash, logs = run_fit(strategy, results)
    unmet = n_honest < 2 * f + 3
    if crash:
        record("1-crash", "krum-precondition", "crashed", f"n={n_honest} f={f}: {crash}")
        return
    if not unmet:
        assert all_finite(strategy.weights)
        return
    kept = all(np.array_equal(a, b) for a, b in zip(strategy.weights, before))
    said = any(("2f + 3" in m or "2f+3" in m or "Krum" in m or "krum" in m) for m in logs)
    record("1-crash", "krum-precondition", "clear_error" if kept and said else "silently_wrong", f"kept={kept} said={said}")


@FUZZ
@given(st.sampled_from(RULES), st.sampled_from(["none", "int8", "int8-block"]), st.integers(2, 5),
       st.integers(25, 38), st.integers(1, 10**7), st.integers(0, 2**16))
def test_large_agreeing_updates_times_large_counts_cannot_overflow_the_mean(
    rule: str, codec: str, n: int, exponent: int, count: int, seed: int
) -> None:
    strategy = make(rule, "mean", codec)
    start_round(strategy, n)
    rng = np.random.default_rng(seed)
    results = []
    for i in range(n):
        local = [np.full(s, 3.0 * 10.0**exponent * (1 + 0.01 * i), np.float32) for s in SHAPES]
        results.append((FakeProxy(f"big{i}"), fit_reply(strategy, local, count + i, rng)))
    crash, logs = run_fit(strategy, results)
    if crash:
        record("1-crash", "overflow", "crashed", f"{rule}/{codec} 3e{exponent} x {count}: {crash}")
    elif not all_finite(state_arrays(strategy)):
        record("1-crash", "overflow", "silently_wrong", f"{rule}/{codec} 3e{exponent}: non-finite model or state")
    else:
        record("1-crash", "overflow", "clear_error" if logs and not strategy._record.updated else "handled")  # type: ignore[union-attr]


# -------------------------------------------------------------------- area 2: numbers clients report
@FUZZ
@given(st.sampled_from(["fedavg", "fednova", "scaffold", "fedsgd", "fedprox"]), st.sampled_from(["mean", "multi-krum"]),
       st.integers(3, 6), st.integers(10**6, 2**63 - 1), st.integers(0, 2**16))
def test_one_client_cannot_take_the_aggregate_by_claiming_many_examples(
    rule: str, aggregator: str, n_honest: int, claimed: int, seed: int
) -> None:
    counts = [int(c) for c in np.random.default_rng(seed).integers(20, 200, size=n_honest)]
    kw = {"num_byzantine": 0}
    reference, _ = honest_reference(rule, aggregator, "none", False, n_honest, seed, counts, **kw)
    strategy = make(rule, aggregator, **kw)
    start_round(strategy, n_honest + 1)
    results = honest_replies(strategy, n_honest, seed, counts)
    rng = np.random.default_rng(seed + 1)
    offset = 0.2  # the attacker's update: a shift of every weight (within what a norm bound lets through)
    results.append((FakeProxy("evil"), fit_reply(strategy, local_weights(strategy, rng, offset=offset), claimed, rng)))
    crash, logs = run_fit(strategy, results)
    if crash:
        record("2-bounds", "num-examples", "crashed", f"{rule}/{aggregator} n={claimed}: {crash}")
        return
    if not all_finite(state_arrays(strategy)):
        record("2-bounds", "num-examples", "silently_wrong", "non-finite model")
        return
    share = float(np.mean(np.concatenate([(a - r).ravel() for a, r in zip(strategy.weights, reference)]))) / offset
    warned = any("evil" in m for m in logs)
    if warned:
        record("2-bounds", "num-examples", "clear_error")
    else:
        record("2-bounds", "num-examples", "silently_wrong" if share > 0.5 else "handled", f"{rule}/{aggregator}: share {share:.3f} of the model")


@FUZZ
@given(st.integers(2, 5), st.one_of(st.integers(10**4, 10**15), st.integers(-5, 0), st.floats(allow_nan=True),
                                    st.text(max_size=3), st.booleans(), st.none()), st.integers(0, 2**16))
def test_fednova_local_steps_are_bounded(n_honest: int, steps: Any, seed: int) -> None:
    reference, scale = honest_reference("fednova", "mean", "none", False, n_honest, seed)
    strategy = make("fednova")
    start_round(strategy, n_honest + 1)
    results = honest_replies(strategy, n_honest, seed)
    rng = np.random.default_rng(seed + 1)
    results.append((FakeProxy("evil"), fit_reply(strategy, local_weights(strategy, rng), 50, rng, {"train_loss": 1.0, "local_steps": steps})))
    outcome, detail = classify_fit(strategy, results, "evil", reference, scale)
    record("2-bounds", "local-steps", outcome, f"steps={steps!r}: {detail}")


def eval_res(loss: Any, n: int, metrics: dict[str, Any]) -> EvaluateRes:
    return EvaluateRes(Status(Code.OK, ""), loss, n, metrics)


BAD_EVAL = st.one_of(
    st.tuples(st.just("loss"), st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-3, 1e300])),
    st.tuples(st.just("num_examples"), st.sampled_from([0, -5, 10**12, 10**15, 2**63 - 1])),
    st.tuples(st.just("accuracy"), st.sampled_from([5.0, -0.1, 1.0001, math.nan, math.inf, "high", b"x", True])),
    st.tuples(st.just("reserved-loss"), st.floats(0, 100)),
    st.tuples(st.just("reserved-num_examples"), st.integers(-5, 10**15)),
)


@FUZZ
@given(st.integers(1, 4), BAD_EVAL, st.integers(0, 2**16))
def test_invalid_evaluation_replies_never_enter_the_federated_figures(n_honest: int, bad: tuple[str, Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    honest = [(FakeProxy(f"honest{i}"), eval_res(float(rng.uniform(0.1, 3)), int(rng.integers(10, 200)), {"accuracy": float(rng.uniform(0, 1))}))
              for i in range(n_honest)]
    what, value = bad
    loss, n, metrics = 0.5, 50, {"accuracy": 0.5}
    if what == "loss":
        loss = value
    elif what == "num_examples":
        n = value
    elif what == "accuracy":
        metrics = {"accuracy": value}
    elif what == "reserved-loss":
        metrics = {"accuracy": 0.5, "loss": value}
    else:
        metrics = {"accuracy": 0.5, "num_examples": value}
    def figures(replies: list[tuple[FakeProxy, EvaluateRes]]) -> tuple[float, float]:
        reference = make("fedavg")
        start_round(reference, len(replies))
        reference.aggregate_evaluate(1, replies, [])  # type: ignore[arg-type]
        assert reference._record is not None
        return reference._record.federated_loss, reference._record.federated_accuracy

    without = figures(honest)  # the bad reply dropped
    clean = figures([*honest, (FakeProxy("clean"), eval_res(0.5, 50, {"accuracy": 0.5}))])  # its valid part used
    strategy = make("fedavg")
    start_round(strategy, n_honest + 1)
    with warnings_logged() as logs:
        try:
            strategy.aggregate_evaluate(1, [*honest, (FakeProxy("evil"), eval_res(loss, n, metrics))], [])  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - the point: whatever escapes is counted
            record("2-bounds", f"eval-{what}", "crashed", f"{value!r}: {type(err).__name__}: {err}")
            return
    record_ = strategy._record
    assert record_ is not None
    got = (record_.federated_loss, record_.federated_accuracy)

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * max(1.0, abs(b))

    wrong = figures_sane(strategy)
    real = isinstance(value, int | float) and not isinstance(value, bool)
    if wrong:
        pass
    elif what in ("reserved-loss", "reserved-num_examples"):
        if "eval_num_examples" in record_.extra:
            wrong = f"a client metric named 'num_examples' became the figure eval_num_examples = {record_.extra['eval_num_examples']}"
        elif not (all(map(same, got, clean)) or all(map(same, got, without))):
            wrong = f"a client metric named {what[9:]!r} = {value!r} changed the figures to {got} (expected {clean})"
    elif what == "loss" and not (math.isfinite(value) and value >= 0) and not same(got[0], without[0]):
        wrong = f"loss {value} entered the federated loss: {got[0]} (without it {without[0]})"
    elif what == "accuracy" and not (real and 0.0 <= value <= 1.0) and not same(got[1], without[1]):
        wrong = f"accuracy {value!r} entered the federated accuracy: {got[1]} (without it {without[1]})"
    elif what == "num_examples" and value <= 0 and not all(map(same, got, without)):
        wrong = f"a reply of {value} examples entered the figures"
    elif what == "num_examples" and value > 10**6 and not any("evil" in m for m in logs):
        # One client claiming a million examples or more may not hold the figures on its own.
        for g, w, own in zip(got, without, (0.5, 0.5)):
            if not math.isnan(w) and abs(g - w) > 0.5 * abs(own - w) + 1e-9:
                wrong = f"{value} claimed examples moved a figure from {w:.4g} to {g:.4g} (its own value {own})"
    if wrong:
        record("2-bounds", f"eval-{what}", "silently_wrong", f"{value!r}: {wrong}")
    else:
        record("2-bounds", f"eval-{what}", "clear_error" if any("evil" in m for m in logs) else "handled")


@FUZZ
@given(st.sampled_from(["trimmed-mean", "median", "krum", "multi-krum"]), st.integers(1, 4), st.integers(0, 2**16))
def test_a_robust_aggregator_that_cannot_do_its_job_says_so(aggregator: str, n: int, seed: int) -> None:
    f = 1
    weak = {"trimmed-mean": math.floor(0.2 * n) == 0, "median": n <= 2, "krum": n < 2 * f + 3, "multi-krum": n < 2 * f + 3}[aggregator]
    strategy = make("fedavg", aggregator, num_byzantine=f)
    start_round(strategy, n)
    crash, logs = run_fit(strategy, honest_replies(strategy, n, seed))
    if not weak:
        assert not crash
        return
    if crash:
        record("2-bounds", f"weak-{aggregator}", "crashed", f"n={n}: {crash}")
        return
    said = any(aggregator in m for m in logs)
    record("2-bounds", f"weak-{aggregator}", "clear_error" if said else "silently_wrong", f"n={n}: nothing said")


# ----------------------------------------------------------------- area 3: the server optimizer's state
@FUZZ
@given(st.sampled_from(RULES), st.sampled_from(["mean", "mean", "median", "trimmed-mean"]), st.integers(3, 5),
       st.integers(3, 38), st.sampled_from(["all", "one", "control"]), st.booleans(), st.integers(0, 2**16))
def test_one_huge_finite_update_cannot_poison_or_freeze_the_server_optimizer(
    rule: str, aggregator: str, n_honest: int, exponent: int, where: str, negative: bool, seed: int
) -> None:
    if where == "control" and not STRATEGIES[rule].scaffold:
        where = "all"
    magnitude = (-1.0 if negative else 1.0) * 3.0 * 10.0**exponent
    runs = {}
    for attacked in (False, True):
        strategy = make(rule, aggregator)
        steps = []
        for rnd in range(1, 5):
            start_round(strategy, n_honest + 1, rnd)
            rng = np.random.default_rng(seed + rnd)
            results = honest_replies(strategy, n_honest, seed + 100 * rnd)
            if attacked and rnd == 2:
                local = local_weights(strategy, rng)
                if where == "all":
                    local = [(w + magnitude).astype(np.float32) for w in strategy.weights]
                elif where == "one":
                    local[0].reshape(-1)[0] = np.float32(strategy.weights[0].reshape(-1)[0] + magnitude)
                control = abs(magnitude) if where == "control" else HONEST_SCALE
                results.append((FakeProxy("evil"), fit_reply(strategy, local, 50, rng, control_scale=control)))
            before = [w.copy() for w in strategy.weights]
            crash, logs = run_fit(strategy, results, rnd)
            if crash:
                record("3-optimizer-state", f"huge-{where}", "crashed", f"{rule}/{aggregator} 3e{exponent} round {rnd}: {crash}")
                return
            if not all_finite(state_arrays(strategy)):
                record("3-optimizer-state", f"huge-{where}", "silently_wrong", f"{rule}/{aggregator} 3e{exponent}: non-finite state after round {rnd}")
                return
            steps.append(max_dev(strategy.weights, before))
            if attacked and rnd == 2:
                warned = any("evil" in m for m in logs) or (any(logs) and not strategy._record.updated)  # type: ignore[union-attr]
        runs[attacked] = (strategy, steps)
    (clean, clean_steps), (hit, hit_steps) = runs[False], runs[True]
    dev = max_dev(hit.weights, clean.weights)
    scale = max(max(clean_steps), HONEST_SCALE)
    if dev > POISON_FACTOR * scale:
        record("3-optimizer-state", f"huge-{where}", "silently_wrong", f"{rule}/{aggregator} 3e{exponent}: model moved {dev:.3g} (honest steps {scale:.3g})")
    elif hit_steps[3] < 0.01 * clean_steps[3]:
        record("3-optimizer-state", f"huge-{where}", "silently_wrong", f"{rule}/{aggregator} 3e{exponent}: frozen (round 4 step {hit_steps[3]:.3g} vs {clean_steps[3]:.3g})")
    else:
        record("3-optimizer-state", f"huge-{where}", "clear_error" if warned else "handled")


# ----------------------------------------------------------------------------------- area 4: run config
# Values above these are bad whatever the key's own bound says: they exhaust memory or time (issue 10, area 4).
SANE_MAX: dict[str, float] = {
    "hidden-size": 2**20, "num-samples": 10**8, "num-features": 10**6, "max-length": 2**20, "batch-size": 2**20,
    "num-partitions": 10**6, "compression-block-size": 2**31, "client-wait-timeout": 10**9, "round-timeout": 10**9,
    "lora-rank": 2**16, "num-server-rounds": 10**8, "local-epochs": 10**6, "grad-accumulation-steps": 2**20,
    "classes-per-partition": 10**6, "min-partition-size": 10**9, "min-fit-clients": 10**7,
    "min-evaluate-clients": 10**7, "min-available-clients": 10**7, "checkpoint-every": 10**8,
    "dp-population-size": 10**10, "num-byzantine": 10**7, "num-selected": 10**7, "seed": 2**63 - 1,
    "synthetic-alpha": 1e6, "synthetic-beta": 1e6,
}
NONEMPTY_PATHS = ("output-dir",)
PATH_KEYS = ("output-dir", "data-root", "data-path", "hf-model", "run-name")
# What makes each rule-, aggregator- or feature-specific key read, so that a value is judged on its own.
CONTEXT: dict[str, dict[str, Any]] = {
    "server-momentum": {"strategy": "fedavgm"},
    **{k: {"strategy": "fedadam"} for k in ("server-beta1", "server-beta2", "server-tau", "server-bias-correction")},
    "proximal-mu": {"strategy": "fedprox"},
    "trim-fraction": {"aggregator": "trimmed-mean"},
    "num-byzantine": {"aggregator": "multi-krum"},
    "num-selected": {"aggregator": "multi-krum"},
    **{k: {"model": "vit-lora"} for k in ("lora-rank", "lora-alpha", "lora-dropout", "lora-target-modules", "lora-modules-to-save")},
    **{k: {"dataset": "text", "hf-model": "some/model"} for k in ("hf-dtype", "text-column", "max-length")},
    "hf-model": {"dataset": "text"},
    **{k: {"dp-mode": "central-server", "dp-clipping": "adaptive"} for k in FIELDS if k.startswith("dp-") and k not in ("dp-mode", "dp-clipping")},
    **{k: {"secure-aggregation": True} for k in FIELDS if k.startswith("secagg-")},
    **{k: {"dataset": "synthetic", "num-partitions": 4} for k in ("synthetic-alpha", "synthetic-beta")},
}


def allows_inf(key: str) -> bool:
    """Whether the key's help text says what infinity means (``inf = ...``)."""
    return re.search(r"\binf\b", FIELDS[key].metadata.get("help", "")) is not None


def _bad_value(key: str, value: Any) -> str:
    """Why ``value`` is bad for ``key`` on its own ("" = it is a valid value), from the field's declared type and
    bounds and the sanity table above (independent of how the parser checks)."""
    f = FIELDS[key]
    default = f.default
    meta = f.metadata
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "not a bool"
    if isinstance(default, str):
        if not isinstance(value, str):
            return "not a string"
        choices = meta.get("choices")
        if choices is not None and value not in (choices() if callable(choices) else choices):
            return "not a choice"
        if key in PATH_KEYS and "\x00" in value:
            return "NUL in a path"
        if key in NONEMPTY_PATHS and not value.strip():
            return "empty path"
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "not a number"
    if isinstance(default, int) and not isinstance(value, int):
        return "not an int"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value) and not allows_inf(key):
        return "infinite"
    for name, ok in (("min", value >= meta.get("min", -math.inf)), ("max", value <= meta.get("max", math.inf)),
                     ("gt", value > meta.get("gt", -math.inf)), ("lt", value < meta.get("lt", math.inf))):
        if name in meta and not ok:
            return f"violates {name}"
    sane = SANE_MAX.get(key, 2**63 - 1 if isinstance(default, int) else math.inf)  # ints: TOML's 64 bits
    if abs(value) > sane and not math.isinf(value):
        return "beyond a sane maximum"
    return ""


def _value_for(key: str) -> st.SearchStrategy[Any]:
    default = FIELDS[key].default
    floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 1e-320])
    ints = st.integers(-3, 300) | st.integers(-(2**70), 2**70) | st.sampled_from([2**31, 2**40, 2**63 - 1, 2**63, 2**64])
    text = st.text(max_size=8) | st.sampled_from(["", " ", "\x00", "a\x00b", "..", "/", "none", "mean"])
    other = st.booleans() | st.none() | st.binary(max_size=3)
    if isinstance(default, bool):
        return st.booleans() | ints | text
    if isinstance(default, int):
        return ints | floats | other | text
    if isinstance(default, float):
        return floats | ints | other | text
    choices = FIELDS[key].metadata.get("choices")
    named = st.sampled_from(list(choices() if callable(choices) else choices)) if choices is not None else text
    return named | text | ints | other


@settings(FUZZ, max_examples=600)
@given(st.data())
def test_every_run_config_value_parses_or_raises_config_error_naming_the_key(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(FIELDS)))
    value = data.draw(_value_for(key))
    why = _bad_value(key, value)
    overrides = {**CONTEXT.get(key, {}), key: value}
    try:
        cfg = parse_run_config(overrides)
    except ConfigError as err:
        if why:
            record("4-run-config", why, "clear_error" if key in str(err) else "unclear_error", f"{key}={value!r}: {err}")
        elif key not in str(err):
            record("4-run-config", "valid-value", "unclear_error", f"{key}={value!r}: {err}")
        return
    except Exception as err:  # noqa: BLE001 - the point: whatever escapes is counted
        record("4-run-config", why or "valid-value", "crashed", f"{key}={value!r}: {type(err).__name__}: {err}")
        return
    assert isinstance(cfg, AppConfig)
    if why:
        record("4-run-config", why, "silently_wrong", f"{key}={value!r} accepted ({why})")
    elif not tallying():
        expected = float(value) if isinstance(FIELDS[key].default, float) else value  # ints become floats
        assert dataclasses.asdict(cfg)[key.replace("-", "_")] == expected


@pytest.mark.parametrize("key", sorted(k for k, f in FIELDS.items() if isinstance(f.default, float) and not isinstance(f.default, bool)))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_key_refuses_nan_and_infinity_naming_the_key(key: str, value: float) -> None:
    overrides = {**CONTEXT.get(key, {}), key: value}
    try:
        parse_run_config(overrides)
    except ConfigError as err:
        record("4-run-config", "non-finite-float", "clear_error" if key in str(err) else "unclear_error", f"{key}={value}: {err}")
        return
    except Exception as err:  # noqa: BLE001 - the point: whatever escapes is counted
        record("4-run-config", "non-finite-float", "crashed", f"{key}={value}: {type(err).__name__}: {err}")
        return
    allowed = value == math.inf and allows_inf(key)
    record("4-run-config", "non-finite-float", "handled" if allowed else "silently_wrong", f"{key}={value} accepted")
