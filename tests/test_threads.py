"""The node-config key torch-threads: values, the automatic default, bad values refused naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common import Context, RecordDict

from flower_app.client_app import build_client
from flower_app.threads import NODE_KEY, ThreadsError, local_supernodes, parse_threads, resolve_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("node_config, expected", [
    ({}, 0), ({NODE_KEY: 0}, 0), ({NODE_KEY: "auto"}, 0), ({NODE_KEY: " AUTO "}, 0), ({NODE_KEY: 1}, 1), ({NODE_KEY: 16}, 16),
])
def test_parse_accepts_counts_and_auto(node_config: dict, expected: int) -> None:
    assert parse_threads(node_config) == expected


@pytest.mark.parametrize("value", [-1, 1.5, 2.0, "two", "", True, False, None])
def test_bad_values_are_refused_naming_the_key_and_the_choices(value: object) -> None:
    with pytest.raises(ThreadsError, match=r"node-config key 'torch-threads' must be a whole number >= 1.*0 / \"auto\""):
        parse_threads({NODE_KEY: value})


def test_a_bad_value_stops_the_client_before_it_loads_anything() -> None:
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2, NODE_KEY: "many"},
                      state=RecordDict(), run_config={})
    with pytest.raises(ThreadsError, match="torch-threads.*'many'"):
        build_client(context)


def test_resolution() -> None:
    assert resolve_threads(3, {"OMP_NUM_THREADS": "1"}, cpus=8, supernodes=2) == 3  # explicit wins
    assert resolve_threads(0, {"OMP_NUM_THREADS": "2"}, cpus=8, supernodes=2) is None  # Ray / the operator decided
    assert resolve_threads(0, {}, cpus=8, supernodes=2) == 4  # cores shared by the SuperNodes on this host
    assert resolve_threads(0, {}, cpus=2, supernodes=10) == 1  # never below one
    assert resolve_threads(0, {}, cpus=16, supernodes=1) == 16


def test_host_probes_are_sane() -> None:
    assert usable_cpus() >= 1
    assert local_supernodes() >= 1


def test_the_setting_reaches_torch_in_a_client_process() -> None:
    code = (
        "import torch\n"
        "from flower_app.threads import apply_threads\n"
        "print(apply_threads({'torch-threads': 1}), torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["1", "1"], out.stderr[-2000:]
