"""Your own model: ``model = "package.module:factory"``, a factory defined outside the app.

Every factory here lives in a module this test writes into a temporary folder put on ``sys.path``,
as a user's package would be installed: nothing of it is part of the app. Each way a factory can be
wrong is refused with a message that names the import path and the problem.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import RecordDict
from hypothesis import given
from hypothesis import strategies as st

from flower_app.client_app import FlowerClient
from flower_app.config import ConfigError, parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.model_factory import IMPORT_PATH, ModelFactoryError, build_from_factory, import_path_problem
from flower_app.server_app import build_strategy
from flower_app.task import ModelInfo, build_model, weight_spec

DIGITS = ModelInfo("classification", (1, 8, 8), 10)
REGRESSION = ModelInfo("regression", (5,), 1)
TOKENS = ModelInfo("causal-lm", (16,), 1, "tokens")
_names = itertools.count()

GOOD = """
import math
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, features, outputs):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.Tanh())
        self.own_head = nn.Linear(16, outputs)

    def forward(self, x):
        return self.own_head(self.body(x))

def build(info):
    return Net(math.prod(info.input_shape), info.num_outputs)
"""


def write_module(root: Path, source: str) -> str:
    """A fresh package ``ownmodels<N>`` with ``nets.py`` holding ``source``; returns ``ownmodels<N>.nets``."""
    package = root / f"ownmodels{next(_names)}"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(source))
    return f"{package.name}.nets"


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path, as an installed package's site-packages would be."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


# Each case: the factory module's source, the attribute, the data's ModelInfo, and what the message must say.
BAD_FACTORIES = {
    "module-missing": (None, "build", DIGITS, (r"module 'no_such_package_xq\.nets' is not importable here "
                       r"\(ModuleNotFoundError: No module named 'no_such_package_xq'\).*fab-include")),
    "own-import-error": ("import no_such_dependency_xq\ndef build(info): pass\n", "build", DIGITS,
                         r"importing module '.*' failed: ModuleNotFoundError: No module named 'no_such_dependency_xq'"),
    "raises-on-import": ("raise RuntimeError('config file missing')\n", "build", DIGITS,
                         r"importing module '.*' raised RuntimeError: config file missing"),
    "attribute-missing": (GOOD, "biuld", DIGITS, r"module '.*' has no attribute 'biuld'; its public callables: Net, build"),
    "nested-attribute-missing": (GOOD, "Net.create", DIGITS, r"'.*:Net' has no attribute 'create'"),
    "not-callable": ("WIDTH = 3\n", "WIDTH", DIGITS, r"'WIDTH' is a int, not callable"),
    "factory-raises": ("def build(info):\n    raise ValueError('needs RGB images')\n", "build", DIGITS,
                       (r"raised ValueError when called with classification, input shape \(1, 8, 8\) \(dense\), "
                       r"10 outputs: needs RGB images")),
    "not-a-module": ("def build(info):\n    return [1, 2]\n", "build", DIGITS, r"returned a list, not a torch\.nn\.Module"),
    "no-parameters": ("from torch import nn\ndef build(info):\n    return nn.Flatten()\n", "build", DIGITS,
                      r"has no trainable parameters \(it has no parameters\)"),
    "frozen": (("from torch import nn\ndef build(info):\n    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
               "    m.requires_grad_(False)\n    return m\n"), "build", DIGITS,
               r"has no trainable parameters \(all 2 of its parameters have requires_grad=False\)"),
    "forward-raises": ("from torch import nn\ndef build(info):\n    return nn.Linear(64, 10)\n", "build", DIGITS,
                       (r"a forward pass on a dummy batch of shape \(2, 1, 8, 8\) \(torch\.float32, the data's input "
                       r"shape \(1, 8, 8\) with a batch of 2\) raised RuntimeError")),
    "wrong-outputs": ("from torch import nn\ndef build(info):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n",
                      "build", DIGITS, r"the output has shape \(2, 5\), expected \(2, 10\); the task is classification"),
    "batch-squeezed": ("from torch import nn\ndef build(info):\n    return nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))\n",
                       "build", REGRESSION, r"the output has shape \(2,\), expected \(2, 1\); the task is regression"),
    "not-a-tensor": (("from torch import nn\nclass M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                     "        self.l = nn.Linear(64, 10)\n    def forward(self, x):\n        return (self.l(x.flatten(1)),)\n"
                     "def build(info):\n    return M()\n"), "build", DIGITS, r"it returned a tuple, not a tensor"),
    "integer-output": (("import torch\nfrom torch import nn\nclass M(nn.Module):\n    def __init__(self):\n"
                       "        super().__init__()\n        self.l = nn.Linear(64, 10)\n    def forward(self, x):\n"
                       "        return self.l(x.flatten(1)).argmax(1, keepdim=True).expand(-1, 10)\n"
                       "def build(info):\n    return M()\n"), "build", DIGITS, r"returned a torch\.int64 tensor"),
    "lm-not-per-token": (("from torch import nn\ndef build(info):\n    return nn.Sequential(nn.Embedding(50, 8), "
                         "nn.Flatten(), nn.Linear(128, 50))\n"), "build", TOKENS,
                         r"the output has shape \(2, 50\), expected \(2, sequence length <= 16, vocabulary size\)"),
}


@pytest.mark.parametrize("case", list(BAD_FACTORIES))
def test_every_bad_factory_is_refused_naming_the_path_and_the_problem(on_path: Path, case: str) -> None:
    source, attribute, info, problem = BAD_FACTORIES[case]
    module = "no_such_package_xq.nets" if source is None else write_module(on_path, source)
    path = f"{module}:{attribute}"
    with pytest.raises(ModelFactoryError, match=problem) as err:
        build_from_factory(path, info)
    assert f"model '{path}'" in str(err.value)
    with pytest.raises(ModelFactoryError, match=problem):  # the same through the app's one entry point
        build_model(path, info, seed=1)


@pytest.mark.parametrize(
    "value, problem",
    [
        ("resnet", r"unknown value 'resnet'; choose one of: auto, cnn, .*, or your own factory as 'package\.module:factory'"),
        ("my_models.nets:", r"'my_models\.nets:' is not an import path of the form 'package\.module:factory'"),
        (":build", r"is not an import path"),
        ("my-models.nets:build", r"is not an import path"),
        ("my_models.nets:build:x", r"is not an import path"),
        ("my_models..nets:build", r"is not an import path"),
    ],
)
def test_the_config_checks_the_syntax_of_an_import_path_and_imports_nothing(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_run_config({"model": value})
    # A well-formed path parses although nothing by that name exists: the server need not be able to import it.
    assert parse_run_config({"model": "not_installed_here.models:build"}).model == "not_installed_here.models:build"
    assert import_path_problem("a.b_c.d2:Factory.create") is None


def test_hidden_size_is_refused_with_an_own_factory() -> None:
    with pytest.raises(ConfigError, match="hidden-size is the width of the built-in mlp; model 'pkg.m:build'"):
        parse_run_config({"model": "pkg.m:build", "hidden-size": 64})


def test_a_good_factory_gets_the_data_description_and_is_seeded(on_path: Path) -> None:
    module = write_module(on_path, GOOD + "\nSEEN = []\ndef recording(info):\n    SEEN.append(info)\n    return build(info)\n")
    a = build_model(f"{module}:recording", DIGITS, seed=3)
    b = build_model(f"{module}:recording", DIGITS, seed=3)
    c = build_model(f"{module}:recording", DIGITS, seed=4)
    import importlib

    assert importlib.import_module(module).SEEN == [DIGITS] * 3  # the frozen ModelInfo, as given
    assert weight_spec(a).keys == ("body.1.weight", "body.1.bias", "own_head.weight", "own_head.bias")
    for x, y, z in zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y) and not torch.equal(x, z)
    assert a.training  # the check's eval-mode forward leaves the model as the factory made it
    with pytest.raises(AttributeError):
        DIGITS.num_outputs = 3  # type: ignore[misc]


def test_an_own_model_for_token_input_gets_token_ids(on_path: Path) -> None:
    module = write_module(on_path, """
        from torch import nn
        class LM(nn.Module):
            def __init__(self, vocab):
                super().__init__()
                self.embed, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)
            def forward(self, ids):
                return self.out(self.embed(ids))
        def build(info):
            assert info.input_kind == "tokens"
            return LM(50)
    """)
    model = build_model(f"{module}:build", TOKENS)
    assert model(torch.zeros(1, 16, dtype=torch.int64)).shape == (1, 16, 50)


def test_a_factory_outside_the_app_trains_through_the_in_process_driver(on_path: Path, tmp_path: Path) -> None:
    module = write_module(on_path, GOOD)
    cfg = parse_run_config({
        "model": f"{module}:build", "output-dir": str(tmp_path / "out"), "run-name": "own", "num-server-rounds": 3,
        "local-epochs": 1, "min-fit-clients": 3, "min-available-clients": 3, "min-evaluate-clients": 3,
        "client-wait-timeout": 1.0, "min-partition-size": 5, "dirichlet-alpha": 10.0, "learning-rate": 0.1,
    })
    strategy, rounds = build_strategy(cfg)
    clients = [FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": 3}), RecordDict())
               for i in range(3)]
    assert all(weight_spec(c.model).keys == weight_spec(clients[0].model).keys for c in clients)
    run_rounds(strategy, clients, rounds)
    run = tmp_path / "out" / "own"
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2, 3]
    assert (metrics["results"].iloc[1:] == 3).all() and (metrics["failures"].iloc[1:] == 0).all()
    assert metrics["central_accuracy"].iloc[-1] > 0.5  # digits, 10 classes: it learned
    assert metrics["central_loss"].iloc[-1] < metrics["central_loss"].iloc[0]
    saved = torch.load(run / "model.pt", weights_only=True)
    assert list(saved) == ["body.1.weight", "body.1.bias", "own_head.weight", "own_head.bias"]
    for array, tensor in zip(strategy.weights, saved.values()):
        np.testing.assert_array_equal(array, tensor.numpy())


IDENTIFIER = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
DOTTED = st.lists(IDENTIFIER, min_size=1, max_size=4).map(".".join)


@given(DOTTED, DOTTED)
def test_every_dotted_module_and_attribute_pair_is_an_import_path(module: str, attribute: str) -> None:
    assert import_path_problem(f"{module}:{attribute}") is None
    assert parse_run_config({"model": f"{module}:{attribute}"}).model == f"{module}:{attribute}"


@given(st.text(max_size=30))
def test_any_other_text_is_a_registered_name_or_refused_with_a_config_error(text: str) -> None:
    well_formed = IMPORT_PATH.fullmatch(text) is not None
    assert (import_path_problem(text) is None) == well_formed
    try:
        cfg = parse_run_config({"model": text})
    except ConfigError as err:
        assert "run-config key 'model'" in str(err)
    else:
        assert well_formed or ":" not in cfg.model
