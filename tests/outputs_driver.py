"""A real server process for the output tests: `build_strategy` and the in-process driver, with hooks.

    python -m tests.outputs_driver CONFIG_JSON [CONFIG_JSON ...] [--gate PATH --gate-round N]
                                   [--hang-in NAME --hang-at N --marker PATH] [--max-file-size BYTES]

Each CONFIG_JSON is a run config (over `BASE`); the configs run one after the other in this
process and each prints one JSON line: {"ok": true} or {"ok": false, "error": type, "message": ...}.
``--hang-in NAME``: on the N-th time a file NAME is being written (its bytes are out, before the
rename), write PATH and sleep, so that a test can kill this process in the middle of a write.
``--gate PATH``: client fits of round N and later wait until PATH exists (to keep a run going, after
its first checkpoints, while a test acts). ``--max-file-size``: RLIMIT_FSIZE, so that writing past it
fails in the kernel with EFBIG (SIGXFSZ ignored), like a full disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flwr.common import RecordDict

from flower_app import rundir
from flower_app.client_app import FlowerClient
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.server_app import build_strategy

NUM_CLIENTS = 3
BASE: dict[str, Any] = {
    "fraction-evaluate": 0.0, "min-available-clients": NUM_CLIENTS, "min-fit-clients": NUM_CLIENTS,
    "client-wait-timeout": 1.0, "min-partition-size": 5, "model": "mlp", "hidden-size": 16, "local-epochs": 1,
    "error-feedback": False, "device": "cpu",
}


class GatedClient(FlowerClient):
    gate: Path | None = None
    gate_round = 1

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        if self.gate is not None and int(config.get("server-round", 0)) >= self.gate_round:
            while not self.gate.exists():
                time.sleep(0.05)
        return super().fit(parameters, config)


def hang_in(name: str, at: int, marker: Path) -> None:
    seen = {"count": 0}
    real = rundir.fsync_file

    def fsync(path: Path) -> None:
        if path.name == name or path.name.startswith(f".{name}."):
            seen["count"] += 1
            if seen["count"] == at:
                marker.write_text(str(path))
                time.sleep(600)
        real(path)

    rundir.fsync_file = fsync  # type: ignore[assignment]


def run(settings: dict[str, Any]) -> None:
    cfg = parse_run_config({**BASE, **settings})
    strategy, rounds = build_strategy(cfg)
    clients = [
        GatedClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": NUM_CLIENTS}), RecordDict())
        for i in range(NUM_CLIENTS)
    ]
    run_rounds(strategy, clients, rounds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--gate", type=Path)
    parser.add_argument("--gate-round", type=int, default=1)
    parser.add_argument("--hang-in", default="")
    parser.add_argument("--hang-at", type=int, default=1)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--max-file-size", type=int, default=0)
    args = parser.parse_args()
    if args.max_file_size:
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.max_file_size, args.max_file_size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    GatedClient.gate, GatedClient.gate_round = args.gate, args.gate_round
    if args.hang_in:
        hang_in(args.hang_in, args.hang_at, args.marker)
    status = 0
    for text in args.configs:
        try:
            run(json.loads(text))
            print(json.dumps({"ok": True}), flush=True)
        except (rundir.RunDirError, rundir.CheckpointError, rundir.WriteError) as err:
            print(json.dumps({"ok": False, "error": type(err).__name__, "message": str(err)}), flush=True)
            status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
