"""What a run writes, through the real strategy in one process: run folders, metrics.csv appends,
a full disk at every artifact, resume with nothing left to train, TensorBoard beside metrics.csv."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from flower_app import outputs, rundir
from flower_app.checkpoint import read_checkpoint
from flower_app.config import ConfigError
from flower_app.inprocess import run_rounds
from flower_app.outputs import CHECKPOINT_NAME, WriteError, latest_run, read_metrics
from flower_app.rundir import LOCK_NAME, RunDirError
from flower_app.server_app import build_strategy
from strategies.base import RoundRecord
from tests.test_rule_oracles import clients, config

SMALL = {"model": "mlp", "hidden-size": 8, "local-epochs": 1, "num-server-rounds": 4, "run-name": "run"}


def run(out: Path, rounds: int | None = None, **settings: Any) -> Any:
    """Build the strategy (as the ServerApp does) and run ``rounds`` of the rounds left (all by default)."""
    cfg = config(out, **{**SMALL, **settings})
    strategy, left = build_strategy(cfg)
    run_rounds(strategy, clients(cfg), left if rounds is None else rounds)
    return strategy


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Final weights of the uninterrupted 4-round run every interrupted one must end at."""
    return run(tmp_path_factory.mktemp("straight")).weights


def test_the_same_command_twice_makes_two_runs_and_leaves_the_first_alone(tmp_path: Path) -> None:
    run(tmp_path, **{"num-server-rounds": 1, "run-name": ""})
    (first,) = list(tmp_path.iterdir())
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    run(tmp_path, **{"num-server-rounds": 1, "run-name": ""})
    runs = sorted(tmp_path.iterdir())
    assert len(runs) == 2 and runs[0] == first and runs[1].name > first.name
    assert runs[0].name.split("-")[2:4] == ["fedavg", "digits"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    for r in runs:
        assert sorted(p.name for p in r.iterdir()) == [
            "best_model.json", "best_model.pt", "checkpoint.pt", "learning_curves.png", "metrics.csv", "model.pt",
            "partitions.csv", "run_config.json",
        ]  # and no lock file: a finished run releases its folder
        assert json.loads((r / "run_config.json").read_text())["run-name"] == r.name


def test_metrics_rows_are_appended_not_rewritten(tmp_path: Path, monkeypatch) -> None:
    rewrites: list[int] = []
    real = outputs.atomic_write

    def counting(path: Path, write: Any) -> None:
        if path.name == "metrics.csv":
            rewrites.append(len(path.read_text().splitlines()) - 1 if path.exists() else 0)
        real(path, write)

    monkeypatch.setattr(outputs, "atomic_write", counting)
    strategy = run(tmp_path, **{"num-server-rounds": 6})
    # Round 0 writes the header; round 1 adds the training columns (one whole, atomic rewrite); then appends.
    assert rewrites == [0, 1]
    recorder = strategy.observers[0]
    written = pd.read_csv(tmp_path / "run" / "metrics.csv")
    expected = pd.DataFrame(recorder.rows)
    assert list(written.columns) == list(expected.columns) and list(written["round"]) == list(range(7))
    pd.testing.assert_frame_equal(written, expected.astype(written.dtypes.to_dict()), check_exact=False, rtol=1e-12)


def test_a_torn_last_line_is_dropped_by_the_reader_and_by_a_resume(tmp_path: Path) -> None:
    run(tmp_path, rounds=3)  # 3 of 4 rounds, checkpoint at 3
    metrics = tmp_path / "run" / "metrics.csv"
    with open(metrics, "a") as f:
        f.write("4,2.1,0.3")  # a crash in the middle of appending round 4
    assert list(read_metrics(metrics)["round"]) == [0, 1, 2, 3]
    run(tmp_path, resume=True)
    assert list(pd.read_csv(metrics)["round"]) == [0, 1, 2, 3, 4]


def test_resume_with_no_rounds_left_rewrites_the_final_model_and_plot(tmp_path: Path, straight) -> None:
    run(tmp_path)
    folder = tmp_path / "run"
    for name in ("model.pt", "learning_curves.png"):
        (folder / name).unlink()  # lost, as after a crash while they were written
    strategy = run(tmp_path, resume=True)
    assert strategy.start_round == 4
    model = torch.load(folder / "model.pt", weights_only=True)
    for array, tensor in zip(straight, model.values()):
        np.testing.assert_array_equal(array, tensor.numpy())
    assert (folder / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (folder / LOCK_NAME).exists() and temporaries(folder) == []


def test_an_abandoned_writer_writes_nothing_after_its_lock_is_taken(tmp_path: Path) -> None:
    abandoned = run(tmp_path, rounds=2)  # "crashed" after round 2, still holding the lock in this process
    run(tmp_path, resume=True)  # takes the lock over, finishes the run
    folder = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(RunDirError, match="was taken over by pid"):
        run_rounds(abandoned, clients(abandoned.observers[0].cfg), 1)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_round_reported_after_the_run_closed_is_not_recorded(tmp_path: Path, caplog) -> None:
    strategy = run(tmp_path, **{"num-server-rounds": 1})
    folder = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    strategy.observers[0](RoundRecord(round=2), strategy)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert any("round 2 reported after run 'run' was closed: not recorded" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- a full disk
DISK_FULL = [
    # (file, first round the disk is full, last good checkpoint)
    ("run_config.json", 0, None),
    ("partitions.csv", 1, None),
    ("metrics.csv", 3, 2),
    ("checkpoint.pt", 3, 2),
    ("learning_curves.png", 4, 3),
    ("model.pt", 4, 4),
]


@pytest.mark.parametrize(
    "name, from_round, good, code",
    [(*case, errno.ENOSPC) for case in DISK_FULL] + [("checkpoint.pt", 2, 1, errno.EDQUOT)],
    ids=[c[0] for c in DISK_FULL] + ["checkpoint.pt-quota"],
)
def test_a_full_disk_stops_the_run_cleanly_and_a_resume_ends_where_the_straight_run_does(
    tmp_path: Path, monkeypatch, straight, name: str, from_round: int, good: int | None, code: int
) -> None:
    now = {"round": 0}
    real = rundir.fsync_file

    def fsync(path: Path) -> None:
        if now["round"] >= from_round and (path.name == name or path.name.startswith(f".{name}.")):
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded")
        real(path)

    monkeypatch.setattr(rundir, "fsync_file", fsync)
    cfg = config(tmp_path, **SMALL)
    folder = tmp_path / "run"
    with pytest.raises(WriteError) as info:
        strategy, left = build_strategy(cfg)
        strategy.observers.insert(0, lambda record, s: now.update(round=record.round))
        run_rounds(strategy, clients(cfg), left)
    message = str(info.value)
    assert name in message and f"[Errno {code} {errno.errorcode[code]}]" in message and info.value.errno == code
    assert "The run stops here" in message
    assert temporaries(folder) == [] and not (folder / LOCK_NAME).exists()
    if good is None:
        assert "no checkpoint was written yet" in message and not (folder / CHECKPOINT_NAME).exists()
        return
    assert f"the last good checkpoint is round {good}" in message and "resume=true run-name='run'" in message
    assert read_checkpoint(folder / CHECKPOINT_NAME)["round"] == good
    metrics = read_metrics(folder / "metrics.csv")
    assert list(metrics["round"])[: good + 1] == list(range(good + 1))
    monkeypatch.setattr(rundir, "fsync_file", real)  # space freed
    resumed = run(tmp_path, resume=True)
    for a, b in zip(resumed.weights, straight):
        np.testing.assert_array_equal(a, b)
    assert list(pd.read_csv(folder / "metrics.csv")["round"]) == [0, 1, 2, 3, 4]
    assert (folder / "model.pt").exists() and temporaries(folder) == []


def test_a_full_disk_while_recording_a_resume_keeps_the_history_and_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run(tmp_path, rounds=2)
    folder = tmp_path / "run"
    checkpoint = (folder / CHECKPOINT_NAME).read_bytes()

    def fsync(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "fsync_file", fsync)
    with pytest.raises(WriteError, match=r"resume_history.jsonl.*ENOSPC.*last good checkpoint is round 2"):
        build_strategy(config(tmp_path, **SMALL, resume=True))
    assert (folder / CHECKPOINT_NAME).read_bytes() == checkpoint
    assert not (folder / "resume_history.jsonl").exists() and temporaries(folder) == []


# ------------------------------------------------------------------------------------- TensorBoard
def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_tensorboard_matches_csv(folder: Path) -> int:
    frame = pd.read_csv(folder / "metrics.csv")
    logged = scalars(folder)
    expected_tags = {c for c in frame.columns if c != "round" and pd.to_numeric(frame[c], errors="coerce").notna().any()}
    assert set(logged) == expected_tags
    for tag, events in logged.items():
        values = {int(r): float(v) for r, v in zip(frame["round"], frame[tag].astype(float)) if math.isfinite(v)}
        assert [step for step, _ in events] == sorted(values), tag  # one event per round, rounds in order
        for step, value in events:
            assert value == np.float32(values[step]), (tag, step)  # TensorBoard keeps float32
    return sum(len(e) for e in logged.values())


def test_tensorboard_logs_every_metric_of_every_round_as_metrics_csv_has_it(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run(tmp_path, tensorboard=True)
    assert assert_tensorboard_matches_csv(tmp_path / "run") > 4 * 15


def test_tensorboard_after_a_resume_shows_each_round_once_with_the_resumed_values(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run(tmp_path, rounds=3, tensorboard=True, **{"checkpoint-every": 2})  # crash after round 3, checkpoint at 2
    before = dict(scalars(tmp_path / "run")["seconds"])
    assert sorted(before) == [0, 1, 2, 3]
    run(tmp_path, resume=True, tensorboard=True, **{"checkpoint-every": 2})
    assert_tensorboard_matches_csv(tmp_path / "run")  # round 3 once: the resumed run's, not the crashed one's
    after = dict(scalars(tmp_path / "run")["seconds"])
    assert after[1] == before[1] and after[3] != before[3]


def test_tensorboard_without_the_package_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(outputs, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'tensorboard' is true but the tensorboard package is not installed: "
                                          r"pip install -e '.\[tracking\]'"):
        build_strategy(config(tmp_path, **SMALL, tensorboard=True))
    assert not (tmp_path / "run").exists()  # refused before any folder was made


def test_a_failing_tensorboard_log_stops_the_run_like_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def full(self: Any, tag: str, value: float, global_step: int) -> None:
        if global_step >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    with pytest.raises(WriteError, match=r"TensorBoard log in .*run/tensorboard: \[Errno 28 ENOSPC\].*round 1"):
        run(tmp_path, tensorboard=True)
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["round"] == 1


def test_latest_run_is_the_folder_a_resume_would_pick(tmp_path: Path) -> None:
    run(tmp_path, **{"num-server-rounds": 1, "run-name": "a"})
    run(tmp_path, **{"num-server-rounds": 1, "run-name": "b"})
    assert latest_run(tmp_path) == tmp_path / "b"
    cfg = dataclasses.replace(config(tmp_path, **SMALL), run_name="", resume=True, num_server_rounds=2)
    strategy, left = build_strategy(cfg)
    assert left == 1 and strategy.observers[0].dir == tmp_path / "b"
