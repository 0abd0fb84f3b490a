"""Checkpoints: what a resumed run refuses, and that nothing is lost when it does."""

from __future__ import annotations

from pathlib import Path

import pytest

from flower_app.config import parse_run_config
from flower_app.inprocess import run_rounds
from flower_app.outputs import CHECKPOINT_NAME, CheckpointError
from flower_app.server_app import build_strategy
from tests.test_rule_oracles import clients, config


def _write_checkpoint(out: Path) -> dict:
    settings = {"num-server-rounds": 2, "model": "mlp", "hidden-size": 16, "local-epochs": 1}
    cfg = config(out, **settings)
    strategy, _ = build_strategy(cfg)
    run_rounds(strategy, clients(cfg), 1)
    assert (out / CHECKPOINT_NAME).exists()
    return settings


def test_missing_checkpoint_says_to_run_without_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at .*; run without resume first"):
        build_strategy(parse_run_config({"output-dir": str(tmp_path), "resume": True}))


def test_corrupt_checkpoint_is_reported_and_left_in_place(tmp_path: Path) -> None:
    settings = _write_checkpoint(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="is corrupt or not a checkpoint"):
        build_strategy(config(tmp_path, **settings, resume=True))
    assert path.stat().st_size == 100  # nothing overwritten: the evidence stays


def test_checkpoint_of_a_different_run_lists_the_differences(tmp_path: Path) -> None:
    settings = _write_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"strategy='fedavg' \(this run: 'fedadam'\)"):
        build_strategy(config(tmp_path, **{**settings, "strategy": "fedadam", "server-learning-rate": 0.01}, resume=True))
    with pytest.raises(CheckpointError, match=r"hidden-size=16 \(this run: 32\)"):
        build_strategy(config(tmp_path, **{**settings, "hidden-size": 32}, resume=True))


def test_a_file_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    import torch

    torch.save({"weights": [1, 2, 3]}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="is not a flower_app-checkpoint-v1 checkpoint"):
        build_strategy(parse_run_config({"output-dir": str(tmp_path), "resume": True}))
