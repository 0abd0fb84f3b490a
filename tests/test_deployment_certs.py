"""deploy/make_certs.py: the CA, TLS certificates and SuperNode keys a secure deployment needs."""

from __future__ import annotations

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


def test_private_keys_are_readable_by_the_owner_only(certs: Path) -> None:
    for path in (certs / "ca.key", certs / "superlink.key", certs / "node-a.key", certs / "auth" / "node-a"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((certs / "ca.crt").stat().st_mode) == 0o644


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
    assert "superlink" in dns  # the compose service name, by default
    assert sorted(p.name for p in (tmp_path / "c" / "auth").iterdir()) == [
        "supernode-1", "supernode-1.pub", "supernode-2", "supernode-2.pub"]
    for bad, message in ((["--supernodes", "-1"], "--supernodes must be >= 0"), (["--node", "../x"], "plain name"),
                         (["--days", "0"], "--days must be >= 1")):
        with pytest.raises(SystemExit) as err:
            main(["--out", str(tmp_path / "d"), *bad])
        assert err.value.code == 2 and message in capsys.readouterr().err
