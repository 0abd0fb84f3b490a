"""What a node keeps: Flower's node state and the node-local state-dir, refusals, and resumes bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Context, RecordDict

from flower_app.client_app import CONTROL_KEY, RESIDUAL_KEY, FlowerClient, build_client
from flower_app.config import AppConfig, parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.node_state import (
    MANIFEST,
    DirectoryStore,
    NodeStateError,
    RecordStore,
    fingerprint,
    open_store,
)
from flower_app.personal import DITTO_KEY, PERSONAL_KEY
from flower_app.server_app import build_strategy

NUM_CLIENTS = 3
A = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([np.pi], np.float32)]


def fit_config(rnd: int, run: str = "run-a") -> dict[str, Any]:
    return {"server-round": rnd, "run-name": run}


def write(store: Any, rnd: int, name: str, arrays: list[np.ndarray], run: str = "run-a") -> None:
    node = store.open(fit_config(rnd, run), fit=True)
    node.put(name, arrays)
    node.commit()


# ---------------------------------------------------------------------------------------------------------- stores
def test_both_stores_round_trip_bit_for_bit(tmp_path: Path) -> None:
    for store in (RecordStore(RecordDict()), DirectoryStore(tmp_path, "partition-0", {"model": "mlp"})):
        write(store, 1, "x", A)
        got = store.open(fit_config(2), fit=True).get("x", [(2, 3), (1,)])
        assert got is not None and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, A))
        with pytest.raises(NodeStateError, match=r"array 0 has shape \(2, 3\), expected \(3, 2\)"):
            store.open(fit_config(2), fit=True).get("x", [(3, 2), (1,)])
        with pytest.raises(RuntimeError, match="only a fit stores state"):
            store.open(fit_config(2), fit=False).commit()


def test_a_fit_reads_the_rounds_before_it_an_evaluation_its_own_round(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, "partition-0", {})
    write(store, 3, "x", [np.zeros(1, np.float32)])
    write(store, 5, "x", [np.ones(1, np.float32)])
    read = lambda rnd, fit: store.open(fit_config(rnd), fit=fit).get("x")
    assert read(3, True) is None and read(4, True)[0][0] == 0 and read(5, True)[0][0] == 0  # type: ignore[index]
    assert read(5, False)[0][0] == 1 and read(9, True)[0][0] == 1  # type: ignore[index]
    assert store.open(fit_config(5, "run-b"), fit=False).get("x") is None  # keyed by run name


def test_snapshots_a_resume_may_need_are_kept(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, "partition-0", {}, checkpoint_every=3)
    for rnd in (1, 2, 4, 5, 7, 8):  # a node not sampled in rounds 3 and 6
        write(store, rnd, "x", [np.full(1, rnd, np.float32)])
    # Round 8 came after checkpoint 6 at the latest: keep the newest at or before 6 (round 5) and everything after.
    assert sorted(p.name for p in (tmp_path / "run-a" / "partition-0").glob("round-*")) == [
        "round-000005.npz", "round-000007.npz", "round-000008.npz"]
    resumed = store.open(fit_config(7), fit=True).get("x")  # the server resumed from its round-6 checkpoint
    assert resumed is not None and resumed[0][0] == 5


def test_state_of_another_run_config_or_model_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = parse_run_config({"personalization": "fedper", "model": "mlp"})
    write(DirectoryStore(tmp_path, "partition-0", fingerprint(cfg)), 1, PERSONAL_KEY, A)
    other = fingerprint(parse_run_config({"personalization": "fedrep", "model": "mlp", "hidden-size": 64}))
    with pytest.raises(NodeStateError) as err:
        DirectoryStore(tmp_path, "partition-0", other).open(fit_config(2), fit=True)
    assert "other settings (hidden-size 128 -> 64, personalization 'fedper' -> 'fedrep')" in str(err.value)
    assert len(list((tmp_path / "run-a" / "partition-0").iterdir())) == 2  # nothing deleted
    # A change a resume may make (the learning rate) is no reason to refuse.
    same = fingerprint(parse_run_config({"personalization": "fedper", "model": "mlp", "learning-rate": 0.3}))
    assert DirectoryStore(tmp_path, "partition-0", same).open(fit_config(2), fit=True).get(PERSONAL_KEY) is not None
    (tmp_path / "run-a" / "partition-0" / MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(NodeStateError, match="is not a node-state manifest"):
        DirectoryStore(tmp_path, "partition-0", same).open(fit_config(2), fit=True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"server-round": 1}, "the server sent no run-name"),
        ({"server-round": 1, "run-name": "../../etc"}, "not a valid run name"),
        ({"server-round": 1, "run-name": ".hidden"}, "not a valid run name"),
        ({"run-name": "ok"}, "no valid server-round"),
    ],
)
def test_what_the_server_sends_is_checked_before_it_names_a_folder(tmp_path: Path, config: dict, message: str) -> None:
    with pytest.raises(NodeStateError, match=message):
        DirectoryStore(tmp_path, "partition-0", {}).open(config, fit=True)
    assert list(tmp_path.iterdir()) == []


def test_a_torn_or_foreign_snapshot_is_refused(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, "partition-0", {})
    write(store, 1, "x", A)
    snapshot = tmp_path / "run-a" / "partition-0" / "round-000001.npz"
    snapshot.write_bytes(snapshot.read_bytes()[:40])
    with pytest.raises(NodeStateError, match="cannot be read"):
        store.open(fit_config(2), fit=True).get("x")


# ------------------------------------------------------------------------------------------------ node config
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: "relative/state", "must be an absolute path"),
        (lambda tmp: str(tmp / "missing"), "no such directory; create it for this node (mkdir -p"),
        (lambda tmp: str(tmp / "a-file"), "exists but is not a directory"),
        (lambda tmp: 7, "must be a path (a string), got int"),
    ],
)
def test_bad_state_dirs_are_refused_clearly(tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path / "a-file").write_text("x")
    cfg = parse_run_config({"personalization": "fedper"})
    with pytest.raises(NodeStateError) as err:
        open_store(cfg, RecordDict(), {"state-dir": make(tmp_path)}, 0)
    assert message in str(err.value) and "node-config state-dir=" in str(err.value)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_state_dir_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(NodeStateError, match="cannot write into it"):
            open_store(parse_run_config({}), RecordDict(), {"state-dir": str(tmp_path)}, 0)
    finally:
        tmp_path.chmod(0o700)


def test_no_state_dir_means_flowers_node_state(tmp_path: Path) -> None:
    assert isinstance(open_store(parse_run_config({}), RecordDict(), {}, 0), RecordStore)
    assert isinstance(open_store(parse_run_config({}), RecordDict(), {"state-dir": ""}, 0), RecordStore)
    store = open_store(parse_run_config({}), RecordDict(), {"state-dir": str(tmp_path)}, -1)
    assert isinstance(store, DirectoryStore) and store.partition == "own-data"


# --------------------------------------------------------------------------------------------------- whole runs
def config(tmp_path: Path, **overrides: object) -> AppConfig:
    base = {"output-dir": str(tmp_path), "dataset": "digits", "model": "mlp", "hidden-size": 16, "local-epochs": 1,
            "partitioner": "shards", "classes-per-partition": 4, "num-partitions": NUM_CLIENTS,
            "min-available-clients": NUM_CLIENTS, "min-fit-clients": NUM_CLIENTS, "min-evaluate-clients": NUM_CLIENTS,
            "client-wait-timeout": 1.0, "min-partition-size": 5, "run-name": "r", "learning-rate": 0.1}
    return parse_run_config({**base, **overrides})


def clients(cfg: AppConfig, state_root: Path | None) -> list[FlowerClient]:
    out = []
    for i in range(NUM_CLIENTS):
        node_config: dict[str, Any] = {"partition-id": i}
        if state_root is not None:
            (state_root / f"node{i}").mkdir(parents=True, exist_ok=True)
            node_config["state-dir"] = str(state_root / f"node{i}")
        out.append(FlowerClient(cfg, client_data(cfg, node_config), RecordDict(), node_config=node_config))
    return out


def kept(state_root: Path, run: str = "r") -> list[dict[str, np.ndarray]]:
    """Each node's newest snapshot of run ``run``, as name/index -> array."""
    out = []
    for i in range(NUM_CLIENTS):
        snapshots = sorted((state_root / f"node{i}" / run / f"partition-{i}").glob("round-*.npz"))
        with np.load(snapshots[-1]) as data:
            out.append({k: data[k] for k in data.files})
    return out


RESUME_CASES = {
    "ditto": ({"personalization": "ditto", "ditto-lambda": 0.5}, DITTO_KEY),
    "fedrep": ({"personalization": "fedrep", "personal-steps": 2}, PERSONAL_KEY),
    "fedbn+scaffold": ({"personalization": "fedbn", "model": "cnn", "strategy": "scaffold", "batch-size": 64}, CONTROL_KEY),
    "fedyogi-int8-error-feedback": ({"strategy": "fedyogi", "server-learning-rate": 0.05, "send-delta": True,
                                     "compression": "int8"}, RESIDUAL_KEY),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_four_rounds_equal_two_then_a_resume_with_the_nodes_state_dirs(tmp_path: Path, case: str) -> None:
    overrides, key = RESUME_CASES[case]
    common = {"num-server-rounds": 4, **overrides}
    straight_cfg = config(tmp_path / "straight", **common)
    straight, _ = build_strategy(straight_cfg)
    run_rounds(straight, clients(straight_cfg, tmp_path / "nodes-straight"), 4)

    first_cfg = config(tmp_path / "split", **common)
    first, _ = build_strategy(first_cfg)
    run_rounds(first, clients(first_cfg, tmp_path / "nodes-split"), 2)  # the server stops after round 2
    resumed_cfg = config(tmp_path / "split", **{**common, "resume": True})
    resumed, remaining = build_strategy(resumed_cfg)
    assert remaining == 2
    run_rounds(resumed, clients(resumed_cfg, tmp_path / "nodes-split"), remaining)  # fresh processes, same dirs

    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a, b)
    for s_node, r_node in zip(kept(tmp_path / "nodes-straight"), kept(tmp_path / "nodes-split")):
        assert s_node.keys() == r_node.keys() and any(k.startswith(key + "/") for k in s_node)
        for name in s_node:
            np.testing.assert_array_equal(s_node[name], r_node[name])


@pytest.mark.slow
def test_without_a_state_dir_scaffolds_control_variates_restart_and_the_resume_differs(tmp_path: Path) -> None:
    """The control for the test above: what a resume lost before nodes kept a state-dir."""
    common = {"num-server-rounds": 4, "strategy": "scaffold", "fraction-evaluate": 0.0}
    straight_cfg = config(tmp_path / "straight", **common)
    straight, _ = build_strategy(straight_cfg)
    run_rounds(straight, clients(straight_cfg, None), 4)
    first_cfg = config(tmp_path / "split", **common)
    run_rounds(build_strategy(first_cfg)[0], clients(first_cfg, None), 2)
    resumed_cfg = config(tmp_path / "split", **{**common, "resume": True})
    resumed, remaining = build_strategy(resumed_cfg)
    run_rounds(resumed, clients(resumed_cfg, None), remaining)
    assert not all(np.array_equal(a, b) for a, b in zip(straight.weights, resumed.weights))


def test_flowers_node_state_keeps_the_personal_part_across_messages_as_a_state_dir_does(tmp_path: Path) -> None:
    """Simulation: a new client per message (as Flower builds one), its state in the node's `context.state`."""
    cfg = config(tmp_path / "sim", personalization="fedper", **{"num-server-rounds": 2, "fraction-evaluate": 0.0})
    strategy, _ = build_strategy(cfg)
    contexts = [Context(0, i, {"partition-id": i}, RecordDict(), cfg.to_run_config()) for i in range(NUM_CLIENTS)]
    weights = strategy.weights
    for rnd in (1, 2):
        replies = [build_client(ctx).fit([w.copy() for w in weights], {"server-round": rnd, **strategy.client_config})
                   for ctx in contexts]
        weights = [np.mean([r[0][j].reshape(w.shape) for r in replies], axis=0) for j, w in enumerate(weights)]
    dir_cfg = config(tmp_path / "dir", personalization="fedper", **{"num-server-rounds": 2, "fraction-evaluate": 0.0})
    dir_strategy, _ = build_strategy(dir_cfg)
    dir_clients = clients(dir_cfg, tmp_path / "nodes")
    weights = dir_strategy.weights
    for rnd in (1, 2):
        replies = [c.fit([w.copy() for w in weights], {"server-round": rnd, "run-name": "r"}) for c in dir_clients]
        weights = [np.mean([r[0][j].reshape(w.shape) for r in replies], axis=0) for j, w in enumerate(weights)]
    for ctx, snapshot in zip(contexts, kept(tmp_path / "nodes")):
        record = ctx.state[PERSONAL_KEY].to_numpy_ndarrays()
        assert len(record) == 2  # the mlp's last layer: weight and bias
        for i, array in enumerate(record):
            np.testing.assert_array_equal(array, snapshot[f"{PERSONAL_KEY}/{i:04d}"])
