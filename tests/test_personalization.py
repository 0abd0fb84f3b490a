"""Personalized FL: what travels, hand-computed Ditto and FedRep steps, the FedAvg oracle, configuration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import RecordDict
from torch import nn

import flower_app.personal as personal_module
from flower_app.client_app import FlowerClient
from flower_app.config import AppConfig, ConfigError, check_privacy_model, parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.personal import DITTO_KEY, PERSONAL_KEY, Personalizer, PersonalOptions, personal_split
from flower_app.server_app import build_strategy
from flower_app.task import ModelInfo, TrainOptions, build_model, get_weights, make_loader, weight_spec
from strategies.personalization import PERSONALIZATION, get_personalization, last_layer, module_keys

NUM_CLIENTS = 3
NDArrays = list[np.ndarray]


class DictNode:
    """A node state in a dict (the `NodeState` interface a personalizer uses)."""

    def __init__(self) -> None:
        self.arrays: dict[str, NDArrays | None] = {}

    def get(self, name: str, shapes: Sequence[tuple[int, ...]] | None = None) -> NDArrays | None:
        return self.arrays.get(name)

    def put(self, name: str, arrays: NDArrays | None) -> None:
        self.arrays[name] = None if arrays is None else [a.copy() for a in arrays]


def config(tmp_path: Path, **overrides: object) -> AppConfig:
    base = {"output-dir": str(tmp_path), "dataset": "digits", "model": "mlp", "hidden-size": 16, "local-epochs": 1,
            "partitioner": "shards", "classes-per-partition": 4, "num-partitions": NUM_CLIENTS, "min-available-clients": NUM_CLIENTS,
            "min-fit-clients": NUM_CLIENTS, "min-evaluate-clients": NUM_CLIENTS, "client-wait-timeout": 1.0,
            "min-partition-size": 5}
    return parse_run_config({**base, **overrides})


def clients(cfg: AppConfig) -> list[FlowerClient]:
    return [FlowerClient(cfg, client_data(cfg, {"partition-id": i}), RecordDict()) for i in range(NUM_CLIENTS)]


def sgd(lr: float) -> TrainOptions:
    return TrainOptions(epochs=1, learning_rate=lr, max_steps=1)


def one_example(x: float, y: float) -> torch.utils.data.DataLoader:
    return make_loader(torch.tensor([[x]]), torch.tensor([[y]]), batch_size=1, shuffle=False)


# ------------------------------------------------------------------------------------------------ hand-computed steps
def test_ditto_personal_step_by_hand() -> None:
    """One step of v <- v - eta (grad F(v) + lambda (v - w)) on (v_w x + v_b - y)^2, by hand."""
    model = nn.Sequential(nn.Linear(1, 1))
    options = PersonalOptions(method="ditto", steps=1, learning_rate=0.1, ditto_lambda=0.5)
    personalizer = Personalizer(options, model)
    node = DictNode()
    node.put(DITTO_KEY, [np.array([[1.0]], np.float32), np.array([0.2], np.float32)])  # v = (1.0, 0.2)
    received = [np.array([[0.5]], np.float32), np.array([0.0], np.float32)]  # w = (0.5, 0.0)
    # x = 2, y = 1: pred = 2.2, r = 1.2; grad = (2 r x, 2 r) = (4.8, 2.4); lambda (v - w) = (0.25, 0.1).
    # v' = (1.0 - 0.1 x 5.05, 0.2 - 0.1 x 2.5) = (0.495, -0.05).
    metrics = personalizer.after_fit(model, node, received, lambda: one_example(2.0, 1.0), "regression", sgd(0.05),
                                     torch.device("cpu"))
    v = node.arrays[DITTO_KEY]
    assert v is not None
    np.testing.assert_allclose(v[0], [[0.495]], rtol=1e-6)
    np.testing.assert_allclose(v[1], [-0.05], rtol=1e-5)
    assert metrics["personal_train_loss"] == pytest.approx(1.44)  # r^2 before the step
    # The next round goes on from v', towards the new w: pred = 0.99 - 0.05 = 0.94, r = -0.06.
    received = [np.array([[0.6]], np.float32), np.array([0.1], np.float32)]
    personalizer.after_fit(model, node, received, lambda: one_example(2.0, 1.0), "regression", sgd(0.05), torch.device("cpu"))
    v = node.arrays[DITTO_KEY]
    assert v is not None
    np.testing.assert_allclose(v[0], [[0.495 - 0.1 * (2 * -0.06 * 2 + 0.5 * (0.495 - 0.6))]], rtol=1e-5)
    np.testing.assert_allclose(v[1], [-0.05 - 0.1 * (2 * -0.06 + 0.5 * (-0.05 - 0.1))], rtol=1e-5)


def test_ditto_evaluates_the_personal_model_and_sends_the_global_update_unchanged() -> None:
    model = nn.Sequential(nn.Linear(1, 1))
    personalizer = Personalizer(PersonalOptions(method="ditto"), model)
    assert personalizer.shared.keys == ("0.weight", "0.bias")  # Ditto shares everything; v is a separate copy
    node = DictNode()
    node.put(DITTO_KEY, [np.array([[2.0]], np.float32), np.array([0.0], np.float32)])
    received = [np.array([[0.0]], np.float32), np.array([0.0], np.float32)]
    out = personalizer.evaluate_personal(model, node, received, lambda: one_example(1.0, 2.0), one_example(1.0, 2.0),
                                         "regression", sgd(0.1), torch.device("cpu"), (4.0, None))
    assert out == {"personal_loss": 0.0}  # v predicts 2 exactly; the global model's loss would be 4


def test_fedrep_head_then_body_by_hand() -> None:
    """Body a, head h, pred = h a x: one head step with a fixed, then one body step with the new h."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].weight.fill_(0.5)
    personalizer = Personalizer(PersonalOptions(method="fedrep", modules=("1",), steps=1, learning_rate=0.1), model)
    assert personalizer.shared.keys == ("0.weight",) and personalizer.split.personal.keys == ("1.weight",)
    # x = 1, y = 3. Head: pred = 1.0, r = -2, dL/dh = 2 r a = -8 -> h = 0.5 + 0.1 x 8 = 1.3 (a stays 2).
    # Body: pred = 2.6, r = -0.4, dL/da = 2 r h = -1.04 -> a = 2 + 0.05 x 1.04 = 2.052 (h stays 1.3).
    result = personalizer.train(model, one_example(1.0, 3.0), "regression", sgd(0.05), torch.device("cpu"))
    assert model[1].weight.item() == pytest.approx(1.3)
    assert model[0].weight.item() == pytest.approx(2.052)
    assert result.num_steps == 1 and result.loss == pytest.approx(0.16)  # the body phase's (SCAFFOLD's K)
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen


def test_fedper_trains_head_and_body_together_and_keeps_the_head() -> None:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].weight.fill_(0.5)
    personalizer = Personalizer(PersonalOptions(method="fedper", modules=("1",)), model)
    # One joint step from (a, h) = (2, 0.5), r = -2: da = 2 r h = -2, dh = 2 r a = -8.
    personalizer.train(model, one_example(1.0, 3.0), "regression", sgd(0.1), torch.device("cpu"))
    assert model[0].weight.item() == pytest.approx(2.2) and model[1].weight.item() == pytest.approx(1.3)
    node = DictNode()
    personalizer.after_fit(model, node, [np.array([[2.0]], np.float32)], lambda: one_example(1.0, 3.0), "regression",
                           sgd(0.1), torch.device("cpu"))
    assert node.arrays[PERSONAL_KEY] is not None and node.arrays[PERSONAL_KEY][0].item() == pytest.approx(1.3)
    model[1].weight.data.fill_(-7.0)  # another client's head in a shared model object
    personalizer.restore(model, node)
    assert model[1].weight.item() == pytest.approx(1.3)


# ------------------------------------------------------------------------------------------------------ what travels
CNN_NORM_KEYS = {f"features.{i}.{n}" for i in (1, 4) for n in ("weight", "bias", "running_mean", "running_var")}


def test_fedbn_wire_format_excludes_exactly_the_normalization_entries() -> None:
    model = build_model("cnn", ModelInfo("classification", (1, 8, 8), 10))
    full = weight_spec(model)
    split = personal_split(PersonalOptions(method="fedbn"), model)
    assert set(split.personal.keys) == CNN_NORM_KEYS
    assert split.shared.keys == tuple(k for k in full.keys if k not in CNN_NORM_KEYS)  # canonical order kept
    assert all(split.shared.trainable)  # no data-dependent buffer travels: DP accepts the cnn under FedBN
    check_privacy_model(parse_run_config({"dp-mode": "local", "model": "cnn"}), split.shared.trainable, "cnn")
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_privacy_model(parse_run_config({"dp-mode": "local", "model": "cnn"}), full.trainable, "cnn")


METHODS = [m for m in PERSONALIZATION if m != "none"]


@pytest.mark.parametrize("method", METHODS)
def test_the_arrays_sent_are_exactly_the_shared_part_in_canonical_order(tmp_path: Path, method: str) -> None:
    model_name = "cnn" if method == "fedbn" else "mlp"
    cfg = config(tmp_path, personalization=method, model=model_name)
    strategy, _ = build_strategy(cfg)
    client = FlowerClient(cfg, client_data(cfg, {"partition-id": 0}), RecordDict())
    full = weight_spec(client.model)
    expected = {
        "fedbn": [k for k in full.keys if k not in CNN_NORM_KEYS],
        "fedper": [k for k in full.keys if not k.startswith("net.5.")],  # the mlp's last layer stays
        "fedrep": [k for k in full.keys if not k.startswith("net.5.")],
    }.get(method, list(full.keys))
    assert list(client.spec.keys) == expected
    assert strategy.shapes == [tuple(s) for k, s in zip(full.keys, full.shapes) if k in expected]  # the server's spec
    sent, _, _ = client.fit([w.copy() for w in strategy.weights], {"server-round": 1, **strategy.client_config})
    assert len(sent) == len(expected)
    if method != "ditto":  # the model now holds what was trained: what was sent is its shared subset, in order
        state = client.model.state_dict()
        for key, array in zip(expected, sent):  # the codec sends each tensor flat
            np.testing.assert_array_equal(array, state[key].numpy().ravel())
    kept = {name: client.state[name].to_numpy_ndarrays() for name in client.state}
    if get_personalization(method).personal_part:
        state = client.model.state_dict()
        personal_keys = [k for k in full.keys if k not in expected]
        assert [a.shape for a in kept[PERSONAL_KEY]] == [tuple(state[k].shape) for k in personal_keys]
        for key, array in zip(personal_keys, kept[PERSONAL_KEY]):
            np.testing.assert_array_equal(array, state[key].numpy())
    assert (DITTO_KEY in kept) == (method == "ditto")
    assert (PERSONAL_KEY in kept) == bool(get_personalization(method).personal_part)


def test_ditto_sends_bit_for_bit_what_fedavg_sends(tmp_path: Path) -> None:
    """The personal model trains beside the global update and does not touch it."""
    sent = {}
    for method in ("none", "ditto"):
        cfg = config(tmp_path / method, personalization=method)
        strategy, _ = build_strategy(cfg)
        client = FlowerClient(cfg, client_data(cfg, {"partition-id": 1}), RecordDict())
        sent[method], _, _ = client.fit([w.copy() for w in strategy.weights], {"server-round": 1, "run-name": "x"})
    for a, b in zip(sent["none"], sent["ditto"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", [{"strategy": "fedavg"}, {"strategy": "fedprox", "proximal-mu": 0.5},
                                  {"strategy": "scaffold"}], ids=["fedavg", "fedprox", "scaffold"])
def test_fedper_with_an_empty_personal_part_equals_the_rule_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    rule: dict) -> None:
    """The FedPer path (all parameters, corrections and proximal anchors per parameter) with nothing personal is the rule."""
    plain_cfg = config(tmp_path / "plain", **rule, **{"num-server-rounds": 2, "fraction-evaluate": 0.0})
    plain, _ = build_strategy(plain_cfg)
    initial = [w.copy() for w in plain.weights]
    run_rounds(plain, clients(plain_cfg), 2)
    monkeypatch.setattr(personal_module, "personal_keys", lambda options, model, spec: ())
    per_cfg = config(tmp_path / "fedper", personalization="fedper", **rule, **{"num-server-rounds": 2, "fraction-evaluate": 0.0})
    fedper, _ = build_strategy(per_cfg)
    fedper_clients = clients(per_cfg)
    assert fedper_clients[0].personal.split.personal.keys == () and fedper_clients[0].personal.method.name == "fedper"
    run_rounds(fedper, fedper_clients, 2)
    assert len(plain.weights) == len(fedper.weights)
    for a, b in zip(plain.weights, fedper.weights):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(plain.weights[0], initial[0])  # it did train


def test_lora_personal_head_or_personal_adapters() -> None:
    from flower_app.hf_models import FineTuneOptions

    model = build_model("vit-lora", ModelInfo("classification", (3, 16, 16), 4), finetune=FineTuneOptions())
    full = weight_spec(model)
    head = personal_split(PersonalOptions(method="fedper"), model)  # default: the head in modules_to_save
    assert last_layer(model).endswith("heads.modules_to_save.default.head")
    assert set(head.personal.keys) == {k for k in full.keys if "modules_to_save" in k}
    assert all("lora_" in k for k in head.shared.keys) and head.shared.keys
    adapters = personal_split(PersonalOptions(method="fedrep", modules=("lora_A", "lora_B")), model)
    assert adapters.personal.keys == head.shared.keys and adapters.shared.keys == head.personal.keys


# ---------------------------------------------------------------------------------------------------- configuration
def test_default_heads_of_the_built_in_models() -> None:
    info = ModelInfo("classification", (1, 8, 8), 10)
    assert last_layer(build_model("cnn", info)) == "head.3"
    assert last_layer(build_model("mlp", info)) == "net.5"
    assert last_layer(build_model("linear", info)) == "linear"
    cnn = build_model("cnn", info)
    assert module_keys(cnn, ["head.3", "head.1"]) == ("head.1.weight", "head.1.bias", "head.3.weight", "head.3.bias")
    # A name matches consecutive components anywhere in a key's module path: "3" is every module named 3.
    assert module_keys(cnn, ["3"]) == ("features.3.weight", "head.3.weight", "head.3.bias")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"personalization": "fedpre"}, "unknown value 'fedpre'; choose one of: ditto, fedbn, fedper, fedrep, finetune, none"),
        ({"personalization": "fedper", "strategy": "fedsgd"},
         ("personalization 'fedper' keeps its head on the clients, which learns only in local training, but strategy "
         "'fedsgd' sends a gradient")),
        ({"personalization": "fedbn", "strategy": "fedsgd"}, "keeps its normalization on the clients"),
        ({"personalization": "finetune", "fraction-evaluate": 0.0}, "acts only in federated evaluation"),
        ({"personalization": "fedper", "ditto-lambda": 1.0},
         "ditto-lambda is set but personalization 'fedper' does not read it (it reads personal-modules)"),
        ({"personalization": "none", "personal-modules": "head"}, "personal-modules is set but personalization 'none'"),
        ({"personalization": "fedbn", "personal-steps": 3}, "personal-steps is set but personalization 'fedbn'"),
    ],
)
def test_settings_that_cannot_work_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(overrides)
    assert message in str(err.value)


def test_ditto_and_finetune_compose_with_fedsgd() -> None:
    for method in ("ditto", "finetune"):
        assert parse_run_config({"personalization": method, "strategy": "fedsgd"}).personalization == method


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"personalization": "fedbn", "model": "mlp"}, "has none that trains or travels (it would equal fedavg)"),
        ({"personalization": "fedper", "model": "linear"}, "cover every array LinearRegression trains, so nothing"),
        ({"personalization": "fedrep", "personal-modules": "net.9"}, ("no module of MLP is named 'net.9'; modules with "
                                                                     "parameters: net.1, net.3, net.5")),
    ],
)
def test_methods_that_do_not_fit_the_model_are_refused_on_both_sides(tmp_path: Path, overrides: dict, message: str) -> None:
    cfg = config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match="") as err:
        build_strategy(cfg)
    assert message in str(err.value)
    with pytest.raises(ConfigError) as err:
        FlowerClient(cfg, client_data(cfg, {"partition-id": 0}), RecordDict())
    assert message in str(err.value)


def test_the_personal_part_starts_from_the_seeded_initialisation_even_in_a_shared_model() -> None:
    model = build_model("mlp", ModelInfo("classification", (4,), 3), hidden=8, seed=1)
    initial = get_weights(model, personal_split(PersonalOptions(method="fedper"), model).personal)
    first = Personalizer(PersonalOptions(method="fedper"), model)
    with torch.no_grad():
        model.net[5].weight.add_(1.0)  # client A trained its head in this (cached) model object
    second = Personalizer(PersonalOptions(method="fedper"), model)  # client B, no state yet
    second.restore(model, DictNode())
    for a, b in zip(get_weights(model, second.split.personal), initial):
        np.testing.assert_array_equal(a, b)
    assert first.initial is second.initial
