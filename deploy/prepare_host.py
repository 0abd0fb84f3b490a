#!/usr/bin/env python3
"""Prepare the Docker host for compose.yaml: the files each container mounts, owned by the images' user.

Flower's images run as user ``app`` (uid and gid 49999; Flower's base Dockerfile:
``useradd --uid 49999 app``, home and working directory ``/app``), so what a container reads or
writes on a bind mount must belong to that user. ``deploy/make_certs.py`` writes into the
administrator's ``certs/`` (with ``ca.key``); this script copies from it only what the containers
use, into the folder compose.yaml mounts (``secrets/``), and never ``ca.key``:

    server side (--server)   ca.crt  superlink.crt  superlink.key  superexec.secret
    each SuperNode (--node)  ca.crt  <node>.crt  <node>.key  auth/<node>

and creates the SuperLink's state folder (``state/``, 0700) and the ServerApp's output folder
(``outputs/``) owned by that user. Private files are written 0400, certificates 0444, each created
at its final mode before its first byte. ``certs/`` stays the administrator's, so running
make_certs.py again for a new node works without sudo. Standard library only: it runs as
``sudo python3 deploy/prepare_host.py`` (changing owners needs root), with no virtual environment.

    sudo python3 deploy/prepare_host.py                       # the server side and every node in certs/auth/
    sudo python3 deploy/prepare_host.py --node supernode-3    # add one node's files (deploy/add_node.sh)
    python3 deploy/prepare_host.py --owner "$(id -u):$(id -g)"  # for processes run as you (tests)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger("prepare_host")

APP_UID = APP_GID = 49999  # user `app` of Flower's images (flwr/base: useradd --uid 49999 app)
SERVER_FILES = ("ca.crt", "superlink.crt", "superlink.key", "superexec.secret")
PRIVATE_SUFFIXES = (".key", ".secret")
NEVER = ("ca.key",)  # the CA's key signs certificates; it stays on the administrator's side


def node_files(node: str) -> tuple[str, ...]:
    return ("ca.crt", f"{node}.crt", f"{node}.key", f"auth/{node}")


def is_private(name: str) -> bool:
    return name.endswith(PRIVATE_SUFFIXES) or name.startswith("auth/") and not name.endswith(".pub")


def parse_owner(text: str) -> tuple[int, int]:
    try:
        uid, _, gid = text.partition(":")
        return int(uid), int(gid or uid)
    except ValueError:
        raise SystemExit(f"--owner {text!r}: give numeric UID:GID, e.g. 49999:49999") from None


def _chown(fd_or_path: int | Path, owner: tuple[int, int]) -> None:
    if (os.geteuid(), os.getegid()) == owner:
        return
    if isinstance(fd_or_path, int):
        os.fchown(fd_or_path, *owner)
    else:
        os.chown(fd_or_path, *owner)


def make_dir(path: Path, owner: tuple[int, int], mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _chown(path, owner)
    os.chmod(path, mode)


def copy_file(source: Path, target: Path, owner: tuple[int, int], mode: int) -> None:
    """Copy ``source`` to ``target`` atomically, created at ``mode`` and owned by ``owner`` before the first byte."""
    data = source.read_bytes()
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:  # the descriptor writes whatever the mode says; the mode binds later opens
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask took away
        _chown(fd, owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, target)
    log.info("installed %s (%o)", target, mode)


def install(certs: Path, secrets: Path, names: Iterable[str], owner: tuple[int, int]) -> list[Path]:
    """Copy ``names`` (paths relative to ``certs``) into ``secrets``; returns the installed paths."""
    installed = []
    for name in dict.fromkeys(names):
        if Path(name).name in NEVER:
            raise ValueError(f"{name} never leaves the administrator's {certs}")
        source = certs / name
        if not source.is_file():
            raise SystemExit(f"{source} does not exist: run deploy/make_certs.py --out {certs} first "
                             "(with --node NAME for a new SuperNode)")
        target = secrets / name
        make_dir(target.parent, owner, 0o700)
        copy_file(source, target, owner, 0o400 if is_private(name) else 0o444)
        installed.append(target)
    return installed


def prepare(
    certs: Path, secrets: Path, state: Path | None, outputs: Path | None, nodes: Sequence[str], server: bool,
    owner: tuple[int, int],
) -> list[Path]:
    """Everything compose.yaml mounts from the host, for the server side and/or the given nodes."""
    make_dir(secrets, owner, 0o700)
    names: list[str] = list(SERVER_FILES) if server else []
    for node in nodes:
        names += node_files(node)
    installed = install(certs, secrets, names, owner)
    if server:
        if state is not None:
            make_dir(state, owner, 0o700)  # the SuperLink's database: registrations, runs
        if outputs is not None:
            make_dir(outputs, owner, 0o755)  # the ServerApp's metrics, checkpoints, model
    return installed


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certs", type=Path, default=Path("certs"), help="make_certs.py's output (default certs)")
    parser.add_argument("--secrets", type=Path, default=Path("secrets"),
                        help="what compose.yaml mounts (default secrets; compose: SECRETS_DIR)")
    parser.add_argument("--state", type=Path, default=Path("state"), help="SuperLink state (default state; STATE_DIR)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"),
                        help="ServerApp outputs (default outputs; OUTPUTS_DIR)")
    parser.add_argument("--server", action="store_true", help="the server side's files and folders")
    parser.add_argument("--node", action="append", default=[], help="a SuperNode's files (repeat)")
    parser.add_argument("--owner", default=f"{APP_UID}:{APP_GID}",
                        help=f"UID:GID that owns what is installed (default {APP_UID}:{APP_GID}, Flower's images)")
    args = parser.parse_args(argv)
    for node in args.node:
        if not node or "/" in node or node.startswith(".") or node in ("ca", "superlink"):
            parser.error(f"--node {node!r}: use a plain SuperNode name such as supernode-3")
    if not args.server and not args.node:  # everything: the server side and every node make_certs.py made
        args.server = True
        auth = args.certs / "auth"
        args.node = sorted(p.name for p in auth.iterdir() if p.suffix != ".pub") if auth.is_dir() else []
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    owner = parse_owner(args.owner)
    if owner != (os.geteuid(), os.getegid()) and os.geteuid() != 0:
        raise SystemExit(f"giving the files to {owner[0]}:{owner[1]} needs root: run it with sudo, or pass "
                         f"--owner {os.geteuid()}:{os.getegid()} for processes that run as you")
    prepare(args.certs, args.secrets, args.state, args.outputs, args.node, args.server, owner)
    log.info("done: compose.yaml mounts %s (SECRETS_DIR)%s", args.secrets,
             f", {args.state} (STATE_DIR) and {args.outputs} (OUTPUTS_DIR)" if args.server else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
