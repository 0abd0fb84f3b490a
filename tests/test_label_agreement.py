"""Labels that data owners agree on: the server's agreed class names reach every node, which refuses
to train or evaluate on labels that disagree (naming itself and the labels); labels with commas."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.common import Context, RecordDict
from hypothesis import assume, given
from hypothesis import strategies as st

from datasets import parse_class_names
from flower_app.client_app import NodeDataError, build_client
from flower_app.config import ConfigError, parse_run_config
from flower_app.data import CLASS_NAMES_KEY, DESCRIPTION_KEY
from flower_app.inprocess import run_rounds
from flower_app.server_app import build_strategy


def write_csv(path: Path, labels: list[str], rows_per_label: int = 8) -> str:
    """A CSV with 3 features and the given labels (quoted: they may hold commas)."""
    lines = ["f1,f2,f3,label"]
    for i in range(rows_per_label):
        for j, label in enumerate(labels):
            lines.append(f"{i * 0.1:.2f},{j},{(i + j) % 3},\"{label}\"")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def settings(tmp_path: Path, server_file: str, **extra: object) -> dict[str, object]:
    return {"dataset": "csv", "data-path": server_file, "model": "mlp", "hidden-size": 8, "local-epochs": 1,
            "num-server-rounds": 1, "output-dir": str(tmp_path / "out"), "min-fit-clients": 1,
            "min-available-clients": 1, "min-evaluate-clients": 1, "client-wait-timeout": 1.0, **extra}


def node(run_config: dict[str, object], path: str, node_id: int) -> object:
    context = Context(run_id=1, node_id=node_id, node_config={"data-path": path}, state=RecordDict(),
                      run_config=dict(run_config))
    return build_client(context)


# ---------------------------------------------------------------------------------- class-names forms
@given(st.lists(st.text(min_size=1).map(str.strip).filter(bool), min_size=2, max_size=8, unique=True))
def test_any_names_round_trip_through_the_json_list_form(names: list[str]) -> None:
    assert parse_class_names(json.dumps(names)) == tuple(names)
    assert parse_class_names(json.dumps(names, ensure_ascii=False)) == tuple(names)


@given(st.lists(st.text(alphabet=st.characters(exclude_characters=",[", exclude_categories=("Cs", "Z", "Cc")),
                        min_size=1), min_size=2, max_size=8, unique=True))
def test_names_without_commas_round_trip_through_the_comma_form(names: list[str]) -> None:
    assume(all(n == n.strip() for n in names))
    assert parse_class_names(",".join(names)) == tuple(names)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('["a, b", "c"', r"starts with '\[' but is not a JSON list of strings"),
        ('["a", 1]', r"must be a list of strings"),
        ('["a", " a "]', r"must be distinct, non-empty names"),
        ('["only, one"]', r"lists a single class"),
        ("a,,b", r"must be distinct, non-empty names"),
    ],
)
def test_malformed_class_names_are_refused_at_parse(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_class_names(text)
    with pytest.raises(ConfigError, match=r"run-config key 'class-names': .*" + problem):
        parse_run_config({"class-names": text})


def test_labels_with_commas_map_through_the_json_list_everywhere(tmp_path: Path) -> None:
    names = ["benign, small", "benign, large", "malignant"]
    server = write_csv(tmp_path / "server.csv", names)
    owner = write_csv(tmp_path / "owner.csv", ["malignant", "benign, small"])  # holds 2 of the 3: fine
    run_config = settings(tmp_path, server, **{"class-names": json.dumps(names)})
    strategy, _ = build_strategy(parse_run_config(run_config))
    assert json.loads(strategy.round_config[CLASS_NAMES_KEY]) == names
    client = node(run_config, owner, 7)
    assert client.data.class_names == tuple(names) and sorted(set(client.data.train.y.tolist())) == [0, 2]
    run_rounds(strategy, [client], 1)
    assert strategy.observers[0].rows[-1]["results"] == 1


# ------------------------------------------------------------------------------ disagreement refused
def test_owners_whose_labels_disagree_with_the_server_are_refused_naming_node_and_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = write_csv(tmp_path / "server.csv", ["cat", "dog", "fox"])
    same = write_csv(tmp_path / "same.csv", ["fox", "dog", "cat"])  # same labels: indices by sorted names agree
    extra = write_csv(tmp_path / "extra.csv", ["cat", "dog", "fox", "owl"])
    lacking = write_csv(tmp_path / "lacking.csv", ["cat", "fox"])  # fox would get index 1, the server's dog
    run_config = settings(tmp_path, server, **{"fraction-evaluate": 1.0})
    strategy, _ = build_strategy(parse_run_config(run_config))
    assert json.loads(strategy.round_config[CLASS_NAMES_KEY]) == ["cat", "dog", "fox"]
    clients = [node(run_config, same, 11), node(run_config, extra, 12), node(run_config, lacking, 13)]
    config = {"server-round": 1, **strategy.round_config}
    with pytest.raises(NodeDataError, match=rf"node 12 \(data-path {extra}\) refuses to take part: its labels disagree "
                                            r"with the agreed class names: labels not in class_names \(cat, dog, fox\): owl"):
        clients[1].fit([], config)
    with pytest.raises(NodeDataError, match=r"node 13 .*lacks the labels dog of \(cat, dog, fox\).*set class-names"):
        clients[2].evaluate([], config)  # evaluation is refused too: its metrics would mix up the labels
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_rounds(strategy, clients, 1)
    row = strategy.observers[0].rows[-1]
    assert (row["results"], row["failures"]) == (1, 2)
    failures = [r.getMessage() for r in caplog.records if "client failure" in r.getMessage()]
    assert any("node 12" in m and "owl" in m for m in failures) and any("node 13" in m for m in failures)


def test_with_class_names_every_owner_maps_through_the_list_and_an_unknown_label_is_refused_at_load(
    tmp_path: Path,
) -> None:
    server = write_csv(tmp_path / "server.csv", ["cat", "dog", "fox"])
    owl = write_csv(tmp_path / "owl.csv", ["cat", "owl"])
    run_config = settings(tmp_path, server, **{"class-names": "cat,dog,fox"})
    with pytest.raises(NodeDataError, match=r"node 5 cannot load its data .*labels not in class_names \(cat, dog, fox\): "
                                            r"owl"):
        node(run_config, owl, 5)


def test_a_node_whose_data_has_another_shape_is_refused_before_it_trains(tmp_path: Path) -> None:
    server = write_csv(tmp_path / "server.csv", ["a", "b"])
    wide = tmp_path / "wide.csv"
    wide.write_text("f1,f2,f3,f4,label\n" + "".join(f"{i},1,2,3,{'ab'[i % 2]}\n" for i in range(12)))
    run_config = settings(tmp_path, server)
    strategy, _ = build_strategy(parse_run_config(run_config))
    assert json.loads(strategy.round_config[DESCRIPTION_KEY]) == {
        "task": "classification", "input_shape": [3], "num_outputs": 2, "input_kind": "dense"}
    client = node(run_config, str(wide), 9)
    with pytest.raises(NodeDataError, match=r"node 9 .*its data is classification, input shape \(4,\) \(dense\), 2 "
                                            r"outputs, but the server's model was built for classification, input "
                                            r"shape \(3,\) \(dense\), 2 outputs$"):
        client.fit([], {"server-round": 1, **strategy.round_config})
