"""Secure aggregation (SecAgg+) with the project's strategy and NumPyClient, run in-process.

`InProcessGrid` hands Flower's real `SecAggPlusWorkflow` messages to the real ClientApp (with
its `secaggplus_mod`), so these tests exercise the protocol itself: masking, dropouts and
unmasking, quantization, and what the strategy gets to see.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from flower_app import client_app
from flower_app.config import AppConfig
from flower_app.inprocess import InProcessGrid
from flower_app.server_app import run_server, server_fn
from flower_app.server_privacy import ServerPrivacy
from strategies.privacy import l2_norm

# Each test trains real (small) models in-process through the whole protocol: a few seconds each.
pytestmark = pytest.mark.slow

NUM_CLIENTS = 3


def base_config(out: Path, **overrides: Any) -> dict[str, Any]:
    rc = AppConfig().to_run_config()
    rc.update({
        "num-server-rounds": 1, "output-dir": str(out), "run-name": "run", "model": "mlp", "hidden-size": 16, "local-epochs": 1,
        "fraction-evaluate": 0.0, "num-partitions": NUM_CLIENTS, "min-fit-clients": NUM_CLIENTS,
        "min-available-clients": NUM_CLIENTS, "send-delta": True,
    })
    rc.update(overrides)
    return rc


def run(rc: dict[str, Any], drop: Callable[[Message], bool] | None = None, spy: bool = False) -> tuple[Any, list]:
    """One in-process run; returns the strategy and what its shell's aggregate_fit received."""
    n = int(rc["num-partitions"])
    grid = InProcessGrid(client_app.app, [{"partition-id": i, "num-partitions": n} for i in range(n)], rc, drop=drop)
    seen: list = []

    def capturing_server_fn(context: Context) -> Any:
        components = server_fn(context)
        if spy:
            strategy = components.strategy
            original = strategy.aggregate_fit

            def recording(server_round: int, results: list, failures: list) -> Any:
                seen.append([list(res.parameters.tensors) for _, res in results])
                return original(server_round, results, failures)

            strategy.aggregate_fit = recording
        return components

    return run_server(grid, Context(1, 0, {}, RecordDict(), rc), capturing_server_fn), seen


def stage_of(msg: Message) -> str | None:
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE))


@pytest.fixture(scope="module")
def plain_and_secure(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list, Path]:
    out = tmp_path_factory.mktemp("secagg")
    plain, _ = run(base_config(out / "plain"))
    secure, seen = run(base_config(out / "secure", **{"secure-aggregation": True}), spy=True)
    return plain, secure, seen, out


def test_secure_aggregate_equals_the_plain_aggregate_within_quantization_error(plain_and_secure: tuple) -> None:
    plain, secure, _, out = plain_and_secure
    assert secure.preaggregated and isinstance(secure.hooks[0], ServerPrivacy)
    assert not plain.preaggregated and plain.hooks == ()
    # SecAgg+ quantizes each weighted value to 2^22 levels over [-8, 8]: a step of 16 / 2^22 = 3.8e-6
    # per client, divided by the summed weights (n_i / 1000, about 1.15 here).
    diffs = [float(np.abs(a - b).max()) for a, b in zip(plain.weights, secure.weights)]
    assert max(diffs) < 2e-5, diffs
    records = pd.read_csv(out / "secure" / "run" / "metrics.csv")
    assert list(records["results"]) == [0, NUM_CLIENTS] and bool(records["updated"].iloc[-1])
    assert records["central_loss"].iloc[-1] < records["central_loss"].iloc[0]  # the model did move


def test_the_strategy_only_ever_sees_the_aggregate(plain_and_secure: tuple) -> None:
    _, _, seen, out = plain_and_secure
    assert len(seen) == 1 and len(seen[0]) == NUM_CLIENTS
    first = seen[0][0]
    assert all(tensors == first for tensors in seen[0]), "every result must hold the same summed parameters"
    records = pd.read_csv(out / "secure" / "run" / "metrics.csv")
    assert "train_loss" in records and records["train_loss"].isna().all()  # per-client metrics stay home
    assert "fit_num_upload_bytes" in records


def test_a_dropout_during_the_protocol_does_not_stop_the_round(tmp_path: Path) -> None:
    dropped_node = 103  # InProcessGrid numbers nodes from 101

    def drop_in_secagg(msg: Message) -> bool:
        return msg.metadata.dst_node_id == dropped_node and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS

    def drop_in_plain(msg: Message) -> bool:
        return msg.metadata.dst_node_id == dropped_node and msg.metadata.message_type == "train"

    rc = {"num-partitions": 4, "min-fit-clients": 4, "min-available-clients": 4}
    secure, _ = run(base_config(tmp_path / "s", **{"secure-aggregation": True, **rc}), drop=drop_in_secagg)
    plain, _ = run(base_config(tmp_path / "p", **rc), drop=drop_in_plain)
    records = pd.read_csv(tmp_path / "s" / "run" / "metrics.csv")
    assert records["results"].iloc[-1] == 3 and records["failures"].iloc[-1] == 1
    assert bool(records["updated"].iloc[-1])
    # The survivors' masks cancel and the dropped client's are rebuilt from its shares: the
    # aggregate is the plain mean of the three survivors.
    for a, b in zip(plain.weights, secure.weights):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_too_many_dropouts_halt_the_round_and_keep_the_model(tmp_path: Path) -> None:
    def drop_two(msg: Message) -> bool:
        return msg.metadata.dst_node_id in (102, 103) and stage_of(msg) == Stage.SHARE_KEYS

    rc = base_config(tmp_path, **{"secure-aggregation": True, "secagg-reconstruction-threshold": 1.0})
    run(rc, drop=drop_two)
    records = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert not bool(records["updated"].iloc[-1])
    assert records["central_loss"].iloc[-1] == records["central_loss"].iloc[0]


def test_secure_aggregation_with_client_side_dp_clips_before_masking(tmp_path: Path) -> None:
    rc = base_config(tmp_path, **{
        "secure-aggregation": True, "dp-mode": "central-client", "dp-noise-multiplier": 0.0,
        "dp-clipping-norm": 0.05, "max-failure-fraction": 0.0,
    })
    start = None

    def capture_start(context: Context) -> Any:
        nonlocal start
        components = server_fn(context)
        start = [w.copy() for w in components.strategy.weights]
        return components

    grid = InProcessGrid(client_app.app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], rc)
    strategy = run_server(grid, Context(1, 0, {}, RecordDict(), rc), capture_start)
    assert start is not None
    step = l2_norm([w - s for w, s in zip(strategy.weights, start)])
    # The mean of three updates each clipped to 0.05 has norm <= 0.05 (and SecAgg+ adds ~1e-5).
    assert 0.0 < step <= 0.05 + 1e-4
    records = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert records["epsilon"].iloc[-1] == np.inf  # no noise: no guarantee, and it says so
