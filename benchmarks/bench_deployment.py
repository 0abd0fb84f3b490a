"""Seconds per round of the default job: in simulation, in an insecure and in a secure deployment.

Run from the repository root (takes several minutes; nothing else should load the machine)::

    python -m benchmarks.bench_deployment --rounds 3 --supernodes 10

Settings, each the default run config (pyproject.toml) with ``num-server-rounds`` set to
``--rounds`` and ``--supernodes`` clients, all on localhost:

``simulation``
    a ``flower-superlink --simulation`` and ``flwr run`` (Ray actors live across rounds).
``insecure``
    README's one-machine deployment: ``flower-superlink --insecure`` and ``flower-supernode``s
    (subprocess isolation: each SuperNode starts its executor).
``secure``
    the commands of compose.yaml: nginx in front of the SuperLink (the SuperNodes through the Fleet
    listener, ``flwr run`` through the operator's), TLS on every connection, SuperNode and executor
    authentication, the SuperLink state in a database, executors started separately
    (``--isolation process``).
``secure-poll-0.1``
    ``secure`` with the executors polling for work every 0.1 s instead of 1 s
    (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), the one polling interval Flower lets us set.

Where a deployment round's time goes comes from the processes' time-stamped logs: per phase (fit,
evaluate) the wait until the first SuperNode pulls its message (the SuperNode polls every 3 s),
the time a SuperNode holds a message (executor poll, a fresh ``flwr-clientapp`` process, the
ClientApp's work), and the wait after the last reply (the ServerApp polls every 3 s). A cold
client is then timed in a fresh process, step by step (imports, data, model, fit, evaluate), and
``python -X importtime`` lists the biggest imports of ``flower_app.client_app``.

Writes ``benchmarks/results/deployment_rounds.csv`` (a row per setting and round),
``deployment_summary.csv``, ``deployment_phases.csv`` and ``deployment_cold_client.csv``
(``--tag -2nodes`` makes them ``deployment-2nodes_*.csv``). The machine's load average is recorded
with each setting: the figures are only comparable at a similar load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from deploy.local import (
    OPERATOR,
    ROOT,
    Cluster,
    Process,
    cluster,
    free_port,
    run_app,
    run_config_string,
    start_compose_deployment,
    write_connection,
)

log = logging.getLogger("bench_deployment")
SETTINGS = ("simulation", "insecure", "secure", "secure-poll-0.1")
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------- one setting each
def _simulation(group: Cluster, nodes: int, config: dict[str, Any]) -> Process:
    port = free_port()
    group.start("superlink", ["flower-superlink", "--insecure", "--simulation", "--host=127.0.0.1", f"--port={port}",
                              "--disable-runtime-dependency-installation"]).wait_for("Uvicorn running", 120)
    write_connection(group.home, "sim", f"127.0.0.1:{port}",
                     options={"num-supernodes": nodes, "backend.client-resources.num-cpus": 1})
    return run_app(group, "sim", run_config_string(config), timeout=3600)


def _insecure(group: Cluster, nodes: int, config: dict[str, Any]) -> Process:
    port = free_port()
    group.start("superlink", ["flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={port}",
                              "--disable-runtime-dependency-installation"]).wait_for("Uvicorn running", 120)
    write_connection(group.home, "local-deploy", f"127.0.0.1:{port}")
    for i in range(nodes):
        group.start(f"supernode-{i + 1}", ["flower-supernode", "--insecure", f"--superlink=127.0.0.1:{port}",
                                           f"--port={free_port()}", f"--node-config=partition-id={i} num-partitions={nodes}"])
    for i in range(nodes):
        group.procs[f"supernode-{i + 1}"].wait_for("SuperNode ID", 300)
    return run_app(group, "local-deploy", run_config_string(config), timeout=3600)


def _secure(group: Cluster, nodes: int, config: dict[str, Any], work: Path) -> Process:
    start_compose_deployment(group, work, nodes)
    return run_app(group, OPERATOR, run_config_string(config), timeout=3600)


def run_setting(setting: str, rounds: int, nodes: int, work: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Run the default job in one setting; returns its metrics.csv, its phase table and a summary row."""
    out = work / "out"  # output-dir/<run-name>
    config: dict[str, Any] = {"num-server-rounds": rounds, "output-dir": str(out.parent), "run-name": out.name,
                              "min-fit-clients": nodes, "min-available-clients": nodes}
    extra_env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"} if setting == "secure-poll-0.1" else {}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with cluster(work, extra_env) as group:
        if setting == "simulation":
            run = _simulation(group, nodes, config)
        elif setting == "insecure":
            run = _insecure(group, nodes, config)
        else:
            run = _secure(group, nodes, config, work)
        wall = time.perf_counter() - started
        metrics = pd.read_csv(out / "metrics.csv") if (out / "metrics.csv").exists() else pd.DataFrame()
        phases = phase_table(group, run) if setting != "simulation" else pd.DataFrame()
    if metrics.empty or metrics["round"].max() != rounds:
        raise RuntimeError(f"{setting}: the run did not finish its {rounds} rounds; logs in {work / 'logs'}")
    trained = metrics[metrics["round"] > 0]
    later = trained[trained["round"] > 1]["seconds"]
    summary = {
        "setting": setting, "supernodes": nodes, "rounds": rounds,
        "first_round_s": float(trained["seconds"].iloc[0]),
        "later_rounds_mean_s": float(later.mean()) if len(later) else float("nan"),
        "all_rounds_mean_s": float(trained["seconds"].mean()),
        "final_central_accuracy": float(trained["central_accuracy"].iloc[-1]),
        "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    metrics.insert(0, "setting", setting)
    if not phases.empty:
        phases.insert(0, "setting", setting)
    return metrics, phases, summary


# ------------------------------------------------------------------------------ the timeline
_MSG = re.compile(r"(Receiving|Sending): (train|evaluate) message")


def phase_table(group: Cluster, run: Process) -> pd.DataFrame:
    """Per round and phase: dispatch wait, time SuperNodes hold a message, collect wait (seconds)."""
    marks = {"fit": (r"configure_fit: strategy sampled", r"aggregate_fit: received"),
             "evaluate": (r"configure_evaluate: strategy sampled", r"aggregate_evaluate: received")}
    node_events: dict[str, list[tuple[float, str, str]]] = {}
    for name, proc in group.procs.items():
        if name.startswith("supernode-"):
            node_events[name] = [(t, m.group(1), m.group(2)) for t, line in proc.lines if (m := _MSG.search(line))]
    rows = []
    for phase, (begin, end) in marks.items():
        kind = "train" if phase == "fit" else "evaluate"
        starts, ends = run.find(begin), run.find(end)
        for rnd, ((t0, _), (t1, _)) in enumerate(zip(starts, ends), start=1):
            received = [t for ev in node_events.values() for t, what, k in ev if what == "Receiving" and k == kind and t0 <= t <= t1]
            sent = [t for ev in node_events.values() for t, what, k in ev if what == "Sending" and k == kind and t0 <= t <= t1]
            held = []
            for ev in node_events.values():
                r = [t for t, what, k in ev if what == "Receiving" and k == kind and t0 <= t <= t1]
                s = [t for t, what, k in ev if what == "Sending" and k == kind and t0 <= t <= t1]
                if r and s:
                    held.append(s[0] - r[0])
            if not received or not sent:
                continue
            rows.append({
                "round": rnd, "phase": phase, "phase_s": t1 - t0,
                "until_first_pull_s": min(received) - t0, "until_last_pull_s": max(received) - t0,
                "node_holds_mean_s": statistics.mean(held) if held else float("nan"),
                "node_holds_max_s": max(held) if held else float("nan"),
                "after_last_reply_s": t1 - max(sent),
            })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ a cold client
_COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import flower_app.client_app as ca
t1 = time.perf_counter()
from flwr.common import RecordDict
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.task import get_weights
cfg = parse_run_config({})
data = client_data(cfg, {"partition-id": 0, "num-partitions": int(sys.argv[1])})
t2 = time.perf_counter()
client = ca.FlowerClient(cfg, data, RecordDict())
weights = get_weights(client.model, client.spec)
dynamo_before = "torch._dynamo" in sys.modules
t3 = time.perf_counter()
client.fit(weights, {"server-round": 1})
t4 = time.perf_counter()
client.fit(weights, {"server-round": 1})  # the same work again, warm
t5 = time.perf_counter()
client.evaluate(weights, {"server-round": 1})
t6 = time.perf_counter()
print(json.dumps({"import_client_app_s": t1 - t0, "load_partition_s": t2 - t1, "build_model_s": t3 - t2,
                  "first_fit_s": t4 - t3, "second_fit_s": t5 - t4, "evaluate_s": t6 - t5,
                  "fit_imported_torch_dynamo": float(not dynamo_before and "torch._dynamo" in sys.modules)}))
"""


def cold_client(nodes: int, repeats: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Median step times of a ClientApp in a fresh process, and the biggest imports (-X importtime)."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _COLD, str(nodes)], cwd=ROOT, capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - start
        runs.append(row)
    steps = pd.DataFrame(runs).median().rename("median_s").to_frame()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flower_app.client_app"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    # Per top-level package, its outermost import's cumulative time (what importing it first cost,
    # its own imports included, so packages nest: torch includes numpy).
    top: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            name = m.group(2).split(".")[0]
            top[name] = max(top.get(name, 0.0), int(m.group(1)) / 1e6)
    ranked = sorted(((k, v) for k, v in top.items() if v >= 0.01), key=lambda kv: -kv[1])[:12]
    imports = pd.DataFrame(ranked, columns=["package", "cumulative_s"])
    return steps.reset_index(names="step"), imports


# -------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    parser.add_argument("--supernodes", type=int, default=10, help="clients, as in the default simulation (default 10)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh-process client timings (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs) and print their path")
    parser.add_argument("--tag", default="", help="suffix of the CSV names, e.g. '-2nodes' -> deployment-2nodes_rounds.csv")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from: {', '.join(SETTINGS)}")
    if args.rounds < 1 or args.supernodes < 2:
        parser.error("--rounds must be >= 1 and --supernodes >= 2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("make_certs").setLevel(logging.WARNING)
    logging.getLogger("prepare_host").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    rounds, phases, summary = [], [], []
    try:
        for setting in settings:
            log.info("%s: %d SuperNodes, %d rounds ...", setting, args.supernodes, args.rounds)
            metrics, table, row = run_setting(setting, args.rounds, args.supernodes, root / setting)
            rounds.append(metrics)
            phases.append(table)
            summary.append(row)
            log.info("%s: %.1f s per round (first %.1f s), wall %.0f s", setting, row["all_rounds_mean_s"],
                     row["first_round_s"], row["wall_s"])
        steps, imports = cold_client(args.supernodes, args.cold_repeats)
    finally:
        if args.keep:
            log.info("work directories (logs) kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    pd.concat(rounds).to_csv(args.out / f"deployment{args.tag}_rounds.csv", index=False)
    summary_frame = pd.DataFrame(summary)
    summary_frame.to_csv(args.out / f"deployment{args.tag}_summary.csv", index=False)
    phase_frame = pd.concat([p for p in phases if not p.empty]) if any(not p.empty for p in phases) else pd.DataFrame()
    phase_frame.to_csv(args.out / f"deployment{args.tag}_phases.csv", index=False)
    cold = pd.concat([steps.assign(kind="step"), imports.rename(columns={"package": "step", "cumulative_s": "median_s"})
                      .assign(kind="import")])
    cold.to_csv(args.out / f"deployment{args.tag}_cold_client.csv", index=False)
    pd.set_option("display.width", 200)
    print("\nSeconds per round of the default job (metrics.csv 'seconds'):")
    print(summary_frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if not phase_frame.empty:
        print("\nWhere a deployment round goes (mean over rounds, seconds):")
        print(phase_frame.groupby(["setting", "phase"]).mean(numeric_only=True).drop(columns="round")
              .to_string(float_format=lambda v: f"{v:.2f}"))
    print("\nA cold ClientApp in a fresh process (median seconds) and its biggest imports:")
    print(cold.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nCSV files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
