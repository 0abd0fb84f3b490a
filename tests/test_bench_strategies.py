"""The strategy benchmark: its corrupted clients do what they claim, and its quick mode writes a sane table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.common import RecordDict

from benchmarks import bench_strategies as bench
from flower_app.client_app import FlowerClient
from flower_app.config import parse_run_config
from flower_app.data import client_data
from strategies.compression import decompress


def _client(overrides: dict) -> FlowerClient:
    cfg = parse_run_config({"dataset": "digits", "model": "mlp", "hidden-size": 8, "local-epochs": 1,
                            "min-partition-size": 5, **overrides})
    return FlowerClient(cfg, client_data(cfg, {"partition-id": 1, "num-partitions": 3}), RecordDict())


@pytest.mark.parametrize("send_delta", [False, True], ids=["weights", "delta"])
@pytest.mark.parametrize("attack", ["scale", "sign-flip", "random"])
def test_corrupted_client_transforms_the_honest_update(attack: str, send_delta: bool) -> None:
    overrides = {"send-delta": send_delta, "compression": "none"}
    honest, wrapped = _client(overrides), bench.CorruptedClient(_client(overrides), attack, seed=3)
    start = honest.get_parameters({})
    config = {"server-round": 1}
    shapes = list(honest.spec.shapes)
    # Two fresh clients with the same seed train identically, so the honest reply is the oracle.
    h_wire, h_n, _ = honest.fit(start, config)
    c_wire, c_n, _ = wrapped.fit(start, config)
    h = decompress(h_wire, shapes, honest.codec)
    c = decompress(c_wire, shapes, honest.codec)  # the server can decode it: same codec, same shapes
    h_update = h if send_delta else [a - g for a, g in zip(h, start)]
    c_update = c if send_delta else [a - g for a, g in zip(c, start)]
    assert c_n == h_n
    for hu, cu in zip(h_update, c_update):
        assert np.all(np.isfinite(cu))
        if attack == "scale":
            np.testing.assert_allclose(cu, 1e6 * hu, rtol=1e-4, atol=1e-2)
        elif attack == "sign-flip":
            np.testing.assert_allclose(cu, -hu, rtol=1e-5, atol=1e-6)
    if attack == "random":  # N(0, 1) whatever the honest update was
        flat = np.concatenate([u.ravel() for u in c_update])
        assert flat.size > 600 and abs(flat.std() - 1.0) < 0.15 and abs(flat.mean()) < 0.2  # 5 standard errors


def test_corrupted_client_passes_scaffold_control_deltas_through() -> None:
    honest, wrapped = _client({"strategy": "scaffold"}), bench.CorruptedClient(_client({"strategy": "scaffold"}), "sign-flip", 0)
    n_model = len(honest.spec)
    controls = [np.zeros(s, dtype=np.float32) for s, t in zip(honest.spec.shapes, honest.spec.trainable) if t]
    start = honest.get_parameters({}) + controls
    h_wire, _, _ = honest.fit(start, {"server-round": 1})
    c_wire, _, _ = wrapped.fit(start, {"server-round": 1})
    assert len(c_wire) == len(h_wire)
    for a, b in zip(h_wire[n_model:], c_wire[n_model:]):
        np.testing.assert_array_equal(a, b)


def test_unknown_attack_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown attack 'flip'; choose one of: scale, sign-flip, random"):
        bench.CorruptedClient(_client({}), "flip", 0)


def test_quick_mode_writes_the_table(tmp_path: Path) -> None:
    frame = bench.main(["--quick", "--tune-rounds", "1", "--only", "a-,c-,d-", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "strategies.csv")
    expected = {"setting", "attack", "num_corrupted", "rule", "strategy", "aggregator", "final_accuracy",
                "best_accuracy", "best_round", "learning_rate", "local_epochs", "server_learning_rate",
                "server_momentum", "server_beta1", "server_beta2", "server_tau", "proximal_mu", "trim_fraction",
                "num_byzantine", "rejected_updates", "client_failures"}
    assert expected <= set(table.columns)
    assert len(table) == len(frame) > 0
    assert table["final_accuracy"].map(math.isfinite).all() and table["best_accuracy"].map(math.isfinite).all()
    # A crashing wrapper would silently shrink the federation. Only where the 1e6 attack wrecked the mean may
    # clients fail (training from exploded weights gives non-finite updates, which the codec refuses to send).
    wrecked = (table["attack"] == "scale") & (table["aggregator"] == "mean")
    assert (table.loc[~wrecked, "client_failures"] == 0).all()
    assert (table["best_accuracy"] >= table["final_accuracy"] - 1e-12).all()
    assert set(table["setting"]) == {"a-digits-dir0.1", "c-synthetic(1,1)", "d-digits-dir0.5/none", "d-digits-dir0.5/scale"}
    for setting in ("a-digits-dir0.1", "c-synthetic(1,1)", "d-digits-dir0.5/none"):
        rules = set(table.loc[table["setting"] == setting, "rule"])
        assert "centralized" in rules, setting
    # Hyper-parameters a rule does not read are left empty; those it reads are filled in.
    row = table[(table["setting"] == "a-digits-dir0.1") & (table["rule"] == "fedadam")].iloc[0]
    assert row["server_tau"] == pytest.approx(1e-3) and math.isnan(row["proximal_mu"])
    row = table[(table["setting"] == "a-digits-dir0.1") & (table["rule"] == "fedprox")].iloc[0]
    assert row["proximal_mu"] > 0 and math.isnan(row["server_tau"])
    # The attack reaches the aggregator: 1 of 5 clients scaled by 1e6 wrecks the mean, not the median.
    scale = table[table["setting"] == "d-digits-dir0.5/scale"].set_index("rule")
    assert (scale["num_corrupted"] == 1).all()
    assert scale.loc["fedavg+mean", "final_accuracy"] < 0.2
    assert scale.loc["fedavg+median", "final_accuracy"] > 0.3
    assert (tmp_path / "strategies.png").stat().st_size > 10_000
    tuning = pd.read_csv(tmp_path / "strategies.tuning.csv")  # fedprox and fedadam in each of a and c
    assert tuning.groupby(["setting", "rule"])["chosen"].sum().tolist() == [1] * 4
    for rule, key in (("fedprox", "proximal_mu"), ("fedadam", "server_learning_rate")):
        picked = tuning[(tuning["rule"] == rule) & tuning["chosen"]].set_index("setting")["value"]
        used = table[table["rule"] == rule].set_index("setting")[key]
        assert picked.to_dict() == used.to_dict()  # the tuned value is the one the run used
    curves = pd.read_csv(tmp_path / "strategies.curves.csv")
    assert set(curves["round"]) == {0, 1, 2}
