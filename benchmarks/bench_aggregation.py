"""Aggregation speed and memory: this project's FedAvg against Flower's own.

For 10 client updates of a transformer-shaped model (embedding, attention and MLP matrices, norms)
of about 10M and 50M parameters, with random weights (identical chunks would be deduplicated by
Flower's transport and make nothing realistic), it times:

- ``flwr-aggregate``: `flwr.server.strategy.aggregate.aggregate` on the deserialized client arrays
  (what Flower's FedAvg does after `parameters_to_ndarrays`);
- ``blocked-mean``: this project's `blocked_weighted_mean` on the same arrays;
- ``flwr-fedavg-fit`` and ``ours-fedavg-fit``: the whole `aggregate_fit` of Flower's `FedAvg` and
  of `FederatedStrategy` (decode, validate, average, server step) from the same `FitRes` list;
  ``ours-fedavg-fit-unbounded`` is ours without the per-round bounds (``max-update-norm-ratio`` and
  ``max-count-ratio`` inf), the cost of the update-norm bound read from the same pass.

Each measurement runs in a fresh subprocess; peak extra memory is the process's peak RSS during
the call (VmHWM, reset through /proc/self/clear_refs) minus its RSS just before it, so inputs
already in memory are not counted. Seconds are the best of ``--repeats`` calls; GB/s is the bytes
of all client updates read divided by that time.

Run: ``python -m benchmarks.bench_aggregation [--sizes 10,50] [--clients 10] [--repeats 3]``.
Writes ``benchmarks/results/aggregation.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("flwr-aggregate", "blocked-mean", "flwr-fedavg-fit", "ours-fedavg-fit", "ours-fedavg-fit-unbounded")


def transformer_shapes(millions: float) -> list[tuple[int, ...]]:
    """Shapes of a GPT-style model with about ``millions`` M parameters (d_model 512, vocab 8k)."""
    d, vocab = 512, 8_192
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    per_layer = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    layer_size = sum(int(np.prod(s)) for s in per_layer)
    layers = max(1, round((millions * 1e6 - (vocab + 1024) * d) / layer_size))
    for _ in range(layers):
        shapes.extend(per_layer)
    return shapes + [(d,), (d,)]


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(method: str, millions: float, clients: int, repeats: int, threads: int) -> dict[str, float]:
    """Run in a child process: build inputs, then time and measure one method."""
    import torch

    torch.set_num_threads(threads)
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg
    from flwr.server.strategy.aggregate import aggregate

    from flower_app.inprocess import DetachedProxy
    from strategies.base import FederatedStrategy, StrategyOptions
    from strategies.streaming import blocked_weighted_mean

    shapes = transformer_shapes(millions)
    rng = np.random.default_rng(0)
    global_weights = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    num_params = sum(w.size for w in global_weights)
    examples = [int(n) for n in rng.integers(50, 500, clients)]
    results = []
    for i in range(clients):
        update = [w + np.float32(0.01) * rng.standard_normal(w.shape, dtype=np.float32) for w in global_weights]
        results.append((DetachedProxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), examples[i], {})))
        del update
    if method in ("flwr-aggregate", "blocked-mean"):
        arrays = [(parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results]
        results = []
    strategy = None

    def run() -> None:
        nonlocal strategy
        if method == "flwr-aggregate":
            aggregate(arrays)
        elif method == "blocked-mean":
            blocked_weighted_mean([a for a, _ in arrays], [float(n) for _, n in arrays])
        elif method == "flwr-fedavg-fit":
            FedAvg(initial_parameters=ndarrays_to_parameters(global_weights)).aggregate_fit(1, results, [])
        else:
            unbounded = {"max_update_norm_ratio": float("inf"), "max_count_ratio": float("inf")}
            options = StrategyOptions(**(unbounded if method.endswith("-unbounded") else {}))  # type: ignore[arg-type]
            strategy = FederatedStrategy(options, global_weights, [True] * len(global_weights))
            strategy.aggregate_fit(1, results, [])

    times, peaks = [], []
    for _ in range(repeats):
        before = _status_kib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        peaks.append(max(0, _status_kib("VmHWM") - before))
        strategy = None
    model_bytes = num_params * 4
    best = min(times)
    return {
        "parameters": num_params,
        "model_mb": model_bytes / 2**20,
        "seconds": best,
        "gb_per_s": model_bytes * clients / best / 1e9,
        # The first call's peak: later calls reuse memory the allocator kept and look smaller.
        "peak_extra_mb": peaks[0] / 1024,
        "peak_extra_models": peaks[0] * 1024 / model_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50", help="model sizes in millions of parameters")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numpy's aggregate uses one)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MILLIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], float(args.child[1]), args.clients, args.repeats, args.threads)))
        return
    import pandas as pd

    rows = []
    root = Path(__file__).resolve().parents[1]
    for size in (float(s) for s in args.sizes.split(",")):
        for method in METHODS:
            # A fixed mmap threshold makes glibc unmap freed arrays, so a later allocation shows up in
            # the RSS instead of silently reusing memory the input construction freed.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_aggregation", "--clients", str(args.clients),
                 "--repeats", str(args.repeats), "--threads", str(args.threads), "--child", method, str(size)],
                cwd=root, env=env, capture_output=True, text=True, check=True,
            )
            row = {"size_m": size, "method": method, "clients": args.clients, "threads": args.threads,
                   "load_1m": round(os.getloadavg()[0], 2), **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{size:>4.0f}M {method:<16} {row['seconds']:8.3f} s {row['gb_per_s']:6.2f} GB/s "
                  f"peak extra {row['peak_extra_mb']:8.1f} MB ({row['peak_extra_models']:.2f} models)", flush=True)
    frame = pd.DataFrame(rows)
    for size in frame["size_m"].unique():
        sub = frame[frame["size_m"] == size].set_index("method")
        for ours, theirs in (("blocked-mean", "flwr-aggregate"), ("ours-fedavg-fit", "flwr-fedavg-fit")):
            ratio = sub.loc[theirs, "seconds"] / sub.loc[ours, "seconds"]
            print(f"{size:>4.0f}M {ours} is {ratio:.1f}x faster than {theirs}")
            frame.loc[(frame["size_m"] == size) & (frame["method"] == ours), "speedup_vs_flower"] = ratio
        bound_cost = sub.loc["ours-fedavg-fit", "seconds"] / sub.loc["ours-fedavg-fit-unbounded", "seconds"]
        print(f"{size:>4.0f}M ours-fedavg-fit with the update-norm bound takes {bound_cost:.2f}x the time without")
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS / "aggregation.csv", index=False)
    print(f"wrote {RESULTS / 'aggregation.csv'}")


if __name__ == "__main__":
    main()
