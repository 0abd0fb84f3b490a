"""Real server processes on one run folder: a concurrent second writer, and kill -9 in the middle of writes.

Each process is `tests/outputs_driver.py` (`build_strategy` and the in-process driver: the server's
real output path without Flower's runtime, which is not what is tested here).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from flower_app.checkpoint import checksum, read_checkpoint
from flower_app.outputs import CHECKPOINT_NAME, read_metrics
from flower_app.rundir import LOCK_NAME
from tests.outputs_driver import BASE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def start(tmp_path: Path, *configs: dict[str, Any], extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_path = tmp_path / f"driver-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.outputs_driver", *(json.dumps(c) for c in configs), *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[list[dict[str, Any]], str]:
    """Wait for a driver; its JSON result lines and its log."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.log_path.read_text()  # type: ignore[attr-defined]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], log


def wait_until(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_whole(folder: Path) -> int:
    """Every artifact present is complete; returns the checkpoint's round."""
    payload = read_checkpoint(folder / CHECKPOINT_NAME)
    assert payload["checksum"] == checksum({k: v for k, v in payload.items() if k != "checksum"})
    metrics = read_metrics(folder / "metrics.csv")
    assert list(metrics["round"]) == list(range(len(metrics)))
    json.loads((folder / "run_config.json").read_text())
    if (folder / "learning_curves.png").exists():
        assert (folder / "learning_curves.png").read_bytes()[-8:-4] == b"IEND"
    if (folder / "partitions.csv").exists():
        pd.read_csv(folder / "partitions.csv")
    if (folder / "model.pt").exists():
        torch.load(folder / "model.pt", weights_only=True)
    return int(payload["round"])


def straight_weights(tmp_path: Path, rounds: int) -> list[np.ndarray]:
    """The final model of an uninterrupted run, in a fresh process like the interrupted one's.

    Not in the test process: earlier tests there may have changed torch's global state (threads,
    kernels), which moves float32 results by an ulp.
    """
    out = tmp_path / "straight"
    proc = start(tmp_path, {**BASE, "output-dir": str(out), "run-name": "s", "num-server-rounds": rounds})
    results, log = finish(proc)
    assert results == [{"ok": True}], log[-3000:]
    model = torch.load(out / "s" / "model.pt", weights_only=True)
    return [tensor.numpy() for tensor in model.values()]


def test_a_second_writer_is_refused_by_name_and_the_first_run_is_intact(tmp_path: Path) -> None:
    out, gate = tmp_path / "out", tmp_path / "go"
    first = {"output-dir": str(out), "run-name": "shared", "num-server-rounds": 4}
    a = start(tmp_path, first, extra=("--gate", str(gate), "--gate-round", "2"))
    folder = out / "shared"
    try:
        wait_until(lambda: (folder / CHECKPOINT_NAME).exists(), "round 1's checkpoint", a)
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == a.pid
        # While A trains round 2: B tries to continue the run, to start it anew, and to resume "the newest".
        b = start(tmp_path, {**first, "resume": True, "num-server-rounds": 8}, first,
                  {"output-dir": str(out), "resume": True})
        results, log = finish(b)
        assert b.returncode == 3 and len(results) == 3, log[-3000:]
        for result in results:
            assert result["error"] == "RunDirError", result
            assert f"in use by another writer: pid {a.pid} on host" in result["message"], result
        assert "picked 'shared', the run with the newest checkpoint" in results[2]["message"]
    finally:
        gate.touch()
    results, log = finish(a)
    assert a.returncode == 0 and results == [{"ok": True}], log[-3000:]
    assert assert_whole(folder) == 4
    assert list(pd.read_csv(folder / "metrics.csv")["round"]) == [0, 1, 2, 3, 4]
    assert json.loads((folder / "run_config.json").read_text())["num-server-rounds"] == 4
    assert not (folder / "resume_history.jsonl").exists()
    assert not (folder / LOCK_NAME).exists() and temporaries(folder) == []


def test_kill_during_a_checkpoint_write_then_resume_ends_where_the_straight_run_does(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "hanging"
    settings = {"output-dir": str(out), "run-name": "r", "num-server-rounds": 4}
    a = start(tmp_path, settings, extra=("--hang-in", CHECKPOINT_NAME, "--hang-at", "3", "--marker", str(marker)))
    folder = out / "r"
    wait_until(marker.exists, "the third checkpoint write", a)
    assert [n for n in temporaries(folder) if n.startswith(f".{CHECKPOINT_NAME}.")]  # its bytes are out
    kill(a)
    # Right after the crash: the old checkpoint is whole, the new one never replaced it.
    assert assert_whole(folder) == 2
    assert not (folder / "model.pt").exists()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == a.pid  # the dead writer's lock stays

    b = start(tmp_path, {**settings, "resume": True})
    results, log = finish(b)
    assert results == [{"ok": True}], log[-3000:]
    assert f"taking over the lock left by pid {a.pid}" in log and "that process is gone" in log
    assert "removed 1 temporary file(s) left by an interrupted writer" in log
    assert assert_whole(folder) == 4
    assert list(pd.read_csv(folder / "metrics.csv")["round"]) == [0, 1, 2, 3, 4]
    assert temporaries(folder) == [] and not (folder / LOCK_NAME).exists()
    history = [json.loads(line) for line in (folder / "resume_history.jsonl").read_text().splitlines()]
    assert [h["from_round"] for h in history] == [2]
    model = torch.load(folder / "model.pt", weights_only=True)
    for expected, tensor in zip(straight_weights(tmp_path, 4), model.values()):
        np.testing.assert_array_equal(expected, tensor.numpy())


def test_kill_during_the_final_model_write_then_resume_rewrites_it(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "hanging"
    settings = {"output-dir": str(out), "run-name": "r", "num-server-rounds": 2}
    a = start(tmp_path, settings, extra=("--hang-in", "model.pt", "--marker", str(marker)))
    folder = out / "r"
    wait_until(marker.exists, "the final model write", a)
    kill(a)
    assert assert_whole(folder) == 2  # the last round's checkpoint is in, the model is not
    assert not (folder / "model.pt").exists() and [n for n in temporaries(folder) if n.startswith(".final.")]

    b = start(tmp_path, {**settings, "resume": True})
    results, log = finish(b)
    assert results == [{"ok": True}], log[-3000:]
    assert "nothing left to train; rewriting the final model and plot" in log
    assert temporaries(folder) == [] and not (folder / LOCK_NAME).exists()
    weights = read_checkpoint(folder / CHECKPOINT_NAME)["strategy"]["weights"]
    model = torch.load(folder / "model.pt", weights_only=True)
    for expected, tensor in zip(weights, model.values()):
        np.testing.assert_array_equal(expected, tensor.numpy())


def test_kills_at_random_moments_never_leave_a_partial_file(tmp_path: Path) -> None:
    # Bigger files (hidden-size 2048: 0.15 M parameters, ~0.6 MB a checkpoint) widen the write windows.
    out = tmp_path / "out"
    folder = out / "r"
    settings = {"output-dir": str(out), "run-name": "r", "num-server-rounds": 40, "hidden-size": 2048}
    rng = random.Random(0)
    last = 0
    for attempt in range(2):
        proc = start(tmp_path, {**settings, "resume": attempt > 0})
        ckpt = folder / CHECKPOINT_NAME
        seen = ckpt.stat().st_mtime_ns if ckpt.exists() else None

        def new_checkpoint(ckpt: Path = ckpt, seen: int | None = seen) -> bool:
            return ckpt.exists() and ckpt.stat().st_mtime_ns != seen

        wait_until(new_checkpoint, "a new checkpoint", proc)
        time.sleep(rng.uniform(0.0, 1.5))
        kill(proc)
        round_now = assert_whole(folder)
        assert round_now >= last
        last = round_now
    # Finish: no rounds left at the checkpoint's round, so the final artifacts are written from it.
    results, log = finish(start(tmp_path, {**settings, "resume": True, "num-server-rounds": last}))
    assert results == [{"ok": True}], log[-3000:]
    assert assert_whole(folder) == last and (folder / "model.pt").exists()
    assert temporaries(folder) == [] and not (folder / LOCK_NAME).exists()


def test_a_real_write_error_from_the_kernel_stops_the_run_naming_the_file_and_errno(tmp_path: Path) -> None:
    # --max-file-size sets RLIMIT_FSIZE: the kernel refuses to grow any file of the driver past 300 kB
    # (EFBIG), as a full disk refuses with ENOSPC: a real error from a real write, without root or a
    # tiny filesystem.
    out = tmp_path / "out"
    # hidden-size 2048: 0.15 M parameters, a 0.6 MB checkpoint; metrics.csv and the plot stay small.
    settings = {"output-dir": str(out), "run-name": "r", "num-server-rounds": 2, "hidden-size": 2048}
    proc = start(tmp_path, settings, extra=("--max-file-size", "300000"))
    results, log = finish(proc)
    assert proc.returncode == 3 and len(results) == 1 and results[0]["error"] == "WriteError", log[-3000:]
    message = results[0]["message"]
    assert "checkpoint.pt" in message and "[Errno 27 EFBIG] File too large" in message, message
    assert "The run stops here" in message and "no checkpoint was written yet" in message
    folder = out / "r"
    assert not (folder / CHECKPOINT_NAME).exists() and temporaries(folder) == [] and not (folder / LOCK_NAME).exists()
    assert list(read_metrics(folder / "metrics.csv")["round"]) == [0, 1]  # what was written before stays
