"""What safe outputs cost: metrics.csv appended vs rewritten each round; checkpoints written atomically
with fsync and a checksum vs a plain torch.save, and loaded with field checks vs a plain torch.load.

    python -m benchmarks.bench_outputs [--rounds 1000] [--params 10000000 50000000] [--repeats 4]

Prints a table and writes benchmarks/results/outputs.csv. Runtime: about 2 minutes on a loaded 2-core
machine (most of it the 1000 whole-file rewrites and the 600 MB checkpoints).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flower_app.checkpoint import read_checkpoint, save_checkpoint, validate_checkpoint
from flower_app.config import AppConfig
from flower_app.rundir import append_line, atomic_write
from flower_app.task import WeightSpec

RESULTS = Path(__file__).resolve().parent / "results"


def row(rnd: int) -> dict[str, float]:
    """A metrics.csv row as wide as a real one (19 columns)."""
    rng = np.random.default_rng(rnd)
    return {"round": rnd, **{f"metric_{j}": float(rng.random()) for j in range(18)}}


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def metrics_case(rounds: int, work: Path) -> list[dict[str, object]]:
    """Whole-file atomic rewrite every round (the old way) vs one appended, fsynced line per round."""
    rows = [row(r) for r in range(rounds)]
    columns = list(rows[0])

    def rewrite() -> None:
        path = work / "rewrite.csv"
        for i in range(rounds):
            frame = pd.DataFrame(rows[: i + 1])
            atomic_write(path, lambda tmp, f=frame: f.to_csv(tmp, index=False))

    def append() -> None:
        path = work / "append.csv"
        path.unlink(missing_ok=True)
        atomic_write(path, lambda tmp: pd.DataFrame(rows[:1]).to_csv(tmp, index=False))
        for r in rows[1:]:
            append_line(path, pd.DataFrame([r], columns=columns).to_csv(header=False, index=False))

    out = []
    base = math.nan
    for name, fn in (("rewrite every round", rewrite), ("append a line", append)):
        seconds = timed(fn, 1)
        base = seconds if math.isnan(base) else base
        out.append({"case": f"metrics.csv, {rounds} rounds", "variant": name, "seconds": seconds,
                    "per_round_ms": 1e3 * seconds / rounds, "ratio": seconds / base})
    assert (work / "rewrite.csv").read_text() == (work / "append.csv").read_text()
    return out


def checkpoint_case(params: int, repeats: int, work: Path) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    shapes = [(params // 1000, 1000)]
    weights = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    state = {"round": 1, "weights": weights, "optimizer": {"step": 1, "m": [w * 0.1 for w in weights],
                                                          "v": [w * w for w in weights]}, "scaffold": None}
    spec = WeightSpec(("w",), tuple(shapes), (True,))
    cfg = AppConfig(num_server_rounds=10)
    plain_path, safe_path = work / "plain.pt", work / "safe.pt"

    def plain_save() -> None:  # what the first version did: temp file + rename, no fsync, no checksum
        tensors = {k: [torch.from_numpy(a) for a in state["optimizer"][k]] for k in ("m", "v")}
        payload = {"round": 1, "strategy": {"round": 1, "weights": [torch.from_numpy(w) for w in weights],
                                            "optimizer": {"step": 1, **tensors}, "scaffold": None}}
        tmp = work / ".plain.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, plain_path)

    def safe_save() -> None:
        save_checkpoint(safe_path, cfg, spec, state)

    def plain_load() -> None:
        torch.load(plain_path, map_location="cpu", weights_only=True)

    def safe_load() -> None:
        validate_checkpoint(read_checkpoint(safe_path), cfg, spec)

    mb = 3 * params * 4 / 1e6
    out = []
    case = f"checkpoint, {params / 1e6:g}M params x 3 arrays ({mb:.0f} MB)"
    for plain, safe in ((("save: torch.save + rename", plain_save), ("save: + checksum + fsync", safe_save)),
                        (("load: torch.load", plain_load), ("load: + checksum + field checks", safe_load))):
        plain[1](), safe[1]()  # both files exist and the page cache holds both before timing
        times: dict[str, list[float]] = {plain[0]: [], safe[0]: []}
        for i in range(repeats):  # alternate the order: writeback of one write slows the next
            for variant, fn in (plain, safe) if i % 2 == 0 else (safe, plain):
                times[variant].append(timed(fn, 1))
        base = statistics.median(times[plain[0]])
        for variant, ts in times.items():
            t = statistics.median(ts)
            out.append({"case": case, "variant": variant, "seconds": t, "per_round_ms": math.nan, "ratio": t / base})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--params", type=int, nargs="+", default=[10_000_000, 50_000_000])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench_outputs_") as tmp:  # a disk (fsync on tmpfs costs nothing)
        work = Path(tmp)
        rows += metrics_case(args.rounds, work)
        for params in args.params:
            rows += checkpoint_case(params, args.repeats, work)
    frame = pd.DataFrame(rows)
    frame["load_before"] = load_before
    frame["load_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "outputs.csv", index=False)
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(frame.drop(columns=["load_before", "load_after"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
