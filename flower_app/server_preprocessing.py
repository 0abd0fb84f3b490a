"""Federated preprocessing, the server's side: the statistics step (`strategies.hooks.StatisticsStep`).

Before round 1 every available client sends statistics of its raw train split (`flower_app.data.statistics_reply`):
``FeatureStats`` arrays with plain aggregation, merged exactly (Chan et al.); under SecAgg+ per-observation
``SumStats`` relative to a public reference, of which the server only sees the protocol's example-weighted
mean. The merged statistics give one transform (`datasets.preprocessing.transform_from_stats`) that every
later fit and evaluate config carries; nodes apply it to their raw partition, the server to its held-out
split. Each reply is checked like a model update: one that is malformed, not finite, of the wrong length,
or inconsistent (a mean outside its min and max, a spread wider than its range allows, a count that does
not match its examples) is rejected with the client and the reason; too few usable replies leave the step
undone, and the run stops (`FederatedStrategy.finish_statistics`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import Scalar
from flwr.common.logger import log

from datasets import FeatureStats, FeatureTransform, SumStats, merge_stats, transform_from_stats
from datasets.labels import agree_class_names, unpack_class_names
from flower_app.data import (
    CLASS_NAMES_KEY,
    LABELS_METRIC,
    LABELS_REQUEST_KEY,
    REFERENCE_KEYS,
    STATS_FEATURES,
    STATS_REQUEST_KEY,
    STATS_SUMS,
    transform_config,
)
from strategies.hooks import NDArrays, StatisticsReply
from strategies.validation import cap_counts, check_count

PREPROCESSING_STATE_KEY = "preprocessing"
# The SecAgg+ aggregate's first entry is the weighted mean of each reply's 1: off by more than quantization
# (a few 1e-6 per client), the protocol clipped or mis-weighted the vectors and no statistic can be trusted.
_SECAGG_COUNT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class StatisticsOptions:
    """What the statistics step asks for and how it checks the replies.

    Attributes:
        kind: ``standardize`` or ``min-max`` (`datasets.core.TRANSFORM_KINDS`).
        secure: SecAgg+: per-observation sums relative to ``reference``; otherwise FeatureStats.
        num_features: Features (tabular) or channels (images) of one example: axis 1 of the data.
        observations_per_example: Values per feature of one example (pixels per channel; 1 for tabular).
        reference: SecAgg+'s public reference transform (None: the raw values, fine for [0, 1] images).
        labels: Classification with labels from each node's files and no class-names: the server model's class
            names; each node reports the labels it holds, which must be among them (nodes then re-index to them).
        min_replies: Fewer usable replies stop the run (min-fit-clients).
        max_failure_fraction: More failed or rejected replies than this fraction stop the run.
        max_count_ratio: A count above this multiple of the lower median is capped (plain aggregation).
    """

    kind: str
    secure: bool
    num_features: int
    observations_per_example: int = 1
    reference: FeatureTransform | None = None
    labels: tuple[str, ...] | None = None
    min_replies: int = 2
    max_failure_fraction: float = 0.5
    max_count_ratio: float = 1000.0


class FederatedStatistics:
    """The statistics step of federated preprocessing; its result is the agreed transform (and class names)."""

    name = PREPROCESSING_STATE_KEY

    def __init__(self, options: StatisticsOptions) -> None:
        self.options = options
        self.transform: FeatureTransform | None = None
        self.class_names: tuple[str, ...] | None = None
        self.summary: dict[str, float] = {}
        self._failure = ""
        self._started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.transform is not None

    @property
    def failure(self) -> str:
        return self._failure

    def fit_config(self) -> dict[str, Scalar]:
        self._started = time.perf_counter()
        config: dict[str, Scalar] = {STATS_REQUEST_KEY: STATS_SUMS if self.options.secure else STATS_FEATURES}
        if self.options.secure and self.options.reference is not None:
            _, offset, scale = self.options.reference.to_strings()
            config.update(dict(zip(REFERENCE_KEYS, (offset, scale))))
        if self.options.labels is not None and not self.options.secure:
            config[LABELS_REQUEST_KEY] = True
        return config

    # ------------------------------------------------------------------------- merging the replies
    def aggregate(self, replies: list[StatisticsReply], failures: int, preaggregated: bool) -> None:
        accepted: list[tuple[str, np.ndarray, int, Mapping[str, Scalar]]] = []
        for cid, arrays, num_examples, metrics in replies:
            try:
                reason, array = self._check(arrays, num_examples, metrics)
            except Exception as err:  # noqa: BLE001 - one client's reply can never crash the server
                reason, array = f"{type(err).__name__}: {err}", None
            if array is None:
                log(WARNING, "statistics round: rejected the statistics of client %s: %s", cid, reason)
                continue
            accepted.append((cid, array, int(num_examples), metrics))
        attempted = len(replies) + failures
        bad = attempted - len(accepted)
        if len(accepted) < self.options.min_replies or (attempted and bad / attempted > self.options.max_failure_fraction):
            self._failure = (
                f"{len(accepted)} usable statistics of {attempted} clients asked ({failures} failed, "
                f"{len(replies) - len(accepted)} rejected: see the log); it needs at least min-fit-clients "
                f"{self.options.min_replies} and at most max-failure-fraction {self.options.max_failure_fraction:g} bad"
            )
            log(WARNING, "statistics round: %s", self._failure)
            return
        try:
            class_names = self._agree_labels(accepted)
            stats = self._merge_sums(accepted) if preaggregated else self._merge(accepted)
            transform = transform_from_stats(stats, self.options.kind)
        except ValueError as err:
            self._failure = str(err)
            log(WARNING, "statistics round: %s", self._failure)
            return
        self.transform, self.class_names = transform, class_names
        self.summary = {
            "clients": float(len(accepted)), "rejected": float(len(replies) - len(accepted)), "failures": float(failures),
            "examples": float(sum(n for _, _, n, _ in accepted)), "seconds": time.perf_counter() - self._started,
            "bytes_received": float(sum(a.nbytes for _, a, _, _ in accepted)),
        }
        log(INFO, "statistics round: %d clients, %d examples: %s transform agreed (%d features)%s", len(accepted),
            int(self.summary["examples"]), transform.kind, transform.num_features,
            f", classes {', '.join(class_names)}" if class_names else "")

    def _check(
        self, arrays: NDArrays, num_examples: object, metrics: Mapping[str, Scalar]
    ) -> tuple[str, np.ndarray | None]:
        """(why the reply is unusable, None) or ("", its statistics array as float64)."""
        reason = check_count(num_examples)
        if reason is not None:
            return reason, None
        if len(arrays) != 1:
            return f"a statistics reply holds one array, got {len(arrays)}", None
        array = np.asarray(arrays[0])
        if array.dtype.kind != "f" or array.ndim != 1:
            return f"statistics must be a flat float array, got {array.dtype} of shape {array.shape}", None
        array = array.astype(np.float64)
        f = self.options.num_features
        size = 1 + 2 * f if self.options.secure else 1 + 4 * f
        if array.size != size:
            what = "[1, mean z, mean z^2]" if self.options.secure else "[count, mean, M2, min, max]"
            return f"statistics of {f} features hold {size} values ({what}), got {array.size}", None
        if not np.isfinite(array).all():
            return "the statistics hold NaN or Inf", None
        if not self.options.secure:
            stats = FeatureStats.from_array(array)
            expected = int(num_examples) * self.options.observations_per_example  # type: ignore[call-overload]
            if stats.count != expected:
                return (f"the statistics count {stats.count} observations, but {num_examples} examples hold "
                        f"{expected}"), None
            slack = 1e-9 * np.maximum(1.0, np.maximum(np.abs(stats.minimum), np.abs(stats.maximum)))
            if bool(np.any(stats.mean < stats.minimum - slack)) or bool(np.any(stats.mean > stats.maximum + slack)):
                return "a mean lies outside its feature's min and max", None
            half_range = (stats.maximum - stats.minimum) / 2
            if bool(np.any(stats.variance() > half_range**2 * (1 + 1e-9) + slack**2)):
                return "a variance exceeds what its feature's range allows ((max - min)^2 / 4)", None
        if self.options.labels is not None and not self.options.secure:
            text = metrics.get(LABELS_METRIC)
            if not isinstance(text, str):
                return f"the reply lacks its class names (metric {LABELS_METRIC})", None
            agree_class_names([unpack_class_names(text), self.options.labels])  # checks every name
        return "", array

    def _merge(self, accepted: Sequence[tuple[str, np.ndarray, int, Mapping[str, Scalar]]]) -> FeatureStats:
        """Chan's merge of the accepted FeatureStats, each count capped at max-count-ratio x the lower median."""
        counts, capped = cap_counts([n for _, _, n, _ in accepted], self.options.max_count_ratio)
        items = []
        for i, (cid, array, n, _) in enumerate(accepted):
            stats = FeatureStats.from_array(array)
            if i in capped:
                log(WARNING, "statistics round: client %s reported %d examples, more than max-count-ratio %g x the lower "
                    "median; its weight is capped at %d", cid, n, self.options.max_count_ratio, counts[i])
                factor = counts[i] / n
                stats = FeatureStats(counts[i] * self.options.observations_per_example, stats.mean, stats.m2 * factor,
                                     stats.minimum, stats.maximum)
            items.append(stats)
        return merge_stats(items)

    def _merge_sums(self, accepted: Sequence[tuple[str, np.ndarray, int, Mapping[str, Scalar]]]) -> SumStats:
        """SecAgg+: every result holds the same aggregate, the example-weighted mean of [1, mean z, mean z^2]."""
        aggregate = accepted[0][1]
        if abs(aggregate[0] - 1.0) > _SECAGG_COUNT_TOLERANCE:
            raise ValueError(
                f"the SecAgg+ aggregate's count entry is {aggregate[0]:.6g}, not 1: the protocol clipped or mis-weighted "
                "the statistics (raise secagg-max-weight above the largest node's examples)"
            )
        total = float(sum(n for _, _, n, _ in accepted)) * self.options.observations_per_example
        return SumStats.from_array(aggregate / aggregate[0] * total, self.options.reference)

    def _agree_labels(self, accepted: Sequence[tuple[str, np.ndarray, int, Mapping[str, Scalar]]]) -> tuple[str, ...] | None:
        """The agreed class names: the nodes' labels merged with the server model's, which must hold them all."""
        known = self.options.labels
        if known is None or self.options.secure:
            return None
        reports = [unpack_class_names(str(m[LABELS_METRIC])) for _, _, _, m in accepted]
        agreed = agree_class_names([*reports, known], nodes=[f"client {cid}" for cid, _, _, _ in accepted] + ["server"])
        extra = [n for n in agreed if n not in known]
        if extra:
            raise ValueError(
                f"the nodes hold labels {', '.join(extra[:10])} that the server's held-out data lacks (its model has "
                f"{len(known)} outputs: {', '.join(known)}); set class-names to the full list"
            )
        return known

    # ------------------------------------------------------------------------- what follows
    def round_config(self) -> dict[str, Scalar]:
        if self.transform is None:
            return {}
        config: dict[str, Scalar] = {**transform_config(self.transform)}
        if self.class_names is not None:
            config[CLASS_NAMES_KEY] = json.dumps(list(self.class_names))
        return config

    def state_dict(self) -> dict[str, Any]:
        transform = self.transform
        return {
            "kind": transform.kind if transform else "",
            "offset": list(transform.offset) if transform else [],
            "scale": list(transform.scale) if transform else [],
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "summary": dict(self.summary),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None or not state.get("kind"):
            raise ValueError(
                "the checkpoint holds no agreed transform (preprocessing 'federated'): it was written before the "
                "statistics round completed, or by a run without it"
            )
        self.transform = FeatureTransform(str(state["kind"]), tuple(float(v) for v in state["offset"]),
                                          tuple(float(v) for v in state["scale"]))
        names = state.get("class_names")
        self.class_names = tuple(str(n) for n in names) if names is not None else None
        self.summary = {str(k): float(v) for k, v in dict(state.get("summary") or {}).items()}


def preprocessing_record(mode: str, transform: FeatureTransform, class_names: Sequence[str] | None,
                         summary: Mapping[str, float]) -> dict[str, Any]:
    """The content of preprocessing.json: the transform a user applies to raw inputs at inference time."""
    return {
        "preprocessing": mode,
        "kind": transform.kind,
        "offset": list(transform.offset),
        "scale": list(transform.scale),
        "apply": "x -> (x - offset[c]) / scale[c], c the feature (tabular) or channel (images) = axis 1 of the raw "
                 "input (images scaled to [0, 1] first)",
        "class_names": list(class_names) if class_names is not None else None,
        "statistics_round": {k: (v if math.isfinite(v) else None) for k, v in summary.items()},
    }
