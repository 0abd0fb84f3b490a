"""The executor image's Python environment, built without Docker, runs a DP run and a LoRA run.

There is no Docker engine here, so this builds what the Dockerfile's RUN step builds, in a fresh
virtual environment, with the same scripts and requirement lines:

1. Flower at the pinned version alone, as the base image (`flwr/superexec`) has it;
2. `deploy/requirements.py --only torch torchvision`, installed (see below for where torch comes from);
3. `deploy/requirements.py --extra llm --provided flwr --exclude torch torchvision` (the llm variant:
   everything the plain image has, plus transformers and peft), installed;
4. `pip check`, and `deploy/check_image.py --extra llm`, the import check the build runs;
5. one short run through `flwr run` against a simulation SuperLink of this environment (Ray: flwr's
   simulation extra) that is both a DP run and a LoRA run: LoRA adapters (transformers + peft) on a
   tiny BERT built here, trained with central DP on the server, whose privacy accountant needs
   dp-accounting (which the image lacked before). One run instead of two saves a Ray start-up
   (about a minute on 2 cores).

The one difference is PyTorch: the image installs it from PyTorch's CPU index, which this machine
cannot reach. Here torch and torchvision (with their own dependencies) are made visible from the
test environment through a .pth file, outside the new environment, so pip treats them as installed
and never touches them; every other package is installed into the new environment from the lines
above. `check_image.py` then runs with `--torch any` (the image's check asserts a CPU build).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from packaging.requirements import Requirement

from deploy.local import ROOT, Cluster, flwr_env, free_port, run_config_string, stop_processes_of, write_connection
from tests.lora_utils import make_encoder, write_sentences

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EXTRAS = "llm"


def _closure(names: list[str]) -> list[md.Distribution]:
    """The installed distributions `names` need, recursively (markers evaluated without extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _expose_torch(site_packages: Path, links: Path) -> list[str]:
    """Symlink torch, torchvision and their dependencies' top-level files into `links` and put that folder
    on the new environment's path (outside it: pip never uninstalls what lies outside an environment)."""
    links.mkdir()
    names = []
    for dist in _closure(["torch", "torchvision"]):
        names.append(f"{dist.metadata['Name']}=={dist.version}")
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or (links / top).exists():
                continue
            (links / top).symlink_to(Path(str(dist.locate_file(top))))
    (site_packages / "torch_from_the_test_environment.pth").write_text(f"{links}\n")
    return names


@dataclass
class ImageEnv:
    python: Path
    bin: Path
    work: Path
    log: str


def _run(argv: list[str], env: dict[str, str], log: list[str], timeout: float = 900) -> str:
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    log.append(f"$ {' '.join(argv)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    assert proc.returncode == 0, "\n".join(log)[-8000:]
    return proc.stdout


@pytest.fixture(scope="module")
def image_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageEnv]:
    work = tmp_path_factory.mktemp("image-env")
    venv = work / "venv"
    log: list[str] = []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _run([sys.executable, "-m", "venv", str(venv)], env, log)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, log).strip())
    log.append("torch from the test environment: " + ", ".join(_expose_torch(site, work / "torch-links")))
    # --no-compile: no .pyc files written at install (the image keeps pip's default); what is installed is the same.
    pip = [str(python), "-m", "pip", "install", "--no-cache-dir", "--no-compile", "--disable-pip-version-check"]
    scripts = ROOT / "deploy"
    import flwr

    _run([*pip, f"flwr=={flwr.__version__}"], env, log)  # the base image's Flower, without extras
    (work / "torch.txt").write_text(_run([str(python), str(scripts / "requirements.py"), "--only", "torch",
                                          "torchvision"], env, log))
    _run([*pip, "-r", str(work / "torch.txt")], env, log)
    (work / "rest.txt").write_text(_run([str(python), str(scripts / "requirements.py"), "--extra", EXTRAS,
                                         "--provided", "flwr", "--exclude", "torch", "torchvision"], env, log))
    _run([*pip, "-r", str(work / "rest.txt")], env, log)
    _run([str(python), "-m", "pip", "check"], env, log)
    _run([str(python), str(scripts / "check_image.py"), "--extra", EXTRAS, "--torch", "any"], env, log)
    yield ImageEnv(python, bin_dir, work, "\n".join(log))


def test_the_requirement_lines_hold_flowers_extras_and_the_llm_extra(image_env: ImageEnv) -> None:
    rest = (image_env.work / "rest.txt").read_text().split()
    import flwr

    assert rest[0] == f"flwr=={flwr.__version__}"
    names = {Requirement(line).name for line in rest}
    assert {"ray", "dp-accounting", "transformers", "peft", "pandas", "scikit-learn", "matplotlib"} <= names
    assert "image check passed" in image_env.log
    code = ("import importlib.util as u; print(*(u.find_spec(m).origin for m in "
            "('dp_accounting', 'ray', 'peft', 'transformers', 'flwr', 'pandas')))")
    out = subprocess.run([str(image_env.python), "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(out.split()) == 6 and all(p.startswith(str(image_env.work / "venv")) for p in out.split()), out


@pytest.fixture(scope="module")
def superlink(image_env: ImageEnv) -> Iterator[Cluster]:
    """A simulation SuperLink of the new environment on a free port (not the shared :local: one)."""
    home = image_env.work / "flwr-home"
    env = {k: v for k, v in flwr_env(home).items() if k != "PYTHONPATH"}
    env.update(VIRTUAL_ENV=str(image_env.bin.parent), PATH=f"{image_env.bin}{os.pathsep}{env['PATH']}")
    group = Cluster(image_env.work, env)
    try:
        port = free_port()
        group.start("superlink", [str(image_env.bin / "flower-superlink"), "--insecure", "--simulation",
                                  "--host=127.0.0.1", f"--port={port}", "--disable-runtime-dependency-installation"]
                    ).wait_for(r"Uvicorn running", timeout=180)
        write_connection(home, "image", f"127.0.0.1:{port}",
                         options={"num-supernodes": 2, "backend.client-resources.num-cpus": 1})
        yield group
    finally:
        group.close()
        stop_processes_of(home)  # Ray's processes


def _flwr_run(group: Cluster, image_env: ImageEnv, name: str, config: dict[str, bool | int | float | str]) -> str:
    proc = group.start(name, [str(image_env.bin / "flwr"), "run", str(ROOT), "image", "--stream",
                              "-c", run_config_string(config)])
    proc.wait(timeout=600)
    return proc.text()


def test_a_lora_run_with_differential_privacy_in_the_image_environment(superlink: Cluster, image_env: ImageEnv) -> None:
    model = make_encoder(image_env.work / "encoder")
    data = write_sentences(image_env.work / "sentences", groups=2, per_group=24)
    out = image_env.work / "outputs" / "run"  # output-dir/<run-name>
    logs = _flwr_run(superlink, image_env, "lora-dp-run", {
        "dataset": "text", "data-path": data, "hf-model": str(model), "partitioner": "natural",
        "num-partitions": 2, "min-partition-size": 5, "max-length": 16, "batch-size": 8, "local-epochs": 1,
        "lora-rank": 4, "dp-mode": "central-server", "dp-noise-multiplier": 1.0, "num-server-rounds": 1,
        "fraction-evaluate": 0.0, "min-fit-clients": 2, "min-available-clients": 2, "test-fraction": 0.25,
        "device": "cpu", "output-dir": str(out.parent), "run-name": out.name,
    })
    assert (out / "metrics.csv").exists(), logs[-4000:]
    last = pd.read_csv(out / "metrics.csv").iloc[-1]
    assert last["round"] == 1 and last["results"] == 2 and last["failures"] == 0 and bool(last["updated"]), logs[-4000:]
    assert 0.0 < last["epsilon"] < float("inf")  # the accountant ran (dp-accounting, installed in this environment)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # peft saved the adapters
