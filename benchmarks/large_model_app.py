"""The app with two large models for ``bench_deployment``'s model-size table: 10M and 100M parameters.

A transformer-like MLP stack (no attention): an input projection to ``width``, then ``blocks``
residual blocks ``x + W2 GELU(W1 LayerNorm(x))`` with ``W1: width -> 4 width``, ``W2: 4 width -> width``
(a transformer's feed-forward half, the bulk of its parameters), then a linear head. Weights are
random (seeded), never zeros: Flower sends arrays in content-addressed chunks, so zeros would travel
once.

``mlp-stack-10m``: width 640, 3 blocks (9.9M parameters); ``mlp-stack-100m``: width 1024, 12 blocks
(100.8M). `large_app_dir` writes a copy of an app tree (this branch's or a baseline's) whose
components are this module's `serverapp` and `clientapp`: the app's own, after registering the two
models in `flower_app.task.MODELS` (a plain registry dict), so `model='mlp-stack-100m'` is a valid run
config in that copy.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from flower_app.task import MODELS, ModelInfo

SIZES = {"mlp-stack-10m": (640, 3), "mlp-stack-100m": (1024, 12)}  # name -> (width, blocks)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class MLPStack(nn.Module):
    def __init__(self, in_features: int, num_outputs: int, width: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x.flatten(1))))


def _builder(width: int, blocks: int):  # type: ignore[no-untyped-def]
    def build(info: ModelInfo, hidden: int) -> nn.Module:
        return MLPStack(math.prod(info.input_shape), info.num_outputs, width, blocks)

    return build


for _name, (_width, _blocks) in SIZES.items():
    MODELS.setdefault(_name, _builder(_width, _blocks))

# Imported after the models are registered.
from flower_app.client_app import app as clientapp
from flower_app.server_app import app as serverapp

__all__ = ["SIZES", "MLPStack", "clientapp", "large_app_dir", "num_parameters", "serverapp"]


def num_parameters(name: str, in_features: int = 60, num_outputs: int = 10) -> int:
    width, blocks = SIZES[name]
    block = 2 * width + (width * 4 * width + 4 * width) + (4 * width * width + width)
    return in_features * width + width + blocks * block + width * num_outputs + num_outputs


def large_app_dir(tree: Path, dest: Path) -> Path:
    """A copy of the app in ``tree`` (flower_app, strategies, datasets, pyproject.toml) whose components are this module's."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("flower_app", "strategies", "datasets"):
        shutil.copytree(tree / package, dest / package, ignore=ignore, dirs_exist_ok=True)
    shutil.copy2(Path(__file__), dest / "large_model_app.py")
    pyproject = (tree / "pyproject.toml").read_text()
    for key, value in (("serverapp", "large_model_app:serverapp"), ("clientapp", "large_model_app:clientapp")):
        pyproject, count = re.subn(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', pyproject)
        if count != 1:
            raise ValueError(f"{tree / 'pyproject.toml'}: no {key} component line")
    pyproject, count = re.subn(r'(?m)^(fab-include = \[)(.*)\]$', r'\1\2, "large_model_app.py"]', pyproject)
    if count != 1:
        raise ValueError(f"{tree / 'pyproject.toml'}: no fab-include line")
    (dest / "pyproject.toml").write_text(pyproject)
    return dest
