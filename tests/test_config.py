"""The run config: pyproject.toml is the schema, AppConfig mirrors it, bad values stop the run."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch

from flower_app.config import AppConfig, ConfigError, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_table_and_appconfig_agree_key_for_key_and_default_for_default() -> None:
    table = pyproject_run_config()
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(AppConfig)}
    assert set(table) == set(fields), f"only in pyproject: {set(table) - set(fields)}; only in AppConfig: {set(fields) - set(table)}"
    for key, default in fields.items():
        assert table[key] == default and type(table[key]) is type(default), key


def test_every_key_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in pyproject_run_config() if f"`{k}`" not in readme]
    assert not missing, f"README lacks run-config keys: {missing}"


def test_parse_defaults_and_override() -> None:
    cfg = parse_run_config({**pyproject_run_config(), "strategy": "fedadam", "server-learning-rate": 1})
    assert cfg.strategy == "fedadam"
    assert cfg.server_learning_rate == 1.0 and isinstance(cfg.server_learning_rate, float)
    assert parse_run_config({}) == AppConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strategy = "fedavg"  # type: ignore[misc]


def test_round_trip_through_run_config() -> None:
    cfg = parse_run_config({"strategy": "scaffold", "dirichlet-alpha": 0.1, "resume": True})
    assert parse_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedadm"}, "unknown value 'fedadm'; choose one of: fedadagrad, fedadam"),
        ({"aggregator": "avg"}, "choose one of: krum, mean, median, multi-krum, trimmed-mean"),
        ({"dataset": "imagenet"}, "run-config key 'dataset': unknown value 'imagenet'; choose one of:"),
        ({"partitioner": "labels"}, "run-config key 'partitioner'"),
        ({"compression": "zip"}, "run-config key 'compression'"),
        ({"model": "resnet"}, "run-config key 'model'"),
        ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1, got 0"),
        ({"fraction-fit": 0.0}, "'fraction-fit' must be > 0.0"),
        ({"fraction-fit": 1.5}, "'fraction-fit' must be <= 1.0"),
        ({"trim-fraction": 0.5}, "'trim-fraction' must be < 0.5"),
        ({"local-epochs": "2"}, "'local-epochs' must be int, got '2' (str)"),
        ({"resume": 1}, "'resume' must be bool"),
        ({"batch-size": True}, "'batch-size' must be int"),
        ({"learning-rate": "fast"}, "'learning-rate' must be float"),
        ({"rounds": 3}, "unknown run-config key(s): rounds; valid keys:"),
        ({"min-fit-clients": 5, "min-available-clients": 2}, "min-available-clients (2) must be >= min-fit-clients (5)"),
        ({"strategy": "fednova", "aggregator": "median"}, "aggregator must be 'mean'"),
        ({"compression": "topk"}, "set send-delta=true"),
        ({"strategy": "fedsgd", "send-delta": True}, "send-delta must be false"),
    ],
)
def test_bad_values_name_the_key_and_the_choices(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(overrides)
    assert message in str(err.value)


def test_synthetic_needs_num_partitions_so_server_and_clients_generate_the_same_data() -> None:
    # Regression: with num-partitions=0 the server generated Synthetic with one device (all labels one
    # class) while the clients generated N devices, so central accuracy measured the wrong data.
    with pytest.raises(ConfigError, match="dataset 'synthetic' generates one device per client"):
        parse_run_config({"dataset": "synthetic"})
    from flower_app.data import client_data, server_source

    cfg = parse_run_config({"dataset": "synthetic", "num-partitions": 4, "num-samples": 200, "partitioner": "natural"})
    parts = [client_data(cfg, {"partition-id": i}) for i in range(4)]
    source = server_source(cfg)
    pooled = sorted(map(tuple, torch.cat([torch.cat([p.train.x, p.val.x]) for p in parts]).tolist()))
    assert pooled == sorted(map(tuple, source.train.x.tolist()))  # the server's data is the clients' data
