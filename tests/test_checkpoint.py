"""Checkpoints: every field checked on load, corruptions refused, and what a resume may change.

The checkpoints here come from real runs of the strategy (in-process driver). Each refusal is a
`CheckpointError` naming the field or setting; nothing is overwritten when a resume is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flower_app.checkpoint import (
    CHANGEABLE_ON_RESUME,
    FIXED_ON_RESUME,
    NOT_COMPARED,
    checksum,
    read_checkpoint,
    restore_strategy,
    validate_checkpoint,
)
from flower_app.config import FIELDS, AppConfig, parse_run_config
from flower_app.inprocess import run_rounds
from flower_app.outputs import CHECKPOINT_NAME, CheckpointError, latest_run
from flower_app.server_app import build_strategy, make_strategy
from flower_app.task import WeightSpec
from tests.test_rule_oracles import clients, config

SMALL = {"model": "mlp", "hidden-size": 8, "local-epochs": 1, "num-server-rounds": 3, "run-name": "run"}
KINDS = {
    # Server optimizer moments m and v, and the DP accountant in the privacy state.
    "fedadam-dp": {"strategy": "fedadam", "server-learning-rate": 0.05, "dp-mode": "central-server",
                   "dp-noise-multiplier": 0.5},
    "scaffold": {"strategy": "scaffold"},
}
PLAIN = "fedavg"


@dataclasses.dataclass
class Written:
    cfg: AppConfig  # the config a resume of this checkpoint would run with
    spec: WeightSpec
    payload: dict[str, Any]
    path: Path

    def fresh_strategy(self) -> Any:
        return make_strategy(self.cfg, [np.zeros(s, np.float32) for s in self.spec.shapes], self.spec.trainable)


def write_checkpoint(out: Path, rounds: int = 2, **settings: Any) -> Written:
    cfg = config(out, **{**SMALL, **settings})
    strategy, _ = build_strategy(cfg)
    run_rounds(strategy, clients(cfg), rounds)
    path = out / "run" / CHECKPOINT_NAME
    payload = read_checkpoint(path)
    spec = WeightSpec(tuple(payload["keys"]), tuple(tuple(s) for s in payload["shapes"]), tuple(strategy.trainable))
    return Written(dataclasses.replace(cfg, resume=True), spec, payload, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    """One real checkpoint per kind, shared: tests change copies of the payload, never the files."""
    kinds = {**KINDS, PLAIN: {}}
    return {kind: write_checkpoint(tmp_path_factory.mktemp(kind), **kinds[kind]) for kind in kinds}


def copy_run(w: Written, out: Path) -> Written:
    """The written run folder copied to ``out`` (to damage or resume without touching the shared one)."""
    shutil.copytree(w.path.parent, out / "run", ignore=shutil.ignore_patterns("run.lock"))
    cfg = dataclasses.replace(w.cfg, output_dir=str(out))
    return Written(cfg, w.spec, w.payload, out / "run" / CHECKPOINT_NAME)


@pytest.fixture(params=list(KINDS))
def written(request: pytest.FixtureRequest, checkpoints: dict[str, Written]) -> Written:
    return checkpoints[request.param]


def with_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    """As a writer would have saved it: the checksum recomputed over the (changed) content."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    return {**body, "checksum": checksum(body)}


def load(w: Written, payload: Any) -> Any:
    """Validate and restore into a fresh strategy, as a resume does."""
    checked = validate_checkpoint(payload, w.cfg, w.spec)
    strategy = w.fresh_strategy()
    restore_strategy(strategy, checked)
    return strategy


def same(a: Any, b: Any) -> bool:
    """Deep equality: arrays by dtype, shape and value; lists and tuples alike; bool is not int."""
    if isinstance(a, torch.Tensor):
        a = a.numpy()
    if isinstance(b, torch.Tensor):
        b = b.numpy()
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
        return isinstance(a, (bool, np.bool_)) and isinstance(b, (bool, np.bool_)) and bool(a) == bool(b)
    numbers = (int, float, np.integer, np.floating)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return isinstance(a, (int, np.integer)) == isinstance(b, (int, np.integer)) and bool(a == b)
    return type(a) is type(b) and bool(a == b)


# ----------------------------------------------------------------------- refusals by name
def test_missing_checkpoint_says_to_run_without_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in any run folder of .*; run without resume first"):
        build_strategy(parse_run_config({"output-dir": str(tmp_path), "resume": True}))
    with pytest.raises(CheckpointError, match="no checkpoint at .*; run without resume first"):
        build_strategy(parse_run_config({"output-dir": str(tmp_path), "resume": True, "run-name": "x"}))


def test_corrupt_checkpoint_is_reported_and_left_in_place(checkpoints: dict[str, Written], tmp_path: Path) -> None:
    w = copy_run(checkpoints[PLAIN], tmp_path)
    w.path.write_bytes(w.path.read_bytes()[:100])  # truncated, as by a full disk without atomic writes
    with pytest.raises(CheckpointError, match="is corrupt or not a checkpoint"):
        build_strategy(w.cfg)
    assert w.path.stat().st_size == 100  # nothing overwritten: the evidence stays


def test_a_flipped_bit_that_torch_load_does_not_notice_is_caught_by_the_checksum(
    checkpoints: dict[str, Written], tmp_path: Path
) -> None:
    w = copy_run(checkpoints[PLAIN], tmp_path)
    data = bytearray(w.path.read_bytes())
    weights = w.payload["strategy"]["weights"][0]
    # Find the first weight array's bytes in the zip archive (stored uncompressed) and flip one bit of it.
    offset = bytes(data).find(weights.tobytes()[:64])
    assert offset > 0
    data[offset + 3] ^= 0x10
    w.path.write_bytes(bytes(data))
    damaged = read_checkpoint(w.path)  # torch.load reads it without complaint ...
    assert not np.array_equal(damaged["strategy"]["weights"][0], weights)
    with pytest.raises(CheckpointError, match="does not match its checksum.*damaged or altered"):
        build_strategy(w.cfg)  # ... the checksum does not


def test_a_file_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    torch.save({"weights": [1, 2, 3]}, tmp_path / "run" / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="is not a flower_app checkpoint: field 'format' is missing"):
        build_strategy(parse_run_config({"output-dir": str(tmp_path), "resume": True}))
    torch.save([1, 2], tmp_path / "run" / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="is not a flower_app checkpoint: it holds a list"):
        build_strategy(parse_run_config({"output-dir": str(tmp_path), "resume": True}))


def _dict_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            if k != "config":
                out += _dict_paths(v, (*prefix, k))
    return out


def _field_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def test_every_missing_field_is_named(written: Written) -> None:
    paths = _dict_paths(written.payload)
    assert len(paths) >= 12
    for path in paths:
        if path == ("strategy", "best"):
            continue  # optional: checkpoints written before best-model selection have none (tests/test_best_model.py)
        broken = copy.deepcopy(written.payload)
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        if path != ("checksum",):
            broken = with_checksum(broken)  # a writer's bug, not a damaged file: the field must be named
        with pytest.raises(CheckpointError, match=rf"field '{_field_name(path)}' is missing"):
            load(written, broken)


@pytest.mark.parametrize(
    "where, value, problem",
    [
        (("round",), -50, r"field 'round' must be >= 0, got -50"),
        (("round",), 2.0, r"field 'round' must be an integer"),
        (("round",), True, r"field 'round' must be an integer"),
        (("strategy", "round"), 1, r"field 'strategy.round' is 1 but the checkpoint's round is 2"),
        (("config",), "lr=1", r"field 'config' must be a dict"),
        (("config", "learning-rate"), [0.1], r"field 'config.learning-rate' must be a run-config scalar"),
        (("strategy", "weights"), "w", r"field 'strategy.weights' must be a list of arrays"),
        (("strategy", "optimizer", "step"), -1, r"field 'strategy.optimizer.step' must be >= 0"),
        (("strategy", "optimizer", "extra"), 1, r"field 'strategy.optimizer' has unknown entries \['extra'\]"),
        (("format",), "flower_app-checkpoint-v9", r"is not a flower_app-checkpoint-v2 checkpoint"),
        (("keys",), ["a", "b"], r"holds a different model: field 'keys'"),
        (("shapes",), [[1]], r"holds a different model: field 'shapes'"),
    ],
)
def test_a_bad_field_value_is_named(checkpoints: dict[str, Written], where: tuple, value: Any, problem: str) -> None:
    w = checkpoints["fedadam-dp"]
    broken = copy.deepcopy(w.payload)
    parent = broken
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    with pytest.raises(CheckpointError, match=problem):
        load(w, with_checksum(broken))


@pytest.mark.parametrize("which", ["weights", "m", "v", "control"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_or_optimizer_state_are_refused(checkpoints: dict[str, Written], which: str, bad: float) -> None:
    w = checkpoints["scaffold" if which == "control" else "fedadam-dp"]
    broken = copy.deepcopy(w.payload)
    state = broken["strategy"]
    arrays = {"weights": state["weights"], "control": state.get("scaffold") and state["scaffold"]["control"],
              "m": state["optimizer"]["m"], "v": state["optimizer"]["v"]}[which]
    arrays[-1].reshape(-1)[0] = bad
    field = {"weights": "strategy.weights", "m": "strategy.optimizer.m", "v": "strategy.optimizer.v",
             "control": "strategy.scaffold.control"}[which]
    with pytest.raises(CheckpointError, match=rf"field '{field}\[{len(arrays) - 1}\]' holds 1 non-finite values"):
        load(w, with_checksum(broken))


def test_a_negative_second_moment_float64_weights_and_a_wrong_shape_are_refused(checkpoints: dict[str, Written]) -> None:
    w = checkpoints["fedadam-dp"]
    cases = [
        (("optimizer", "v"), lambda a: -a - 1, r"strategy.optimizer.v\[0\]' holds negative values"),
        (("weights",), lambda a: a.astype(np.float64), r"strategy.weights\[0\]' must be float32, got float64"),
        (("weights",), lambda a: a.T.copy(), r"strategy.weights\[0\]' has shape"),
        (("optimizer", "m"), lambda a: a[:1], r"strategy.optimizer.m\[0\]' has shape"),
    ]
    for where, change, problem in cases:
        broken = copy.deepcopy(w.payload)
        arrays = broken["strategy"]
        for key in where:
            arrays = arrays[key]
        arrays[0] = change(arrays[0])
        with pytest.raises(CheckpointError, match=problem):
            load(w, with_checksum(broken))


def test_a_dp_checkpoint_without_its_accountant_is_refused(checkpoints: dict[str, Written]) -> None:
    w = checkpoints["fedadam-dp"]
    broken = copy.deepcopy(w.payload)
    broken["strategy"]["privacy"]["accountant"] = None
    with pytest.raises(CheckpointError, match="strategy.privacy.accountant' is empty, but the checkpoint's run used "
                                              "differential privacy"):
        load(w, with_checksum(broken))
    broken["strategy"]["privacy"]["accountant"] = {**w.payload["strategy"]["privacy"]["accountant"], "delta": 2.0}
    with pytest.raises(CheckpointError, match=r"accountant.delta' must be > 0 and < 1, got 2.0"):
        load(w, with_checksum(broken))


def test_a_checkpoint_past_num_server_rounds_says_how_to_continue(checkpoints: dict[str, Written]) -> None:
    w = checkpoints["scaffold"]
    with pytest.raises(CheckpointError, match="is at round 2 but num-server-rounds is 1: set num-server-rounds to at "
                                              "least 2"):
        build_strategy(dataclasses.replace(w.cfg, num_server_rounds=1))


def test_the_older_format_without_a_checksum_still_loads(checkpoints: dict[str, Written], caplog) -> None:
    w = checkpoints["scaffold"]
    old = {k: v for k, v in w.payload.items() if k != "checksum"}
    old["format"] = "flower_app-checkpoint-v1"
    strategy = load(w, old)
    np.testing.assert_array_equal(strategy.weights[0], w.payload["strategy"]["weights"][0])
    assert any("without a checksum" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ hypothesis: random corruptions
def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, (list, tuple)):
        for j, v in enumerate(obj):
            out += _paths(v, (*prefix, j))
    return out


def _hostile(original: Any) -> st.SearchStrategy[Any]:
    """Values to put where ``original`` was: wrong types, out-of-range and non-finite numbers, bent arrays."""
    anything = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=2),
                                                                                      st.integers(), max_size=2),
        st.just(np.zeros(3, np.float32)), st.just(np.float32(1.0)),
    )
    if isinstance(original, np.ndarray):
        a = original

        def poke(value: float) -> Callable[[Any], np.ndarray]:
            def f(i: int) -> np.ndarray:
                b = a.copy()
                if b.size:
                    b.reshape(-1)[i % b.size] = value
                return b
            return f

        bent = st.one_of(
            st.integers(0, 10**6).map(poke(np.nan)), st.integers(0, 10**6).map(poke(np.inf)),
            st.integers(0, 10**6).map(poke(-np.inf)), st.integers(0, 10**6).map(poke(1e30)),
            st.integers(0, 10**6).map(poke(-1.0)),
            st.sampled_from([np.float64, np.float16, np.int32, np.int64]).map(lambda t: a.astype(t)),
            st.just(a.reshape(-1)), st.just(a.reshape((1, *a.shape))), st.just(a[:-1] if a.size else a),
            st.just(a.copy()), st.just(-a),
        )
        return st.one_of(bent, anything)
    if isinstance(original, (bool, np.bool_)):
        return st.one_of(st.just(not original), st.just(int(original)), anything)
    if isinstance(original, (int, np.integer)):
        n = int(original)
        return st.one_of(st.sampled_from([n + 1, n - 1, -1, -50, 2**63, float(n), np.int64(n), n]), anything)
    if isinstance(original, float):
        return st.one_of(st.sampled_from([np.nan, np.inf, -np.inf, -original, 0.0, original * 2, original]), anything)
    if isinstance(original, str):
        return st.one_of(st.sampled_from(["", original + "x", original.upper(), original]), anything)
    if isinstance(original, (list, tuple)):
        o = list(original)
        return st.one_of(st.sampled_from([o[:-1], o + o[-1:], o[::-1], tuple(o), []]), anything)
    return anything


@st.composite
def corruptions(draw: st.DrawFn, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    broken = copy.deepcopy(payload)
    path = draw(st.sampled_from(_paths(payload)))
    parent: Any = None
    node: Any = broken
    for key in path:
        parent, node = node, node[key]
    ops = ["replace"] + (["delete"] if parent is not None else []) + (["add"] if isinstance(node, dict) else [])
    op = draw(st.sampled_from(ops))
    if op == "delete":
        del parent[path[-1]]
    elif op == "add":
        node[draw(st.sampled_from(["zz", "weights", "round", "extra"]))] = draw(_hostile(None))
    else:
        value = draw(_hostile(node))
        if parent is None:
            broken = value
        else:
            parent[path[-1]] = value
    return f"{op} {path}", broken


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FAST
@given(data=st.data())
def test_a_damaged_checkpoint_is_refused_or_loads_equal_to_the_original(written: Written, data: st.DataObject) -> None:
    what, broken = data.draw(corruptions(written.payload))
    try:
        strategy = load(written, broken)
    except CheckpointError:
        return
    # Accepted: then nothing that matters changed (an equal value, a list given as a tuple, ...).
    assert same(strategy.state_dict()["weights"], written.payload["strategy"]["weights"]), what
    original = written.fresh_strategy()
    restore_strategy(original, written.payload)
    assert same(strategy.state_dict(), original.state_dict()), what


@FAST
@given(data=st.data())
def test_a_self_consistent_but_bad_checkpoint_is_refused_or_loads_exactly_what_it_holds(
    written: Written, data: st.DataObject
) -> None:
    # As written by a buggy or hostile writer: the checksum matches the corrupted content.
    what, broken = data.draw(corruptions(written.payload))
    if isinstance(broken, dict):
        broken = with_checksum(broken)
    try:
        strategy = load(written, broken)
    except CheckpointError:
        return
    state = strategy.state_dict()
    for array in state["weights"] + (state["optimizer"]["m"] or []) + (state["optimizer"]["v"] or []):
        assert np.isfinite(array).all(), what
    assert same(state["weights"], [np.asarray(a) for a in broken["strategy"]["weights"]]), what
    assert state["round"] == broken["round"] == strategy.start_round, what


# ------------------------------------------------------------------------------ changed settings
def test_every_run_config_key_has_a_resume_rule() -> None:
    fixed = [k for keys in FIXED_ON_RESUME.values() for k in keys]
    listed = fixed + list(CHANGEABLE_ON_RESUME) + list(NOT_COMPARED)
    assert len(listed) == len(set(listed)), "a key is listed twice"
    assert set(listed) == set(FIELDS), (
        f"classify these keys in flower_app/checkpoint.py: {sorted(set(FIELDS) - set(listed))}; "
        f"unknown keys listed: {sorted(set(listed) - set(FIELDS))}"
    )


@pytest.mark.parametrize(
    "change, refused",
    [
        ({"dp-mode": "none"}, r"dp-mode: 'central-server' in the checkpoint, 'none' now \(the differential-privacy"),
        ({"dp-noise-multiplier": 0.1}, r"dp-noise-multiplier: 0.5 in the checkpoint, 0.1 now"),
        ({"dp-clipping-norm": 2.0}, r"dp-clipping-norm: 1.0 in the checkpoint, 2.0 now"),
        ({"dp-delta": 1e-6}, r"dp-delta: 1e-05 in the checkpoint, 1e-06 now"),
        ({"dp-population-size": 100}, r"dp-population-size: 0 in the checkpoint, 100 now"),
        ({"partitioner": "iid"}, r"partitioner: 'dirichlet' in the checkpoint, 'iid' now \(the data split\)"),
        ({"dirichlet-alpha": 0.1}, r"dirichlet-alpha: 0.5 in the checkpoint, 0.1 now \(the data split\)"),
        ({"seed": 1}, r"seed: 42 in the checkpoint, 1 now"),
        ({"test-fraction": 0.3}, r"test-fraction: 0.2 in the checkpoint, 0.3 now"),
        ({"strategy": "fedyogi"}, r"strategy: 'fedadam' in the checkpoint, 'fedyogi' now \(what the checkpoint's"),
        ({"hidden-size": 32}, r"hidden-size: 8 in the checkpoint, 32 now"),
    ],
)
def test_a_resume_that_would_break_a_guarantee_is_refused(
    checkpoints: dict[str, Written], change: dict, refused: str
) -> None:
    w = checkpoints["fedadam-dp"]
    before = {p.name: p.read_bytes() for p in w.path.parent.iterdir() if p.name != "run.lock"}
    out = w.path.parents[1]
    with pytest.raises(CheckpointError, match=refused + ".*Set them back, or start a new run"):
        build_strategy(config(out, **{**SMALL, **KINDS["fedadam-dp"], **change, "resume": True}))
    after = {p.name: p.read_bytes() for p in w.path.parent.iterdir() if p.name != "run.lock"}
    assert after == before  # refused before anything was written: config, history and metrics unchanged


def test_secure_aggregation_may_not_be_switched_on_a_resume(checkpoints: dict[str, Written]) -> None:
    w = checkpoints[PLAIN]
    with pytest.raises(CheckpointError, match=r"secure-aggregation: False in the checkpoint, True now \(secure agg"):
        build_strategy(dataclasses.replace(w.cfg, secure_aggregation=True))


def test_allowed_changes_are_logged_and_recorded_in_the_history(
    checkpoints: dict[str, Written], tmp_path: Path, caplog
) -> None:
    w = copy_run(checkpoints[PLAIN], tmp_path)
    run_dir = latest_run(tmp_path)
    cfg = config(tmp_path, **{**SMALL, "num-server-rounds": 4, "learning-rate": 0.02, "resume": True,
                              "run-name": ""})
    strategy, rounds = build_strategy(cfg)
    assert rounds == 2 and strategy.start_round == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("resume: run 'run' from round 2 of 4" in m for m in messages)
    assert any("settings changed since the checkpoint: num-server-rounds 3 -> 4, learning-rate 0.05 -> 0.02, "
               "output-dir" in m for m in messages)
    history = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert len(history) == 1
    assert history[0]["from_round"] == 2 and history[0]["num_server_rounds"] == 4
    assert history[0]["changed"] == {  # the copied folder moved: output-dir is a recorded change too
        "learning-rate": [0.05, 0.02], "num-server-rounds": [3, 4],
        "output-dir": [checkpoints[PLAIN].cfg.output_dir, str(tmp_path)],
    }
    recorded = json.loads((run_dir / "run_config.json").read_text())
    assert recorded["learning-rate"] == 0.02 and recorded["run-name"] == "run"  # the resolved name
    run_rounds(strategy, clients(cfg), rounds)
    assert read_checkpoint(w.path)["config"]["learning-rate"] == 0.02
    # A second resume adds a line and keeps the first.
    strategy, rounds = build_strategy(dataclasses.replace(cfg, num_server_rounds=5))
    history = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert [h["from_round"] for h in history] == [2, 4] and history[1]["changed"] == {"num-server-rounds": [4, 5]}


def test_the_accountant_comes_back_with_its_ledger(checkpoints: dict[str, Written]) -> None:
    w = checkpoints["fedadam-dp"]
    strategy = load(w, w.payload)
    accountant = w.payload["strategy"]["privacy"]["accountant"]
    (privacy,) = strategy.hooks
    assert privacy.accountant.state_dict()["ledger"] == accountant["ledger"] and len(accountant["ledger"]) == 1
    assert privacy.accountant.rounds == 2 and privacy.accountant.epsilon() > 0
