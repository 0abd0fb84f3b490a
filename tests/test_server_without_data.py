"""A server without data (server-data='none'): it loads nothing, builds the model from the run config,
and its metrics and best model come from federated evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.common import Context, RecordDict
from hypothesis import given
from hypothesis import strategies as st

import datasets
import datasets.cache
import datasets.registry
from datasets import SOURCE_KINDS, SOURCES, SourceOptions
from flower_app import data as app_data
from flower_app import server_app
from flower_app.client_app import NodeDataError, build_client
from flower_app.config import ConfigError, parse_input_shape, parse_run_config
from flower_app.data import agreement_config, check_agreement, configured_model_info, model_info
from flower_app.inprocess import run_rounds
from flower_app.outputs import BEST_INFO_NAME, BEST_MODEL_NAME
from flower_app.server_app import build_strategy
from flower_app.task import ModelInfo
from tests.test_label_agreement import write_csv

NAMES = ["cat", "dog", "fox"]


def base(tmp_path: Path, **extra: object) -> dict[str, object]:
    # data-path names a file the server does not have: with server-data='held-out' it could not start.
    return {"dataset": "csv", "data-path": str(tmp_path / "not-on-the-server.csv"), "server-data": "none",
            "class-names": ",".join(NAMES), "input-shape": "3", "model": "mlp", "hidden-size": 8,
            "local-epochs": 1, "learning-rate": 0.2, "num-server-rounds": 3, "output-dir": str(tmp_path / "out"),
            "run-name": "run", "min-fit-clients": 3, "min-available-clients": 3, "min-evaluate-clients": 3,
            "client-wait-timeout": 1.0, **extra}


def owner(run_config: dict[str, object], path: str, node_id: int) -> object:
    return build_client(Context(run_id=1, node_id=node_id, node_config={"data-path": path}, state=RecordDict(),
                                run_config=dict(run_config)))


@pytest.mark.parametrize("mode", ["separate", "fit"])
def test_the_server_loads_no_data_and_federated_evaluation_drives_metrics_and_the_best_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    run_config = base(tmp_path, **{"federated-evaluation": mode})
    cfg = parse_run_config(run_config)
    with pytest.raises(FileNotFoundError, match="not-on-the-server.csv"):  # what held-out would have done
        build_strategy(parse_run_config({**run_config, "server-data": "held-out", "input-shape": "",
                                         "run-name": "held-out"}))

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server loaded data")

    for module, name in ((app_data, "load_source_cached"), (datasets.cache, "load_source"),
                         (datasets.registry, "load_source"), (server_app, "server_source")):
        monkeypatch.setattr(module, name, no_loading)
    strategy, rounds = build_strategy(cfg)
    monkeypatch.undo()
    assert strategy.evaluate_fn is None and strategy.selection_metric == "federated_loss"
    files = [write_csv(tmp_path / f"owner{i}.csv", labels, rows_per_label=10)
             for i, labels in enumerate([NAMES, ["fox", "cat"], ["dog", "cat", "fox"]])]
    clients = [owner(run_config, f, 21 + i) for i, f in enumerate(files)]
    weights: dict[int, list[np.ndarray]] = {0: [w.copy() for w in strategy.weights]}
    strategy.observers.append(lambda record, s: weights.update({record.round: [w.copy() for w in s.weights]}))
    run_rounds(strategy, clients, rounds)

    folder = tmp_path / "out" / "run"
    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics["round"]) == [1, 2, 3]  # no round 0: nothing evaluates the initial model
    assert metrics["central_loss"].isna().all() and metrics["central_accuracy"].isna().all()
    assert metrics["federated_loss"].notna().all() and metrics["federated_accuracy"].notna().all()
    assert (metrics["results"] == 3).all() and (metrics["failures"] == 0).all()
    assert (folder / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Which model each federated loss measured: in mode "separate" the round's own; in mode "fit" the one the
    # round started from (round r - 1), and the evaluate round after the last measures the final model.
    rows = [int(r) for r in metrics["round"]]
    losses = dict(zip(rows, metrics["federated_loss"])) if mode == "separate" else {
        **{r - 1: loss for r, loss in zip(rows, metrics["federated_loss"])},
        rows[-1]: float(metrics["final_federated_loss"].iloc[-1]),
    }
    best = min(losses, key=lambda r: (losses[r], r))
    info = json.loads((folder / BEST_INFO_NAME).read_text())
    assert (info["round"], info["metric"]) == (best, "federated_loss")
    assert math.isclose(info["value"], losses[best], rel_tol=1e-9)
    for array, tensor in zip(weights[best], torch.load(folder / BEST_MODEL_NAME, weights_only=True).values()):
        np.testing.assert_array_equal(array, tensor.numpy())


def test_a_node_whose_data_does_not_fit_the_configured_description_says_what_to_set(tmp_path: Path) -> None:
    run_config = base(tmp_path, **{"input-shape": "4"})
    strategy, _ = build_strategy(parse_run_config(run_config))
    client = owner(run_config, write_csv(tmp_path / "a.csv", NAMES), 3)
    with pytest.raises(NodeDataError, match=r"node 3 .*its data is classification, input shape \(3,\) \(dense\), 3 "
                                            r"outputs, but the server's model was built for classification, input "
                                            r"shape \(4,\) \(dense\), 3 outputs; set the run config's input-shape"):
        client.fit([], {"server-round": 1, **strategy.round_config})


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"class-names": ""}, r"dataset 'csv': each data owner's labels come from its own files .* set class-names"),
        ({"dataset": "linear", "class-names": ""}, (r"dataset 'linear' \(regression\): set num-outputs to the number of "
                                                  r"regression targets$")),
        ({"dataset": "digits", "class-names": ""}, r"set num-outputs to the number of classes \(or class-names\)"),
        ({"dataset": "text-lm", "class-names": "", "num-outputs": 5, "hf-model": "x", "model": "auto",
          "hidden-size": 128}, r"num-outputs does not apply to dataset 'text-lm'"),
    ],
)
def test_a_description_the_server_cannot_complete_is_refused_at_start(
    tmp_path: Path, settings: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        configured_model_info(parse_run_config(base(tmp_path, **settings)))


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"input-shape": ""}, r"server-data='none': the server builds the model before round 1 .* set input-shape"),
        ({"input-shape": "3,0"}, r"run-config key 'input-shape': '3,0' is not a shape"),
        ({"input-shape": "3x4"}, r"run-config key 'input-shape': '3x4' is not a shape"),
        ({"fraction-evaluate": 0.0}, r"fraction-evaluate must be > 0"),
        ({"num-outputs": 2}, r"num-outputs \(2\) differs from the number of class-names \(3\)"),
        ({"server-data": "held-out"}, r"input-shape describes the data to a server without data"),
        ({"server-data": "held-out", "input-shape": "", "num-outputs": 3}, r"num-outputs describes the data"),
        ({"server-data": "nowhere"}, (r"run-config key 'server-data': unknown value 'nowhere'; choose one of: "
                                     r"held-out, none")),
    ],
)
def test_the_config_refuses_a_server_without_data_that_cannot_work(
    tmp_path: Path, settings: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_run_config(base(tmp_path, **settings))


def test_the_described_data_is_what_the_nodes_hold() -> None:
    assert set(SOURCE_KINDS) == set(SOURCES), "every source needs its SourceKind in datasets.registry.SOURCE_KINDS"
    options = SourceOptions(num_samples=200, num_partitions=2)
    for name in ("digits", "linear", "synthetic", "breast-cancer", "diabetes"):  # they load offline in a moment
        info = model_info(datasets.load_source(name, options))
        assert (info.task, info.input_kind) == (SOURCE_KINDS[name].task, SOURCE_KINDS[name].input_kind), name
    cfg = parse_run_config({"dataset": "digits", "server-data": "none", "input-shape": "1,8,8", "num-outputs": 10})
    assert configured_model_info(cfg) == model_info(datasets.load_source("digits", options)) == ModelInfo(
        "classification", (1, 8, 8), 10, "dense")


@given(st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=5))
def test_an_input_shape_round_trips_through_its_text(shape: list[int]) -> None:
    assert parse_input_shape(",".join(map(str, shape))) == tuple(shape)
    assert parse_input_shape(" , ".join(map(str, shape))) == tuple(shape)


@given(st.text(max_size=20))
def test_any_text_is_a_shape_of_positive_integers_or_a_config_error(text: str) -> None:
    try:
        shape = parse_input_shape(text)
    except ConfigError as err:
        assert "run-config key 'input-shape'" in str(err)
    else:
        assert shape and all(isinstance(d, int) and d >= 1 for d in shape)


@given(st.sampled_from(["classification", "regression", "causal-lm"]),
       st.lists(st.integers(min_value=1, max_value=512), min_size=1, max_size=4),
       st.integers(min_value=1, max_value=1000), st.sampled_from(["dense", "tokens"]))
def test_the_description_the_server_sends_is_the_one_a_node_compares(
    task: str, shape: list[int], outputs: int, kind: str
) -> None:
    info = ModelInfo(task, tuple(shape), outputs, kind)
    node = app_data.ClientData(None, None, info, 0, None)  # type: ignore[arg-type]
    check_agreement(node, agreement_config(info, None))
    other = ModelInfo(task, tuple(shape), outputs + 1, kind)
    with pytest.raises(ValueError, match="but the server's model was built for"):
        check_agreement(node, agreement_config(other, None))
