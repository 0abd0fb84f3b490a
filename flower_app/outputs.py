"""What a run leaves behind in ``output-dir/<run-name>/``: metrics, plot, checkpoints, final and best model.

`RunRecorder` is the observer of finished rounds and the owner of the run's folder
(`flower_app.rundir`): it picks and locks the folder, restores a checkpoint on resume (checked by
`flower_app.checkpoint`), records changed settings, and writes every file atomically. A write
that fails (a full disk) stops the run with a `WriteError` naming the file and errno; what was
written before stays, up to the last good checkpoint.

``metrics.csv`` grows by one appended, fsynced line per round (the header is written once, and the
whole file is rewritten atomically only when a new column appears or on resume); a crash can at
worst leave a torn last line, which `read_metrics` drops.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flower_app.checkpoint import (
    CHECKPOINT_FORMAT,
    config_changes,
    load_checkpoint,
    restore_strategy,
    resumed_config,
    save_checkpoint,
)
from flower_app.config import AppConfig, ConfigError
from flower_app.rundir import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunDir,
    WriteError,
    append_line,
    atomic_write,
    atomic_write_bytes,
    describe_os_error,
    latest_run,
    open_run_dir,
    os_error_in,
    publish_dir,
    tmp_path_for,
)
from flower_app.task import WeightSpec

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "CheckpointError", "RunRecorder", "WriteError", "latest_run",
    "load_checkpoint", "plot_metrics", "read_metrics", "save_checkpoint",
]

# A child of Flower's logger: these lines show in `flwr run --stream` and `flwr log` with the run's own.
log = logging.getLogger(f"flwr.{__name__}")

METRICS_NAME = "metrics.csv"
HISTORY_NAME = "resume_history.jsonl"
TENSORBOARD_DIR = "tensorboard"
BEST_MODEL_NAME = "best_model.pt"  # the round with the lowest evaluation loss (strategies.selection)
BEST_INFO_NAME = "best_model.json"  # {round, metric, value, last_round[, preprocessing]}
PREPROCESSING_NAME = "preprocessing.json"  # the agreed feature transform (flower_app.server_preprocessing)


class SaveModel(Protocol):
    """Writes weights as a model file at ``path``; ``library_format`` also writes transformers' adapter/ beside it."""

    def __call__(self, weights: list[np.ndarray], path: Path, library_format: bool = True) -> None: ...
PLOT_INTERVAL_S = 30.0  # learning_curves.png is redrawn at most this often, and after the last round


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv as a frame, tolerant of a torn last line (a crash mid-append): that line is dropped."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(text) - cut)
        text = text[:cut]
    if not text.strip():
        return pd.DataFrame()
    frame = pd.read_csv(io.StringIO(text))
    if "round" in frame:
        rounds = pd.to_numeric(frame["round"], errors="coerce")
        if rounds.isna().any():
            log.warning("%s: dropping %d row(s) without a round number", path, int(rounds.isna().sum()))
        frame = frame[rounds.notna()].assign(round=rounds[rounds.notna()].astype(int))
    return frame


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class RunRecorder:
    """Observer of finished rounds: metrics.csv, TensorBoard, the plot, checkpoints, the final model.

    Construction opens nothing for a new run (a config error later leaves no folder behind); for a
    resume it locks the run's folder and reads its checkpoint, since the strategy needs the round.
    `start` (called once the strategy exists) takes the folder, restores the checkpoint's state,
    writes run_config.json and, on resume, resume_history.jsonl. On resume, rows of metrics.csv up
    to the checkpoint's round are kept, later ones (rounds the interrupted run did not checkpoint)
    are dropped.
    """

    def __init__(
        self,
        cfg: AppConfig,
        spec: WeightSpec,
        save_model: SaveModel,
        flower_run_id: int | None = None,
        preprocessing: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        if cfg.tensorboard and not tensorboard_available():
            raise ConfigError(
                "run-config key 'tensorboard' is true but the tensorboard package is not installed: "
                "pip install -e '.[tracking]' (or pip install tensorboard), or set tensorboard=false"
            )
        self.cfg = cfg
        self.spec = spec
        self.save_model = save_model
        self.flower_run_id = flower_run_id
        self.preprocessing = preprocessing  # the agreed transform (preprocessing.json), for federated or fixed preprocessing
        self.run: RunDir | None = None
        self.checkpoint: dict[str, Any] | None = None
        self.start_round = 0
        self.last_checkpoint: int | None = None
        self.rows: list[dict[str, Any]] = []
        self._columns: list[str] = []
        self._partitions = ""
        self._last_plot = -math.inf
        self._tb: Any = None
        self._closed = False
        if cfg.resume:
            self.run = open_run_dir(cfg.output_dir, cfg.run_name, True, self._label(), flower_run_id)
            try:
                self.checkpoint = load_checkpoint(self.run.path / CHECKPOINT_NAME, cfg, spec)
            except BaseException:
                self.run.lock.release()
                raise
            self.start_round = self.last_checkpoint = int(self.checkpoint["round"])
            self.cfg = resumed_config(cfg, self.run.name)

    def _label(self) -> str:
        return f"{self.cfg.strategy}-{self.cfg.dataset}"

    @property
    def rounds_left(self) -> int:
        return max(self.cfg.num_server_rounds - self.start_round, 0)

    @property
    def dir(self) -> Path:
        if self.run is None:
            raise RuntimeError("RunRecorder.start() has not been called: the run has no folder yet")
        return self.run.path

    # ------------------------------------------------------------------------------ start
    def start(self, strategy: Any) -> None:
        """Take the run's folder, restore the checkpoint into ``strategy`` (resume), write the run's config."""
        if self.run is None:
            self.run = open_run_dir(self.cfg.output_dir, self.cfg.run_name, False, self._label(), self.flower_run_id)
            self.cfg = resumed_config(self.cfg, self.run.name)
        try:
            if self.checkpoint is not None:
                self._restore(strategy)
            else:
                atomic_write_bytes(self.dir / "run_config.json", self.cfg.to_json().encode())
            if self.cfg.tensorboard:
                self._open_tensorboard()
            if self.checkpoint is not None and self.rounds_left == 0:
                self._finish(strategy, regenerate=True)
        except WriteError as err:
            self._stop(err)
        except BaseException:
            self.run.lock.release()
            raise

    def _restore(self, strategy: Any) -> None:
        assert self.checkpoint is not None and self.run is not None
        restore_strategy(strategy, self.checkpoint, f"checkpoint {self.dir / CHECKPOINT_NAME}")
        changes = config_changes(self.checkpoint["config"], self.cfg.to_run_config())
        log.info("resume: run '%s' from round %d of %d (%s)", self.run.name, self.start_round,
                 self.cfg.num_server_rounds, self.dir)
        if changes:
            log.info("resume: settings changed since the checkpoint: %s",
                     ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_round": self.start_round,
            "num_server_rounds": self.cfg.num_server_rounds, "flower_run_id": self.flower_run_id,
            "changed": changes,
        }
        history = self.dir / HISTORY_NAME
        previous = history.read_bytes() if history.exists() else b""
        if previous and not previous.endswith(b"\n"):
            previous = previous[: previous.rfind(b"\n") + 1]
        atomic_write_bytes(history, previous + (json.dumps(entry, sort_keys=True) + "\n").encode())
        atomic_write_bytes(self.dir / "run_config.json", self.cfg.to_json().encode())
        metrics = self.dir / METRICS_NAME
        if metrics.exists():
            frame = read_metrics(metrics)
            if "round" in frame:
                frame = frame[frame["round"] <= self.start_round]
            self.rows = frame.to_dict("records")
            self._columns = list(frame.columns)
            atomic_write(metrics, lambda tmp: frame.to_csv(tmp, index=False))

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events of rounds after the checkpoint (written before the crash) are purged by readers.
        purge = self.start_round + 1 if self.checkpoint is not None else None
        try:
            self._tb = SummaryWriter(log_dir=str(self.dir / TENSORBOARD_DIR), purge_step=purge)
        except OSError as err:
            raise WriteError(f"could not open the TensorBoard log in {self.dir / TENSORBOARD_DIR}: "
                             f"{describe_os_error(err)}", self.dir / TENSORBOARD_DIR, err.errno) from err

    # ---------------------------------------------------------------------- every round
    def __call__(self, record: Any, strategy: Any) -> None:
        if self.run is None:
            raise RuntimeError("RunRecorder.start() has not been called: the run has no folder yet")
        if self._closed:  # the run's last round was written and its folder released
            log.warning("round %d reported after run '%s' was closed: not recorded", record.round, self.run.name)
            return
        self.run.lock.check()
        try:
            self._write_round(record, strategy)
        except WriteError as err:
            self._stop(err)

    def _write_round(self, record: Any, strategy: Any) -> None:
        row = record.as_row()
        self.rows.append(row)
        self._append_metrics(row)
        self._write_partitions(strategy)
        self._log_tensorboard(row)
        if record.round == 0:
            return
        last = record.round >= self.cfg.num_server_rounds
        # Redrawing costs ~0.5 s: throttle it so that cheap rounds are not dominated by plotting.
        if last or time.monotonic() - self._last_plot >= PLOT_INTERVAL_S:
            plot_metrics(pd.DataFrame(self.rows), self.dir / "learning_curves.png")
            self._last_plot = time.monotonic()
        if last or record.round % self.cfg.checkpoint_every == 0:
            save_checkpoint(self.dir / CHECKPOINT_NAME, self.cfg, self.spec, strategy.state_dict())
            self.last_checkpoint = record.round
        if last:
            self._finish(strategy)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        path = self.dir / METRICS_NAME
        if not self._columns or not path.exists() or any(k not in self._columns for k in row):
            frame = pd.DataFrame(self.rows)  # first row, or a new column: the whole file, atomically
            self._columns = list(frame.columns)
            atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
        else:
            append_line(path, pd.DataFrame([row], columns=self._columns).to_csv(header=False, index=False))

    def _write_partitions(self, strategy: Any) -> None:
        summary = getattr(strategy, "data_summary", None)
        if not summary:
            return
        text = pd.DataFrame(list(summary.values())).sort_values("client").to_csv(index=False)
        if text != self._partitions:
            atomic_write_bytes(self.dir / "partitions.csv", text.encode())
            self._partitions = text

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        if self._tb is None:
            return
        try:
            for key, value in row.items():
                if key == "round" or isinstance(value, str) or value is None:
                    continue
                value = float(value)
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=int(row["round"]))
            self._tb.flush()
        except OSError as err:
            path = self.dir / TENSORBOARD_DIR
            raise WriteError(f"could not write the TensorBoard log in {path}: {describe_os_error(err)}",
                             path, err.errno) from err

    # --------------------------------------------------------------------- the end
    def _finish(self, strategy: Any, regenerate: bool = False) -> None:
        """Final plot and model (written through a staging folder), then the folder is released."""
        if regenerate:
            log.info("resume: the checkpoint is at the last round (%d): nothing left to train; rewriting the "
                     "final model and plot", self.start_round)
            if self.rows:
                plot_metrics(pd.DataFrame(self.rows), self.dir / "learning_curves.png")
        staging = tmp_path_for(self.dir / "final")
        try:
            staging.mkdir()
            try:
                record = self.preprocessing() if self.preprocessing is not None else None
                if record is not None:  # beside the model: what raw inputs go through before it
                    (staging / PREPROCESSING_NAME).write_text(json.dumps(record, indent=2) + "\n")
                best = self._stage_best(strategy, staging, record is not None)
                self.save_model(strategy.weights, staging / "model.pt")
            except (OSError, RuntimeError) as err:  # safetensors and torch's writers may hide the OSError
                cause = os_error_in(err) or err
                raise WriteError(f"could not write the final model {self.dir / 'model.pt'}: {describe_os_error(cause)}",
                                 self.dir / "model.pt", getattr(cause, "errno", None)) from err
            publish_dir(staging, self.dir)
            if best is not None:
                log.info("best model: round %d (%s %.6g): %s", best.round, best.metric, best.value,
                         self.dir / BEST_MODEL_NAME)
        except OSError as err:
            raise WriteError(f"could not write the final model in {self.dir}: {describe_os_error(err)}",
                             self.dir, err.errno) from err
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self._close()
        log.info("run '%s' finished: metrics, plot, checkpoint and final model in %s", self.dir.name, self.dir)

    def _stage_best(self, strategy: Any, staging: Path, preprocessing: bool = False) -> Any:
        """best_model.pt, the round with the lowest evaluation loss (`strategies.selection`), and best_model.json."""
        best = getattr(strategy, "best", None)
        if best is None:
            metric = getattr(strategy, "selection_metric", "an evaluation loss")
            log.warning("no best round is known (no round had a finite %s, or the run resumed from a checkpoint "
                        "written before best-model selection): no best_model.pt (model.pt is the last round's)", metric)
            return None
        # Only the state_dict: a transformer's adapter/ or hf_model/ beside it would be the last round's.
        self.save_model(best.weights, staging / BEST_MODEL_NAME, library_format=False)
        info: dict[str, Any] = {"round": best.round, "metric": best.metric, "value": best.value,
                                "last_round": strategy.current_round}
        if preprocessing:
            info["preprocessing"] = PREPROCESSING_NAME  # apply it to raw inputs before the model
        (staging / BEST_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        return best

    def _close(self) -> None:
        self._closed = True
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as err:
                log.warning("closing the TensorBoard log: %s", describe_os_error(err))
            self._tb = None
        if self.run is not None:
            self.run.lock.release()

    def _stop(self, err: WriteError) -> None:
        kept = (f"the last good checkpoint is round {self.last_checkpoint} ({self.dir / CHECKPOINT_NAME})"
                if self.last_checkpoint is not None else "no checkpoint was written yet")
        message = (f"{err}. The run stops here; its folder keeps everything written before, and {kept}. "
                   f"Free some space (or fix the folder), then continue with resume=true run-name='{self.dir.name}'")
        log.error("%s", message)
        self._close()
        raise WriteError(message, err.path, err.errno) from err


# Per-client figures (strategies.client_metrics): colour by model, line style by figure.
_PER_CLIENT_STYLE = {"mean": "--", "p10": ":", "p90": ":", "worst": "-."}
_PER_CLIENT_MODELS = (("", "global", "tab:purple"), ("personal_", "personal", "tab:green"))


def _plot_per_client(axes: Any, frame: pd.DataFrame) -> None:
    """Each client counted once: mean, 10th percentile and worst (accuracy; loss for regression)."""
    for metric, ax in (("accuracy", axes[1]), ("loss", axes[0])):
        for prefix, model, color in _PER_CLIENT_MODELS:
            for figure, style in _PER_CLIENT_STYLE.items():
                column = f"clients_{prefix}{metric}_{figure}"
                if column in frame and frame[column].notna().any():
                    ax.plot(frame["round"], frame[column], linestyle=style, color=color, linewidth=1.2,
                            label=f"{model} model, per client {figure}")


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
    _plot_per_client(axes, frame)
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
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
