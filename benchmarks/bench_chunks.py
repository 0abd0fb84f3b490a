"""Flower's object chunk size and a 100M-parameter model's deployed round: is the transport's CPU a knob away?

Run from the repository root (nothing else should load the machine)::

    python -m benchmarks.bench_chunks                       # 1, 5 (Flower's default) and 64 MiB
    python -m benchmarks.bench_chunks --chunks-mib 5,16 --rounds 3

Flower 1.42 splits every Array into chunks of ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` bytes (5 MiB)
and moves each chunk as one HTTP request per hop. For each size, the 100M model of
``bench_deployment`` (``benchmarks/large_model_app.py``) runs warm with 2 SuperNodes (the environment
variable set for every process of the deployment), and the table gives seconds a round after the
first and the CPU seconds a round of the SuperLink, the SuperNodes and the executors. Writes
``benchmarks/results/chunks.csv``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.bench_deployment import RESULTS, ROOT, Tree, large_model_job, load, run_setting
from benchmarks.large_model_app import large_app_dir, num_parameters

CHUNK_ENV = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"
MODEL = "mlp-stack-100m"
log = logging.getLogger("bench_chunks")


def chunk_row(mib: float, rounds: int, work: Path) -> dict[str, Any]:
    """One deployment of the 100M model with chunks of ``mib`` MiB: seconds and CPU seconds a round."""
    tree = Tree("branch", ROOT)
    app = large_app_dir(tree.path, work / "app")
    previous = os.environ.get(CHUNK_ENV)
    os.environ[CHUNK_ENV] = str(int(mib * 2**20))  # the deployment's processes inherit it
    try:
        result = run_setting("warm", rounds, 2, work / "run", tree, project=app, extra=large_model_job(MODEL),
                             model_bytes=4 * num_parameters(MODEL))
    finally:
        if previous is None:
            os.environ.pop(CHUNK_ENV, None)
        else:
            os.environ[CHUNK_ENV] = previous
    summary = result.summary
    return {"chunk_mib": mib, "later_rounds_mean_s": summary["later_rounds_mean_s"],
            **{k: v for k, v in summary.items() if k.endswith("_cpu_s_per_round")},
            "load_before": summary["load_before"], "load_after": summary["load_after"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks-mib", default="1,5,64", help="comma-separated chunk sizes in MiB (default 1,5,64)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds a deployment (default 4; the first is left out)")
    parser.add_argument("--out", type=Path, default=RESULTS / "chunks.csv")
    args = parser.parse_args(argv)
    sizes = [float(x) for x in args.chunks_mib.split(",") if x.strip()]
    if args.rounds < 2 or not sizes or min(sizes) <= 0:
        parser.error("--rounds must be >= 2 and every chunk size > 0 MiB")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    rows = []
    for mib in sizes:
        log.info("%s, chunks of %g MiB (load %.1f) ...", MODEL, mib, load())
        with tempfile.TemporaryDirectory(prefix="bench-chunks-") as work:
            rows.append(chunk_row(mib, args.rounds, Path(work)))
    frame = pd.DataFrame(rows)
    frame["flower_cpu_s_per_round"] = frame.get("superlink_cpu_s_per_round", 0) + frame.get("supernodes_cpu_s_per_round", 0)
    frame["uptime_at_start"] = uptime
    print(frame.drop(columns=["uptime_at_start"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"uptime at start: {uptime}\nCSV: {args.out}")


if __name__ == "__main__":
    main()
