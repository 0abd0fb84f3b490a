"""Run directories: a folder per run, the lock against concurrent writers, atomic writes (no torch here)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flower_app import rundir
from flower_app.rundir import (
    LOCK_NAME,
    CheckpointError,
    RunDirError,
    RunLock,
    WriteError,
    append_line,
    atomic_write,
    atomic_write_bytes,
    generated_name,
    latest_run,
    open_run_dir,
    publish_dir,
)

ROOT = Path(__file__).resolve().parents[1]
HOLDER = (
    "import sys; from pathlib import Path; from flower_app.rundir import RunLock; "
    "RunLock.acquire(Path(sys.argv[1]), flower_run_id=4242); print('locked', flush=True); sys.stdin.read()"
)


@pytest.fixture(autouse=True)
def _release_locks() -> Iterator[None]:
    yield
    for lock in list(rundir._HELD.values()):
        lock.release()


def tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


def holder_process(directory: Path) -> subprocess.Popen[str]:
    """A separate process that holds the lock of ``directory`` until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def finish(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


# ------------------------------------------------------------------------------ run names and folders
def test_generated_names_sort_by_start_time_and_carry_the_label() -> None:
    early = generated_name("fedavg-digits", now=time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1)))
    late = generated_name("fedavg-digits", now=time.mktime((2024, 1, 2, 13, 4, 5, 0, 0, -1)))
    assert early == "20240102-030405-fedavg-digits"
    assert early < late
    assert generated_name("a/b c", now=0).endswith("-a-b-c")  # never a path separator


def test_two_new_runs_get_two_folders_and_the_first_is_untouched(tmp_path: Path) -> None:
    first = open_run_dir(str(tmp_path), "", False, "fedavg-digits")
    (first.path / "metrics.csv").write_text("round\n0\n")
    first.lock.release()
    second = open_run_dir(str(tmp_path), "", False, "fedavg-digits")
    assert second.path != first.path and second.path.parent == tmp_path
    assert (first.path / "metrics.csv").read_text() == "round\n0\n"
    # Started within the same second: the second folder gets a suffix and still sorts after the first.
    if second.path.name.startswith(first.path.name):
        assert second.path.name == first.path.name + "-2"
    assert sorted([first.path.name, second.path.name]) == [first.path.name, second.path.name]


def test_a_named_run_folder_holding_files_is_refused_without_resume(tmp_path: Path) -> None:
    run = open_run_dir(str(tmp_path), "exp1", False, "x")
    (run.path / "checkpoint.pt").write_bytes(b"results")
    run.lock.release()
    with pytest.raises(RunDirError, match=r"already holds a run's files \(checkpoint.pt\).*set resume=true"):
        open_run_dir(str(tmp_path), "exp1", False, "x")
    assert (run.path / "checkpoint.pt").read_bytes() == b"results"
    assert not (run.path / LOCK_NAME).exists()  # the refused writer left no lock behind


def test_an_empty_named_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "exp1").mkdir()
    assert open_run_dir(str(tmp_path), "exp1", False, "x").path == tmp_path / "exp1"


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "-x", "x" * 129, "run.tmp", " ", "a b"])
def test_a_run_name_that_is_not_one_plain_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(RunDirError, match="run-config key 'run-name'.*letters, digits"):
        open_run_dir(str(tmp_path), name, False, "x")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_output_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="'output-dir' is empty"):
        open_run_dir("", "", False, "x")


def test_resume_without_a_name_takes_the_newest_checkpoint_and_says_so(tmp_path: Path, caplog) -> None:
    for name, age in (("old", 100), ("new", 10), ("empty", 0)):
        (tmp_path / name).mkdir()
        if name != "empty":
            ckpt = tmp_path / name / "checkpoint.pt"
            ckpt.write_bytes(b"x")
            os.utime(ckpt, (time.time() - age, time.time() - age))
    assert latest_run(tmp_path) == tmp_path / "new"
    with caplog.at_level(logging.INFO, logger="flwr"):
        run = open_run_dir(str(tmp_path), "", True, "x")
    assert run.path == tmp_path / "new" and run.resumed
    assert any("continuing run 'new', the newest checkpoint of 2 run(s)" in r.getMessage() for r in caplog.records)


def test_resume_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in any run folder of .*; run without resume first"):
        open_run_dir(str(tmp_path), "", True, "x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*b/checkpoint.pt; run without resume first; "
                                              r"runs with a checkpoint in .*: a"):
        open_run_dir(str(tmp_path), "b", True, "x")


def test_resume_points_at_the_old_single_folder_layout(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="layout of older versions.*move that folder's files into"):
        open_run_dir(str(tmp_path), "", True, "x")


# ---------------------------------------------------------------------------------------- the lock
def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    holder = holder_process(run_dir)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another writer: pid {holder.pid} on host .*, since "
                                              r".*, Flower run 4242 \(lock file .*run.lock\)"):
            open_run_dir(str(tmp_path), "exp", False, "x")
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            RunLock.acquire(run_dir)
    finally:
        finish(holder)


def test_a_lock_left_by_a_killed_writer_is_taken_over_with_a_log_line(tmp_path: Path, caplog) -> None:
    holder = holder_process(tmp_path)
    pid = holder.pid
    os.kill(pid, signal.SIGKILL)
    holder.wait(timeout=10)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == pid  # the file stays: a crash cleans nothing
    with caplog.at_level(logging.WARNING, logger="flwr"):
        lock = RunLock.acquire(tmp_path, flower_run_id=7)
    assert any(f"taking over the lock left by pid {pid} on host" in r.getMessage() and "that process is gone"
               in r.getMessage() for r in caplog.records)
    content = json.loads((tmp_path / LOCK_NAME).read_text())
    assert content["pid"] == os.getpid() and content["flower_run_id"] == 7
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_released_lock_is_free_for_the_next_writer_without_a_warning(tmp_path: Path, caplog) -> None:
    RunLock.acquire(tmp_path).release()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        RunLock.acquire(tmp_path).release()
    assert not [r for r in caplog.records if "taking over" in r.getMessage()]


def test_a_writer_whose_lock_was_taken_writes_nothing_more(tmp_path: Path) -> None:
    first = RunLock.acquire(tmp_path)
    second = RunLock.acquire(tmp_path)  # same process: an abandoned writer (a test's simulated crash)
    second.check()
    with pytest.raises(RunDirError, match="taken over by pid"):
        first.check()
    (tmp_path / LOCK_NAME).write_text("{}")  # someone overwrote the lock file
    with pytest.raises(RunDirError, match="now names nobody"):
        second.check()


# ------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_leaves_the_old_file_and_no_temporary_when_the_disk_is_full(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*model.pt: \[Errno 28 ENOSPC\] No space left") as info:
        atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC and info.value.path == target
    assert target.read_bytes() == b"old" and tmp_files(tmp_path) == []


def test_a_disk_error_hidden_behind_another_exception_is_still_named(tmp_path: Path) -> None:
    # As torch.save does: its zip writer raises RuntimeError("unexpected pos") while closing after
    # the write itself failed (found with a real EFBIG, tests/test_outputs_processes.py).
    def write(tmp: Path) -> None:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3712 vs 3606") from None

    with pytest.raises(WriteError, match=r"could not write .*ckpt: \[Errno 27 EFBIG\] File too large") as info:
        atomic_write(tmp_path / "ckpt", write)
    assert info.value.errno == errno.EFBIG and tmp_files(tmp_path) == []

    def bug(tmp: Path) -> None:
        raise RuntimeError("a bug, not the disk")

    with pytest.raises(RuntimeError, match="a bug, not the disk"):  # not turned into a disk error
        atomic_write(tmp_path / "ckpt", bug)


def test_a_failed_fsync_counts_as_a_failed_write(tmp_path: Path, monkeypatch) -> None:
    def fsync(path: Path) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(rundir, "fsync_file", fsync)
    with pytest.raises(WriteError, match=r"\[Errno 122 EDQUOT\]"):
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert not (tmp_path / "a.json").exists() and tmp_files(tmp_path) == []


def test_a_failed_append_is_cut_back_so_no_torn_line_stays(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("round\n0\n")
    monkeypatch.setattr(rundir, "fsync_file", lambda p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(WriteError, match="could not append to .*metrics.csv: .*ENOSPC"):
        append_line(path, "1")
    assert path.read_text() == "round\n0\n"


def test_publish_dir_replaces_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.bin").write_bytes(b"old")
    (tmp_path / "model.pt").write_bytes(b"old")
    staging = tmp_path / ".final.1-ab.tmp"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "new.bin").write_bytes(b"new")
    (staging / "model.pt").write_bytes(b"new")
    assert publish_dir(staging, tmp_path) == ["adapter", "model.pt"]
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["new.bin"]
    assert (tmp_path / "model.pt").read_bytes() == b"new"
    assert tmp_files(tmp_path) == [staging.name] and list(staging.iterdir()) == []  # the caller removes staging


def test_stale_temporaries_of_a_dead_writer_are_removed_when_the_run_is_taken(tmp_path: Path, caplog) -> None:
    run = tmp_path / "exp"
    (run / ".final.99-ab.tmp").mkdir(parents=True)
    (run / ".checkpoint.pt.99-cd.tmp").write_bytes(b"x" * 1000)
    (run / "checkpoint.pt").write_bytes(b"x")
    keep = run / "notes.tmp"  # not one of ours (no leading dot): left alone
    keep.write_text("mine")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        open_run_dir(str(tmp_path), "exp", True, "x")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "notes.tmp", LOCK_NAME]
    assert any("removed 2 temporary file(s) left by an interrupted writer" in r.getMessage() for r in caplog.records)
