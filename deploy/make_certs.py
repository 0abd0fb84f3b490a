#!/usr/bin/env python3
"""Create what a secure Flower deployment needs: a CA, TLS certificates and SuperNode keys.

Writes into ``--out`` (default ``certs/``)::

    ca.crt  ca.key                  certificate authority (ca.key never leaves the admin machine)
    superlink.crt  superlink.key    the SuperLink's TLS certificate, SANs: --host values,
                                    localhost and 127.0.0.1
    <node>.crt  <node>.key          TLS certificate of a SuperNode's Runtime API (where its
                                    executor connects), SANs: <node>, localhost, 127.0.0.1
    auth/<node>  auth/<node>.pub    the SuperNode's authentication key pair: ECDSA P-384 in
                                    OpenSSH format, as `ssh-keygen -t ecdsa -b 384` makes it;
                                    register the .pub with `flwr supernode register`
    superexec.secret                the shared secret the SuperLink's executors authenticate with
                                    (`--superexec-auth-secret-file`): 64 hex characters

Every private file (keys, the secret) is created readable by its owner only (mode 0600) from the
start; the directory itself is made 0700. This directory is the administrator's: it holds
``ca.key`` and is never mounted into a container. ``deploy/prepare_host.py`` copies what each
container needs (never ``ca.key``) into the directory compose.yaml mounts.

An existing CA is reused, so adding a SuperNode later does not invalidate the other
certificates; other existing files are kept unless ``--force`` is given.

Example::

    python deploy/make_certs.py --out certs --host superlink --host fleet-proxy --host fl.example.org \\
        --host 10.0.0.5 --supernodes 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("make_certs")

ALWAYS_SANS = ("localhost", "127.0.0.1")
CURVE = ec.SECP384R1  # P-384 for every key: what `flwr supernode register` and Flower's docs use


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644
DEFAULT_HOSTS = ("superlink", "fleet-proxy")  # compose.yaml's names: the SuperLink and the data owners' proxy


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``path`` atomically; a private file is never readable by anyone but its owner.

    The file is created with O_EXCL at its final mode (umask can only narrow it; fchmod before the
    first byte sets it exactly), written, then renamed over ``path``: no moment exists at which a
    key's bytes sit in a file with wider permissions, and a reader never sees half a file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted run: O_EXCL must create afresh
    mode = PRIVATE_MODE if private else PUBLIC_MODE
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask took away
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("wrote %s", path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("flower-app deployment CA"))
        .issuer_name(_name("flower-app deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, hosts: Sequence[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate signed by the CA, valid for every name/address in ``hosts``."""
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_auth_keypair(comment: str) -> tuple[bytes, bytes]:
    """ECDSA P-384 key pair in OpenSSH format: (private key file, public key line)."""
    key = _new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    key_path, cert_path = out / "ca.key", out / "ca.crt"
    if not (key_path.exists() and cert_path.exists()):
        return None
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{key_path} is not an EC private key; remove it or use another --out")
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def generate(
    out: Path, hosts: Sequence[str], supernodes: Sequence[str], days: int = 365, force: bool = False
) -> dict[str, Path]:
    """Create (or complete) the certificate directory; returns the paths by role."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths: dict[str, Path] = {"ca": out / "ca.crt", "superexec.secret": out / "superexec.secret"}
    ca = None if force else _load_ca(out)
    if ca is None:
        ca = make_ca(days)
        _write(out / "ca.key", _pem_key(ca[0]), private=True)
        _write(out / "ca.crt", ca[1].public_bytes(serialization.Encoding.PEM), private=False)
        force = True  # a new CA invalidates every certificate signed by an old one
    ca_key, ca_cert = ca

    def server(name: str, sans: Sequence[str]) -> None:
        crt, key = out / f"{name}.crt", out / f"{name}.key"
        paths[f"{name}.crt"], paths[f"{name}.key"] = crt, key
        if crt.exists() and key.exists() and not force:
            log.info("kept %s (use --force to replace it)", crt)
            return
        k, c = make_server_cert(ca_key, ca_cert, name, sans, days)
        _write(key, _pem_key(k), private=True)
        _write(crt, c.public_bytes(serialization.Encoding.PEM), private=False)

    server("superlink", [*hosts, *ALWAYS_SANS])
    secret = out / "superexec.secret"
    if force or not secret.exists():
        _write(secret, secrets.token_hex(32).encode("ascii"), private=True)
    for node in supernodes:
        server(node, [node, *ALWAYS_SANS])
        private, public = out / "auth" / node, out / "auth" / f"{node}.pub"
        paths[f"auth/{node}"], paths[f"auth/{node}.pub"] = private, public
        if private.exists() and public.exists() and not force:
            log.info("kept %s (use --force to replace it)", private)
            continue
        priv_bytes, pub_bytes = make_auth_keypair(node)
        _write(private, priv_bytes, private=True)
        _write(public, pub_bytes, private=False)
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output directory (default: certs)")
    parser.add_argument(
        "--host", action="append", default=[],
        help="host name or IP address SuperNodes and the flwr CLI use to reach the SuperLink "
        "(repeat; localhost and 127.0.0.1 are always included; default: superlink and fleet-proxy, "
        "the names compose.yaml's containers dial)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--supernodes", type=int, default=None, help="create keys for supernode-1 .. supernode-N (default 2)")
    group.add_argument("--node", action="append", default=None, help="create keys for a SuperNode of this name (repeat)")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace every existing file, the CA included")
    args = parser.parse_args(argv)
    if args.supernodes is not None and args.supernodes < 0:
        parser.error(f"--supernodes must be >= 0, got {args.supernodes}")
    if args.days < 1:
        parser.error(f"--days must be >= 1, got {args.days}")
    for node in args.node or []:
        if not node or "/" in node or node.startswith("."):
            parser.error(f"--node {node!r}: use a plain name such as supernode-1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    count = 2 if args.supernodes is None else args.supernodes
    nodes = args.node if args.node is not None else [f"supernode-{i}" for i in range(1, count + 1)]
    hosts = args.host or list(DEFAULT_HOSTS)
    generate(args.out, hosts, nodes, days=args.days, force=args.force)
    log.info(
        "done. SuperLink and proxy: --ssl-ca-certfile %(d)s/ca.crt --ssl-certfile %(d)s/superlink.crt --ssl-keyfile "
        "%(d)s/superlink.key --superexec-auth-secret-file %(d)s/superexec.secret; SuperNodes: --root-certificates "
        "%(d)s/ca.crt --auth-supernode-private-key %(d)s/auth/<node>; register each %(d)s/auth/<node>.pub with "
        "`flwr supernode register`. For Docker: sudo python3 deploy/prepare_host.py --certs %(d)s",
        {"d": args.out},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
