"""What a node keeps between messages: personal model parts, SCAFFOLD's c_i, compression residuals.

Two stores, chosen by the node config:

* Flower's node state (``context.state``), the default. It lasts for one run, in simulation and deployment: a
  resumed run (a new Flower run) starts it empty.
* A node-local directory, ``--node-config "state-dir='/srv/site-a/flower-state'"`` (an absolute path that
  exists and this node can write). It outlasts runs, so a resumed run continues with what the node had::

      <state-dir>/<run-name>/<partition-N | own-data>/
          manifest.json        format, run name, partition, and the run-config values that fix what the
                               arrays mean (`flower_app.checkpoint.FIXED_ON_RESUME`)
          round-000007.npz     every kept array after this node's fit in round 7 (name/0000, name/0001, ...)

  Files are written whole or not at all (temporary file, fsync, rename) and the folders are private to the
  node's user (mode 0700). The server sends the run's name (``run-name``) and round with every message. A fit
  in round ``t`` reads the newest snapshot of a round before ``t`` and writes ``round-t``; an evaluation in round
  ``t`` reads the newest of a round up to ``t``. A resume from the checkpoint of round ``R`` therefore reads what
  the node had after round ``R`` even when the node had gone further before the server stopped: snapshots are
  kept back to the newest one at or before the last round the server surely checkpointed
  (``checkpoint-every``). A snapshot written by another run config (other model, method, data split...), or
  whose arrays do not have this run's shapes, is refused with the reason; nothing is deleted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.common import ArrayRecord, RecordDict, Scalar

from flower_app.config import AppConfig
from strategies import get_rule
from strategies.compression import CODECS
from strategies.personalization import get_personalization

log = logging.getLogger(f"flwr.{__name__}")

NDArrays = list[np.ndarray]
STATE_DIR_KEY = "state-dir"  # node config
RUN_NAME_CONFIG_KEY = "run-name"  # fit and evaluate config: the server's run folder name
ROUND_CONFIG_KEY = "server-round"
FORMAT = "flower_app-node-state-v1"
MANIFEST = "manifest.json"
_SNAPSHOT = re.compile(r"round-(\d{6,})\.npz")
_ARRAY_NAME = re.compile(r"(.+)/(\d{4,})")


class NodeStateError(RuntimeError):
    """This node's kept state cannot be used for this run; the message says why and what to do."""


def fingerprint(cfg: AppConfig) -> dict[str, Scalar]:
    """The run-config values that fix what a node's kept arrays mean (those a resume may not change)."""
    from flower_app.checkpoint import FIXED_ON_RESUME  # only with a state-dir: off the plain client's import path

    values = cfg.to_run_config()
    return {k: values[k] for keys in FIXED_ON_RESUME.values() for k in keys if k in values}


class NodeState:
    """One message's view of the node's kept arrays, by name; `commit` stores what was put (fit only)."""

    def __init__(self, load: Callable[[str], NDArrays | None], origin: str,
                 commit: Callable[[dict[str, NDArrays | None]], None] | None) -> None:
        self._load = load
        self._origin = origin
        self._commit = commit
        self._puts: dict[str, NDArrays | None] = {}

    def get(self, name: str, shapes: Sequence[tuple[int, ...]] | None = None) -> NDArrays | None:
        """The arrays kept under ``name`` (None if none); with ``shapes``, they must have those shapes."""
        arrays = self._puts[name] if name in self._puts else self._load(name)
        if arrays is None or shapes is None:
            return arrays
        found = [tuple(a.shape) for a in arrays]
        if found != [tuple(s) for s in shapes]:
            diff = next((i for i, (a, b) in enumerate(zip(found, shapes)) if a != tuple(b)), min(len(found), len(shapes)))
            raise NodeStateError(
                f"node state '{name}' in {self._origin} does not fit this run's model: {len(found)} arrays, expected "
                f"{len(shapes)}; array {diff} has shape {found[diff] if diff < len(found) else None}, expected "
                f"{tuple(shapes[diff]) if diff < len(shapes) else None}. It was written by another model; "
                "move it away or use another run-name"
            )
        return arrays

    def put(self, name: str, arrays: NDArrays | None) -> None:
        """Keep ``arrays`` under ``name`` (None: keep nothing under it)."""
        self._puts[name] = None if arrays is None else [np.ascontiguousarray(a) for a in arrays]

    def commit(self) -> None:
        if self._commit is None:
            raise RuntimeError("this node state was opened for an evaluation; only a fit stores state")
        if self._puts:
            self._commit(dict(self._puts))


class NodeStore(Protocol):
    def open(self, config: Mapping[str, Scalar], fit: bool) -> NodeState: ...


class RecordStore:
    """Flower's node state (``context.state``): one `ArrayRecord` per name, for the length of one run."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def open(self, config: Mapping[str, Scalar], fit: bool) -> NodeState:
        def load(name: str) -> NDArrays | None:
            record = self.state.get(name)
            return record.to_numpy_ndarrays() if isinstance(record, ArrayRecord) else None

        def commit(arrays: dict[str, NDArrays | None]) -> None:
            for name, value in arrays.items():
                if value is None:
                    if name in self.state:
                        del self.state[name]
                else:
                    self.state[name] = ArrayRecord(numpy_ndarrays=value)

        return NodeState(load, "node state (context.state)", commit if fit else None)


class DirectoryStore:
    """A node-local directory that outlasts runs (see the module docstring for its layout and rules)."""

    def __init__(self, root: Path, partition: str, config: Mapping[str, Scalar], checkpoint_every: int = 1) -> None:
        self.root = root
        self.partition = partition
        self.config = dict(config)
        self.checkpoint_every = max(int(checkpoint_every), 1)

    def folder(self, run_name: str) -> Path:
        return self.root / run_name / self.partition

    def open(self, config: Mapping[str, Scalar], fit: bool) -> NodeState:
        run_name, rnd = self._run_and_round(config)
        folder = self.folder(run_name)
        self._check_manifest(folder)
        as_of = rnd - 1 if fit else rnd
        path = self._newest(folder, as_of)
        cache: dict[str, NDArrays] | None = None

        def load(name: str) -> NDArrays | None:
            nonlocal cache
            if cache is None:
                cache = self._read(path) if path is not None else {}
            return cache.get(name)

        def commit(arrays: dict[str, NDArrays | None]) -> None:
            merged = {**(self._read(path) if path is not None else {}), **arrays}
            self._write(folder, rnd, {k: v for k, v in merged.items() if v is not None})

        origin = str(path) if path is not None else str(folder)
        return NodeState(load, origin, commit if fit else None)

    # ----------------------------------------------------------------------------------------- internals
    def _run_and_round(self, config: Mapping[str, Scalar]) -> tuple[str, int]:
        from flower_app.rundir import RUN_NAME_PATTERN, RUN_NAME_RULE

        run_name = config.get(RUN_NAME_CONFIG_KEY)
        if not isinstance(run_name, str) or not run_name:
            raise NodeStateError(
                f"node-config {STATE_DIR_KEY} is set, but the server sent no {RUN_NAME_CONFIG_KEY} with the message "
                "(a server of an older version?): this node cannot tell which run its state belongs to"
            )
        # The name becomes a folder on this node: only the server's own run-name rule is accepted (no '/' or '..').
        if not RUN_NAME_PATTERN.fullmatch(run_name) or run_name.startswith("."):
            raise NodeStateError(f"the server sent the run name {run_name!r}, which is not a valid run name ({RUN_NAME_RULE})")
        rnd = config.get(ROUND_CONFIG_KEY)
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise NodeStateError(f"the server sent no valid {ROUND_CONFIG_KEY} (got {rnd!r})")
        return run_name, rnd

    def _check_manifest(self, folder: Path) -> None:
        path = folder / MANIFEST
        if not path.exists():
            return
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise NodeStateError(f"node state manifest {path} cannot be read ({err}); move the folder away") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise NodeStateError(f"{path} is not a node-state manifest of format {FORMAT}; move the folder away")
        stored = manifest.get("config", {})
        changed = {k: (stored.get(k), v) for k, v in self.config.items() if stored.get(k) != v}
        changed.update({k: (v, None) for k, v in stored.items() if k not in self.config})
        if changed:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise NodeStateError(
                f"the node state in {folder} was written by a run with other settings ({listed}); its arrays would "
                "not mean the same for this run. Resume with the run's own settings, or use another run-name "
                "(the state is kept)"
            )

    def _snapshots(self, folder: Path) -> list[tuple[int, Path]]:
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            match = _SNAPSHOT.fullmatch(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def _newest(self, folder: Path, as_of: int) -> Path | None:
        older = [p for r, p in self._snapshots(folder) if r <= as_of]
        return older[-1] if older else None

    def _read(self, path: Path) -> dict[str, NDArrays]:
        try:
            with np.load(path, allow_pickle=False) as data:
                items = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise NodeStateError(f"node state {path} cannot be read ({err}); move it away to start this node afresh") from err
        grouped: dict[str, dict[int, np.ndarray]] = {}
        for key, value in items.items():
            match = _ARRAY_NAME.fullmatch(key)
            if match is None:
                raise NodeStateError(f"node state {path} holds an array named {key!r}, not '<name>/<index>'")
            grouped.setdefault(match.group(1), {})[int(match.group(2))] = value
        out: dict[str, NDArrays] = {}
        for name, by_index in grouped.items():
            if sorted(by_index) != list(range(len(by_index))):
                raise NodeStateError(f"node state {path}: the arrays of '{name}' are not numbered 0..{len(by_index) - 1}")
            out[name] = [by_index[i] for i in range(len(by_index))]
        return out

    def _write(self, folder: Path, rnd: int, arrays: dict[str, NDArrays]) -> None:
        if not arrays:
            return
        from flower_app.rundir import WriteError, atomic_write_bytes, describe_os_error

        try:
            for directory in (folder.parent, folder):
                directory.mkdir(mode=0o700, exist_ok=True)
            manifest = folder / MANIFEST
            if not manifest.exists():
                body = {"format": FORMAT, "run-name": folder.parent.name, "partition": self.partition, "config": self.config}
                atomic_write_bytes(manifest, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
            buffer = io.BytesIO()
            named: dict[str, Any] = {f"{name}/{i:04d}": a for name, values in arrays.items() for i, a in enumerate(values)}
            np.savez(buffer, **named)
            atomic_write_bytes(folder / f"round-{rnd:06d}.npz", buffer.getvalue())
        except OSError as err:
            raise NodeStateError(f"could not write the node state in {folder}: {describe_os_error(err)}") from err
        except WriteError as err:
            raise NodeStateError(f"could not write the node state: {err}") from err
        self._prune(folder, rnd)

    def _prune(self, folder: Path, rnd: int) -> None:
        """Keep the snapshots a resume may need: all after the last surely checkpointed round, and one at or before it.

        The server checkpointed round ``(t - 1) - (t - 1) % checkpoint-every`` or a later one before it sent round
        ``t``: a resume goes back at most to there.
        """
        from flower_app.rundir import describe_os_error

        done = rnd - 1
        safe = done - done % self.checkpoint_every
        snapshots = self._snapshots(folder)
        at_or_before = [(r, p) for r, p in snapshots if r <= safe]
        for _, path in at_or_before[:-1]:
            try:
                path.unlink()
            except OSError as err:  # a leftover costs space, not correctness
                log.warning("node state: could not remove the old snapshot %s: %s", path, describe_os_error(err))


def partition_label(partition_id: int) -> str:
    """The folder of one data partition (``own-data`` for a node that brings its own data file)."""
    return f"partition-{partition_id}" if partition_id >= 0 else "own-data"


def open_store(cfg: AppConfig, state: RecordDict, node_config: Mapping[str, Any], partition_id: int) -> NodeStore:
    """This node's store: the directory of node-config ``state-dir`` when set, else Flower's node state.

    Raises:
        NodeStateError: for a ``state-dir`` that is not an absolute path to an existing directory this process
            can write (the message names it and what to do).
    """
    raw = node_config.get(STATE_DIR_KEY)
    if raw is None or raw == "":
        return RecordStore(state)
    where = f"node-config {STATE_DIR_KEY}={raw!r}"
    if not isinstance(raw, str):
        raise NodeStateError(f"{where}: must be a path (a string), got {type(raw).__name__}")
    path = Path(raw)
    if not path.is_absolute():
        raise NodeStateError(
            f"{where}: must be an absolute path (the node's ClientApp processes do not share one working directory)"
        )
    if not path.exists():
        raise NodeStateError(
            f"{where}: no such directory; create it for this node (mkdir -p {raw}, owned by the user the SuperNode "
            "runs as). It is not created here, so that a typo cannot start a run without its kept state"
        )
    if not path.is_dir():
        raise NodeStateError(f"{where}: exists but is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise NodeStateError(f"{where}: this process (uid {os.getuid()}) cannot write into it; fix its owner or mode")
    return DirectoryStore(path, partition_label(partition_id), fingerprint(cfg), cfg.checkpoint_every)


def kept_state(cfg: AppConfig) -> str:
    """What a node of this run keeps between rounds, in words ("" = nothing), from the registries."""
    method = get_personalization(cfg.personalization)
    kept = [
        get_rule(cfg.strategy).client_state,
        f"its {cfg.personalization} personal state" if method.keeps_state else "",
        "its compression residual" if cfg.error_feedback and not CODECS[cfg.compression].lossless else "",
    ]
    return ", ".join(k for k in kept if k)


_WARNED: set[str] = set()


def warn_if_lost_on_resume(cfg: AppConfig, store: NodeStore, what: str) -> None:
    """A resumed run whose nodes keep state in Flower's node state starts that state afresh: say so once."""
    if not (cfg.resume and what and isinstance(store, RecordStore)) or what in _WARNED:
        return
    _WARNED.add(what)
    log.warning(
        "resume: this node keeps %s in Flower's node state, which does not outlast a run: it starts afresh. "
        "Give the node a node-config %s to keep it across runs", what, STATE_DIR_KEY,
    )
