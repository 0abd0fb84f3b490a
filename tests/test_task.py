"""Plain-PyTorch layer: canonical weight exchange and the local training loops."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from flower_app.task import (
    MODELS,
    ModelInfo,
    TrainOptions,
    build_model,
    full_gradient,
    get_weights,
    make_loader,
    set_weights,
    train,
    weight_spec,
)

IMAGE = ModelInfo("classification", (1, 8, 8), 10)
TABULAR = ModelInfo("classification", (5,), 3)
REGRESSION = ModelInfo("regression", (4,), 1)


def test_weight_spec_sends_trainable_parameters_and_float_buffers_in_state_dict_order() -> None:
    model = build_model("cnn", IMAGE)
    spec = weight_spec(model)
    state_keys = list(model.state_dict())
    assert list(spec.keys) == [k for k in state_keys if not k.endswith("num_batches_tracked")]
    assert "features.1.running_mean" in spec.keys
    assert not spec.trainable[spec.keys.index("features.1.running_mean")]
    assert spec.trainable[spec.keys.index("features.0.weight")]
    frozen = build_model("mlp", TABULAR)
    frozen.net[1].weight.requires_grad_(False)
    assert "net.1.weight" not in weight_spec(frozen).keys


def test_models_are_seeded_and_weights_round_trip() -> None:
    a, b, c = build_model("mlp", TABULAR, seed=1), build_model("mlp", TABULAR, seed=1), build_model("mlp", TABULAR, seed=2)
    spec = weight_spec(a)
    assert all(np.array_equal(x, y) for x, y in zip(get_weights(a, spec), get_weights(b, spec)))
    assert not all(np.array_equal(x, y) for x, y in zip(get_weights(a, spec), get_weights(c, spec)))
    set_weights(c, spec, get_weights(a, spec))
    assert all(np.array_equal(x, y) for x, y in zip(get_weights(a, spec), get_weights(c, spec)))


def test_set_weights_rejects_wrong_count_and_shape() -> None:
    model = build_model("linear", REGRESSION)
    spec = weight_spec(model)
    weights = get_weights(model, spec)
    with pytest.raises(ValueError, match="expected 2 arrays, got 1"):
        set_weights(model, spec, weights[:1])
    with pytest.raises(ValueError, match="has shape"):
        set_weights(model, spec, [weights[0].T, weights[1]])


def test_every_model_builds_and_auto_picks_by_data() -> None:
    for name in MODELS:
        info = IMAGE if name == "cnn" else REGRESSION if name == "linear" else TABULAR
        out = build_model(name, info)(torch.zeros(2, *info.input_shape))
        assert out.shape == (2, info.num_outputs)
    assert type(build_model("auto", IMAGE)).__name__ == "SmallCNN"
    assert type(build_model("auto", REGRESSION)).__name__ == "LinearRegression"
    with pytest.raises(ValueError, match="needs image input"):
        build_model("cnn", TABULAR)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_fedprox_term_pulls_towards_the_start_and_mu_zero_is_plain_sgd() -> None:
    x, y = _data()
    results = {}
    for mu in (0.0, 10.0):
        model = build_model("mlp", TABULAR, seed=3)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        train(model, make_loader(x, y, 8, True, seed=1), "classification", TrainOptions(epochs=3, learning_rate=0.1, proximal_mu=mu), torch.device("cpu"))
        results[mu] = (model, float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm()))
    plain = build_model("mlp", TABULAR, seed=3)
    train(plain, make_loader(x, y, 8, True, seed=1), "classification", TrainOptions(epochs=3, learning_rate=0.1), torch.device("cpu"))
    for p, q in zip(plain.parameters(), results[0.0][0].parameters()):
        assert torch.equal(p, q)
    assert results[10.0][1] < 0.7 * results[0.0][1]


def test_fedprox_gradient_matches_hand_computation() -> None:
    # One parameter w, loss (w x - y)^2 with x = 1, y = 0: grad 2w. Two SGD steps from w0 = 1, lr 0.1, mu 1:
    # step 1 at w0 (prox grad 0): w1 = 1 - 0.1 * 2 = 0.8; step 2: grad 2*0.8 + 1*(0.8 - 1) = 1.4 -> w2 = 0.66.
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    loader = make_loader(torch.ones(2, 1), torch.zeros(2, 1), batch_size=1, shuffle=False)
    train(model, loader, "regression", TrainOptions(learning_rate=0.1, proximal_mu=1.0), torch.device("cpu"))
    assert model.weight.item() == pytest.approx(0.66, abs=1e-6)


def test_full_gradient_is_the_full_batch_gradient_whatever_the_batch_size() -> None:
    x, y = _data(50)
    model = build_model("mlp", TABULAR, seed=0)
    reference = build_model("mlp", TABULAR, seed=0)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    grads, loss = full_gradient(model, make_loader(x, y, 7, False), "classification", torch.device("cpu"))
    for g, p in zip(grads, reference.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(reference(x), y).item(), rel=1e-5)


def test_gradient_accumulation_equals_the_larger_batch() -> None:
    x, y = _data(32)
    small = build_model("mlp", TABULAR, seed=0)
    big = build_model("mlp", TABULAR, seed=0)
    train(small, make_loader(x, y, 8, False), "classification", TrainOptions(learning_rate=0.1, grad_accumulation_steps=4), torch.device("cpu"))
    result = train(big, make_loader(x, y, 32, False), "classification", TrainOptions(learning_rate=0.1), torch.device("cpu"))
    assert result.num_steps == 1
    for p, q in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_task_module_imports_no_flower() -> None:
    code = "import sys, flower_app.task; assert not any(m.startswith('flwr') for m in sys.modules), 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])
