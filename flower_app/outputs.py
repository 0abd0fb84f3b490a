"""What a run leaves behind: metrics.csv, a plot, checkpoints, the final model and its config."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from flower_app.config import AppConfig
from flower_app.task import WeightSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "flower_app-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"
PLOT_INTERVAL_S = 30.0  # learning_curves.png is redrawn at most this often, and after the last round
# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = (
    "strategy", "aggregator", "dataset", "model", "hidden-size", "partitioner", "num-partitions",
    "seed", "send-delta", "compression",
    "hf-model", "lora-rank", "lora-target-modules", "lora-modules-to-save",  # what the weights are of
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or written by a different run."""


def _to_torch(obj: Any) -> Any:
    # torch.load(weights_only=True) accepts tensors and plain containers, not numpy arrays.
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: Path, cfg: AppConfig, spec: WeightSpec, strategy_state: Mapping[str, Any]) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "round": int(strategy_state["round"]),
        "config": cfg.to_run_config(),
        "keys": list(spec.keys),
        "shapes": [list(s) for s in spec.shapes],
        "strategy": _to_torch(dict(strategy_state)),
    }
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, cfg: AppConfig, spec: WeightSpec) -> dict[str, Any]:
    """Load and check a checkpoint against this run; raises `CheckpointError` with the reason."""
    if not path.exists():
        raise CheckpointError(f"resume=true but there is no checkpoint at {path}; run without resume first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    saved = payload["config"]
    current = cfg.to_run_config()
    diffs = [f"{k}={saved.get(k)!r} (this run: {current[k]!r})" for k in RESUME_KEYS if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different run: {'; '.join(diffs)}")
    if list(payload["keys"]) != list(spec.keys) or [tuple(s) for s in payload["shapes"]] != list(spec.shapes):
        raise CheckpointError(f"checkpoint {path} holds a different model (parameter names or shapes differ)")
    payload["strategy"] = _to_numpy(payload["strategy"])
    return payload


class RunRecorder:
    """Observer of finished rounds: appends metrics.csv, redraws the plot, saves checkpoints.

    On resume, rows already in metrics.csv up to the checkpoint's round are kept, later ones
    (from rounds the interrupted run did not checkpoint) are dropped.
    """

    def __init__(
        self,
        cfg: AppConfig,
        spec: WeightSpec,
        save_model: Callable[[list[np.ndarray], Path], None],
        start_round: int = 0,
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.save_model = save_model
        self.dir = Path(cfg.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self._last_plot = -math.inf
        if start_round > 0 and self.metrics_path.exists():
            previous = pd.read_csv(self.metrics_path)
            self.rows = previous[previous["round"] <= start_round].to_dict("records")
        (self.dir / "run_config.json").write_text(cfg.to_json())

    def __call__(self, record: Any, strategy: Any) -> None:
        self.rows.append(record.as_row())
        frame = pd.DataFrame(self.rows)
        _atomic_write(self.metrics_path, lambda tmp: frame.to_csv(tmp, index=False))
        summary = getattr(strategy, "data_summary", None)
        if summary:
            table = pd.DataFrame(list(summary.values())).sort_values("client")
            table.to_csv(self.dir / "partitions.csv", index=False)
        if record.round == 0:
            return
        last = record.round >= self.cfg.num_server_rounds
        # Redrawing costs ~0.5 s: throttle it so that cheap rounds are not dominated by plotting.
        if last or time.monotonic() - self._last_plot >= PLOT_INTERVAL_S:
            plot_metrics(frame, self.dir / "learning_curves.png")
            self._last_plot = time.monotonic()
        if last or record.round % self.cfg.checkpoint_every == 0:
            save_checkpoint(self.dir / CHECKPOINT_NAME, self.cfg, self.spec, strategy.state_dict())
        if last:
            self.save_model(strategy.weights, self.dir / "model.pt")
            log.info("run finished: metrics, plot, checkpoint and final model in %s", self.dir)


def plot_metrics(frame: pd.DataFrame, path: Path) -> None:
    """Learning curves (loss, accuracy) and bytes per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for column, label in (("central_loss", "centralized"), ("federated_loss", "federated"), ("train_loss", "train")):
        if column in frame and frame[column].notna().any():
            axes[0].plot(frame["round"], frame[column], marker=".", label=label)
    for column, label in (("central_accuracy", "centralized"), ("federated_accuracy", "federated"), ("train_accuracy", "train")):
        if column in frame and frame[column].notna().any():
            axes[1].plot(frame["round"], frame[column], marker=".", label=label)
    for column, label in (
        ("bytes_sent", "server to clients"),
        ("bytes_received", "clients to server"),
        ("bytes_sent_per_client", "to one client"),
        ("bytes_received_per_client", "from one client (mean)"),
    ):
        if column in frame and frame[column].notna().any():
            axes[2].plot(frame["round"], frame[column] / 1e6, marker=".", label=label)
    if axes[2].lines:
        axes[2].set_yscale("log")  # compressed uploads can be 1000x smaller than the model sent down
    if "epsilon" in frame and frame["epsilon"].notna().any():
        twin = axes[1].twinx()
        twin.plot(frame["round"], frame["epsilon"], color="tab:red", linestyle="--", label="epsilon")
        twin.set_ylabel("epsilon")
    for ax, title, ylabel in zip(axes, ("loss", "accuracy", "traffic"), ("loss", "accuracy", "MB per round")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
