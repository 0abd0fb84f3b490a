"""The client-side pieces the deployment fault tests rely on, checked in-process: the tests'
fault-injecting ClientApp (node-config `fault`) and the error a node gets when its data cannot load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common import Context, RecordDict

from flower_app.client_app import FlowerClient, NodeDataError, client_fn
from flower_app.config import parse_run_config
from flower_app.data import client_data
from strategies.validation import check_update
from tests import fault_injection
from tests.fault_injection import FAULTS, FaultInjectingClient, corrupt_update, fault_app_dir


def _update() -> list[np.ndarray]:
    return [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]


def test_nan_fault_puts_one_nan_in_the_first_float_array_and_the_server_check_rejects_it() -> None:
    original = _update()
    bad = corrupt_update("nan", original)
    assert np.isnan(bad[0]).sum() == 1 and np.isnan(bad[0][0, 0])
    assert np.array_equal(bad[1], original[1]) and not np.isnan(original[0]).any()  # input untouched
    assert "NaN" in (check_update(bad, [(2, 3), (4,)], 10) or "")


def test_nan_fault_skips_integer_arrays() -> None:
    bad = corrupt_update("nan", [np.zeros(3, dtype=np.int8), np.zeros(2, dtype=np.float32)])
    assert not np.isnan(bad[1]).all() and np.isnan(bad[1]).sum() == 1


def test_shape_fault_drops_one_element_and_the_server_check_rejects_it() -> None:
    bad = corrupt_update("shape", _update())
    assert bad[0].shape == (5,)
    assert "shape (5,)" in (check_update(bad, [(2, 3), (4,)], 10) or "")


def test_unknown_fault_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown value 'zero'; choose one of: nan, shape"):
        corrupt_update("zero", _update())
    cfg = parse_run_config({"num-partitions": 2})
    data = client_data(cfg, {"partition-id": 0})
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(FAULTS)):
        FaultInjectingClient(FlowerClient(cfg, data, RecordDict()), "zero")


def test_a_faulty_client_trains_normally_and_corrupts_only_its_reply() -> None:
    cfg = parse_run_config({"num-partitions": 2, "local-epochs": 1})
    data = client_data(cfg, {"partition-id": 0})
    honest = FlowerClient(cfg, data, RecordDict())
    faulty = FaultInjectingClient(FlowerClient(cfg, data, RecordDict()), "nan")
    weights = honest.get_parameters({})
    config = {"server-round": 1}
    good, n_good, _ = honest.fit(weights, config)
    bad, n_bad, _ = faulty.fit(weights, config)
    assert n_good == n_bad
    assert np.isnan(bad[0]).sum() == 1
    mask = ~np.isnan(bad[0])
    assert np.allclose(bad[0][mask], good[0][mask]) and all(np.allclose(b, g) for b, g in zip(bad[1:], good[1:]))


def test_a_missing_data_file_is_a_node_data_error_naming_node_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "site-a.csv"
    context = Context(run_id=1, node_id=1234, node_config={"data-path": str(missing)}, state=RecordDict(),
                      run_config={"dataset": "csv", "data-path": str(missing)})
    with pytest.raises(NodeDataError, match=rf"node 1234 cannot load its data .*FileNotFoundError: .*{missing.name}"):
        client_fn(context)


def test_the_fault_app_corrupts_only_nodes_with_a_fault_and_is_what_the_app_copy_runs(tmp_path: Path) -> None:
    run_config = {"num-partitions": 2, "local-epochs": 1}
    honest = fault_injection.client_fn(Context(1, 1, {"partition-id": 0}, RecordDict(), run_config))
    faulty = fault_injection.client_fn(Context(1, 2, {"partition-id": 0, "fault": "shape"}, RecordDict(), run_config))
    assert isinstance(honest.numpy_client, FlowerClient)  # type: ignore[attr-defined]
    assert isinstance(faulty.numpy_client, FaultInjectingClient)  # type: ignore[attr-defined]
    app = fault_app_dir(tmp_path / "app")
    assert 'clientapp = "tests.fault_injection:app"' in (app / "pyproject.toml").read_text()
    assert 'serverapp = "flower_app.server_app:app"' in (app / "pyproject.toml").read_text()
    assert (app / "tests" / "fault_injection.py").exists() and (app / "flower_app" / "client_app.py").exists()
