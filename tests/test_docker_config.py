"""The Dockerfile, compose.yaml, the images and pyproject.toml agree, and the Dockerfile passes hadolint.

No Docker engine is needed: the Flower version is compared across the files and the installed
package; every Flower command in compose is parsed by Flower's own argument parsers; the topology
is checked (the SuperLink on the internal network only, the data owners reaching fleet-proxy and
the operator operator-proxy, each executor next to its SuperNode, the secret where the Runtime API
is called); every mounted file is one make_certs.py + prepare_host.py write (never ca.key), with the
host names the containers dial in the certificates they are offered; and every volume path and
user is checked against what the images create (`IMAGE_FACTS`). tests/test_deployment.py then runs
these commands, nginx included, as processes; tests/test_image_env.py builds the image's Python
environment from the Dockerfile's requirement lines.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from deploy.local import (
    DOCKERFILE,
    IMAGE_COMMANDS,
    NGINX_IMAGE,
    NGINX_TEMPLATES,
    ROOT,
    dockerfile_entrypoint,
    image_name,
    interpolate,
    load_compose,
    render_template,
    service_entrypoint,
    service_environment,
    split_flags,
)
from deploy.make_certs import DEFAULT_HOSTS, generate
from deploy.prepare_host import APP_GID, APP_UID, prepare
from deploy.requirements import distribution, lines_for, requirements, select

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
NETWORKS: dict[str, dict[str, Any]] = {k: v or {} for k, v in COMPOSE.get("networks", {}).items()}
DEFAULTS: dict[str, str] = {}  # compose's ${VAR:-default}s, as `docker compose up` with no variables set

# What the images create, from their Dockerfiles (not inspectable here: no Docker engine).
# Flower's images (flwr/superlink, flwr/supernode, flwr/superexec) build on flwr/base
# (adap/flower framework/docker/base/ubuntu/Dockerfile): `useradd --no-create-home --home-dir /app
# --uid 49999 app`, `mkdir -p /app && chown -R app:app /app`, `WORKDIR /app`, `USER app`, `HOME=/app`;
# nothing else under /app. The official nginx image starts its master process as root (workers as
# user nginx) and renders /etc/nginx/templates/*.template into /etc/nginx/conf.d/ at start-up.
IMAGE_FACTS = {
    "flower": {"uid": 49999, "gid": 49999, "home": "/app", "workdir": "/app", "dirs": ("/app",)},
    "nginx": {"uid": 0, "templates": NGINX_TEMPLATES},
}


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


def by_kind(*entrypoints: str) -> list[str]:
    return [n for n in SERVICES if kind(n) in entrypoints]


EXECUTORS = ("flower-superexec", "flower-app-superexec")  # Flower's, and ours (deploy/superexec.py)


def environment(name: str) -> dict[str, str]:
    return service_environment(SERVICES[name], DEFAULTS)


def proxies() -> dict[str, str]:
    """nginx service -> the API it passes (FLOWER_API)."""
    return {n: environment(n)["FLOWER_API"] for n in by_kind("nginx")}


def proxy_for(api: str) -> str:
    (name,) = [n for n, a in proxies().items() if a == api]
    return name


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def mounts(name: str, env: dict[str, str] | None = None) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of the service's volumes."""
    out = []
    for entry in SERVICES[name].get("volumes", []):
        parts = interpolate(str(entry), env or DEFAULTS).split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def networks(name: str) -> set[str]:
    return set(SERVICES[name].get("networks", []))


def published(name: str) -> list[str]:
    return [str(p) for p in SERVICES[name].get("ports", [])]


def _parser(entrypoint: str) -> argparse.ArgumentParser:
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode

    from deploy.superexec import parser as app_superexec

    factories: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "flower-superlink": superlink, "flower-supernode": supernode, "flower-superexec": superexec,
        "flower-app-superexec": app_superexec,
    }
    return factories[entrypoint]()


# ---------------------------------------------------------------------------- versions, images
def test_flower_version_is_the_same_everywhere() -> None:
    import flwr

    pin = flwr_pin()
    assert flwr.__version__ == pin
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert froms == [f"flwr/superexec:{pin}"], froms
    flower = {n: s["image"] for n, s in SERVICES.items() if "build" not in s and image_name(s) != NGINX_IMAGE}
    assert flower and all(image.split(":") in (["flwr/superlink", pin], ["flwr/supernode", pin])
                          for image in flower.values()), flower


def test_the_proxy_image_is_pinned_and_every_service_is_known() -> None:
    for name in by_kind("nginx"):
        assert re.fullmatch(r"nginx:\d+\.\d+(\.\d+)?-alpine", SERVICES[name]["image"]), SERVICES[name]["image"]
    assert {kind(n) for n in SERVICES} == {"flower-superlink", "flower-supernode", *EXECUTORS, "nginx"}


def test_services_built_here_use_the_dockerfile_and_the_project_version() -> None:
    built = [n for n, s in SERVICES.items() if "build" in s]
    assert sorted(built) == sorted(by_kind(*EXECUTORS))
    version = PYPROJECT["project"]["version"]
    for name in built:
        assert SERVICES[name]["build"] in (".", {"context": "."}), name
        assert SERVICES[name]["image"] == f"flower-app-superexec:{version}", name
    assert dockerfile_entrypoint() == ["flower-app-superexec"]
    # The image installs each command local runs from this repository, from the file local runs.
    text = DOCKERFILE.read_text()
    for command_name, local_argv in IMAGE_COMMANDS.items():
        source = Path(local_argv[-1]).relative_to(ROOT).as_posix()
        assert re.search(rf"^COPY --chmod=755 {re.escape(source)} /usr/local/bin/{command_name}$", text, re.MULTILINE)
        assert os.access(ROOT / source, os.X_OK) and (ROOT / source).read_text().startswith("#!/usr/bin/env python\n")


@pytest.mark.parametrize("name", sorted(n for n in SERVICES if kind(n) != "nginx"))
def test_every_flower_command_parses_with_flowers_own_parser(name: str) -> None:
    parser = _parser(kind(name))
    parser.exit_on_error = False
    try:
        args = parser.parse_args(command(name))
    except (argparse.ArgumentError, SystemExit) as err:
        pytest.fail(f"{name}: {kind(name)} rejects {command(name)}: {err}")
    assert not getattr(args, "insecure", False), f"{name} runs without TLS"


# -------------------------------------------------------------------------------- the topology
def test_the_superlink_is_secure_persistent_and_reachable_only_inside() -> None:
    (name,) = by_kind("flower-superlink")
    f = flags(name)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database", "--superexec-auth-secret-file"):
        assert f.get(flag), flag
    assert "--enable-supernode-auth" in f and "--disable-runtime-dependency-installation" in f
    assert f["--isolation"] == "process" and f["--host"] == "0.0.0.0"
    assert not published(name), "the SuperLink publishes no port: the proxies are the way in"
    assert networks(name) and all(NETWORKS[n].get("internal") is True for n in networks(name))


def test_each_proxy_passes_one_api_and_is_published_where_its_callers_are() -> None:
    (superlink,) = by_kind("flower-superlink")
    link_port = int(flags(superlink)["--port"] or 0)
    assert sorted(proxies().values()) == ["control", "fleet"]
    template_vars: set[str] = set()
    for name, api in proxies().items():
        env = environment(name)
        assert env["SUPERLINK_ADDRESS"] == f"{superlink}:{link_port}"
        assert env["SUPERLINK_TLS_NAME"] == superlink
        port = env["LISTEN_PORT"]
        expected = [f"{port}:{port}"] if api == "fleet" else [f"127.0.0.1:{port}:{port}"]
        assert published(name) == expected, (name, published(name))
        assert networks(name) & {n for n, v in NETWORKS.items() if v.get("internal")}, f"{name} cannot reach {superlink}"
        outside = networks(name) - {n for n, v in NETWORKS.items() if v.get("internal")}
        assert len(outside) == 1, (name, outside)
        templates = [(s, t) for s, t, _ in mounts(name) if t.startswith(NGINX_TEMPLATES) and t.endswith(".template")]
        assert len(templates) == 1, templates
        text = (ROOT / templates[0][0]).read_text()
        rendered = render_template(text, env)
        left = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", rendered)
        assert not left, f"{name}: the template needs {left}, which compose does not set"
        assert f"location ~ ^/v1/{api}/" in rendered
        template_vars |= set(re.findall(r"\$\{([A-Za-z_]+)\}", text))
        files = {t for _, t, ro in mounts(name) if ro}
        for variable in ("TLS_CERTFILE", "TLS_KEYFILE", "CA_CERTFILE"):
            assert env[variable] in files, f"{name}: {variable}={env[variable]} is not a mounted file"
    # The operator's outward network holds nothing but the operator's proxy.
    (operator_net,) = networks(proxy_for("control")) - {n for n, v in NETWORKS.items() if v.get("internal")}
    assert [n for n in SERVICES if operator_net in networks(n)] == [proxy_for("control")]
    assert template_vars == {"FLOWER_API", "SUPERLINK_ADDRESS", "SUPERLINK_TLS_NAME", "LISTEN_HOST", "LISTEN_PORT",
                             "TLS_CERTFILE", "TLS_KEYFILE", "CA_CERTFILE", "READ_TIMEOUT"}


def test_supernodes_reach_only_the_fleet_proxy_and_each_has_one_executor() -> None:
    (superlink,) = by_kind("flower-superlink")
    fleet = proxy_for("fleet")
    fleet_port = int(environment(fleet)["LISTEN_PORT"])
    nodes = by_kind("flower-supernode")
    assert len(nodes) >= 2
    executors = {n: host_port(str(flags(n)["--runtime-api-address"])) for n in by_kind(*EXECUTORS)}
    assert sorted(host for host, _ in executors.values()) == sorted([superlink, *nodes]), \
        "one executor per SuperNode and one for the SuperLink"
    assert {kind(e) for e, (host, _) in executors.items() if host in nodes} == {"flower-app-superexec"}, \
        "ClientApps start warm"
    internal = {n for n, v in NETWORKS.items() if v.get("internal")}
    partitions = []
    for node in nodes:
        f = flags(node)
        assert host_port(str(f["--superlink"])) == (fleet, fleet_port), f"{node} must dial {fleet}, never {superlink}"
        assert not networks(node) & networks(superlink), f"{node} shares a network with the SuperLink"
        assert f.get("--root-certificates") and f.get("--auth-supernode-private-key")
        assert f["--isolation"] == "process" and f["--host"] == "0.0.0.0"
        assert f.get("--ssl-certfile") and f.get("--ssl-keyfile") and f.get("--ssl-ca-certfile")
        (executor,) = [e for e, (host, _) in executors.items() if host == node]
        assert executors[executor][1] == int(f["--port"] or 0), f"{executor} must reach {node} on its --port"
        assert node in SERVICES[executor]["depends_on"]
        # The node and its executor share a network of their own, which nothing else joins.
        (private,) = networks(node) & networks(executor)
        assert private in internal and [n for n in SERVICES if private in networks(n)] == [node, executor]
        assert networks(executor) == {private}
        node_config = dict(kv.split("=", 1) for kv in str(f["--node-config"]).split())
        partitions.append((int(node_config["partition-id"]), int(node_config["num-partitions"])))
        assert SERVICES[node]["restart"] == "on-failure"  # comes back once its key is registered
    assert sorted(p for p, _ in partitions) == list(range(len(nodes)))
    assert {n for _, n in partitions} == {len(nodes)}
    for executor, (host, _) in executors.items():
        f = flags(executor)
        assert f.get("--root-certificates") and SERVICES[executor].get("init") is True
        if host == superlink:  # the Runtime API of the SuperLink: with the shared secret, from inside
            assert f.get("--superexec-auth-secret-file") == flags(superlink)["--superexec-auth-secret-file"]
            assert networks(executor) == networks(superlink)


def test_every_file_a_service_names_is_mounted_and_made_by_make_certs_and_prepare_host(tmp_path: Path) -> None:
    certs, secrets = tmp_path / "certs", tmp_path / "secrets"
    nodes = by_kind("flower-supernode")
    generate(certs, list(DEFAULT_HOSTS), nodes)
    prepare(certs, secrets, tmp_path / "state", tmp_path / "outputs", nodes, server=True,
            owner=(os.geteuid(), os.getegid()))
    env = {"SECRETS_DIR": str(secrets)}
    file_flags = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates",
                  "--auth-supernode-private-key", "--superexec-auth-secret-file")
    offered: dict[str, Path] = {}  # service -> the certificate it presents
    for name in SERVICES:
        targets = {}
        for source, target, read_only in mounts(name, env):
            targets[target] = source
            if source.startswith(str(secrets)):
                assert Path(source).is_file() and read_only, f"{name} mounts {source}, which prepare_host.py does not write"
            assert Path(source).name != "ca.key", f"{name} mounts the CA's key"
        values = [v for flag, v in split_flags(command(name)) if flag in file_flags]
        values += [v for k, v in environment(name).items() if k.endswith("FILE")]
        for value in values:
            assert value in targets, f"{name}: {value} is not a mounted file"
        cert = flags(name).get("--ssl-certfile") if kind(name) != "nginx" else environment(name)["TLS_CERTFILE"]
        if cert:
            offered[name] = Path(targets[str(cert)])
    assert not (secrets / "ca.key").exists()
    # The names the services dial are in the certificates they are offered.
    dials = [(n, host_port(str(flags(n).get("--superlink") or flags(n).get("--runtime-api-address")))[0])
             for n in by_kind("flower-supernode", *EXECUTORS)]
    dials += [(n, environment(n)["SUPERLINK_TLS_NAME"]) for n in by_kind("nginx")]
    for name, host in dials:
        cert = x509.load_pem_x509_certificate(offered[host].read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in names.get_values_for_type(x509.DNSName), f"{name} dials {host}, not in {offered[host].name}"


def test_volume_paths_and_users_match_what_the_images_create() -> None:
    """No named volumes (a fresh one is root's where the image lacks the folder); the containers run as
    the images' users; what a Flower container writes is a host folder prepare_host.py makes for that
    user; everything else is read-only; output-dir's default lands on the outputs mount."""
    flower = IMAGE_FACTS["flower"]
    assert (APP_UID, APP_GID) == (flower["uid"], flower["gid"])
    assert not COMPOSE.get("volumes"), "named volumes start out owned by root"
    defaults = {"./state": "state", "./outputs": "outputs"}  # prepare_host.py's --state / --outputs defaults
    writable: dict[str, str] = {}
    for name, service in SERVICES.items():
        assert "user" not in service, f"{name}: runs as its image's user, the one prepare_host.py prepares for"
        for source, target, read_only in mounts(name):
            assert source.startswith(("./", "/")), f"{name}: {source} is not a bind mount"
            if kind(name) == "nginx":
                assert read_only and target.startswith("/etc/nginx/"), (name, target)
                continue
            assert target.startswith(str(flower["home"]) + "/"), f"{name}: {target} outside the app user's home"
            if not read_only:
                assert source in defaults, f"{name} writes to {source}, which prepare_host.py does not create"
                writable[target] = name
    (superlink,) = by_kind("flower-superlink")
    database = str(flags(superlink)["--database"])
    assert writable.get(str(Path(database).parent)) == superlink
    # output-dir = "outputs" is relative to the executor's working directory, the image's WORKDIR.
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert workdirs[-1] == flower["workdir"]
    assert not re.search(r"^USER\s", DOCKERFILE.read_text(), flags=re.MULTILINE), "the image keeps the base's user"
    output_dir = PYPROJECT["tool"]["flwr"]["app"]["config"]["output-dir"]
    assert writable.get(f"{flower['workdir']}/{output_dir}") == "serverapp"
    assert set(writable) == {str(Path(database).parent), f"{flower['workdir']}/{output_dir}"}


# ------------------------------------------------------------------------------ the image
def test_dockerfile_installs_torch_from_its_index_then_the_rest_and_copies_no_code() -> None:
    text = DOCKERFILE.read_text()
    assert 'ARG TORCH_VARIANT=cpu' in text
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"' in text
    assert "--provided flwr" in text and "check_image.py" in text and "pip check" in text
    copied = [src for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
              for src in [w for w in line.split() if not w.startswith("--")][:-1]]
    # Build tooling and the executor; never the app's code (flwr run ships it with each run).
    assert sorted(copied) == ["deploy/check_image.py", "deploy/requirements.py", "deploy/superexec.py", "pyproject.toml"]
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


def test_flowers_extras_come_from_the_installed_flower() -> None:
    """flwr[simulation,dp] in pyproject: the image gets the extras' requirements at the versions the
    base image's Flower declares (and that Flower pinned), never another Flower."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    lines = lines_for(PYPROJECT, [], None, ["torch", "torchvision"], ["flwr"])
    pin = flwr_pin()
    assert lines[0] == f"flwr=={pin}"
    (flwr_req,) = [r for r in PYPROJECT["project"]["dependencies"] if distribution(r) == "flwr"]
    expected = set()
    for line in md.requires("flwr") or []:
        dep = Requirement(line)
        if dep.marker is not None and any(dep.marker.evaluate({"extra": e}) for e in Requirement(flwr_req).extras):
            expected.add(f"{dep.name}{dep.specifier}")
    assert expected and expected <= set(lines), (expected, lines)
    assert {distribution(x) for x in expected} >= {"ray", "dp-accounting"}
    mismatch = {"project": {"dependencies": ["flwr[dp]==0.0.1"]}}
    with pytest.raises(SystemExit, match=r"flwr 1\.42\.0 is installed; pyproject.toml asks for flwr==0\.0\.1"):
        lines_for(mismatch, [], None, [], ["flwr"])


def test_hadolint_passes() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "lint.sh")], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
