"""deploy/prepare_host.py: what the containers mount, owned by the images' user, and never the CA's key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from deploy.make_certs import generate
from deploy.prepare_host import APP_GID, APP_UID, install, main, prepare

NODES = ["supernode-1", "supernode-2"]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    generate(out, ["superlink", "fleet-proxy"], NODES)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_and_nodes_get_their_files_at_the_right_modes(certs: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    me = (os.geteuid(), os.getegid())
    prepare(certs, secrets, tmp_path / "state", tmp_path / "outputs", NODES, server=True, owner=me)
    files = {p.relative_to(secrets).as_posix(): _mode(p) for p in secrets.rglob("*") if p.is_file()}
    assert files == {
        "ca.crt": 0o444, "superlink.crt": 0o444, "superlink.key": 0o400, "superexec.secret": 0o400,
        "supernode-1.crt": 0o444, "supernode-1.key": 0o400, "auth/supernode-1": 0o400,
        "supernode-2.crt": 0o444, "supernode-2.key": 0o400, "auth/supernode-2": 0o400,
    }
    for name in files:
        assert (secrets / name).read_bytes() == (certs / name).read_bytes(), name
    assert _mode(secrets) == 0o700 and _mode(tmp_path / "state") == 0o700 and _mode(tmp_path / "outputs") == 0o755


def test_the_ca_key_is_never_installed(certs: Path, tmp_path: Path) -> None:
    me = (os.geteuid(), os.getegid())
    with pytest.raises(ValueError, match="ca.key never leaves"):
        install(certs, tmp_path / "secrets", ["ca.crt", "ca.key"], me)
    assert not (tmp_path / "secrets" / "ca.key").exists()


def test_one_new_node_and_a_missing_one(certs: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    me = f"{os.geteuid()}:{os.getegid()}"
    assert main(["--certs", str(certs), "--secrets", str(secrets), "--owner", me, "--node", "supernode-2"]) == 0
    assert sorted(p.relative_to(secrets).as_posix() for p in secrets.rglob("*") if p.is_file()) == [
        "auth/supernode-2", "ca.crt", "supernode-2.crt", "supernode-2.key"]
    assert not (tmp_path / "state").exists()  # a node's files only
    with pytest.raises(SystemExit, match=r"make_certs.py --out .* first \(with --node NAME"):
        main(["--certs", str(certs), "--secrets", str(secrets), "--owner", me, "--node", "supernode-9"])
    with pytest.raises(SystemExit):
        main(["--certs", str(certs), "--node", "../x"])


def test_by_default_everything_for_the_images_user(certs: Path, tmp_path: Path) -> None:
    """As root (CI, or sudo): everything installed belongs to uid 49999, and certs/ stays its owner's.
    As anyone else: refused with the way out, nothing written."""
    secrets = tmp_path / "secrets"
    args = ["--certs", str(certs), "--secrets", str(secrets), "--state", str(tmp_path / "state"),
            "--outputs", str(tmp_path / "outputs")]
    if os.geteuid() != 0:
        with pytest.raises(SystemExit, match="needs root: run it with sudo"):
            main(args)
        assert not secrets.exists()
        return
    before = {p: (p.stat().st_uid, _mode(p)) for p in certs.rglob("*")}
    assert main(args) == 0
    installed = [p for p in [secrets, tmp_path / "state", tmp_path / "outputs", *secrets.rglob("*")]]
    assert len(installed) == 3 + 11  # 10 files and the auth/ folder
    assert all((p.stat().st_uid, p.stat().st_gid) == (APP_UID, APP_GID) for p in installed)
    assert {p: (p.stat().st_uid, _mode(p)) for p in certs.rglob("*")} == before
