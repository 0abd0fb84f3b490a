"""The run config: pyproject.toml is the schema, AppConfig mirrors it, bad values stop the run."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch

from flower_app.config import (
    AGGREGATOR_KEYS,
    LOCAL_TRAINING_KEYS,
    RULE_KEYS,
    SERVER_OPTIMIZER_KEYS,
    AppConfig,
    ConfigError,
    aggregator_keys,
    parse_run_config,
    rule_keys,
)
from flower_app.options import payload_kind, strategy_options, train_options
from strategies import STRATEGIES
from strategies.aggregators import AGGREGATOR_SPECS, AGGREGATORS
from strategies.optimizers import OPTIMIZER_HPARAMS_USED

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


# ------------------------------------------------- keys the chosen rule or aggregator does not read
# A valid value other than the default for every rule- or aggregator-specific key.
OTHER_VALUE: dict[str, object] = {
    "server-learning-rate": 0.5, "server-momentum": 0.5, "server-beta1": 0.8, "server-beta2": 0.9, "server-tau": 0.01,
    "server-bias-correction": True, "proximal-mu": 0.1, "local-epochs": 3, "learning-rate": 0.1,
    "client-momentum": 0.5, "weight-decay": 0.001, "grad-accumulation-steps": 2, "client-optimizer": "adamw",
    "trim-fraction": 0.1, "num-byzantine": 2, "num-selected": 3,
}


def test_every_rule_or_aggregator_specific_key_has_a_test_value() -> None:
    assert set(OTHER_VALUE) == set(RULE_KEYS) | set(AGGREGATOR_KEYS)
    defaults = AppConfig()
    assert all(getattr(defaults, k.replace("-", "_")) != v for k, v in OTHER_VALUE.items())


@pytest.mark.parametrize(("rule", "key"), [(r, k) for r in sorted(STRATEGIES) for k in RULE_KEYS if k not in rule_keys(r)])
def test_a_key_the_rule_does_not_read_is_refused_naming_the_rule_and_what_it_reads(rule: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({"strategy": rule, key: OTHER_VALUE[key]})
    message = str(err.value)
    assert message.startswith(f"{key} is set but strategy '{rule}' (server optimizer '{STRATEGIES[rule].server_optimizer}')")
    assert f"(it reads {', '.join(rule_keys(rule))})" in message


@pytest.mark.parametrize(
    ("aggregator", "key"), [(a, k) for a in sorted(AGGREGATORS) for k in AGGREGATOR_KEYS if k not in aggregator_keys(a)]
)
def test_a_key_the_aggregator_does_not_read_is_refused_naming_it_and_what_it_reads(aggregator: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({"aggregator": aggregator, key: OTHER_VALUE[key]})
    reads = ", ".join(aggregator_keys(aggregator)) or "none of " + ", ".join(AGGREGATOR_KEYS)
    assert str(err.value).startswith(f"{key} is set but aggregator '{aggregator}' does not read it (it reads {reads})")


@pytest.mark.parametrize(
    ("rule", "key"),
    # adamw with a rule that assumes SGD steps is refused for that reason (test_adamw_is_refused_where_the_rule_says_so).
    [(r, k) for r in sorted(STRATEGIES) for k in rule_keys(r) if not (k == "client-optimizer" and STRATEGIES[r].adamw_conflict)],
)
def test_a_key_the_rule_reads_is_accepted(rule: str, key: str) -> None:
    assert getattr(parse_run_config({"strategy": rule, key: OTHER_VALUE[key]}), key.replace("-", "_")) == OTHER_VALUE[key]


def test_which_keys_a_rule_reads_follows_its_server_optimizer_and_properties() -> None:
    assert rule_keys("fedavg") == ("server-learning-rate", *LOCAL_TRAINING_KEYS)
    assert rule_keys("fedavgm") == ("server-learning-rate", "server-momentum", *LOCAL_TRAINING_KEYS)
    assert "proximal-mu" in rule_keys("fedprox") and "proximal-mu" not in rule_keys("fedavg")
    assert rule_keys("fedsgd") == ("server-learning-rate",)  # sends a gradient: no local training
    assert aggregator_keys("multi-krum") == ("num-byzantine", "num-selected") and aggregator_keys("mean") == ()
    for name, rule in STRATEGIES.items():  # the server optimizer's own table decides its keys
        used = OPTIMIZER_HPARAMS_USED[rule.server_optimizer]
        assert {k for f, k in SERVER_OPTIMIZER_KEYS.items() if f in used} == set(rule_keys(name)) & set(SERVER_OPTIMIZER_KEYS.values())


def test_pyproject_defaults_are_valid_for_every_rule_and_aggregator_that_can_run_with_them() -> None:
    table = pyproject_run_config()
    for rule in STRATEGIES:
        parse_run_config({**table, "strategy": rule})
    for aggregator in AGGREGATORS:
        parse_run_config({**table, "aggregator": aggregator})


# ------------------------------------------- compatibility checks derived from the rules' properties
@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_per_client_aggregators_are_refused_where_the_rule_says_so(rule: str) -> None:
    spec = STRATEGIES[rule]
    for aggregator in AGGREGATORS:
        if not (spec.aggregator_conflict and AGGREGATOR_SPECS[aggregator].per_client):
            parse_run_config({"strategy": rule, "aggregator": aggregator})
            continue
        with pytest.raises(ConfigError) as err:
            parse_run_config({"strategy": rule, "aggregator": aggregator})
        means = [a for a, s in AGGREGATOR_SPECS.items() if not s.per_client]
        assert str(err.value) == (
            f"strategy '{rule}' {spec.aggregator_conflict}; aggregator must be '{means[0]}', got '{aggregator}'"
        )


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_adamw_is_refused_where_the_rule_says_so(rule: str) -> None:
    spec = STRATEGIES[rule]
    settings = {"strategy": rule, "client-optimizer": "adamw"}
    if spec.adamw_conflict and spec.local_training:
        with pytest.raises(ConfigError, match=rf"client-optimizer 'adamw' does not fit strategy '{rule}' \(it assumes"):
            parse_run_config(settings)
    elif spec.adamw_conflict:  # the rule does not train locally: it reads no client-optimizer at all
        with pytest.raises(ConfigError, match=f"client-optimizer is set but strategy '{rule}'"):
            parse_run_config(settings)
    else:
        assert parse_run_config(settings).client_optimizer == "adamw"


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_secure_aggregation_and_dp_are_refused_where_the_rule_says_so_naming_the_valid_rules(rule: str) -> None:
    spec = STRATEGIES[rule]
    for feature, conflict, settings in (
        ("secure-aggregation", spec.secagg_conflict, {"secure-aggregation": True}),
        ("dp-mode 'local'", spec.dp_conflict, {"dp-mode": "local"}),
    ):
        if not conflict:
            parse_run_config({"strategy": rule, **settings})
            continue
        with pytest.raises(ConfigError) as err:
            parse_run_config({"strategy": rule, **settings})
        message = str(err.value)
        fits = [n for n, s in STRATEGIES.items() if not (s.secagg_conflict if feature == "secure-aggregation" else s.dp_conflict)]
        assert message.startswith(f"{feature}: strategy '{rule}' {conflict}")
        assert message.endswith("choose one of " + ", ".join(f"'{n}'" for n in fits))


def test_the_rules_properties_say_what_travels_and_what_is_kept() -> None:
    scaffold, fednova, fedsgd, fedavg = (STRATEGIES[n] for n in ("scaffold", "fednova", "fedsgd", "fedavg"))
    assert scaffold.extra_arrays and scaffold.client_state and not fedavg.extra_arrays and not fedavg.client_state
    assert fednova.reports_local_steps and not fedavg.reports_local_steps
    assert not fedsgd.local_training and fedsgd.payload_kind(False) == "gradient"
    assert all(not getattr(fedavg, p) for p in ("secagg_conflict", "dp_conflict", "aggregator_conflict", "adamw_conflict"))


def test_no_rule_name_is_written_in_flower_app() -> None:
    """Compatibility checks read the rules' properties; only the run config's default names a rule."""
    import ast

    names = set(STRATEGIES)
    found = []
    for path in sorted((ROOT / "flower_app").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert found == [f"config.py:{_default_line()}: 'fedavg'"], found


def _default_line() -> int:
    lines = (ROOT / "flower_app" / "config.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.lstrip().startswith("strategy: str = _opt("))


# ----------------------------------------------------------------- the options module
def test_the_client_reads_its_hyper_parameters_from_its_own_run_config() -> None:
    prox = parse_run_config({"strategy": "fedprox", "proximal-mu": 0.3, "learning-rate": 0.2, "local-epochs": 3})
    options = train_options(prox)
    assert (options.proximal_mu, options.learning_rate, options.epochs) == (0.3, 0.2, 3)
    assert train_options(parse_run_config({"strategy": "fedavg"})).proximal_mu == 0.0  # the default 0.01 is not read


def test_strategy_options_take_every_server_optimizer_and_aggregator_key() -> None:
    cfg = parse_run_config({"strategy": "fedadam", "server-learning-rate": 0.5, "server-beta1": 0.8, "server-beta2": 0.9,
                            "server-tau": 0.01, "server-bias-correction": True, "aggregator": "trimmed-mean",
                            "trim-fraction": 0.1})
    opts = strategy_options(cfg)
    hp = opts.optimizer
    assert (hp.learning_rate, hp.beta1, hp.beta2, hp.tau, hp.bias_correction) == (0.5, 0.8, 0.9, 0.01, True)
    assert opts.aggregator_params.trim_fraction == 0.1
    assert set(SERVER_OPTIMIZER_KEYS) <= {f.name for f in dataclasses.fields(type(hp))}


def test_client_side_dp_sends_updates_whatever_send_delta_says() -> None:
    assert payload_kind(parse_run_config({})) == "weights"
    assert payload_kind(parse_run_config({"send-delta": True})) == "delta"
    assert payload_kind(parse_run_config({"dp-mode": "central-client", "model": "mlp"})) == "delta"
    assert payload_kind(parse_run_config({"dp-mode": "central-server", "model": "mlp"})) == "weights"
    assert payload_kind(parse_run_config({"strategy": "fedsgd", "dp-mode": "local", "model": "mlp"})) == "gradient"
    assert strategy_options(parse_run_config({"dp-mode": "local", "model": "mlp"})).send_delta
