"""The best model: the round with the lowest evaluation loss, kept beside the last one.

Pure selection rule on hand-made values, the shell choosing by hand-made central or federated
losses, the checkpoint carrying the choice (fields checked by name), and a resumed run handing back
the same best model as the straight one.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters

from flower_app.checkpoint import read_checkpoint, restore_strategy, validate_checkpoint
from flower_app.inprocess import run_rounds
from flower_app.outputs import BEST_INFO_NAME, BEST_MODEL_NAME
from flower_app.server_app import build_strategy, make_strategy
from strategies.base import FederatedStrategy, StrategyOptions
from strategies.selection import BestRound, best_state_dict, load_best_state, update_best
from tests.strategy_utils import client_manager, eval_res, fit_res
from tests.test_checkpoint import Written, with_checksum, write_checkpoint
from tests.test_rule_oracles import clients, config


# ---------------------------------------------------------------------------------- the pure rule
def test_a_strictly_lower_finite_loss_wins_and_a_tie_keeps_the_earlier_round() -> None:
    losses = [math.nan, 2.0, 1.5, 1.5, 3.0, math.inf, 1.4999, -0.0]
    best: BestRound | None = None
    chosen = []
    for rnd, value in enumerate(losses):
        best = update_best(best, rnd, "federated_loss", value, [np.full(2, rnd, np.float32)])
        chosen.append(None if best is None else best.round)
    assert chosen == [None, 1, 2, 2, 2, 2, 6, 7]
    assert best is not None and best.value == 0.0 and best.weights[0].tolist() == [7.0, 7.0]


def test_the_kept_weights_are_a_copy_and_the_metric_cannot_change() -> None:
    weights = [np.ones(3, np.float32)]
    best = update_best(None, 4, "central_loss", 0.5, weights)
    weights[0] += 1  # the strategy's arrays change later
    assert best is not None and best.weights[0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="chosen by central_loss, not federated_loss"):
        update_best(best, 5, "federated_loss", 0.1, weights)


def test_the_state_stores_weights_only_when_they_are_not_the_checkpoints_own() -> None:
    best = BestRound(3, "central_loss", 0.25, [np.arange(4, dtype=np.float32)])
    assert best_state_dict(None, 3) is None and load_best_state(None, []) is None
    same_round = best_state_dict(best, 3)
    assert same_round == {"round": 3, "metric": "central_loss", "value": 0.25, "weights": None}
    current = [np.full(4, 9, np.float32)]
    assert load_best_state(same_round, current).weights[0].tolist() == [9, 9, 9, 9]  # the checkpoint's weights
    later = best_state_dict(best, 5)
    assert later is not None and later["weights"][0].tolist() == [0, 1, 2, 3]
    back = load_best_state(later, current)
    assert (back.round, back.metric, back.value, back.weights[0].tolist()) == (3, "central_loss", 0.25, [0, 1, 2, 3])


# ---------------------------------------------------------------------- the shell, hand-made values
def drive(strategy: FederatedStrategy, rounds: list[tuple[float, list[float]]]) -> list[list[np.ndarray]]:
    """Each round: 2 clients send weights ``w = round`` (so the mean is round), then evaluate with the given losses.

    Returns the global weights after each round (index 0: the initial ones).
    """
    manager, proxies = client_manager(2)
    params = strategy.initialize_parameters(manager)
    strategy.evaluate(0, params)
    seen = [[w.copy() for w in strategy.weights]]
    for rnd, (_, federated) in enumerate(rounds, start=1):
        strategy.configure_fit(rnd, params, manager)
        replies = [(p, fit_res([np.full(3, rnd, np.float32)], 10)) for p in proxies]
        params, _ = strategy.aggregate_fit(rnd, replies, [])
        strategy.evaluate(rnd, params)
        strategy.configure_evaluate(rnd, params, manager)
        strategy.aggregate_evaluate(rnd, [(p, eval_res(loss, 10)) for p, loss in zip(proxies, federated)], [])
        seen.append([w.copy() for w in strategy.weights])
    return seen


def scripted(central: list[float]) -> Any:
    calls = iter(central)
    return lambda weights: (next(calls), {})


def test_the_shell_chooses_by_central_loss_when_it_evaluates_centrally() -> None:
    # central losses for rounds 0..4; federated ones favour another round and must be ignored
    rounds = [(3.0, [0.1, 0.1]), (1.0, [5.0, 5.0]), (2.0, [0.0, 0.0]), (1.0, [9.0, 9.0])]
    strategy = FederatedStrategy(StrategyOptions(min_fit_clients=2, min_evaluate_clients=2), [np.zeros(3, np.float32)],
                                 [True], evaluate_fn=scripted([4.0] + [c for c, _ in rounds]))
    seen = drive(strategy, rounds)
    assert strategy.selection_metric == "central_loss"
    assert strategy.best is not None and (strategy.best.round, strategy.best.value) == (2, 1.0)  # tie with 4: earlier
    np.testing.assert_array_equal(strategy.best.weights[0], seen[2][0])
    assert seen[2][0].tolist() == [2.0, 2.0, 2.0]


def test_without_central_evaluation_the_shell_chooses_by_the_weighted_federated_loss() -> None:
    rounds = [(math.nan, [2.0, 4.0]), (math.nan, [1.0, 2.0]), (math.nan, [0.5, 3.0]), (math.nan, [math.nan, math.nan])]
    strategy = FederatedStrategy(StrategyOptions(min_fit_clients=2, min_evaluate_clients=2), [np.zeros(3, np.float32)],
                                 [True])
    drive(strategy, rounds)
    # means 3.0, 1.5, 1.75; round 4's NaN replies are dropped (no finite loss): round 2 stays
    assert strategy.selection_metric == "federated_loss"
    assert strategy.best is not None and (strategy.best.round, strategy.best.value) == (2, 1.5)
    assert strategy.best.weights[0].tolist() == [2.0, 2.0, 2.0]


def test_the_initial_model_is_the_best_when_every_round_made_it_worse() -> None:
    strategy = FederatedStrategy(StrategyOptions(min_fit_clients=2, min_evaluate_clients=2), [np.zeros(3, np.float32)],
                                 [True], evaluate_fn=scripted([0.5, 0.9, 1.2]))
    drive(strategy, [(0.9, [1.0, 1.0]), (1.2, [1.0, 1.0])])
    assert strategy.best is not None and strategy.best.round == 0 and strategy.best.weights[0].tolist() == [0, 0, 0]


def test_round_config_reaches_every_fit_and_evaluate_instruction() -> None:
    strategy = FederatedStrategy(StrategyOptions(min_fit_clients=2, min_evaluate_clients=2), [np.zeros(3, np.float32)],
                                 [True], round_config={"data-description": "{}", "agreed-class-names": '["a"]'})
    manager, _ = client_manager(2)
    params = ndarrays_to_parameters(strategy.weights)
    for _, ins in strategy.configure_fit(1, params, manager) + strategy.configure_evaluate(1, params, manager):
        assert ins.config == {"server-round": 1, "data-description": "{}", "agreed-class-names": '["a"]'}


# ------------------------------------------------------------------------ outputs and checkpoints
SMALL = {"model": "mlp", "hidden-size": 8, "local-epochs": 1, "num-server-rounds": 4, "run-name": "run",
         "learning-rate": 0.5}  # a large step: central loss goes up and down, so the best is not the last round


def test_best_model_pt_is_the_chosen_rounds_model_and_a_resume_ends_with_the_same(tmp_path: Path) -> None:
    cfg = config(tmp_path / "straight", **SMALL)
    strategy, left = build_strategy(cfg)
    weights_by_round: dict[int, list[np.ndarray]] = {}
    strategy.observers.append(lambda record, s: weights_by_round.update({record.round: [w.copy() for w in s.weights]}))
    run_rounds(strategy, clients(cfg), left)
    folder = tmp_path / "straight" / "run"
    import pandas as pd

    metrics = pd.read_csv(folder / "metrics.csv")
    best_round = int(metrics.loc[metrics["central_loss"].idxmin(), "round"])
    info = json.loads((folder / BEST_INFO_NAME).read_text())
    assert info == {"round": best_round, "metric": "central_loss", "value": pytest.approx(metrics["central_loss"].min()),
                    "last_round": 4}
    saved = torch.load(folder / BEST_MODEL_NAME, weights_only=True)
    final = torch.load(folder / "model.pt", weights_only=True)
    assert list(saved) == list(final)  # the same format as model.pt
    for array, tensor in zip(weights_by_round[best_round], saved.values()):
        np.testing.assert_array_equal(array, tensor.numpy())

    # Interrupted after round 2 and resumed: the choice travels in the checkpoint; the result is the same.
    resumed_cfg = config(tmp_path / "resumed", **SMALL)
    first, _ = build_strategy(resumed_cfg)
    run_rounds(first, clients(resumed_cfg), 2)
    second, left = build_strategy(config(tmp_path / "resumed", **{**SMALL, "resume": True}))
    assert second.best is not None and second.best.round == first.best.round
    run_rounds(second, clients(resumed_cfg), left)
    again = torch.load(tmp_path / "resumed" / "run" / BEST_MODEL_NAME, weights_only=True)
    assert json.loads((tmp_path / "resumed" / "run" / BEST_INFO_NAME).read_text()) == info
    for a, b in zip(saved.values(), again.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    out = tmp_path_factory.mktemp("best")
    w = write_checkpoint(out, rounds=3)
    assert w.payload["strategy"]["best"] is not None
    return w


def load(w: Written, payload: dict[str, Any]) -> FederatedStrategy:
    """Validate and restore into a fresh strategy that evaluates centrally, as a resume of that run does."""
    checked = validate_checkpoint(payload, w.cfg, w.spec)
    strategy = make_strategy(w.cfg, [np.zeros(s, np.float32) for s in w.spec.shapes], w.spec.trainable,
                             evaluate_fn=lambda weights: (0.0, {}))
    restore_strategy(strategy, checked)
    return strategy


def with_best(w: Written, **changes: Any) -> dict[str, Any]:
    broken = copy.deepcopy(w.payload)
    best = broken["strategy"]["best"]
    if best["weights"] is None:  # make it a past round's, with its weights
        best["round"], best["weights"] = 1, [a.copy() for a in broken["strategy"]["weights"]]
    best.update(changes)
    return with_checksum(broken)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"round": 9}, r"field 'strategy.best.round' must be in \[0, 3\], got 9"),
        ({"metric": "accuracy"}, r"field 'strategy.best.metric' must be one of central_loss, federated_loss"),
        ({"value": math.nan}, r"field 'strategy.best.value' must be finite"),
        ({"weights": None}, r"field 'strategy.best.weights' is empty, but the best round \(1\) is not the checkpoint's"),
        ({"weights": "w"}, r"field 'strategy.best.weights' must be a list of arrays"),
    ],
)
def test_a_bad_best_entry_in_a_checkpoint_is_named(written: Written, changes: dict[str, Any], problem: str) -> None:
    from flower_app.outputs import CheckpointError

    with pytest.raises(CheckpointError, match=problem):
        load(written, with_best(written, **changes))


def test_a_checkpoint_without_a_best_entry_loads_and_starts_the_choice_afresh(written: Written) -> None:
    older = copy.deepcopy(written.payload)
    del older["strategy"]["best"]  # written before best-model selection
    assert load(written, with_checksum(older)).best is None
    good = load(written, with_best(written))
    assert good.best is not None and good.best.round == 1
    assert read_checkpoint(written.path)["strategy"]["best"]["metric"] == "central_loss"
