"""Privacy on the client: the SecAgg+ mod, clipping and noise of the update, what is reported in clear.

The server decides the clipping norm and the noise std per round and sends them in the fit
config (`FIT_CLIP_KEY`, `FIT_NOISE_KEY`, `FIT_COUNT_NOISE_KEY`); everything else comes from the
run config through `flower_app.options.PrivacyOptions`. The arithmetic lives in `strategies.privacy`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message
from flwr.common import Scalar
from flwr.common.logger import log

from flower_app.options import PrivacyOptions
from strategies.privacy import add_gaussian_noise, clip_to_norm, secure_rng

if TYPE_CHECKING:
    from flwr.clientapp.typing import ClientAppCallable, Mod

NDArrays = list[np.ndarray]

FIT_CLIP_KEY = "dp-clipping-norm"  # fit config: the L2 norm a client clips its update to
FIT_NOISE_KEY = "dp-noise-std"  # fit config: std of the Gaussian noise a client adds to its update
FIT_COUNT_NOISE_KEY = "dp-count-noise-std"  # fit config (adaptive): std a client adds to its clipping bit


def _when(predicate: Callable[[Context], bool], mod: Mod) -> Mod:
    """Apply ``mod`` only for runs where ``predicate(context)`` holds (mods are fixed at import)."""

    def conditional(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        return mod(msg, ctx, call_next) if predicate(ctx) else call_next(msg, ctx)

    return conditional


def _secagg_requested(ctx: Context) -> bool:
    return bool(ctx.run_config.get("secure-aggregation", False))


def client_mods() -> list[Mod]:
    """The ClientApp's mods: SecAgg+ for runs with ``secure-aggregation = true``."""
    from flwr.client.mod import secaggplus_mod

    return [_when(_secagg_requested, secaggplus_mod)]


def privatize_update(
    options: PrivacyOptions, fit_config: Mapping[str, Scalar], update: NDArrays, rng: np.random.Generator | None = None
) -> tuple[NDArrays, NDArrays]:
    """Clip this client's update (or gradient) and add its noise (dp-mode central-client or local).

    Returns the update to send and the arrays to append after it: with adaptive clipping, the
    centred clipping bit plus its noise.
    """
    missing = [k for k in (FIT_CLIP_KEY, FIT_NOISE_KEY) if k not in fit_config]
    if options.adaptive_clipping and FIT_COUNT_NOISE_KEY not in fit_config:
        missing.append(FIT_COUNT_NOISE_KEY)
    if missing:
        raise ValueError(
            f"dp-mode '{options.dp_mode}' but the server sent no {', '.join(missing)}: server and client run configs differ"
        )
    rng = rng or secure_rng()
    clip_norm = float(fit_config[FIT_CLIP_KEY])
    clipped, norm = clip_to_norm(update, clip_norm)
    noisy = add_gaussian_noise(clipped, float(fit_config[FIT_NOISE_KEY]), rng)
    extras: NDArrays = []
    if options.adaptive_clipping:
        bit = (1.0 if norm <= clip_norm else 0.0) - 0.5
        extras = [np.array([bit + rng.normal(0.0, float(fit_config[FIT_COUNT_NOISE_KEY]))], dtype=np.float32)]
    return noisy, extras


def private_fit_report(
    options: PrivacyOptions, wire: NDArrays, num_examples: int, metrics: dict[str, Scalar]
) -> tuple[int, dict[str, Scalar]]:
    """What a client reports in plain text next to a protected update.

    With privacy on, only the upload size leaves in the clear: per-client train loss, label
    counts and step counts are data too. Central DP weighs every client the same (weight 1), as
    DP-FedAvg's sensitivity bound assumes. Under SecAgg+, values the protocol will clip to
    ``[-secagg-clipping-range, secagg-clipping-range]`` are counted and warned about.
    """
    if not options.enabled:
        return num_examples, metrics
    report: dict[str, Scalar] = {"num_upload_bytes": metrics.get("num_upload_bytes", 0)}
    if options.central_dp:
        num_examples = 1
    if options.secure_aggregation:
        fraction = secagg_clipped_fraction(wire, num_examples, options.secagg_max_weight, options.secagg_clipping_range)
        if fraction > 0:
            log(
                WARNING,
                "SecAgg+ will clip %.4f%% of this client's values to +-%g (weighted by %d / %g): raise "
                "secagg-clipping-range, or send updates instead of weights (send-delta=true)",
                100 * fraction, options.secagg_clipping_range, num_examples, options.secagg_max_weight,
            )
        if options.dp_mode == "none":
            report["secagg_clipped_fraction_max"] = fraction
    return num_examples, report


def secagg_clipped_fraction(arrays: Sequence[np.ndarray], num_examples: int, max_weight: float, clipping_range: float) -> float:
    """Fraction of values that SecAgg+ clips: it sends ``(n / max_weight) * x`` clipped to ``+-range``."""
    total = sum(int(np.size(a)) for a in arrays)
    if total == 0:
        return 0.0
    limit = clipping_range / (num_examples / max_weight)
    return sum(int(np.count_nonzero(np.abs(a) > limit)) for a in arrays) / total
