"""Privacy: SecAgg+ secure aggregation and differential privacy, switched by the run config.

Server: `wrap_strategy` puts a `PrivateStrategy` around the `FederatedStrategy` (composition);
`run_server` runs the legacy loop as `ServerApp(server_fn=...)` does, or Flower's
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` when secure aggregation is on.
Client: `client_mods` (SecAgg+ only when the run asks for it) and `privatize_fit` (clipping and
noise inside `FlowerClient.fit`). The arithmetic lives in `strategies.privacy`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flower_app.config import AppConfig

DP_MODES = ("none", "central-server", "central-client", "local")


def check_privacy_config(cfg: AppConfig) -> None:
    """Refuse privacy settings that cannot work (called from `AppConfig._check_combinations`)."""
    from flower_app.config import ConfigError

    dp = cfg.dp_mode != "none"
    if cfg.secure_aggregation:
        if cfg.aggregator != "mean":
            raise ConfigError(
                f"secure-aggregation: the server only sees the sum of the updates, so the per-client rule "
                f"aggregator='{cfg.aggregator}' cannot run; use aggregator='mean'"
            )
        if cfg.strategy in ("scaffold", "fednova"):
            why = (
                "needs each client's control-variate update, unweighted"
                if cfg.strategy == "scaffold"
                else "rescales each client's update by its own step count"
            )
            raise ConfigError(
                f"secure-aggregation: strategy '{cfg.strategy}' {why}, but SecAgg+ returns one example-weighted "
                "mean of everything the clients send; choose fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad or fedsgd"
            )
        if cfg.compression != "none":
            raise ConfigError(
                f"secure-aggregation: compression '{cfg.compression}' cannot be summed under masking (SecAgg+ sends its "
                "own quantized integer vector, and codec scales or top-k indices are not additive); set compression='none'"
            )
        if cfg.dp_mode == "central-server":
            raise ConfigError(
                "dp-mode 'central-server' clips each update on the server, which secure aggregation hides; "
                "use dp-mode='central-client' (clients clip and add their share of the noise)"
            )
        _check_secagg_counts(cfg)
        if cfg.min_fit_clients < 2:
            raise ConfigError("secure-aggregation needs at least 2 clients a round: set min-fit-clients >= 2")
    if dp:
        if cfg.strategy in ("scaffold", "fednova"):
            what = "its control variates" if cfg.strategy == "scaffold" else "its local step count"
            raise ConfigError(
                f"dp-mode '{cfg.dp_mode}': strategy '{cfg.strategy}' also sends {what}, which clipping and noise "
                "do not cover; choose fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad or fedsgd"
            )
        if cfg.dp_mode != "local" and cfg.aggregator != "mean":
            raise ConfigError(
                f"dp-mode '{cfg.dp_mode}': the noise is calibrated to the sum of clipped updates, so aggregator "
                f"'{cfg.aggregator}' is not covered; use aggregator='mean' (or dp-mode='local')"
            )
        if cfg.dp_clipping == "adaptive" and cfg.dp_mode == "local":
            raise ConfigError("dp-clipping 'adaptive' estimates the norm from the clients' noisy count, a central-DP "
                              "mechanism; use dp-clipping='fixed' with dp-mode='local'")
        if cfg.secure_aggregation and cfg.secagg_clipping_range < cfg.dp_clipping_norm:
            raise ConfigError(
                f"secagg-clipping-range ({cfg.secagg_clipping_range:g}) is smaller than dp-clipping-norm "
                f"({cfg.dp_clipping_norm:g}): SecAgg+ would clip the clipped updates again; raise secagg-clipping-range"
            )
        if cfg.dp_target_epsilon > 0 and cfg.dp_noise_multiplier == 0:
            raise ConfigError("dp-target-epsilon needs noise: with dp-noise-multiplier=0 epsilon is infinite after one round")
    elif cfg.dp_target_epsilon > 0:
        raise ConfigError("dp-target-epsilon is set but dp-mode is 'none': there is no privacy budget to track")


def _check_secagg_counts(cfg: AppConfig) -> None:
    from flower_app.config import ConfigError

    shares, threshold = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
    if shares > 1 and (shares != int(shares) or shares < 3):
        raise ConfigError(f"secagg-num-shares: a count must be an integer >= 3 (or a fraction <= 1), got {shares:g}")
    if threshold > 1 and (threshold != int(threshold) or threshold < 2):
        raise ConfigError(
            f"secagg-reconstruction-threshold: a count must be an integer >= 2 (or a fraction <= 1), got {threshold:g}"
        )
    if shares > 1 and threshold > 1 and threshold >= shares:
        raise ConfigError(
            f"secagg-reconstruction-threshold ({threshold:g}) must be smaller than secagg-num-shares ({shares:g})"
        )
    if not math.isfinite(cfg.secagg_clipping_range):
        raise ConfigError("secagg-clipping-range must be finite")
