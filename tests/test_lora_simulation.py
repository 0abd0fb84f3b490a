"""LoRA with 8-bit updates end to end through `flwr run` (Ray simulation): a tiny transformer built in the test.

Flower reports client failures as a completed run with exit code 0: the assertions are on metrics.csv and the
files the run wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.flwr_utils import run_simulation
from tests.lora_utils import make_encoder, write_sentences
from tests.strategy_utils import packed_nbytes

pytestmark = pytest.mark.slow


def test_lora_with_int8_updates_through_flwr_run(flwr_home: Path, tmp_path: Path) -> None:
    model = make_encoder(tmp_path / "encoder")
    data = write_sentences(tmp_path / "sentences", groups=3, per_group=60)
    out = tmp_path / "out" / "run"
    config = (
        f"dataset='text' data-path='{data}' hf-model='{model}' partitioner='natural' num-partitions=3 "
        "min-partition-size=5 max-length=16 batch-size=8 local-epochs=6 client-optimizer='adamw' learning-rate=0.01 "
        "lora-rank=4 send-delta=true compression='int8' num-server-rounds=3 fraction-evaluate=0.0 "
        f"min-fit-clients=3 min-available-clients=3 test-fraction=0.25 device='cpu' output-dir='{out.parent}' run-name='run'"
    )
    proc = run_simulation(flwr_home, config, num_supernodes=3, timeout=600)
    metrics_path = out / "metrics.csv"
    assert metrics_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    frame = pd.read_csv(metrics_path)
    assert list(frame["round"]) == [0, 1, 2, 3], proc.stdout[-3000:]
    trained = frame[frame["round"] > 0]
    assert (trained["results"] == 3).all() and (trained["failures"] == 0).all() and (trained["rejected"] == 0).all()
    # Adapters of 2 layers x (query, value), rank 4, width 32, plus the 2 x 32 head: int8 values and a scale each.
    shapes = [(4, 32), (32, 4)] * 4 + [(2, 32), (2,)]
    # The wire's bytes: the arrays packed into one buffer (pack-arrays, the default).
    upload = packed_nbytes([a for s in shapes for a in (np.zeros(int(np.prod(s)), np.int8), np.zeros(1, np.float32))])
    assert (trained["bytes_received_per_client"] == upload).all()
    assert (trained["bytes_sent_per_client"] == packed_nbytes([np.zeros(s, np.float32) for s in shapes])).all()  # float32 down
    assert frame["central_loss"].iloc[-1] < frame["central_loss"].iloc[0] - 0.1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
