"""The clients' hand-written SGD step: bit-identical to torch.optim.SGD, and no torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flower_app.sgd import SGD
from flower_app.task import ModelInfo, TrainOptions, build_model, make_loader, train

ROOT = Path(__file__).resolve().parents[1]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 3, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


@pytest.mark.parametrize("lr, momentum, weight_decay", [
    (0.05, 0.0, 0.0), (0.1, 0.9, 0.0), (0.01, 0.0, 5e-4), (0.3, 0.5, 1e-2), (1.0, 0.99, 0.1),
])
def test_steps_equal_torch_optim_sgd_bit_for_bit(lr: float, momentum: float, weight_decay: float) -> None:
    ours, theirs = _params(0), _params(0)
    mine = SGD(ours, lr=lr, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(theirs, lr=lr, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for i, (a, b, grad) in enumerate(zip(ours, theirs, grads)):
            # One parameter gets no gradient in some steps: both must skip it (no decay, no momentum).
            skip = i == 1 and step % 3 == 1
            a.grad = None if skip else grad.clone()
            b.grad = None if skip else grad.clone()
        mine.step()
        reference.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max().item()}"
        mine.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours)


def test_training_with_it_equals_training_with_torch_optim() -> None:
    info = ModelInfo("classification", (1, 8, 8), 10)
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (96,), generator=torch.Generator().manual_seed(4))
    options = TrainOptions(epochs=2, learning_rate=0.05, momentum=0.9, weight_decay=1e-4)
    ours = build_model("cnn", info, seed=5)
    reference = build_model("cnn", info, seed=5)
    torch.manual_seed(0)
    train(ours, make_loader(x, y, 32, shuffle=True, seed=1), "classification", options, torch.device("cpu"))
    # The same loop by hand with torch.optim.SGD.
    torch.manual_seed(0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    reference.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = make_loader(x, y, 32, shuffle=True, seed=1)  # one loader: its generator moves on between epochs
    for _ in range(2):
        for xb, yb in loader:
            loss = loss_fn(reference(xb).float(), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_hyper_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        SGD(_params(0), lr=-0.1)


def test_local_training_imports_no_torch_dynamo() -> None:
    """torch.optim's first call imports torch._dynamo (about 1 s a cold process); the SGD path must not."""
    code = (
        "import sys, torch\n"
        "from flower_app.task import ModelInfo, TrainOptions, build_model, make_loader, train\n"
        "m = build_model('cnn', ModelInfo('classification', (1, 8, 8), 10))\n"
        "x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))\n"
        "train(m, make_loader(x, y, 32, True), 'classification', TrainOptions(momentum=0.9), torch.device('cpu'))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
