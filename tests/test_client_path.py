"""What a deployed message costs the client, held where it is: a lean import path, a whole fit that pulls in
nothing it does not use, arrays to and from Flower without extra copies, and a sender pool the size of the cohort.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.common import (
    Code,
    Context,
    FitIns,
    FitRes,
    RecordDict,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ServerConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flower_app.client_app import ArrayClient, client_fn
from flower_app.config import parse_run_config
from flower_app.server_app import CohortClientManager, cohort_server, make_strategy, server_fn
from flower_app.task import build_model, get_weights, weight_spec
from strategies.base import FederatedStrategy, StrategyOptions
from strategies.evaluation import EVALUATE_BEFORE_FIT
from strategies.serde import npy_bytes
from tests.strategy_utils import FakeProxy

ROOT = Path(__file__).resolve().parents[1]

# Nothing a default job's client uses: data frames, scikit-learn (only the digits source's first
# preparation), plots, transformers and LoRA, the text sources, the server's outputs, torch.compile.
FORBIDDEN = (
    "pandas", "sklearn", "scipy", "matplotlib", "transformers", "peft", "tokenizers", "torchvision", "PIL",
    "datasets.text", "flower_app.outputs", "flower_app.checkpoint", "flower_app.rundir", "torch._dynamo",
)


def _run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded(names: list[str]) -> str:
    return f"sorted(m for m in {names!r} if m in sys.modules)"


def test_importing_the_client_app_imports_nothing_it_does_not_use() -> None:
    code = f"import json, sys\nimport flower_app.client_app\nprint(json.dumps({_loaded(list(FORBIDDEN))}))\n"
    assert _run(code) == []


@pytest.mark.slow
def test_a_whole_fit_from_the_node_cache_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    """A message as a fresh ClientApp process handles it once the node's data is prepared (the first one)."""
    code = f"""
import json, sys
from flwr.common import Context, RecordDict, FitIns, ndarrays_to_parameters
from flower_app.client_app import client_fn
context = Context(run_id=1, node_id=1, node_config={{"partition-id": 0, "num-partitions": 2, "torch-threads": 1}},
                  state=RecordDict(), run_config={{"data-cache-dir": sys.argv[1], "local-epochs": 1}})
client = client_fn(context)
from flower_app.task import get_weights
inner = client.numpy_client
weights = [w.copy() for w in get_weights(inner.model, inner.spec)]
res = client.fit(FitIns(ndarrays_to_parameters(weights), {{"server-round": 1, "{EVALUATE_BEFORE_FIT}": True}}))
assert res.num_examples > 0 and "fed_eval_loss" in res.metrics
print(json.dumps({_loaded(list(FORBIDDEN))}))
"""
    _run(code, str(tmp_path))  # the first message prepares the partition (and may import what that needs)
    assert _run(code, str(tmp_path)) == []


# ------------------------------------------------------------------------------------ arrays
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.float16]),
                  hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))
def test_npy_bytes_are_what_flower_writes(array: np.ndarray) -> None:
    assert npy_bytes(array) == ndarray_to_bytes(array)
    view = array.T if array.ndim > 1 else array  # a non-contiguous view is written in C order, as np.save does
    assert np.array_equal(np.load(io.BytesIO(npy_bytes(view))), view, equal_nan=view.dtype.kind == "f")


def test_the_array_client_gives_the_numpy_clients_result(tmp_path: Path) -> None:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={"data-cache-dir": str(tmp_path), "local-epochs": 1})
    ours = client_fn(context)
    assert isinstance(ours, ArrayClient)
    reference = client_fn(context).numpy_client.to_client()  # Flower's wrapper of the same client
    weights = [w.copy() + 0.01 for w in get_weights(ours.numpy_client.model, ours.numpy_client.spec)]
    ins = FitIns(ndarrays_to_parameters(weights), {"server-round": 3})
    a, b = ours.fit(ins), reference.fit(ins)
    assert a.num_examples == b.num_examples and a.metrics == b.metrics and a.status.code == Code.OK
    assert all(np.array_equal(x, y) for x, y in zip(parameters_to_ndarrays(a.parameters), parameters_to_ndarrays(b.parameters)))
    assert a.parameters.tensors == b.parameters.tensors  # the very bytes


def test_get_weights_are_views_of_the_model_and_set_weights_reads_read_only_arrays() -> None:
    from flower_app.task import ModelInfo, set_weights

    model = build_model("mlp", ModelInfo("classification", (5,), 3))
    spec = weight_spec(model)
    weights = get_weights(model, spec)
    assert all(np.shares_memory(w, t.detach().numpy()) for w, t in zip(weights, [model.state_dict()[k] for k in spec.keys]))
    frozen = [np.frombuffer((w + 1).tobytes(), dtype=np.float32).reshape(w.shape) for w in weights]  # read-only
    set_weights(model, spec, frozen)
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(model, spec), frozen))


# ------------------------------------------------------------------------------ sender pool
class BarrierProxy(FakeProxy):
    """A client whose fit returns only when the whole cohort is being served at once."""

    def __init__(self, cid: str, barrier: threading.Barrier) -> None:
        super().__init__(cid)
        self.barrier = barrier

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        self.barrier.wait(timeout=30)  # BrokenBarrierError (a failure) if the cohort goes out in waves
        return FitRes(Status(Code.OK, ""), ins.parameters, 10, {})


def test_the_sender_pool_follows_the_cohort_so_a_large_cohort_is_sent_at_once() -> None:
    n = 40  # far above Flower's default pool, min(32, CPUs + 4)
    weights = [np.zeros(3, np.float32)]
    strategy = FederatedStrategy(StrategyOptions(min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0),
                                 weights, [True])
    server = cohort_server(strategy)
    barrier = threading.Barrier(n)
    for i in range(n):
        server.client_manager().register(BarrierProxy(str(i), barrier))
    server.parameters = ndarrays_to_parameters(weights)
    outcome = server.fit_round(server_round=1, timeout=None)
    assert server.max_workers == n
    assert outcome is not None
    _, _, (results, failures) = outcome
    assert len(results) == n and not failures


def test_the_server_app_builds_that_server(tmp_path: Path) -> None:
    components = server_fn(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                   run_config={"num-server-rounds": 2, "output-dir": str(tmp_path)}))
    assert isinstance(components.server.client_manager(), CohortClientManager)
    assert components.server.strategy is components.strategy
    assert isinstance(components.config, ServerConfig)
    manager = components.server.client_manager()
    for i in range(12):
        manager.register(FakeProxy(str(i)))
    manager.all()
    assert components.server.max_workers == 12


def test_make_strategy_is_unchanged_for_direct_callers() -> None:
    strategy = make_strategy(parse_run_config({}), [np.zeros(2, np.float32)], [True])
    assert strategy.options.federated_evaluation == "fit"
