"""Checkpoints: what one holds, every field checked on load, and which settings a resume may change.

A checkpoint (``checkpoint.pt``, `torch.save` of plain containers and tensors, loaded with
``weights_only=True``) holds::

    format    "flower_app-checkpoint-v2"
    round     rounds done, 0 <= round <= num-server-rounds
    config    the run config that wrote it (a dict of scalars)
    keys      the model's parameter names, shapes: their shapes (must match this run's model)
    strategy  the strategy's state_dict: round, weights (finite float32 arrays, the model's shapes),
              optimizer {step, m, v} (moments finite, v >= 0), scaffold (None or {control}),
              best (None or {round <= round, metric, value >= 0 finite, weights: None for this round's}),
              privacy (DP runs: dp_mode, clipping_norm, accountant), scheduler (runs with the scheduler:
              the simulated clock, the dispatch counter, FedBuff's work in flight and the model versions
              it started from) and any further entries, in which every number must be finite
    checksum  CRC-32 over all of the above, so a flipped bit is caught (torch.load does not notice one)

`load_checkpoint` refuses anything else with a `CheckpointError` that names the field.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flower_app.config import FIELDS, AppConfig
from flower_app.rundir import CheckpointError, atomic_write
from flower_app.task import WeightSpec
from strategies.base import BEST_STATE_KEY, CONTROL_STATE_KEY, STATE_KEYS
from strategies.selection import SELECTION_METRICS

# A child of Flower's logger: these lines show in `flwr run --stream` and `flwr log` with the run's own.
log = logging.getLogger(f"flwr.{__name__}")

CHECKPOINT_FORMAT = "flower_app-checkpoint-v2"
OLD_FORMATS = ("flower_app-checkpoint-v1",)  # no checksum; still loaded

# Settings a resumed run may not change, by the guarantee a change would break. Every other key
# may change and is then listed in the log and in resume_history.jsonl (a test keeps every
# run-config key in exactly one of FIXED_ON_RESUME, CHANGEABLE_ON_RESUME and NOT_COMPARED).
FIXED_ON_RESUME: dict[str, tuple[str, ...]] = {
    "the differential-privacy guarantee": (
        "dp-mode", "dp-clipping", "dp-clipping-norm", "dp-noise-multiplier", "dp-delta", "dp-target-epsilon",
        "dp-population-size", "dp-target-quantile", "dp-clip-learning-rate", "dp-clip-count-stddev",
    ),
    "secure aggregation": (
        "secure-aggregation", "secagg-num-shares", "secagg-reconstruction-threshold", "secagg-clipping-range",
        "secagg-quantization-range", "secagg-max-weight",
    ),
    "the data split": (
        "dataset", "data-path", "image-size", "label-column", "class-names", "test-fraction", "num-samples", "num-features",
        "synthetic-alpha", "synthetic-beta", "partitioner", "num-partitions", "dirichlet-alpha",
        "classes-per-partition", "quantity-alpha", "min-partition-size", "seed", "text-column", "max-length",
        "prompt-column", "response-column",
        "server-data",
    ),
    "what the checkpoint's weights and server state are": (
        "strategy", "aggregator", "model", "hidden-size", "send-delta", "compression", "hf-model", "hf-dtype",
        "lora-rank", "lora-alpha", "lora-target-modules", "lora-modules-to-save", "input-shape", "num-outputs",
        # personalization: which entries travel (the checkpoint's weights) and what the nodes keep
        "personalization", "personal-modules",
    ),
    # The features the model was trained on: the agreed transform is in the checkpoint (federated preprocessing).
    "the transform of the features (its statistics are in the checkpoint)": (
        "preprocessing", "preprocessing-kind", "preprocessing-offset", "preprocessing-scale",
    ),
    # FedBuff's checkpoint holds the clients in flight and the model versions they started from; a sync run's
    # holds none. The simulated devices are the data the simulated clock is made of.
    "what the scheduler's state in the checkpoint is": ("mode",),
    "the simulated devices (their clock in the checkpoint)": (
        "device-profiles", "device-speed", "device-speed-spread", "device-upload-bandwidth",
        "device-download-bandwidth", "device-dropout", "device-availability", "device-availability-period",
        "device-trace",
    ),
}
# Training and operational settings: a resume may change them (e.g. more rounds, a lower learning
# rate, another device); the change is logged and recorded.
CHANGEABLE_ON_RESUME: tuple[str, ...] = (
    "num-server-rounds", "fraction-fit", "min-fit-clients", "fraction-evaluate", "min-evaluate-clients",
    "min-available-clients", "client-wait-timeout", "round-timeout", "max-failure-fraction",
    "server-learning-rate", "server-momentum", "server-beta1", "server-beta2", "server-tau",
    "server-bias-correction", "proximal-mu", "trim-fraction", "num-byzantine", "num-selected",
    "local-epochs", "batch-size", "learning-rate", "client-momentum", "weight-decay", "grad-accumulation-steps",
    "device", "data-root", "download", "compression-block-size", "topk-fraction", "error-feedback",
    "output-dir", "checkpoint-every", "lora-dropout", "client-optimizer", "tensorboard",
    "model-cache-dir", "answer-scoring", "gradient-checkpointing", "max-local-steps",
    "max-count-ratio", "max-update-norm-ratio",
    # speed (issue 12): where federated evaluation happens, the nodes' data cache, how arrays travel
    "federated-evaluation", "data-cache", "data-cache-dir", "pack-arrays",
    "round-deadline", "over-selection", "async-concurrency", "async-buffer-size",
    "staleness-weighting", "staleness-exponent", "staleness-cutoff", "max-staleness", "device-work-budget",
    # personalization: the personal training's settings
    "personal-epochs", "personal-steps", "personal-learning-rate", "ditto-lambda",
)
NOT_COMPARED: tuple[str, ...] = ("resume", "run-name")


# --------------------------------------------------------------------------------- conversion
def _to_torch(obj: Any) -> Any:
    # torch.load(weights_only=True) accepts tensors and plain containers, not numpy arrays.
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def checksum(obj: Any) -> str:
    """CRC-32 of a canonical encoding of plain containers, scalars and arrays (numpy or torch)."""
    return f"crc32:{_crc(obj, 0):08x}"


def _crc(obj: Any, crc: int) -> int:
    if isinstance(obj, torch.Tensor):
        obj = obj.numpy()
    if isinstance(obj, np.ndarray):
        header = f"A{obj.dtype.str}{obj.shape}".encode()
        crc = zlib.crc32(header, crc)
        return zlib.crc32(np.ascontiguousarray(obj).view(np.uint8).reshape(-1).data, crc)
    if isinstance(obj, Mapping):
        crc = zlib.crc32(b"{%d" % len(obj), crc)
        for key in sorted(obj, key=repr):
            crc = _crc(key, crc)
            crc = _crc(obj[key], crc)
        return crc
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(b"[%d" % len(obj), crc)
        for item in obj:
            crc = _crc(item, crc)
        return crc
    if obj is None or isinstance(obj, (bool, np.bool_)):
        return zlib.crc32(repr(None if obj is None else bool(obj)).encode(), crc)
    if isinstance(obj, (int, np.integer)):
        return zlib.crc32(b"I%d" % int(obj), crc)
    if isinstance(obj, (float, np.floating)):
        return zlib.crc32(b"F" + struct.pack("<d", float(obj)), crc)
    if isinstance(obj, str):
        return zlib.crc32(b"S" + obj.encode("utf-8", "surrogatepass"), crc)
    return zlib.crc32(f"?{type(obj).__name__}:{obj!r}".encode(), crc)


# ------------------------------------------------------------------------------- save and load
def save_checkpoint(path: Path, cfg: AppConfig, spec: WeightSpec, strategy_state: Mapping[str, Any]) -> None:
    """Write the checkpoint atomically (`flower_app.rundir.atomic_write`)."""
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "round": int(strategy_state["round"]),
        "config": cfg.to_run_config(),
        "keys": list(spec.keys),
        "shapes": [list(s) for s in spec.shapes],
        "strategy": _to_torch(dict(strategy_state)),
    }
    payload["checksum"] = checksum(payload)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a Python file: a full disk raises OSError with its errno
            torch.save(payload, f)

    atomic_write(path, write)


def read_checkpoint(path: Path) -> Any:
    """The raw object in ``path`` (arrays as numpy), or `CheckpointError` if it cannot be read."""
    if not path.exists():
        raise CheckpointError(f"resume=true but there is no checkpoint at {path}; run without resume first")
    try:
        with open(path, "rb") as f:
            data = f.read()
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {type(err).__name__}: {err}") from err
    return _to_numpy(payload)


def load_checkpoint(path: Path, cfg: AppConfig, spec: WeightSpec) -> dict[str, Any]:
    """Read, validate and check a checkpoint against this run; raises `CheckpointError` with the reason.

    Settings in `FIXED_ON_RESUME` that differ from the checkpoint's are refused; the changeable
    ones are for the caller to record (`config_changes`).
    """
    return validate_checkpoint(read_checkpoint(path), cfg, spec, source=f"checkpoint {path}")


# --------------------------------------------------------------------------------- validation
class _Checker:
    """Field checks that raise `CheckpointError` naming the field (``strategy.optimizer.m[2]``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: field '{field}' {problem}")

    def get(self, mapping: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in mapping:
            raise self.fail(f"{where}{key}", "is missing")
        return mapping[key]

    def as_dict(self, value: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(field, f"must be a dict, got {type(value).__name__}")
        return value

    def as_int(self, value: Any, field: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise self.fail(field, f"must be an integer, got {value!r} ({type(value).__name__})")
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise self.fail(field, f"must be {bound}, got {value}")
        return int(value)

    def as_float(self, value: Any, field: str, positive: bool = False, below_one: bool = False) -> float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self.fail(field, f"must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise self.fail(field, f"must be finite, got {value}")
        if (positive and value <= 0) or (not positive and value < 0) or (below_one and value >= 1):
            raise self.fail(field, f"must be {'> 0' if positive else '>= 0'}{' and < 1' if below_one else ''}, got {value}")
        return float(value)

    def as_str(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {type(value).__name__}")
        return value

    def arrays(self, value: Any, field: str, shapes: Sequence[tuple[int, ...]], nonneg: bool = False) -> list[np.ndarray]:
        if not isinstance(value, (list, tuple)):
            raise self.fail(field, f"must be a list of arrays, got {type(value).__name__}")
        if len(value) != len(shapes):
            raise self.fail(field, f"holds {len(value)} arrays; the model has {len(shapes)}")
        out = []
        for j, (array, shape) in enumerate(zip(value, shapes)):
            name = f"{field}[{j}]"
            if not isinstance(array, np.ndarray):
                raise self.fail(name, f"must be an array, got {type(array).__name__}")
            if array.dtype != np.float32:
                raise self.fail(name, f"must be float32, got {array.dtype}")
            if tuple(array.shape) != tuple(shape):
                raise self.fail(name, f"has shape {tuple(array.shape)}; the model's is {tuple(shape)}")
            if not np.isfinite(array).all():
                raise self.fail(name, f"holds {int(np.size(array) - np.isfinite(array).sum())} non-finite values")
            if nonneg and (array < 0).any():
                raise self.fail(name, "holds negative values (a second moment is >= 0)")
            out.append(array)
        return out

    def all_finite(self, value: Any, field: str) -> None:
        """Every number anywhere in ``value`` finite (entries the validator does not know in detail)."""
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise self.fail(field, "holds non-finite values")
        elif isinstance(value, (float, np.floating)):
            if not math.isfinite(value):
                raise self.fail(field, f"must be finite, got {value}")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                self.all_finite(v, f"{field}.{k}")
        elif isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                self.all_finite(v, f"{field}[{j}]")


def validate_checkpoint(payload: Any, cfg: AppConfig, spec: WeightSpec, source: str = "checkpoint") -> dict[str, Any]:
    """Check every field of a loaded checkpoint (arrays as numpy) against this run's model and settings.

    Returns the payload (a dict); raises `CheckpointError` naming the first bad field.
    """
    c = _Checker(source)
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{source} is not a flower_app checkpoint: it holds a {type(payload).__name__}")
    if "format" not in payload:
        raise CheckpointError(f"{source} is not a flower_app checkpoint: field 'format' is missing")
    fmt = payload["format"]
    if not isinstance(fmt, str) or (fmt != CHECKPOINT_FORMAT and fmt not in OLD_FORMATS):
        raise CheckpointError(f"{source} is not a {CHECKPOINT_FORMAT} checkpoint (format {fmt!r})")
    if fmt in OLD_FORMATS:
        log.warning("%s has the older format %s, without a checksum: damage to its content cannot be detected",
                    source, fmt)
    if fmt == CHECKPOINT_FORMAT:  # first: if the bytes changed, no field can be trusted
        stored = c.as_str(c.get(payload, "checksum", ""), "checksum")
        if checksum({k: v for k, v in payload.items() if k != "checksum"}) != stored:
            raise CheckpointError(
                f"{source}: its content does not match its checksum (field 'checksum'): the file was damaged or "
                "altered after it was written"
            )
    config = c.as_dict(c.get(payload, "config", ""), "config")
    for key, value in config.items():
        if not isinstance(key, str) or isinstance(value, np.generic) or not isinstance(value, (bool, int, float, str)):
            raise c.fail(f"config.{key}", f"must be a run-config scalar, got {type(value).__name__}")
    refused = refused_changes(config, cfg.to_run_config())
    if refused:
        raise CheckpointError(
            f"{source} was written by a run with other settings that a resume may not change: "
            f"{'; '.join(refused)}. Set them back, or start a new run (resume=false)"
        )
    rnd = c.as_int(c.get(payload, "round", ""), "round")
    if rnd > cfg.num_server_rounds:
        raise CheckpointError(
            f"{source} is at round {rnd} but num-server-rounds is {cfg.num_server_rounds}: set "
            f"num-server-rounds to at least {rnd} to continue it"
        )
    keys = c.get(payload, "keys", "")
    if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys) or list(keys) != list(spec.keys):
        raise CheckpointError(f"{source} holds a different model: field 'keys' (parameter names) differs from "
                              f"this run's model ({len(spec.keys)} arrays: {', '.join(spec.keys[:4])}...)")
    shapes = c.get(payload, "shapes", "")
    if not isinstance(shapes, (list, tuple)) or [_shape(s) for s in shapes] != [tuple(s) for s in spec.shapes]:
        raise CheckpointError(f"{source} holds a different model: field 'shapes' differs from this run's model")
    state = c.as_dict(c.get(payload, "strategy", ""), "strategy")
    if c.as_int(c.get(state, "round", "strategy."), "strategy.round") != rnd:
        raise c.fail("strategy.round", f"is {state['round']} but the checkpoint's round is {rnd}")
    c.arrays(c.get(state, "weights", "strategy."), "strategy.weights", spec.shapes)
    trainable_shapes = [s for s, t in zip(spec.shapes, spec.trainable) if t]
    opt = c.as_dict(c.get(state, "optimizer", "strategy."), "strategy.optimizer")
    c.as_int(c.get(opt, "step", "strategy.optimizer."), "strategy.optimizer.step")
    for moment in ("m", "v"):
        value = c.get(opt, moment, "strategy.optimizer.")
        if value is not None:
            c.arrays(value, f"strategy.optimizer.{moment}", trainable_shapes, nonneg=moment == "v")
    extra = set(opt) - {"step", "m", "v"}
    if extra:
        raise c.fail("strategy.optimizer", f"has unknown entries {sorted(extra)}")
    control = c.get(state, CONTROL_STATE_KEY, "strategy.")
    if control is not None:
        where = f"strategy.{CONTROL_STATE_KEY}"
        control = c.as_dict(control, where)
        c.arrays(c.get(control, "control", f"{where}."), f"{where}.control", trainable_shapes)
    best = state.get(BEST_STATE_KEY)  # absent from checkpoints written before best-model selection
    if best is not None:
        _check_best(c, best, rnd, spec)
    dp = _saved_value(config, "dp-mode") != "none"
    if dp or _saved_value(config, "secure-aggregation") or "privacy" in state:
        _check_privacy(c, c.get(state, "privacy", "strategy."), dp)
    for key in set(state) - {*STATE_KEYS, "privacy"}:
        c.all_finite(state[key], f"strategy.{key}")
    return dict(payload)


def _shape(value: Any) -> tuple[Any, ...] | None:
    if not isinstance(value, (list, tuple)):
        return None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) for d in value):
        return None
    return tuple(int(d) for d in value)


def _check_best(c: _Checker, value: Any, rnd: int, spec: WeightSpec) -> None:
    where = f"strategy.{BEST_STATE_KEY}"
    best = c.as_dict(value, where)
    best_round = c.as_int(c.get(best, "round", f"{where}."), f"{where}.round", hi=rnd)
    metric = c.as_str(c.get(best, "metric", f"{where}."), f"{where}.metric")
    if metric not in SELECTION_METRICS:
        raise c.fail(f"{where}.metric", f"must be one of {', '.join(SELECTION_METRICS)}, got {metric!r}")
    c.as_float(c.get(best, "value", f"{where}."), f"{where}.value")
    weights = c.get(best, "weights", f"{where}.")
    if weights is None and best_round != rnd:
        raise c.fail(f"{where}.weights", f"is empty, but the best round ({best_round}) is not the checkpoint's ({rnd})")
    if weights is not None:
        c.arrays(weights, f"{where}.weights", spec.shapes)


def _check_privacy(c: _Checker, value: Any, dp: bool) -> None:
    privacy = c.as_dict(value, "strategy.privacy")
    c.as_str(c.get(privacy, "dp_mode", "strategy.privacy."), "strategy.privacy.dp_mode")
    c.as_float(c.get(privacy, "clipping_norm", "strategy.privacy."), "strategy.privacy.clipping_norm", positive=True)
    accountant = c.get(privacy, "accountant", "strategy.privacy.")
    if accountant is None:
        if dp:
            raise c.fail("strategy.privacy.accountant", "is empty, but the checkpoint's run used differential privacy")
        return
    where = "strategy.privacy.accountant."
    acc = c.as_dict(accountant, where[:-1])
    c.as_str(c.get(acc, "kind", where), where + "kind")
    c.as_float(c.get(acc, "delta", where), where + "delta", positive=True, below_one=True)
    c.as_int(c.get(acc, "population", where), where + "population")
    c.as_int(c.get(acc, "noiseless_rounds", where), where + "noiseless_rounds")
    ledger = c.get(acc, "ledger", where)
    if not isinstance(ledger, (list, tuple)):
        raise c.fail(where + "ledger", f"must be a list, got {type(ledger).__name__}")
    for j, entry in enumerate(ledger):
        name = f"{where}ledger[{j}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise c.fail(name, "must be [noise multiplier, clients sampled, rounds]")
        c.as_float(entry[0], name + "[0]")
        c.as_int(entry[1], name + "[1]")
        c.as_int(entry[2], name + "[2]")


def restore_strategy(strategy: Any, payload: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load a validated checkpoint's state into ``strategy``; whatever it refuses becomes a `CheckpointError`."""
    try:
        strategy.load_state_dict(payload["strategy"])
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise CheckpointError(f"{source} does not fit this run's strategy: {err}") from err


# ------------------------------------------------------------------------------ resume settings
def _saved_value(saved: Mapping[str, Any], key: str) -> Any:
    # A key the checkpoint's run did not have yet ran with today's default.
    if key in saved:
        return saved[key]
    return FIELDS[key].default if key in FIELDS else None


def _fixed_reason(key: str) -> str | None:
    for reason, keys in FIXED_ON_RESUME.items():
        if key in keys:
            return reason
    if key in CHANGEABLE_ON_RESUME or key in NOT_COMPARED:
        return None
    return "a setting not yet classified for resume (flower_app/checkpoint.py FIXED_ON_RESUME)"


def refused_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: old -> new (reason)`` for every changed key a resume may not change."""
    out = []
    for key in current:
        reason = _fixed_reason(key)
        old = _saved_value(saved, key)
        if reason is not None and old != current[key]:
            out.append(f"{key}: {old!r} in the checkpoint, {current[key]!r} now ({reason})")
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for every compared key whose value changed (the allowed ones, after `load_checkpoint`)."""
    return {
        key: [_saved_value(saved, key), value]
        for key, value in current.items()
        if key not in NOT_COMPARED and _saved_value(saved, key) != value
    }


def resumed_config(cfg: AppConfig, run_name: str) -> AppConfig:
    """The config a run records: its resolved run name filled in."""
    return cfg if cfg.run_name == run_name else dataclasses.replace(cfg, run_name=run_name)
