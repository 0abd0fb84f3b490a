"""deploy/make_certs.py: the CA, TLS certificates and SuperNode keys a secure deployment needs."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy.make_certs import generate, main


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - any verification failure
        return False
    return cert.issuer == ca.subject


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    generate(out, ["fl.example.org", "10.0.0.5"], ["node-a", "node-b"])
    return out


def test_superlink_certificate_has_the_given_names_and_localhost(certs: Path) -> None:
    ca, server = _cert(certs / "ca.crt"), _cert(certs / "superlink.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _signed_by(server, ca)
    dns, ips = _sans(server)
    assert dns == {"fl.example.org", "localhost"}
    assert ips == {"10.0.0.5", "127.0.0.1"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    for node in ("node-a", "node-b"):  # each SuperNode's Runtime API certificate names the node
        cert = _cert(certs / f"{node}.crt")
        assert _signed_by(cert, ca) and _sans(cert) == ({node, "localhost"}, {"127.0.0.1"})


def test_auth_keys_are_p384_openssh_pairs_flower_accepts(certs: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    for node in ("node-a", "node-b"):
        private = load_ssh_private_key((certs / "auth" / node).read_bytes(), None)
        public_line = (certs / "auth" / f"{node}.pub").read_bytes()
        public = load_ssh_public_key(public_line)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert public_line.startswith(b"ecdsa-sha2-nistp384 ") and public_line.rstrip().endswith(node.encode())
        assert try_load_public_key(certs / "auth" / f"{node}.pub")  # what `flwr supernode register` runs


PRIVATE = ("ca.key", "superlink.key", "node-a.key", "node-b.key", "auth/node-a", "auth/node-b", "superexec.secret")


def test_private_files_are_readable_by_the_owner_only(certs: Path) -> None:
    for name in PRIVATE:
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "superlink.crt", "node-a.crt", "auth/node-a.pub"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700  # the directory holds ca.key
    secret = (certs / "superexec.secret").read_bytes()
    assert len(secret) == 64 and all(c in b"0123456789abcdef" for c in secret)


def test_private_files_are_never_wider_than_0600_not_even_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the most permissive umask, every byte of a private file goes into a file that is already
    0600 (created so with O_EXCL), and nothing is chmod-ed after the write."""
    opened: dict[int, str] = {}
    events: list[tuple[str, str, int]] = []
    real_open, real_write, real_chmod = os.open, os.write, os.chmod

    def spy_open(path, flags, mode=0o777, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, mode, *args, **kwargs)
        if str(path).startswith(str(tmp_path)):
            opened[fd] = str(path)
            events.append(("open", str(path), mode if flags & os.O_CREAT else -1))
            assert flags & os.O_EXCL, f"{path} opened without O_EXCL"
        return fd

    def spy_write(fd, data):  # type: ignore[no-untyped-def]
        if fd in opened:
            events.append(("write", opened[fd], stat.S_IMODE(os.fstat(fd).st_mode)))
        return real_write(fd, data)

    def spy_chmod(path, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        events.append(("chmod", str(path), mode))
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "write", spy_write)
    monkeypatch.setattr(os, "chmod", spy_chmod)
    old_umask = os.umask(0)
    try:
        generate(tmp_path / "certs", ["fl.example.org"], ["node-a"])
    finally:
        os.umask(old_umask)
    monkeypatch.undo()
    out = tmp_path / "certs"
    private = {str(out / n) for n in ("ca.key", "superlink.key", "node-a.key", "auth/node-a", "superexec.secret")}
    written = {Path(p).name.removeprefix(".").removesuffix(".tmp") for kind, p, _ in events if kind == "write"}
    assert {Path(p).name for p in private} <= written
    for kind, path, mode in events:
        final = str(Path(path).with_name(Path(path).name.removeprefix(".").removesuffix(".tmp")))
        if kind == "chmod":
            pytest.fail(f"chmod after the fact: {path} to {oct(mode)}")
        if final in private:
            assert mode == 0o600, (kind, path, oct(mode))
    for path in private:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_existing_files_are_kept_and_a_new_node_reuses_the_ca(certs: Path) -> None:
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    generate(certs, ["fl.example.org", "10.0.0.5"], ["node-a", "node-b", "node-c"])
    assert all(p.read_bytes() == data for p, data in before.items())
    assert _signed_by(_cert(certs / "node-c.crt"), _cert(certs / "ca.crt"))
    generate(certs, ["fl.example.org"], ["node-a"], force=True)
    assert (certs / "ca.crt").read_bytes() != before[certs / "ca.crt"]
    assert _signed_by(_cert(certs / "node-a.crt"), _cert(certs / "ca.crt"))
    assert not _signed_by(_cert(certs / "node-c.crt"), _cert(certs / "ca.crt"))  # left over, now stale


def _handshake(certs: Path, server_hostname: str) -> None:
    """A real TLS handshake: server with superlink.crt/key, client trusting only ca.crt."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs / "superlink.crt", certs / "superlink.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize("name", ["fl.example.org", "localhost", "127.0.0.1", "10.0.0.5"])
def test_tls_handshake_succeeds_for_every_san(certs: Path, name: str) -> None:
    _handshake(certs, name)


def test_tls_handshake_fails_for_another_name(certs: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "attacker.example.org")


def test_cli_defaults_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "c")]) == 0
    dns, _ = _sans(_cert(tmp_path / "c" / "superlink.crt"))
    assert dns == {"superlink", "fleet-proxy", "localhost"}  # the names compose.yaml's containers dial
    assert sorted(p.name for p in (tmp_path / "c" / "auth").iterdir()) == [
        "supernode-1", "supernode-1.pub", "supernode-2", "supernode-2.pub"]
    for bad, message in ((["--supernodes", "-1"], "--supernodes must be >= 0"), (["--node", "../x"], "plain name"),
                         (["--days", "0"], "--days must be >= 1")):
        with pytest.raises(SystemExit) as err:
            main(["--out", str(tmp_path / "d"), *bad])
        assert err.value.code == 2 and message in capsys.readouterr().err
