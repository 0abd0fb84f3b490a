"""Differential privacy: clipping and noise arithmetic, the hook inside the strategy shell,
the accountant against its reference library, checkpoints, and refused combinations."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as ReferenceRdp
from flwr.common import ndarrays_to_parameters

from flower_app.client_privacy import (
    FIT_CLIP_KEY,
    FIT_COUNT_NOISE_KEY,
    FIT_NOISE_KEY,
    private_fit_report,
    privatize_update,
    secagg_clipped_fraction,
)
from flower_app.config import AppConfig, ConfigError, check_privacy_model
from flower_app.options import privacy_options
from flower_app.outputs import load_checkpoint, save_checkpoint
from flower_app.server_privacy import ServerPrivacy, privacy_hooks
from flower_app.task import WeightSpec
from strategies.base import FederatedStrategy, StrategyOptions
from strategies.privacy import (
    AccountingSpec,
    PrivacyAccountant,
    adaptive_clip_norm,
    add_gaussian_noise,
    clip_to_norm,
    l2_norm,
    min_contributions,
    noise_share_std,
    update_noise_multiplier,
)
from tests.strategy_utils import client_manager, fit_res, to_arrays

SHAPES = [(3, 4), (4,)]
PARAMS = ndarrays_to_parameters([np.zeros(1, np.float32)])  # what the strategy was sent (only its size is read)


def zeros() -> list[np.ndarray]:
    return [np.zeros(s, dtype=np.float32) for s in SHAPES]


def with_privacy(cfg: AppConfig, opts: StrategyOptions, weights: list[np.ndarray], **kw: object) -> FederatedStrategy:
    """The shell with the run's privacy hook, as `server_app.build_strategy` composes it."""
    hooks = privacy_hooks(privacy_options(cfg), opts, cfg.num_server_rounds)
    return FederatedStrategy(opts, weights, [True] * len(weights), hooks=hooks, **kw)  # type: ignore[arg-type]


def dp_of(strategy: FederatedStrategy) -> ServerPrivacy:
    hook = strategy.hooks[0]
    assert isinstance(hook, ServerPrivacy)
    return hook


def private(cfg: AppConfig, weights: list[np.ndarray] | None = None, **options: object) -> FederatedStrategy:
    settings: dict[str, object] = {"min_fit_clients": 2, "min_available_clients": 2, "fraction_evaluate": 0.0, **options}
    opts = StrategyOptions(**settings)  # type: ignore[arg-type]
    strategy = with_privacy(cfg, opts, weights or zeros())
    assert isinstance(strategy.hooks[0], ServerPrivacy)
    return strategy


def run_round(strategy: FederatedStrategy, manager: object, payloads: list[list[np.ndarray]], n: int = 1) -> list:
    instructions = strategy.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    results = [(proxy, fit_res(p, n)) for (proxy, _), p in zip(instructions, payloads)]
    strategy.aggregate_fit(1, results, [])
    return instructions


# ------------------------------------------------------------------------------ arithmetic
def test_clip_to_norm_hand_computed() -> None:
    clipped, norm = clip_to_norm([np.array([3.0, 0.0]), np.array([[4.0]])], 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [[0.8]], rtol=1e-6)
    small, norm = clip_to_norm([np.array([0.3, 0.4])], 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(small[0], np.array([0.3, 0.4], dtype=np.float32))
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_gaussian_noise_has_its_configured_std() -> None:
    rng = np.random.default_rng(0)
    noisy = add_gaussian_noise([np.zeros(200_000), np.full((100, 1000), 2.0)], 0.7, rng)
    assert noisy[0].std() == pytest.approx(0.7, rel=0.01)
    assert abs(noisy[0].mean()) < 0.01
    assert (noisy[1] - 2.0).std() == pytest.approx(0.7, rel=0.01)
    assert add_gaussian_noise([np.ones(3)], 0.0, rng)[0].tolist() == [1.0, 1.0, 1.0]


def test_noise_budgeting_hand_computed() -> None:
    assert min_contributions(10, 0.5) == 5
    assert min_contributions(10, 0.0) == 10
    assert min_contributions(3, 0.5) == 2  # up to floor(1.5) = 1 failure accepted
    assert noise_share_std(2.0, 4) == pytest.approx(1.0)
    # Andrew et al. 2021: z_u = (z^-2 - (2 s)^-2)^(-1/2); z = 1, s = 1 -> (1 - 1/4)^(-1/2).
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    with pytest.raises(ValueError, match="dp-clip-count-stddev"):
        update_noise_multiplier(1.0, 0.5)
    assert adaptive_clip_norm(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))


# ------------------------------------------------------------------------------ accountant
def reference_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = ReferenceRdp()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    ("z", "sampled", "population", "rounds", "pinned"),
    [
        (1.1, 10, 100, 50, 4.8996),  # dp-accounting 0.6.0, delta 1e-5
        (1.0, 20, 20, 10, 19.0536),  # no amplification (q = 1)
        (4.0, 1, 100, 100, 0.0897),
        (0.8, 5, 1000, 200, 1.7350),
    ],
)
def test_epsilon_matches_dp_accounting(z: float, sampled: int, population: int, rounds: int, pinned: float) -> None:
    acc = PrivacyAccountant(AccountingSpec("central", z, 1e-5), population)
    assert acc.epsilon() == 0.0
    for _ in range(rounds):
        acc.record_round(sampled)
    expected = reference_epsilon(z, sampled / population, rounds, 1e-5)
    assert acc.epsilon() == pytest.approx(expected, rel=1e-9)
    assert acc.epsilon() == pytest.approx(pinned, abs=1e-3)


def test_full_participation_matches_the_gaussian_rdp_closed_form() -> None:
    """q = 1: RDP(a) = T a / (2 z^2); epsilon = min_a RDP(a) + log((a-1)/a) - (log delta + log a)/(a-1)."""
    z, rounds, delta = 2.0, 30, 1e-5
    acc = PrivacyAccountant(AccountingSpec("central", z, delta), 10)
    for _ in range(rounds):
        acc.record_round(10)
    orders = np.linspace(1.01, 200, 200_000)
    bound = rounds * orders / (2 * z * z) + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    assert acc.epsilon() == pytest.approx(float(bound.min()), rel=2e-3)


def test_local_accounting_is_the_gaussian_mechanism_at_half_the_multiplier() -> None:
    acc = PrivacyAccountant(AccountingSpec("local", 4.0, 1e-5))
    for _ in range(5):
        acc.record_round(3)
    assert acc.epsilon() == pytest.approx(reference_epsilon(2.0, 1.0, 5, 1e-5), rel=1e-9)


def test_accountant_state_round_trips_and_keeps_counting() -> None:
    acc = PrivacyAccountant(AccountingSpec("central", 1.1, 1e-5), 100)
    for _ in range(7):
        acc.record_round(10)
    resumed = PrivacyAccountant(AccountingSpec("central", 1.1, 1e-5))
    resumed.load_state_dict(acc.state_dict())
    assert resumed.epsilon() == acc.epsilon() and resumed.rounds == 7
    assert resumed.epsilon_after(10, 3) == pytest.approx(reference_epsilon(1.1, 0.1, 10, 1e-5), rel=1e-9)
    resumed.record_round(10)
    assert resumed.epsilon() > acc.epsilon()
    with pytest.raises(ValueError, match="local"):
        PrivacyAccountant(AccountingSpec("local", 1.1, 1e-5)).load_state_dict(acc.state_dict())
    noiseless = PrivacyAccountant(AccountingSpec("central", 0.0, 1e-5), 10)
    noiseless.record_round(5)
    assert noiseless.epsilon() == math.inf


# ---------------------------------------------------------------------- central-server DP
def test_central_server_clips_every_update_and_equals_fedavg_of_the_clipped_updates() -> None:
    cfg = AppConfig(dp_mode="central-server", dp_noise_multiplier=0.0, dp_clipping_norm=1.0, model="mlp")
    w0 = [np.full(s, 0.5, dtype=np.float32) for s in SHAPES]
    strategy = private(cfg, weights=w0)
    manager, _ = client_manager(3)
    rng = np.random.default_rng(1)
    updates = [[rng.normal(0, scale, s).astype(np.float32) for s in SHAPES] for scale in (0.05, 1.0, 3.0)]
    payloads = [[w + u for w, u in zip(w0, upd)] for upd in updates]
    # Example counts differ, but DP-FedAvg weighs clients equally (num_examples are ignored).
    instructions = strategy.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    results = [(proxy, fit_res(p, n)) for (proxy, _), p, n in zip(instructions, payloads, (1, 50, 1000))]
    strategy.aggregate_fit(1, results, [])
    clipped = [clip_to_norm(u, 1.0)[0] for u in updates]
    assert all(l2_norm(c) <= 1.0 + 1e-6 for c in clipped)
    assert l2_norm(clipped[0]) == pytest.approx(l2_norm(updates[0]), rel=1e-6)  # small one untouched
    expected = [w + sum(c[i] for c in clipped) / 3 for i, w in enumerate(w0)]
    for got, want in zip(strategy.weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert dp_of(strategy).accountant is not None and dp_of(strategy).accountant.epsilon() == math.inf  # type: ignore[union-attr]


def test_central_server_noise_std_on_the_average_is_z_c_over_m() -> None:
    shapes = [(400, 500)]
    cfg = AppConfig(dp_mode="central-server", dp_noise_multiplier=1.5, dp_clipping_norm=2.0, model="mlp")
    strategy = with_privacy(cfg, StrategyOptions(min_fit_clients=4, min_available_clients=4, fraction_evaluate=0.0),
                            [np.zeros(shapes[0], np.float32)])
    manager, _ = client_manager(4)
    run_round(strategy, manager, [[np.zeros(shapes[0], np.float32)] for _ in range(4)])  # type: ignore[arg-type]
    noise = strategy.weights[0]
    assert noise.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(noise.mean()) < 0.01


def test_adaptive_clipping_moves_the_norm_towards_the_quantile() -> None:
    cfg = AppConfig(dp_mode="central-server", dp_clipping="adaptive", dp_noise_multiplier=0.0,
                    dp_clip_count_stddev=1e-9, dp_clipping_norm=2.0, dp_target_quantile=0.5, model="mlp")
    strategy = private(cfg)
    manager, _ = client_manager(2)
    tiny = [np.full(s, 0.01, np.float32) for s in SHAPES]
    run_round(strategy, manager, [tiny, tiny])  # every update is below the norm: b = 1
    assert dp_of(strategy).clip_norm == pytest.approx(2.0 * math.exp(-0.2 * (1.0 - 0.5)), rel=1e-6)


# ---------------------------------------------------------------------- client-side DP
def test_client_clips_and_noises_its_update_and_reports_weight_one() -> None:
    options = privacy_options(AppConfig(dp_mode="central-client", model="mlp"))
    update = [np.full(s, 3.0, np.float32) for s in SHAPES]  # norm 3 * sqrt(16) = 12
    out, extras = privatize_update(options, {FIT_CLIP_KEY: 1.5, FIT_NOISE_KEY: 0.0}, update, np.random.default_rng(0))
    assert extras == []
    assert l2_norm(out) == pytest.approx(1.5, rel=1e-5)
    np.testing.assert_allclose(out[0], 3.0 * 1.5 / 12, rtol=1e-6)  # a scaled copy of the update
    big = [np.zeros((500, 400), np.float32)]
    noisy, _ = privatize_update(options, {FIT_CLIP_KEY: 1.0, FIT_NOISE_KEY: 0.25}, big, np.random.default_rng(0))
    assert noisy[0].std() == pytest.approx(0.25, rel=0.01)
    n, metrics = private_fit_report(options, out, 437, {"num_upload_bytes": 64, "train_loss": 0.3, "data_label_0": 5})
    assert n == 1 and metrics == {"num_upload_bytes": 64}
    with pytest.raises(ValueError, match="dp-noise-std"):
        privatize_update(options, {FIT_CLIP_KEY: 1.0}, update)


def test_client_side_clipping_with_zero_noise_equals_fedavg_of_clipped_updates() -> None:
    cfg = AppConfig(dp_mode="central-client", dp_noise_multiplier=0.0, dp_clipping_norm=1.0, send_delta=True, model="mlp")
    strategy = private(cfg, send_delta=True)
    manager, _ = client_manager(3)
    instructions = strategy.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    config = instructions[0][1].config
    assert config[FIT_CLIP_KEY] == 1.0 and config[FIT_NOISE_KEY] == 0.0
    rng = np.random.default_rng(2)
    updates = [[rng.normal(0, s, shape).astype(np.float32) for shape in SHAPES] for s in (0.1, 1.0, 2.0)]
    sent = [privatize_update(privacy_options(cfg), config, u)[0] for u in updates]
    assert all(l2_norm(s) <= 1.0 + 1e-6 for s in sent)
    results = [(proxy, fit_res(p, 1)) for (proxy, _), p in zip(instructions, sent)]
    strategy.aggregate_fit(1, results, [])
    expected = [sum(clip_to_norm(u, 1.0)[0][i] for u in updates) / 3 for i in range(len(SHAPES))]
    for got, want in zip(strategy.weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_central_client_splits_the_noise_over_the_fewest_accepted_contributions() -> None:
    cfg = AppConfig(dp_mode="central-client", dp_noise_multiplier=1.2, dp_clipping_norm=0.5, model="mlp",
                    min_fit_clients=4, min_available_clients=4, max_failure_fraction=0.25)
    strategy = private(cfg, min_fit_clients=4, min_available_clients=4, max_failure_fraction=0.25)  # type: ignore[arg-type]
    manager, _ = client_manager(4)
    instructions = strategy.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    # 4 sampled, up to 1 failure accepted -> t = 3 shares of N(0, (1.2 * 0.5)^2).
    assert instructions[0][1].config[FIT_NOISE_KEY] == pytest.approx(1.2 * 0.5 / math.sqrt(3))
    # Two contributions only: the round is refused (their noise does not add up to the configured noise).
    results = [(proxy, fit_res(zeros(), 1)) for proxy, _ in instructions[:2]]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is None


def test_adaptive_central_client_sends_and_reads_the_clipping_bit() -> None:
    cfg = AppConfig(dp_mode="central-client", dp_clipping="adaptive", dp_noise_multiplier=0.0, dp_clip_count_stddev=1e-9,
                    dp_clipping_norm=1.0, send_delta=True, model="mlp")
    strategy = private(cfg, send_delta=True)
    manager, _ = client_manager(2)
    instructions = strategy.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    config = instructions[0][1].config
    assert FIT_COUNT_NOISE_KEY in config
    small = [np.full(s, 0.01, np.float32) for s in SHAPES]
    large = [np.full(s, 5.0, np.float32) for s in SHAPES]
    sent = [privatize_update(privacy_options(cfg), config, u) for u in (small, large)]
    assert [float(e[0][0]) for _, e in sent] == pytest.approx([0.5, -0.5], abs=1e-6)  # centred bits
    results = [(proxy, fit_res(p + e, 1)) for (proxy, _), (p, e) in zip(instructions, sent)]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None and len(to_arrays(params)) == len(SHAPES)
    assert dp_of(strategy).clip_norm == pytest.approx(math.exp(-0.2 * (0.5 - 0.5)))  # half unclipped = the target


def test_local_dp_keeps_example_weights_and_noises_with_the_full_multiplier() -> None:
    cfg = AppConfig(dp_mode="local", dp_noise_multiplier=2.0, dp_clipping_norm=0.5, model="mlp")
    strategy = private(cfg)
    manager, _ = client_manager(2)
    instructions = strategy.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    assert instructions[0][1].config[FIT_NOISE_KEY] == pytest.approx(1.0)
    n, _ = private_fit_report(privacy_options(cfg), zeros(), 437, {"num_upload_bytes": 1})
    assert n == 437


# ------------------------------------------------------------------- budget and resume
def test_target_epsilon_stops_training_before_it_is_exceeded(caplog: pytest.LogCaptureFixture) -> None:
    cfg = AppConfig(dp_mode="central-server", dp_noise_multiplier=1.0, dp_target_epsilon=3.0, model="mlp",
                    num_server_rounds=50)
    strategy = private(cfg, fraction_fit=0.1)
    manager, _ = client_manager(20)  # 2 of 20 clients a round: q = 0.1
    ladder = PrivacyAccountant(AccountingSpec("central", 1.0, 1e-5), 20)
    allowed = 0
    while ladder.epsilon_after(2) <= 3.0:
        ladder.record_round(2)
        allowed += 1
    assert 0 < allowed < 50
    trained = 0
    with caplog.at_level(logging.WARNING):
        for rnd in range(1, 50):
            instructions = strategy.configure_fit(rnd, PARAMS, manager)  # type: ignore[arg-type]
            if instructions:
                trained += 1
                strategy.aggregate_fit(rnd, [(p, fit_res(zeros(), 1)) for p, _ in instructions], [])
            else:
                assert strategy.configure_evaluate(rnd, PARAMS, manager) == []  # type: ignore[arg-type]
    assert trained == allowed
    accountant = dp_of(strategy).accountant
    assert accountant is not None and accountant.epsilon() <= 3.0
    assert accountant.epsilon_after(2) > 3.0
    assert any("past dp-target-epsilon 3.0000" in r.getMessage() for r in caplog.records)


def test_epsilon_goes_into_the_record_and_survives_a_checkpoint(tmp_path: Path) -> None:
    cfg = AppConfig(dp_mode="central-server", dp_noise_multiplier=1.1, model="mlp", output_dir=str(tmp_path))
    rows: list[dict] = []
    opts = StrategyOptions(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0)
    strategy = with_privacy(cfg, opts, zeros(), observers=[lambda rec, s: rows.append(rec.as_row())])
    manager, _ = client_manager(4)
    for rnd in (1, 2, 3):
        instructions = strategy.configure_fit(rnd, PARAMS, manager)  # type: ignore[arg-type]
        strategy.aggregate_fit(rnd, [(p, fit_res(zeros(), 1)) for p, _ in instructions], [])
        strategy.configure_evaluate(rnd, PARAMS, manager)  # type: ignore[arg-type]
    assert [r["round"] for r in rows] == [1, 2, 3]
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(reference_epsilon(1.1, 4 / 4, 3, 1e-5), rel=1e-9)  # 4 of 4 clients

    spec = WeightSpec(("a", "b"), tuple(SHAPES), (True, True))
    save_checkpoint(tmp_path / "checkpoint.pt", cfg, spec, strategy.state_dict())
    payload = load_checkpoint(tmp_path / "checkpoint.pt", dataclasses.replace(cfg, resume=True), spec)
    resumed = with_privacy(cfg, opts, zeros())
    resumed.load_state_dict(payload["strategy"])
    accountant = dp_of(resumed).accountant
    assert accountant is not None and accountant.epsilon() == pytest.approx(eps[-1], rel=1e-12)
    instructions = resumed.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    resumed.aggregate_fit(1, [(p, fit_res(zeros(), 1)) for p, _ in instructions], [])
    assert accountant.epsilon() == pytest.approx(reference_epsilon(1.1, 1.0, 4, 1e-5), rel=1e-9)

    plain = FederatedStrategy(opts, zeros(), [True, True])
    plain.configure_fit(1, PARAMS, manager)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without differential privacy"):
        with_privacy(cfg, opts, zeros()).load_state_dict(
            {**plain.state_dict(), "round": 3}
        )


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"secure_aggregation": True, "aggregator": "median"}, "aggregator='median' cannot run"),
        ({"secure_aggregation": True, "aggregator": "krum"}, "aggregator='krum' cannot run"),
        ({"secure_aggregation": True, "strategy": "scaffold"}, "strategy 'scaffold'"),
        ({"secure_aggregation": True, "strategy": "fednova"}, "strategy 'fednova'"),
        ({"secure_aggregation": True, "compression": "int8"}, "compression 'int8' cannot be summed"),
        ({"secure_aggregation": True, "dp_mode": "central-server"}, "use dp-mode='central-client'"),
        ({"secure_aggregation": True, "dp_mode": "central-client", "dp_clipping_norm": 10.0},
         "secagg-clipping-range (8) is smaller than dp-clipping-norm (10)"),
        ({"secure_aggregation": True, "secagg_num_shares": 4.0}, "secagg-num-shares: a count must be an odd integer >= 3"),
        ({"secure_aggregation": True, "secagg_num_shares": 5.0, "secagg_reconstruction_threshold": 5.0},
         "must be smaller than secagg-num-shares"),
        ({"dp_mode": "central-server", "strategy": "scaffold"}, "also sends its control-variate update"),
        ({"dp_mode": "local", "strategy": "fednova"}, "local step count"),
        ({"dp_mode": "central-server", "aggregator": "trimmed-mean"}, "aggregator 'trimmed-mean' is not covered"),
        ({"dp_mode": "local", "dp_clipping": "adaptive"}, "dp-clipping 'adaptive'"),
        ({"dp_target_epsilon": 2.0}, "dp-mode is 'none'"),
        ({"dp_mode": "central-server", "dp_noise_multiplier": 0.0, "dp_target_epsilon": 2.0}, "needs noise"),
        ({"dp_mode": "secret"}, "run-config key 'dp-mode': unknown value 'secret'; choose one of"),
    ],
)
def test_refused_combinations_name_the_problem(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        AppConfig(**settings)


def test_sound_combinations_are_accepted() -> None:
    for strategy in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedsgd"):
        AppConfig(strategy=strategy, secure_aggregation=True, dp_mode="central-client")
        AppConfig(strategy=strategy, dp_mode="central-server", dp_clipping="adaptive")
    AppConfig(dp_mode="local", aggregator="median")  # local DP: any aggregation is post-processing
    assert not AppConfig().secure_aggregation and AppConfig().dp_mode == "none"


def test_dp_refuses_models_with_batchnorm_buffers() -> None:
    with pytest.raises(ConfigError, match="model='mlp'"):
        check_privacy_model(AppConfig(dp_mode="central-server"), [True, False, False], "cnn")
    check_privacy_model(AppConfig(dp_mode="central-server"), [True, True], "mlp")
    check_privacy_model(AppConfig(secure_aggregation=True), [True, False], "cnn")  # SecAgg alone sums buffers too


def test_privacy_off_leaves_the_strategy_and_the_client_report_alone() -> None:
    assert privacy_hooks(privacy_options(AppConfig()), StrategyOptions(), 20) == []
    metrics = {"num_upload_bytes": 1, "train_loss": 0.5}
    assert private_fit_report(privacy_options(AppConfig()), zeros(), 7, metrics) == (7, metrics)


def test_secagg_clipping_is_counted_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    arrays = [np.array([0.0, 1.0, 9.0, -20.0], np.float32)]
    # SecAgg+ sends (n / max_weight) * x clipped to +-8: with n = max_weight, 2 of 4 values are clipped.
    assert secagg_clipped_fraction(arrays, 100, 100.0, 8.0) == 0.5
    assert secagg_clipped_fraction(arrays, 10, 100.0, 8.0) == 0.0  # scaled by 0.1 first
    with caplog.at_level(logging.WARNING):
        n, metrics = private_fit_report(privacy_options(AppConfig(secure_aggregation=True, secagg_max_weight=100.0)), arrays, 100, {})
    assert n == 100 and metrics["secagg_clipped_fraction_max"] == 0.5
    assert any("SecAgg+ will clip 50.0000%" in r.getMessage() for r in caplog.records)
