"""A minimal stock-Flower PyTorch app: the reference ``bench_deployment`` compares large models against.

What a Flower user writes from the docs: ``flwr.server.strategy.FedAvg`` behind
``ServerApp(server_fn=...)``, a ``NumPyClient`` that trains a model for one epoch with
``torch.optim.SGD`` and returns ``get_parameters``; none of this app's code (no validation, data
cache, fit-time evaluation, checkpoints or outputs). The model is ``large_model_app``'s MLP stack
(same layer shapes, random seeded weights) on 200 random examples per client. `stock_app_dir`
writes it as a Flower app (``pyproject.toml`` + this file); run config ``model`` picks the size and
``num-server-rounds`` the rounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from torch import nn

SIZES = {"mlp-stack-10m": (640, 3), "mlp-stack-100m": (1024, 12)}  # as large_model_app
IN_FEATURES, CLASSES, EXAMPLES = 60, 10, 200


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def build(model: str) -> nn.Module:
    width, blocks = SIZES[model]
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, width), *[Block(width) for _ in range(blocks)],
                         nn.Linear(width, CLASSES))


def get_weights(net: nn.Module) -> list[np.ndarray]:
    return [v.cpu().numpy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, weights: list[np.ndarray]) -> None:
    net.load_state_dict({k: torch.from_numpy(np.copy(w)) for k, w in zip(net.state_dict(), weights)}, strict=True)


class StockClient(NumPyClient):
    def __init__(self, model: str, seed: int) -> None:
        self.net = build(model)
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(EXAMPLES, IN_FEATURES, generator=generator)
        self.y = torch.randint(0, CLASSES, (EXAMPLES,), generator=generator)

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        set_weights(self.net, parameters)
        optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01)
        for start in range(0, EXAMPLES, 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(self.net(self.x[start:start + 64]), self.y[start:start + 64]).backward()
            optimizer.step()
        return get_weights(self.net), EXAMPLES, {}


def client_fn(context: Context):  # type: ignore[no-untyped-def]
    return StockClient(str(context.run_config["model"]), int(context.node_config.get("partition-id", 0))).to_client()


def server_fn(context: Context) -> ServerAppComponents:
    initial = ndarrays_to_parameters(get_weights(build(str(context.run_config["model"]))))
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                      initial_parameters=initial)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(context.run_config["num-server-rounds"])))


clientapp = ClientApp(client_fn=client_fn)
serverapp = ServerApp(server_fn=server_fn)

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stock-app"
version = "0.1.0"
dependencies = ["flwr==1.42.0", "torch"]

[tool.flwr.app]
publisher = "bench"
fab-include = ["stock_app.py"]

[tool.flwr.app.components]
serverapp = "stock_app:serverapp"
clientapp = "stock_app:clientapp"

[tool.flwr.app.config]
num-server-rounds = 3
model = "mlp-stack-100m"
"""


def stock_app_dir(dest: Path) -> Path:
    """Write the stock app (pyproject.toml and this file) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "stock_app.py").write_text(Path(__file__).read_text())
    (dest / "pyproject.toml").write_text(PYPROJECT)
    return dest
