"""The Dockerfile, compose.yaml and pyproject.toml agree, and the Dockerfile passes hadolint.

No Docker engine is needed: the Flower version is compared across the three files and the
installed package; every compose command is parsed by Flower's own argument parsers; the secure
topology (TLS on every connection, SuperNode authentication, one executor per SuperNode and one
for the SuperLink, ports that match) is checked; the certificate files compose mounts are the ones
deploy/make_certs.py writes, with the host names compose uses. tests/test_deployment.py then runs
these commands as processes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; Flower depends on tomli
    import tomli as tomllib  # type: ignore[no-redef]

from deploy.make_certs import generate
from deploy.requirements import distribution, requirements, select
from deploy.local import (
    DOCKERFILE,
    ROOT,
    dockerfile_entrypoint,
    interpolate,
    load_compose,
    service_entrypoint,
    split_flags,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DEFAULTS: dict[str, str] = {}  # compose's ${VAR:-default}s, as `docker compose up` with no variables set


def flwr_pin() -> str:
    pins = [r for r in PYPROJECT["project"]["dependencies"] if distribution(r) == "flwr"]
    assert len(pins) == 1, pins
    match = re.search(r"==\s*([0-9][^,;\s]*)", pins[0])
    assert match, f"flwr must be pinned exactly (==) in pyproject.toml, got {pins[0]!r}"
    return match.group(1)


def command(name: str) -> list[str]:
    raw = SERVICES[name].get("command", [])
    return [interpolate(str(c), DEFAULTS) for c in raw]


def flags(name: str) -> dict[str, str | None]:
    return dict(split_flags(command(name)))


def kind(name: str) -> str:
    return service_entrypoint(SERVICES[name])[0]


def by_kind(entrypoint: str) -> list[str]:
    return [n for n in SERVICES if kind(n) == entrypoint]


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _parser(entrypoint: str) -> argparse.ArgumentParser:
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode

    factories: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "flower-superlink": superlink, "flower-supernode": supernode, "flower-superexec": superexec,
    }
    return factories[entrypoint]()


def test_flower_version_is_the_same_everywhere() -> None:
    import flwr

    pin = flwr_pin()
    assert flwr.__version__ == pin
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert froms == [f"flwr/superexec:{pin}"], froms
    images = {n: s["image"] for n, s in SERVICES.items() if "build" not in s}
    assert images and all(image.split(":") in (["flwr/superlink", pin], ["flwr/supernode", pin])
                          for image in images.values()), images


def test_services_built_here_use_the_dockerfile_and_the_project_version() -> None:
    built = [n for n, s in SERVICES.items() if "build" in s]
    assert sorted(built) == sorted(by_kind("flower-superexec"))
    version = PYPROJECT["project"]["version"]
    for name in built:
        assert SERVICES[name]["build"] in (".", {"context": "."}), name
        assert SERVICES[name]["image"] == f"flower-app-superexec:{version}", name
    assert dockerfile_entrypoint() == ["flower-superexec"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_command_parses_with_flowers_own_parser(name: str) -> None:
    parser = _parser(kind(name))
    parser.exit_on_error = False
    try:
        args = parser.parse_args(command(name))
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"{name}: {kind(name)} rejects {command(name)}: {err}")
    assert not getattr(args, "insecure", False), f"{name} runs without TLS"


def test_superlink_is_secure_persistent_and_leaves_executors_to_their_containers() -> None:
    (name,) = by_kind("flower-superlink")
    f = flags(name)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert f.get(flag), flag
    assert "--enable-supernode-auth" in f and "--disable-runtime-dependency-installation" in f
    assert f["--isolation"] == "process" and f["--host"] == "0.0.0.0"
    port = int(f["--port"] or 0)
    assert f"{port}:{port}" in [str(p) for p in SERVICES[name]["ports"]]
    # The database lives on a named volume, so it survives `docker compose down` / restarts.
    database = str(f["--database"])
    volume = next(v for v in SERVICES[name]["volumes"] if database.startswith(v.split(":")[1] + "/"))
    assert volume.split(":")[0] in COMPOSE["volumes"]


def test_supernodes_authenticate_over_tls_and_each_has_one_executor() -> None:
    (superlink,) = by_kind("flower-superlink")
    link_port = int(flags(superlink)["--port"] or 0)
    nodes = by_kind("flower-supernode")
    assert len(nodes) >= 2
    executors = {n: host_port(str(flags(n)["--runtime-api-address"])) for n in by_kind("flower-superexec")}
    targets = [host for host, _ in executors.values()]
    assert sorted(targets) == sorted([superlink, *nodes]), "one executor per SuperNode and one for the SuperLink"
    partitions = []
    for node in nodes:
        f = flags(node)
        assert host_port(str(f["--superlink"])) == (superlink, link_port)
        assert f.get("--root-certificates") and f.get("--auth-supernode-private-key")
        assert f["--isolation"] == "process" and f["--host"] == "0.0.0.0"
        assert f.get("--ssl-certfile") and f.get("--ssl-keyfile") and f.get("--ssl-ca-certfile")
        (executor,) = [e for e, (host, _) in executors.items() if host == node]
        assert executors[executor][1] == int(f["--port"] or 0), f"{executor} must reach {node} on its --port"
        assert node in SERVICES[executor]["depends_on"]
        node_config = dict(kv.split("=", 1) for kv in str(f["--node-config"]).split())
        partitions.append((int(node_config["partition-id"]), int(node_config["num-partitions"])))
        assert SERVICES[node]["restart"] == "on-failure"  # comes back once its key is registered
    assert sorted(p for p, _ in partitions) == list(range(len(nodes)))
    assert {n for _, n in partitions} == {len(nodes)}
    for executor in executors:
        f = flags(executor)
        assert f.get("--root-certificates") and SERVICES[executor].get("init") is True


def test_every_file_a_command_names_is_mounted_and_made_by_make_certs(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    nodes = by_kind("flower-supernode")
    generate(certs, ["superlink"], nodes)
    env = {"CERTS_DIR": str(certs)}
    file_flags = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates",
                  "--auth-supernode-private-key")
    for name, service in SERVICES.items():
        mounts = {}
        for entry in service.get("volumes", []):
            source, target = interpolate(entry, env).split(":")[:2]
            mounts[target] = source
            if source.startswith(str(certs)):
                assert Path(source).is_file(), f"{name} mounts {source}, which make_certs.py does not write"
        for flag, value in split_flags(command(name)):
            if flag in file_flags:
                assert value in mounts, f"{name}: {flag}={value} is not a mounted file"
    # The names the containers dial are in the certificates they are offered.
    for name in by_kind("flower-supernode") + by_kind("flower-superexec"):
        f = flags(name)
        address = f.get("--superlink") or f.get("--runtime-api-address")
        host, _ = host_port(str(address))
        cert = x509.load_pem_x509_certificate((certs / f"{host}.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in names.get_values_for_type(x509.DNSName), f"{name} dials {host}, not in {host}.crt"


def test_dockerfile_installs_cpu_torch_then_the_rest_and_copies_no_code() -> None:
    text = DOCKERFILE.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    copied = [src for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
              for src in line.split() if not src.startswith("--")][:-1]
    assert sorted(copied) == ["deploy/requirements.py", "pyproject.toml"]
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*" and sorted(line[1:] for line in ignore[1:]) == sorted(copied)
    deps = requirements(PYPROJECT)
    torch_part = select(deps, ["torch", "torchvision"], [])
    rest = select(deps, None, ["flwr", "torch", "torchvision"])
    assert sorted(torch_part + rest) == sorted(d for d in deps if distribution(d) != "flwr")


def test_requirements_script_prints_what_pyproject_says() -> None:
    script = ROOT / "deploy" / "requirements.py"
    out = subprocess.run([sys.executable, str(script), "--only", "torch", "torchvision"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [r for r in PYPROJECT["project"]["dependencies"] if distribution(r) in ("torch", "torchvision")]
    bad = subprocess.run([sys.executable, str(script), "--extra", "nope"], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "unknown extra 'nope'" in bad.stderr


def test_hadolint_passes() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "lint.sh")], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
