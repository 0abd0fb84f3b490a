"""Run directories: a folder per run under output-dir, a lock against concurrent writers, atomic writes.

Layout: ``output-dir/<run-name>/``. An empty ``run-name`` gets a generated, unique, sortable name
(``YYYYmmdd-HHMMSS-<strategy>-<dataset>``, then ``-2``, ``-3``... if that folder exists). A new run
refuses a folder that already holds files; ``resume=true`` continues the named run, or with an
empty ``run-name`` the run whose checkpoint was written last.

The lock is ``run.lock`` in the run's folder: a file that names its holder (host, pid, start time,
Flower run id) and an exclusive `fcntl.flock` on it. The kernel drops the flock when the holder
dies, however it dies, so a lock left by a crashed or killed writer is taken over (with a log
line naming it) while a live one is refused (with a message naming it).

Every file is written to a temporary ``.<name>.<pid>-<hex>.tmp`` in the same folder, fsynced and
renamed over the target (then the folder is fsynced): a reader sees the old file or the new one,
never a part. Temporaries of a dead writer are removed when the next writer takes the lock.
This module knows nothing of torch or Flower.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# A child of Flower's logger: these lines show in `flwr run --stream` and `flwr log` with the run's own.
log = logging.getLogger(f"flwr.{__name__}")

LOCK_NAME = "run.lock"
CHECKPOINT_NAME = "checkpoint.pt"
TMP_SUFFIX = ".tmp"
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_NAME_RULE = "1-128 characters, letters, digits, '.', '_' and '-', not starting with '.', '_' or '-'"


class RunDirError(RuntimeError):
    """A run directory that cannot be used: in use by another writer, holding another run, misnamed."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or written by a run this one may not continue."""


class WriteError(RuntimeError):
    """Writing an output failed (a full disk, a quota, a read-only folder): the message names the file and errno."""

    def __init__(self, message: str, path: Path, errno_code: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno_code


def describe_os_error(err: BaseException) -> str:
    """``[Errno 28 ENOSPC] No space left on device`` (or the exception's text when it has no errno)."""
    code = getattr(err, "errno", None)
    if isinstance(code, int):
        return f"[Errno {code} {errno.errorcode.get(code, '?')}] {getattr(err, 'strerror', None) or err}"
    return f"{type(err).__name__}: {err}"


def os_error_in(err: BaseException) -> OSError | None:
    """The `OSError` behind ``err``, if any: itself or one in its cause/context chain.

    torch.save hides a failed write (ENOSPC, EFBIG) behind a RuntimeError that its zip writer raises
    while closing; the OSError is still in the chain.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# ------------------------------------------------------------------------------------ atomic writes
def tmp_path_for(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses, recognisable as ours (``*.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_file(path: Path) -> None:
    """Flush a written file to the device (the seam tests use to inject disk errors)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems refuse fsync on directories
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                fsync_file(child)
        for folder in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
            fsync_dir(folder)
    else:
        fsync_file(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, rename: all or nothing.

    ``write`` gets the temporary path. Any `OSError` (a full disk, a quota), also one wrapped in
    another exception, becomes a `WriteError` naming ``path`` and the errno; the old ``path`` is
    untouched and the temporary is removed.
    """
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        raise WriteError(f"could not write {path}: {describe_os_error(cause)}", path, cause.errno) from err
    finally:
        if tmp.exists():
            _remove(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def append_line(path: Path, line: str) -> None:
    """Append one line (with its newline) and fsync; on an error, cut the file back to what it was.

    A crash during the append can leave a torn last line without a newline; readers drop it
    (`flower_app.outputs.read_metrics`).
    """
    data = line.encode() if line.endswith("\n") else (line + "\n").encode()
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write(data)
            f.flush()
            fsync_file(path)
        except OSError as err:
            try:
                f.truncate(size)
            except OSError:
                pass
            raise WriteError(f"could not append to {path}: {describe_os_error(err)}", path, err.errno) from err


def publish_dir(staging: Path, target_dir: Path) -> list[str]:
    """Move every entry of ``staging`` into ``target_dir``, each replacing its namesake; returns the names.

    Files move by one atomic rename. A folder (``adapter/``) cannot be renamed over a non-empty
    one: the old folder is first renamed to a ``*.tmp`` name, the new one moved in, the old one
    removed. A crash between the two renames leaves no folder of that name (and a ``*.tmp`` that the
    next writer removes); the final artifacts are then rewritten by a resume (``resume=true``).
    """
    names = []
    target = target_dir
    try:
        entries = sorted(staging.iterdir(), key=lambda p: (not p.is_dir(), p.name))  # folders first, model.pt last
        for entry in entries:
            target = target_dir / entry.name
            _fsync_tree(entry)
            if entry.is_dir():
                old = tmp_path_for(target) if target.exists() else None
                if old is not None:
                    os.replace(target, old)
                os.replace(entry, target)
                fsync_dir(target_dir)
                if old is not None:
                    _remove(old)
            else:
                os.replace(entry, target)
            names.append(entry.name)
        fsync_dir(target_dir)
    except OSError as err:
        raise WriteError(f"could not write {target}: {describe_os_error(err)}", target, err.errno) from err
    return names


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove ``.*.tmp`` files and folders a dead writer left in ``directory`` (call only holding its lock)."""
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX):
            _remove(entry)
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------------------- the lock
@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    flower_run_id: int | None
    token: str

    def describe(self) -> str:
        run = f", Flower run {self.flower_run_id}" if self.flower_run_id is not None else ""
        return f"pid {self.pid} on host {self.host}, since {self.started}{run}"

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data["started"]),
                       None if data.get("flower_run_id") is None else int(data["flower_run_id"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_fd(fd: int) -> str:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")


# Locks this process holds, by lock-file path: a second writer in this process (a test that
# abandons a strategy mid-run to simulate a crash, then resumes) takes the lock over.
_HELD: dict[str, RunLock] = {}


class RunLock:
    """An exclusive lock on a run directory; see the module docstring."""

    def __init__(self, path: Path, fd: int | None, holder: LockHolder) -> None:
        self.path = path
        self._fd = fd
        self.holder = holder
        self.lost_to: str | None = None

    @classmethod
    def acquire(cls, directory: Path, flower_run_id: int | None = None, hint: str = "") -> RunLock:
        """Take the lock of ``directory`` or raise `RunDirError` naming the live holder."""
        path = directory / LOCK_NAME
        key = str(path.resolve())
        holder = LockHolder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            flower_run_id, secrets.token_hex(8))
        earlier = _HELD.pop(key, None)
        if earlier is not None and earlier._fd is not None:
            log.warning("run directory %s: taking the lock over from an earlier writer in this process (%s); "
                        "that writer will write nothing more", directory, earlier.holder.describe())
            fd: int | None = earlier._fd
            earlier._fd, earlier.lost_to = None, holder.describe()
        else:
            fd = cls._lock_file(path, directory, hint)
        lock = cls(path, fd, holder)
        lock._write_holder()
        _HELD[key] = lock
        return lock

    @staticmethod
    def _lock_file(path: Path, directory: Path, hint: str) -> int | None:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as err:
                raise WriteError(f"could not create the lock file {path}: {describe_os_error(err)}", path, err.errno) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = _read_fd(fd)
                os.close(fd)
                found = LockHolder.parse(text)
                who = found.describe() if found else "a writer that has not named itself yet"
                raise RunDirError(
                    f"run directory {directory} is in use by another writer: {who} (lock file {path}). Wait for "
                    f"that run to end or stop it; a lock left by a process that died is taken over by itself.{hint}"
                ) from None
            except OSError as err:  # no file locking on this filesystem: fall back on the pid rule
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    os.close(fd)
                    raise
                RunLock._check_holder_without_flock(fd, path, directory, hint)
                return fd
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                text = _read_fd(fd)
                if text.strip():
                    previous = LockHolder.parse(text)
                    who = previous.describe() if previous else "a writer whose lock file is unreadable"
                    log.warning("run directory %s: taking over the lock left by %s: that process is gone "
                                "(it crashed or was killed)", directory, who)
                return fd
            os.close(fd)  # the holder released (and removed) the file between our open and flock: retry

    @staticmethod
    def _check_holder_without_flock(fd: int, path: Path, directory: Path, hint: str) -> None:
        found = LockHolder.parse(_read_fd(fd))
        if found is None:
            log.warning("run directory %s: this filesystem has no file locks; concurrent writers are "
                        "detected by process id only", directory)
            return
        here = found.host == socket.gethostname()
        if here and not _pid_alive(found.pid):
            log.warning("run directory %s: taking over the lock left by %s: that process is gone", directory,
                        found.describe())
            return
        os.close(fd)
        raise RunDirError(
            f"run directory {directory} is in use by another writer: {found.describe()} (lock file {path}; this "
            f"filesystem has no file locks{'' if here else ', and that host cannot be checked from here'}: "
            f"if that process is gone, delete the lock file).{hint}"
        )

    def _write_holder(self) -> None:
        data = json.dumps(asdict(self.holder), indent=1).encode()
        try:
            if self._fd is None:
                raise OSError(errno.EBADF, "lock not held")
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as err:
            self.release()
            raise WriteError(f"could not write the lock file {self.path}: {describe_os_error(err)}",
                             self.path, err.errno) from err

    def check(self) -> None:
        """Raise `RunDirError` unless this lock is still ours (someone removed or took it)."""
        if self.lost_to is not None:
            raise RunDirError(f"the lock of {self.path.parent} was taken over by {self.lost_to}; "
                              "this writer stops so as not to mix its results with that one's")
        if self._fd is None:
            raise RunDirError(f"the lock of {self.path.parent} was released; nothing more is written there")
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        found = LockHolder.parse(text)
        if found is None or found.token != self.holder.token:
            who = found.describe() if found else "nobody (the lock file is gone or unreadable)"
            raise RunDirError(f"the lock file {self.path} now names {who}, not this writer "
                              f"({self.holder.describe()}); stopping so as not to overwrite another run's results")

    def release(self) -> None:
        """Remove the lock file (if it still names us) and drop the lock; idempotent."""
        fd, self._fd = self._fd, None
        _HELD.pop(str(self.path.resolve()), None)
        if fd is None:
            return
        try:
            found = LockHolder.parse(self.path.read_text(errors="replace")) if self.path.exists() else None
            if found is not None and found.token == self.holder.token:
                self.path.unlink()  # while still holding the flock: a waiting writer then retries on a fresh file
        except OSError as err:
            log.warning("could not remove the lock file %s: %s", self.path, describe_os_error(err))
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------- run directories
@dataclass
class RunDir:
    """An open run directory: where this run writes, under its lock."""

    path: Path
    name: str
    lock: RunLock
    resumed: bool


def check_run_name(run_name: str) -> None:
    if run_name and (not RUN_NAME_PATTERN.fullmatch(run_name) or run_name.endswith(TMP_SUFFIX)):
        raise RunDirError(f"run-config key 'run-name': {run_name!r} is not a valid run name: {RUN_NAME_RULE} "
                          f"(it names a folder in output-dir; '' = a generated name)")


def generated_name(label: str, now: float | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<label>`` in local time: names sort by start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-._") or "run"
    return f"{stamp}-{clean}"


def _holds(directory: Path) -> list[str]:
    """Names in a run directory other than the lock and temporaries."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name != LOCK_NAME and not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)))


def runs_with_checkpoint(root: Path) -> list[Path]:
    """Run directories under ``root`` holding a checkpoint, oldest checkpoint first (ties by name)."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and (d / CHECKPOINT_NAME).is_file()]
    return sorted(found, key=lambda d: ((d / CHECKPOINT_NAME).stat().st_mtime_ns, d.name))


def latest_run(output_dir: str | Path) -> Path:
    """The run directory in ``output_dir`` whose checkpoint was written last (what resume=true picks)."""
    runs = runs_with_checkpoint(Path(output_dir))
    if not runs:
        raise CheckpointError(f"no run in {output_dir} has a checkpoint")
    return runs[-1]


def open_run_dir(output_dir: str, run_name: str, resume: bool, label: str,
                 flower_run_id: int | None = None) -> RunDir:
    """Pick, create and lock this run's directory (see the module docstring for the rules)."""
    if not output_dir.strip():
        raise RunDirError("run-config key 'output-dir' is empty: name the folder that holds the runs' outputs")
    check_run_name(run_name)
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"could not create output-dir {root}: {describe_os_error(err)}", root, err.errno) from err
    if resume:
        return _open_for_resume(root, run_name, flower_run_id)
    if run_name:
        path = root / run_name
        try:
            path.mkdir(exist_ok=True)
        except OSError as err:
            raise WriteError(f"could not create {path}: {describe_os_error(err)}", path, err.errno) from err
        lock = RunLock.acquire(path, flower_run_id)
        held = _holds(path)
        if held:
            lock.release()
            listed = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
            raise RunDirError(
                f"run directory {path} already holds a run's files ({listed}); a new run never overwrites "
                f"another: set resume=true to continue it, choose another run-name, or leave run-name empty "
                f"for a new generated name"
            )
    else:
        path = _new_generated_dir(root, label)
        lock = RunLock.acquire(path, flower_run_id)
    _clean(path)
    log.info("run '%s': outputs in %s", path.name, path)
    return RunDir(path, path.name, lock, resumed=False)


def _new_generated_dir(root: Path, label: str) -> Path:
    base = generated_name(label)
    for n in range(1, 10_000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()  # atomic: two runs starting in the same second get different folders
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise WriteError(f"could not create {path}: {describe_os_error(err)}", path, err.errno) from err
    raise RunDirError(f"could not find a free run name in {root} starting with {base}")


def _open_for_resume(root: Path, run_name: str, flower_run_id: int | None) -> RunDir:
    hint = ""
    if run_name:
        path = root / run_name
        if not (path / CHECKPOINT_NAME).is_file():
            others = [d.name for d in runs_with_checkpoint(root)]
            listed = f"; runs with a checkpoint in {root}: {', '.join(others)}" if others else ""
            raise CheckpointError(
                f"resume=true but there is no checkpoint at {path / CHECKPOINT_NAME}; "
                f"run without resume first{listed}"
            )
    else:
        runs = runs_with_checkpoint(root)
        if not runs:
            if (root / CHECKPOINT_NAME).is_file():
                raise CheckpointError(
                    f"resume=true but no run folder in {root} has a checkpoint; {root / CHECKPOINT_NAME} is in the "
                    f"layout of older versions (one folder for every run): move that folder's files into "
                    f"{root}/<name>/ and resume with run-name='<name>'"
                )
            raise CheckpointError(f"resume=true but there is no checkpoint in any run folder of {root}; "
                                  "run without resume first")
        path = runs[-1]
        hint = (f" (resume=true with an empty run-name picked '{path.name}', the run with the newest checkpoint; "
                "set run-name to resume another)")
        log.info("resume: run-name is empty: continuing run '%s', the newest checkpoint of %d run(s) in %s "
                 "(set run-name to resume another)", path.name, len(runs), root)
    lock = RunLock.acquire(path, flower_run_id, hint=hint)
    if not (path / CHECKPOINT_NAME).is_file():  # removed while we waited for the lock
        lock.release()
        raise CheckpointError(f"resume=true but there is no checkpoint at {path / CHECKPOINT_NAME}")
    _clean(path)
    return RunDir(path, path.name, lock, resumed=True)


def _clean(path: Path) -> None:
    removed = remove_stale_temporaries(path)
    if removed:
        log.warning("run directory %s: removed %d temporary file(s) left by an interrupted writer: %s",
                    path, len(removed), ", ".join(p.name for p in removed))
