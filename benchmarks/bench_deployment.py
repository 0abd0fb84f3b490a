"""Where a deployed round's time goes, and what each of issue 12's levers buys: before and after, in one run.

Run from the repository root (nothing else should load the machine; record the load anyway)::

    python -m benchmarks.bench_deployment --quick      # about 10-20 minutes on 2 cores
    python -m benchmarks.bench_deployment              # everything: 2 and 10 SuperNodes, 10M and 100M models

Every table compares this tree ("branch") with a baseline tree of the app ("base", by default the
commit before issue 12, checked out into a temporary git worktree; ``--baseline PATH`` uses a tree
you have, ``--baseline none`` skips it), measured in the same run on the same machine, and records
the load average (``uptime``) next to every figure. Absolute seconds depend on the machine and its
load; the ratios are what carries over.

Tables (each printed and written as ``benchmarks/results/deployment<tag>_<table>.csv``):

``rounds``
    seconds per round of the default job (digits CNN, 2 local epochs, federated evaluation) per
    tree, setting and number of SuperNodes. Settings: ``simulation`` (``flower-superlink
    --simulation``), ``insecure`` (README's one-machine deployment: subprocess isolation),
    ``secure`` (compose.yaml's commands: nginx, TLS, SuperNode and executor authentication,
    database, process isolation; its SuperNodes' executors are the image's ``flower-app-superexec``),
    ``secure-poll-0.1`` (executors polling every 0.1 s), and the branch's ``insecure-separate``
    (``federated-evaluation='separate'``: an evaluate message per client and round, as before) and
    ``warm`` (``insecure`` with ``--isolation process`` and ``deploy/superexec.py`` beside each
    SuperNode: every ClientApp process forked from a warm fork server), and ``warm-per-tensor``
    (``warm`` with ``pack-arrays=false``: one Flower Array a tensor instead of one packed buffer a
    message). Each row also has the CPU seconds a round of the SuperLink, the SuperNodes and the
    executors (their whole run's CPU time over its rounds).
``phases``
    per round and phase (fit, evaluate) from the processes' time-stamped logs: the wait until the
    first and the last SuperNode pull their message (SuperNodes poll every 3 s; the last pull also
    shows a sender pool smaller than the cohort), how long a SuperNode holds a message, and the wait
    after the last reply (the ServerApp polls every 3 s).
``messages``
    where a SuperNode's time with one message goes, phase -> seconds (mean over messages), from a
    time-stamping stand-in for ``flwr-clientapp`` (``benchmarks/clientapp_probe.py``, put first on
    the SuperNodes' PATH): executor poll and fork, Python start-up, Flower's ``flwr-clientapp``
    imports, pulling the message, context, run and FAB, unpacking the FAB, importing the app,
    building the client (config, data, model), the fit or evaluate itself, Flower's reply
    conversion, pushing the reply, the SuperNode's next look for it, and the process's exit. For
    ``warm``, from ``flower-app-superexec``'s log: each warm process's seconds (fork to exit) and
    CPU seconds.
``cold``
    a cold ClientApp in a fresh process, step by step (median of ``--cold-repeats``), per tree,
    next to bare ``python -c "import torch, flwr"`` (alone, and two at once as two SuperNodes' clients
    start) and Flower's own ``flwr-clientapp`` imports; the goal lines compare a deployed fit message
    (spawn to exit; for ``warm``, fork to exit) with the bare import.
``imports``
    the biggest imports of ``flower_app.client_app`` (``python -X importtime``) per tree.
``levers``
    each lever's gain as a ratio measured in this run: the client's own imports, the node's data
    cache, the hand-written SGD step (no ``torch._dynamo``), the thread policy (two clients training
    at once), federated evaluation in the fit message, warm processes and packed arrays (round
    seconds), the sender pool sized to the cohort (the last SuperNode's pull with 10 SuperNodes),
    and the copies between torch, NumPy and Flower's records for a 100M-parameter model (bytes
    written and peak memory of the client's conversion path).
``models``
    10M- and 100M-parameter transformer-like MLP stacks (``benchmarks/large_model_app.py``), 2
    SuperNodes: seconds per round and useful GB/s (model bytes sent and received per round over the
    round's seconds) deployed (``insecure`` and ``warm``) and in simulation, and the same models with
    a minimal stock-Flower app (``benchmarks/stock_app.py``: FedAvg and a NumPyClient) deployed the
    ``insecure`` way, in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from deploy.local import (
    BIN,
    OPERATOR,
    ROOT,
    Cluster,
    Process,
    cluster,
    free_port,
    run_app,
    run_config_string,
    start_compose_deployment,
    start_local_deployment,
    write_connection,
)

log = logging.getLogger("bench_deployment")
SETTINGS = ("simulation", "insecure", "insecure-separate", "warm", "warm-per-tensor", "secure", "secure-poll-0.1")
RESULTS = ROOT / "benchmarks" / "results"
BASELINE_REF = "966ad3b"  # main before issue 12 (the merge of branch 'strat')
PROBE = ROOT / "benchmarks" / "clientapp_probe.py"


@dataclass(frozen=True)
class Tree:
    """An app tree to run: this branch or the baseline."""

    label: str
    path: Path

    @property
    def has_speed_keys(self) -> bool:
        """Whether this tree knows issue 12's run-config keys (data-cache-dir, federated-evaluation)."""
        return (self.path / "flower_app" / "threads.py").exists()


def load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------- baseline tree
def baseline_tree(spec: str, work: Path) -> tuple[Tree | None, Path | None]:
    """(the baseline tree, the worktree to remove afterwards) from ``--baseline``: none, a path, or a git ref."""
    if spec == "none":
        return None, None
    if Path(spec).is_dir():
        return Tree("base", Path(spec).resolve()), None
    dest = work / "baseline-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dest), spec], check=True,
                   capture_output=True, text=True)
    return Tree("base", dest), dest


def remove_worktree(path: Path | None) -> None:
    if path is not None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False,
                       capture_output=True, text=True)


# --------------------------------------------------------------------------- the probe (shim)
def probe_env(work: Path) -> dict[str, str]:
    """PATH and folder for `clientapp_probe`: the SuperNodes' executors launch it as `flwr-clientapp`."""
    shim, out = work / "shim", work / "probe"
    shim.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    script = shim / "flwr-clientapp"
    script.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(PROBE)!r}, run_name='__main__')\n")
    script.chmod(0o755)
    return {"PATH": f"{shim}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLOWER_APP_PROBE_DIR": str(out)}


# Step -> (start mark, end mark) in a probe record; "received"/"sending" come from the SuperNode's log.
MESSAGE_STEPS = (
    ("executor poll + fork", "received", "spawned"),
    ("python start-up", "spawned", "python_up"),
    ("flwr-clientapp imports", "python_up", "flwr_imported"),
    ("pull message, context, run, FAB", "flwr_imported", "pulled"),
    ("unpack FAB", "pulled", "fab_installed"),
    ("import the app", "fab_installed", "app_loaded"),
    ("build client (config, threads, data, model)", "app_loaded", "client_built"),
    ("fit / evaluate", "client_built", "work_done"),
    ("Flower's reply conversion", "work_done", "app_done"),
    ("push reply", "app_done", "pushed"),
    ("SuperNode notices the reply", "pushed", "sending"),
    ("process exit after push", "pushed", "exited"),
)


def message_records(group: Cluster, probe_dir: Path) -> pd.DataFrame:
    """One row per ClientApp process: its message type, node and every step's seconds."""
    records = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("*.json"))]
    by_port: dict[str, list[tuple[float, str, str]]] = {}
    for name, proc in group.procs.items():
        port = next((m.group(1) for a in proc.argv if (m := re.search(r"--port=(\d+)", a))), None)
        if port is None or not name.startswith(("supernode", "clientapp")):
            continue
        node = name if name.startswith("supernode") else name.replace("clientapp", "supernode")
        events = [(t, m.group(1), m.group(2)) for t, line in group.procs[node].lines if (m := _MSG.search(line))]
        by_port[port] = events
    rows = []
    for rec in records:
        t = dict(rec["t"])
        port = next((a.rsplit(":", 1)[-1] for a in rec.get("argv", []) if re.search(r":\d+$", a)), "")
        kind = "train" if rec.get("message_type", "").startswith("train") else "evaluate"
        events = by_port.get(port, [])
        spawned = t.get("spawned", math.nan)
        received = [ts for ts, what, k in events if what == "Receiving" and k == kind and ts <= spawned + 0.05]
        sending = [ts for ts, what, k in events if what == "Sending" and k == kind and ts >= t.get("pushed", math.inf) - 0.05]
        if received:
            t["received"] = max(received)
        if sending:
            t["sending"] = min(sending)
        row: dict[str, Any] = {"message": "fit" if kind == "train" else "evaluate", "port": port, "spawned": spawned,
                               "total_s": t.get("exited", math.nan) - spawned}
        for step, start, end in MESSAGE_STEPS:
            row[step] = t[end] - t[start] if start in t and end in t else math.nan
        rows.append(row)
    return pd.DataFrame(rows).sort_values("spawned") if rows else pd.DataFrame()


# ---------------------------------------------------------------------------- one setting each
def _default_config(rounds: int, nodes: int, out: Path, tree: Tree, work: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"num-server-rounds": rounds, "output-dir": str(out.parent), "run-name": out.name,
                              "min-fit-clients": nodes, "min-available-clients": nodes}
    if tree.has_speed_keys:
        config["data-cache-dir"] = str(work / "data-cache")  # starts empty: round 1 prepares the data
    return config


def _simulation(group: Cluster, nodes: int, config: dict[str, Any], project: Path) -> Process:
    port = free_port()
    link = group.start("superlink", ["flower-superlink", "--insecure", "--simulation", "--host=127.0.0.1",
                                     f"--port={port}", "--disable-runtime-dependency-installation"])
    link.wait_for("Uvicorn running", 120)
    write_connection(group.home, "sim", f"127.0.0.1:{port}",
                     options={"num-supernodes": nodes, "backend.client-resources.num-cpus": 1})
    return run_app(group, "sim", run_config_string(config), timeout=3600, project=project)


def _insecure(group: Cluster, nodes: int, config: dict[str, Any], project: Path, warm: bool = False) -> Process:
    """README's one-machine deployment; ``warm``: each SuperNode in ``--isolation process`` beside a ``flower-app-superexec``."""
    connection = start_local_deployment(group, nodes, warm=warm)
    return run_app(group, connection, run_config_string(config), timeout=3600, project=project)


def _secure(group: Cluster, nodes: int, config: dict[str, Any], work: Path, project: Path) -> Process:
    start_compose_deployment(group, work, nodes)
    return run_app(group, OPERATOR, run_config_string(config), timeout=3600, project=project)


@dataclass
class SettingResult:
    metrics: pd.DataFrame
    phases: pd.DataFrame
    messages: pd.DataFrame
    summary: dict[str, Any]


def run_setting(setting: str, rounds: int, nodes: int, work: Path, tree: Tree, project: Path | None = None,
                extra: dict[str, Any] | None = None, model_bytes: int = 0) -> SettingResult:
    """Run a job in one setting with ``tree``'s app (or ``project``, a copy of it); metrics, phases, messages, summary."""
    out = work / "out"
    config = {**_default_config(rounds, nodes, out, tree, work), **(extra or {})}
    if setting == "insecure-separate":
        config["federated-evaluation"] = "separate"
    if setting == "warm-per-tensor":  # the packed-arrays lever off: one Flower Array per tensor, as Flower's format
        config["pack-arrays"] = False
    extra_env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"} if setting == "secure-poll-0.1" else {}
    if setting != "simulation":
        extra_env.update(probe_env(work))
    load_before, started = load(), time.perf_counter()
    project = project or tree.path
    with cluster(work, extra_env) as group:
        if setting == "simulation":
            _simulation(group, nodes, config, project)
        elif setting.startswith(("insecure", "warm")):
            _insecure(group, nodes, config, project, warm=setting.startswith("warm"))
        else:
            _secure(group, nodes, config, work, project)
        wall = time.perf_counter() - started
        metrics = pd.read_csv(out / "metrics.csv") if (out / "metrics.csv").exists() else pd.DataFrame()
        phases = phase_table(group) if setting != "simulation" else pd.DataFrame()
        messages = (warm_records(group) if setting.startswith("warm") else message_records(group, work / "probe")
                    if setting != "simulation" else pd.DataFrame())
        cpu = cpu_seconds(group)  # before the processes end
    if metrics.empty or metrics["round"].max() != rounds:
        raise RuntimeError(f"{tree.label} {setting}: the run did not finish its {rounds} rounds; logs in {work / 'logs'}")
    trained = metrics[metrics["round"] > 0]
    later = trained[trained["round"] > 1]["seconds"]
    mean_later = float(later.mean()) if len(later) else float("nan")
    summary = {
        "tree": tree.label, "setting": setting, "supernodes": nodes, "rounds": rounds,
        "first_round_s": float(trained["seconds"].iloc[0]), "later_rounds_mean_s": mean_later,
        "all_rounds_mean_s": float(trained["seconds"].mean()),
        "final_central_accuracy": float(trained["central_accuracy"].iloc[-1]),
        "wall_s": wall, "load_before": load_before, "load_after": load(),
        # CPU seconds a round (the whole run's over its rounds) of Flower's long-lived processes
        **{f"{kind}_cpu_s_per_round": seconds / rounds for kind, seconds in cpu.items()},
    }
    if model_bytes:
        seconds = mean_later if math.isfinite(mean_later) else summary["all_rounds_mean_s"]
        summary["model_mb"] = model_bytes / 1e6
        summary["useful_gb_per_s"] = 2 * nodes * model_bytes / seconds / 1e9  # sent to and back from each client
    for frame in (metrics, phases, messages):
        if not frame.empty:
            frame.insert(0, "setting", setting)
            frame.insert(0, "tree", tree.label)
    return SettingResult(metrics, phases, messages, summary)


def stock_flower_row(model: str, rounds: int, work: Path, model_bytes: int) -> dict[str, Any]:
    """The same model with a minimal stock-Flower app (benchmarks/stock_app.py), README's insecure deployment.

    Seconds per round = the fit phase from the ServerApp's log (the stock app has no metrics.csv and
    no evaluation), mean over the rounds after the first.
    """
    from benchmarks.stock_app import stock_app_dir

    load_before = load()
    with cluster(work, {}) as group:
        _insecure(group, 2, {"num-server-rounds": rounds, "model": model}, stock_app_dir(work / "app"))
        phases = phase_table(group)
    fits = phases[phases["phase"] == "fit"] if not phases.empty else phases
    if len(fits) != rounds:
        return {"model": model, "tree": "stock-flower", "setting": "insecure",
                "error": f"{len(fits)} of {rounds} fit rounds; logs in {work / 'logs'}"}
    later = float(fits[fits["round"] > 1]["phase_s"].mean())
    return {"model": model, "tree": "stock-flower", "setting": "insecure", "supernodes": 2, "rounds": rounds,
            "first_round_s": float(fits["phase_s"].iloc[0]), "later_rounds_mean_s": later,
            "all_rounds_mean_s": float(fits["phase_s"].mean()), "load_before": load_before, "load_after": load(),
            "model_mb": model_bytes / 1e6, "useful_gb_per_s": 4 * model_bytes / later / 1e9}


def large_model_job(model: str) -> dict[str, Any]:
    """The run config of a large-model round (``benchmarks/large_model_app.py``'s ``model``, 2 clients)."""
    return {"model": model, "dataset": "synthetic", "num-partitions": 2, "num-samples": 200, "batch-size": 64,
            "local-epochs": 1, "fraction-evaluate": 0.0}


def cpu_seconds(group: Cluster) -> dict[str, float]:
    """CPU seconds (user + system) so far of the cluster's SuperLink, SuperNodes and executors, by kind."""
    tick = os.sysconf("SC_CLK_TCK")
    kinds = {"superlink": "superlink", "supernode": "supernodes", "clientapp": "executors"}
    out: dict[str, float] = {}
    for name, proc in group.procs.items():
        kind = next((label for prefix, label in kinds.items() if name.startswith(prefix)), None)
        if kind is None:
            continue
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


# ------------------------------------------------------------------------------ the timeline
_MSG = re.compile(r"(Receiving|Sending): (train|evaluate) message")


def phase_table(group: Cluster) -> pd.DataFrame:
    """Per round and phase: dispatch wait, time SuperNodes hold a message, collect wait (seconds).

    The ServerApp's lines are read from the process that printed them (the SuperLink in subprocess
    isolation, the ServerApp executor in process isolation), time-stamped as they arrived.
    """
    marks = {"fit": (r"configure_fit: strategy sampled", r"aggregate_fit: received"),
             "evaluate": (r"configure_evaluate: strategy sampled", r"aggregate_evaluate: received")}
    server = next((p for p in group.procs.values() if p.find(marks["fit"][0])), None)
    if server is None:
        return pd.DataFrame()
    node_events: dict[str, list[tuple[float, str, str]]] = {}
    for name, proc in group.procs.items():
        if name.startswith("supernode-"):
            node_events[name] = [(t, m.group(1), m.group(2)) for t, line in proc.lines if (m := _MSG.search(line))]
    rows = []
    for phase, (begin, end) in marks.items():
        kind = "train" if phase == "fit" else "evaluate"
        for (t0, _), (t1, _) in zip(server.find(begin), server.find(end)):
            received, sent, held = [], [], []
            for ev in node_events.values():
                r = [t for t, what, k in ev if what == "Receiving" and k == kind and t0 <= t <= t1]
                s = [t for t, what, k in ev if what == "Sending" and k == kind and t0 <= t <= t1]
                received += r
                sent += s
                if r and s:
                    held.append(s[0] - r[0])
            if not received or not sent:
                continue
            rows.append({
                "round": len([r for r in rows if r["phase"] == phase]) + 1, "phase": phase, "phase_s": t1 - t0,
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
args = json.loads(sys.argv[1])
import torch
import flower_app.client_app as ca
t1 = time.perf_counter()
node_config = {"partition-id": args.get("partition", 0), "num-partitions": args["nodes"]}
try:  # as build_client does: the node's torch-threads (the baseline has no thread policy: torch's default)
    from flower_app.threads import apply_threads
    apply_threads({**node_config, "torch-threads": args["threads"]} if args.get("threads") else node_config)
except ImportError:
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
from flwr.common import RecordDict
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.task import get_weights
if args.get("torch_optim"):  # the lever off: torch.optim's SGD (its first call imports torch._dynamo)
    import flower_app.task as task
    task.make_optimizer = lambda params, o: torch.optim.SGD(params, lr=o.learning_rate, momentum=o.momentum,
                                                            weight_decay=o.weight_decay)
cfg = parse_run_config(args["run_config"])
data = client_data(cfg, node_config)
t2 = time.perf_counter()
client = ca.FlowerClient(cfg, data, RecordDict())
weights = [w.copy() for w in get_weights(client.model, client.spec)]
dynamo_before = "torch._dynamo" in sys.modules
t3 = time.perf_counter()
client.fit(weights, {"server-round": 1})
t4 = time.perf_counter()
client.fit(weights, {"server-round": 1})  # the same work again, warm
t5 = time.perf_counter()
client.evaluate(weights, {"server-round": 1})
t6 = time.perf_counter()
print(json.dumps({"import flower_app.client_app": t1 - t0, "load partition": t2 - t1, "build model": t3 - t2,
                  "first fit": t4 - t3, "second fit (warm)": t5 - t4, "evaluate": t6 - t5,
                  "fit imported torch._dynamo": float(not dynamo_before and "torch._dynamo" in sys.modules),
                  "torch threads": torch.get_num_threads()}))
"""


def _env_for(tree: Tree) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree.path)}


def cold_runs(tree: Tree, args: dict[str, Any], repeats: int, at_once: int = 1) -> pd.DataFrame:
    """``repeats`` x ``at_once`` fresh client processes (``at_once`` started together); one row each."""
    rows = []
    for _ in range(repeats):
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _COLD, json.dumps({**args, "partition": i % args["nodes"]})],
                                  cwd=tree.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env_for(tree)) for i in range(at_once)]
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"cold client ({tree.label}, {args}) failed:\n{err[-3000:]}")
            row = json.loads(out.strip().splitlines()[-1])
            row["process"] = time.perf_counter() - started
            rows.append(row)
    return pd.DataFrame(rows)


def timed_process(code: str, repeats: int, at_once: int = 1, env: dict[str, str] | None = None) -> float:
    """Median seconds from spawn to exit of ``python -c code`` (``at_once`` started together: each one's time)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env or dict(os.environ)) for _ in range(at_once)]
        for proc in procs:
            proc.wait(timeout=600)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def import_table(tree: Tree) -> pd.DataFrame:
    """The biggest imports of flower_app.client_app (-X importtime), per top-level package, outermost cumulative."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flower_app.client_app"], cwd=tree.path,
                          capture_output=True, text=True, check=True, env=_env_for(tree))
    top: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            name = m.group(2).split(".")[0]
            top[name] = max(top.get(name, 0.0), int(m.group(1)) / 1e6)
    ranked = sorted(((k, v) for k, v in top.items() if v >= 0.01), key=lambda kv: -kv[1])[:12]
    return pd.DataFrame([{"tree": tree.label, "package": k, "cumulative_s": v} for k, v in ranked])


def own_import_seconds(tree: Tree, repeats: int) -> float:
    """Median seconds to import flower_app.client_app once torch and Flower's flwr-clientapp are imported."""
    code = ("import time, torch, flwr.supernode.cli.flwr_clientapp\nt = time.perf_counter()\n"
            "import flower_app.client_app\nprint(time.perf_counter() - t)")
    values = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], cwd=tree.path, capture_output=True, text=True, check=True,
                             env=_env_for(tree))
        values.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(values)


# ------------------------------------------------------------------------- copies (large model)
_COPIES = r"""
import json, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
sys.path.insert(0, args["bench"])
from large_model_app import MLPStack, SIZES
from flwr.common import FitIns, Parameters
import flower_app.client_app as ca
try:
    from strategies.serde import npy_bytes  # this tree
except ImportError:
    npy_bytes = ca.npy_bytes  # a baseline before the packed format, where it lived in client_app
from flower_app.task import ModelInfo, weight_spec, get_weights
width, blocks = SIZES[args["model"]]
info = ModelInfo("classification", (60,), 10)
torch.manual_seed(0)
model = MLPStack(60, 10, width, blocks)
spec = weight_spec(model)
rng = np.random.default_rng(1)
tensors = [npy_bytes(rng.standard_normal(s, dtype=np.float32)) for s in spec.shapes]  # one array alive at a time
ins = FitIns(Parameters(tensors=tensors, tensor_type="numpy.ndarray"), {"server-round": 1})  # what Flower hands over
del tensors

class Holder(ca.NumPyClient):  # the client's own conversions only: load the model, send it back
    def fit(self, parameters, config):
        ca.set_weights(model, spec, parameters)
        return get_weights(model, spec), 1, {}
def status(field):  # kB -> bytes, from /proc/self/status (VmRSS now, VmHWM the peak since the last reset)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: reset the peak (VmHWM) to the current RSS
t0 = time.perf_counter()
if args["client"] == "array":
    res = ca.ArrayClient(Holder()).fit(ins)
else:
    res = Holder().to_client().fit(ins)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
model_bytes = sum(int(np.prod(s)) * 4 for s in spec.shapes)
print(json.dumps({"seconds": seconds, "peak_growth_models": max(0, peak - before) / model_bytes,
                  "model_mb": model_bytes / 1e6}))
"""


def copies_table(tree: Tree, model: str, repeats: int) -> pd.DataFrame:
    """The client's conversion path for one fit of a large model: ArrayClient vs Flower's NumPyClient wrapper."""
    rows = []
    for client, bytes_copied in (("numpy", 4), ("array", 2)):
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", _COPIES, json.dumps({"model": model, "client": client,
                                                                             "bench": str(ROOT / "benchmarks")})],
                                 cwd=tree.path, capture_output=True, text=True, check=True, env=_env_for(tree))
            row = json.loads(out.stdout.strip().splitlines()[-1])
            # Model-sized copies by construction (per fit, receive + send): Flower's NumPyClient wrapper: np.load of
            # the message bytes, copy into the model, np.save into a BytesIO, getvalue (4; the baseline's get_weights
            # copied once more: 5); ArrayClient: into the model from a view of the bytes, one write into the reply (2).
            rows.append({"client": client, "model": model, "model_copies_by_design": bytes_copied, **row})
    frame = pd.DataFrame(rows)
    return frame.groupby(["client", "model"], as_index=False).median(numeric_only=True)


# ----------------------------------------------------------------------------------- tables
_WARM = re.compile(r"Warm ClientApp process (\d+): ([0-9.]+) s, ([0-9.]+) s CPU")


def warm_records(group: Cluster) -> pd.DataFrame:
    """One row per warm ClientApp process (flower-app-superexec's log): message type, seconds, CPU seconds.

    Its message is the last one its SuperNode received before the process started.
    """
    rows = []
    for name, proc in group.procs.items():
        if not name.startswith("clientapp-"):
            continue
        node = name.replace("clientapp", "supernode")
        received = [(t, m.group(2)) for t, line in group.procs[node].lines
                    if (m := _MSG.search(line)) and m.group(1) == "Receiving"] if node in group.procs else []
        for ended, line in proc.lines:
            if not (m := _WARM.search(line)):
                continue
            wall, cpu = float(m.group(2)), float(m.group(3))
            before = [kind for t, kind in received if t <= ended - wall + 0.05]
            rows.append({"message": "fit" if before and before[-1] == "train" else "evaluate", "port": node,
                         "spawned": ended - wall, "total_s": wall, "warm process CPU": cpu})
    return pd.DataFrame(rows).sort_values("spawned") if rows else pd.DataFrame()


def message_summary(messages: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per step, per tree, setting and message type (phase -> seconds)."""
    if messages.empty:
        return pd.DataFrame()
    steps = [s for s, _, _ in MESSAGE_STEPS] + ["warm process CPU", "total_s"]
    messages = messages.reindex(columns=[*messages.columns.drop(steps, errors="ignore"), *steps])
    table = messages.groupby(["tree", "setting", "supernodes", "message"])[steps].mean().T
    return table


class Tables(dict[str, pd.DataFrame]):
    """The run's tables; each is written to its CSV as soon as it is set (a later failure keeps it), with `uptime`."""

    def __init__(self, out: Path, tag: str) -> None:
        super().__init__()
        self.out, self.tag = out, tag

    def __setitem__(self, name: str, table: pd.DataFrame) -> None:
        super().__setitem__(name, table)
        if not table.empty:
            now = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
            if isinstance(table.columns, pd.MultiIndex):  # messages: tree / setting / supernodes / message
                table = table.set_axis([" / ".join(map(str, c)) for c in table.columns], axis=1)
            table.assign(uptime=now).to_csv(self.out / f"deployment{self.tag}_{name}.csv",
                                            index=name in ("messages", "cold"))


def ratio(before: float, after: float) -> float:
    return before / after if after and math.isfinite(after) and math.isfinite(before) else float("nan")


# -------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 SuperNodes, 3 rounds, settings simulation/insecure/insecure-separate, the 10M model")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 4; --quick 3)")
    parser.add_argument("--supernodes", default=None, help="comma-separated counts (default 2,10; --quick 2)")
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated subset of {', '.join(SETTINGS)} (default simulation,insecure,insecure-separate,warm,warm-per-tensor)")
    parser.add_argument("--models", default=None, help="large models, comma-separated of mlp-stack-10m, mlp-stack-100m, "
                        "or none (default both; --quick mlp-stack-10m)")
    parser.add_argument("--baseline", default=BASELINE_REF,
                        help=f"the 'before' app: a git ref (checked out into a temporary worktree), a folder, or none "
                        f"(default {BASELINE_REF}, main before issue 12)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh-process client timings (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs) and print their path")
    parser.add_argument("--rounds-only", action="store_true",
                        help="only the settings' tables (rounds, phases, messages): no cold clients, levers or models")
    parser.add_argument("--tag", default="", help="suffix of the CSV names, e.g. '-quick' -> deployment-quick_rounds.csv")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 4)
    counts = [int(n) for n in (args.supernodes or ("2" if args.quick else "2,10")).split(",")]
    settings = [s.strip() for s in (args.settings or "simulation,insecure,insecure-separate,warm,warm-per-tensor").split(",")
                if s.strip()]
    models = [m for m in (args.models or ("mlp-stack-10m" if args.quick else "mlp-stack-10m,mlp-stack-100m")).split(",")
              if m and m != "none"]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from: {', '.join(SETTINGS)}")
    if rounds < 2 or min(counts) < 2:
        parser.error("--rounds must be >= 2 (round 1 prepares the data; later rounds are the steady state) and "
                     "--supernodes >= 2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("make_certs", "prepare_host"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    branch = Tree("branch", ROOT)
    base, worktree = baseline_tree(args.baseline, root)
    trees = [t for t in (base, branch) if t is not None]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    log.info("uptime at start: %s", uptime)
    results: list[SettingResult] = []
    tables = Tables(args.out, args.tag)
    try:
        # ---- rounds, phases, messages: the default job
        for nodes in counts:
            for setting in settings:
                for tree in trees:
                    if setting in ("insecure-separate", "warm", "warm-per-tensor") and not tree.has_speed_keys:
                        continue  # the baseline's only mode is 'insecure'
                    log.info("%s %s: %d SuperNodes, %d rounds (load %.1f) ...", tree.label, setting, nodes, rounds, load())
                    result = run_setting(setting, rounds, nodes, root / f"{tree.label}-{setting}-{nodes}", tree)
                    for frame in (result.phases, result.messages):
                        if not frame.empty:
                            frame.insert(2, "supernodes", nodes)
                    results.append(result)
                    log.info("  %.1f s per round (first %.1f s, later %.1f s)", result.summary["all_rounds_mean_s"],
                             result.summary["first_round_s"], result.summary["later_rounds_mean_s"])
                    tables["rounds"] = pd.DataFrame([r.summary for r in results])
                    phase_frames = [r.phases for r in results if not r.phases.empty]
                    tables["phases"] = pd.concat(phase_frames) if phase_frames else pd.DataFrame()
                    message_frames = [r.messages for r in results if not r.messages.empty]
                    messages = pd.concat(message_frames) if message_frames else pd.DataFrame()
                    tables["messages"] = message_summary(messages)

        if not args.rounds_only:
            # ---- the cold client, bare imports, the import list
            log.info("cold clients (load %.1f) ...", load())
            cold_rows = []
            nodes = counts[0]
            cores = os.cpu_count() or 1
            auto_threads = max(1, cores // nodes)  # what torch-threads=auto gives with `nodes` SuperNodes on this host
            for tree in trees:
                run_config: dict[str, Any] = {}
                cold_args: dict[str, Any] = {"nodes": nodes, "run_config": run_config}
                if tree.has_speed_keys:
                    run_config["data-cache-dir"] = str(root / "cold-cache")
                    cold_args["threads"] = auto_threads
                    cold_runs(tree, cold_args, 1)  # prepares the node cache
                frame = cold_runs(tree, cold_args, args.cold_repeats)
                cold_rows.append(frame.median().rename(tree.label))
            cold = pd.concat(cold_rows, axis=1)
            bare = {
                'python -c "import torch, flwr" (alone)': timed_process("import torch, flwr", args.cold_repeats),
                'python -c "import torch, flwr" (two at once)': timed_process("import torch, flwr", args.cold_repeats, 2),
                "flwr-clientapp's imports + torch (alone)": timed_process(
                    "import torch, flwr.supernode.cli.flwr_clientapp", args.cold_repeats),
            }
            for name, seconds in bare.items():
                cold.loc[name] = seconds
            fits = messages[(messages["message"] == "fit") & (messages["setting"] == "insecure")] if not messages.empty else messages
            for tree in trees:
                mine = fits[(fits["tree"] == tree.label) & (fits["supernodes"] == nodes)] if not fits.empty else fits
                # Round 1 prepares the data cache; the steady state is every later message.
                value = float(mine["total_s"].iloc[nodes:].median()) if len(mine) > nodes else math.nan
                cold.loc[f"deployed fit message, spawn to exit ({nodes} SuperNodes, after round 1)", tree.label] = value
            goal_row = cold.loc[f"deployed fit message, spawn to exit ({nodes} SuperNodes, after round 1)"]
            cold.loc["message minus bare import (two at once); goal <= 1.0"] = goal_row - bare[
                'python -c "import torch, flwr" (two at once)']
            warm = (messages[(messages["message"] == "fit") & (messages["setting"] == "warm") & (messages["supernodes"] == nodes)]
                    if not messages.empty else messages)
            if len(warm) > nodes:
                name = f"deployed fit message, warm (flower-app-superexec), fork to exit ({nodes} SuperNodes, after round 1)"
                cold.loc[name, "branch"] = float(warm["total_s"].iloc[nodes:].median())
                cold.loc["warm message minus bare import (two at once); goal <= 1.0", "branch"] = (
                    cold.loc[name, "branch"] - bare['python -c "import torch, flwr" (two at once)'])
            tables["cold"] = cold
            tables["imports"] = pd.concat([import_table(t) for t in trees])

            # ---- levers, each measured in this run
            log.info("levers (load %.1f) ...", load())
            lever_rows: list[dict[str, Any]] = []

            def lever(name: str, off: float, on: float, what: str) -> None:
                lever_rows.append({"lever": name, "without_s": off, "with_s": on, "gain_ratio": ratio(off, on), "measured": what,
                                   "load": load()})

            if base is not None:
                lever("client imports (own modules)", own_import_seconds(base, args.cold_repeats),
                      own_import_seconds(branch, args.cold_repeats),
                      "import flower_app.client_app after torch + flwr-clientapp's imports: base vs branch")
            cache_dir = str(root / "lever-cache")
            cold_runs(branch, {"nodes": nodes, "run_config": {"data-cache-dir": cache_dir}}, 1)
            cached = cold_runs(branch, {"nodes": nodes, "run_config": {"data-cache-dir": cache_dir}, "threads": 1},
                               args.cold_repeats)
            uncached = cold_runs(branch, {"nodes": nodes, "run_config": {"data-cache": False}, "threads": 1}, args.cold_repeats)
            lever("node data cache", float(uncached["load partition"].median()), float(cached["load partition"].median()),
                  "load partition in a fresh process: data-cache=false vs a cache hit")
            one_thread = {"nodes": nodes, "run_config": {"data-cache-dir": cache_dir}, "threads": 1}
            optim = cold_runs(branch, {**one_thread, "torch_optim": True}, args.cold_repeats)
            ours = cold_runs(branch, one_thread, args.cold_repeats)
            lever("SGD without torch.optim (no torch._dynamo)", float(optim["first fit"].median()),
                  float(ours["first fit"].median()), "first fit in a fresh process, 1 thread: torch.optim.SGD vs flower_app.sgd")
            many = cold_runs(branch, {"nodes": nodes, "run_config": {"data-cache-dir": cache_dir}, "threads": cores},
                             args.cold_repeats, at_once=2)
            one = cold_runs(branch, {"nodes": nodes, "run_config": {"data-cache-dir": cache_dir}, "threads": max(1, cores // 2)},
                            args.cold_repeats, at_once=2)
            lever("thread policy (2 clients on one host)", float(many["second fit (warm)"].median()),
                  float(one["second fit (warm)"].median()),
                  f"warm fit, two client processes at once: {cores} threads each (torch's default) vs {max(1, cores // 2)} "
                  "(the auto policy: cores / SuperNodes)")
            rounds_table = tables["rounds"]
            for nodes_ in counts:
                sel = rounds_table[(rounds_table["tree"] == "branch") & (rounds_table["supernodes"] == nodes_)]
                fit_mode = sel[sel["setting"] == "insecure"]["later_rounds_mean_s"]
                separate = sel[sel["setting"] == "insecure-separate"]["later_rounds_mean_s"]
                if len(fit_mode) and len(separate):
                    lever(f"federated evaluation in the fit message ({nodes_} SuperNodes)", float(separate.iloc[0]),
                          float(fit_mode.iloc[0]), "deployed round (after round 1): federated-evaluation separate vs fit")
                warm_mode = sel[sel["setting"] == "warm"]["later_rounds_mean_s"]
                if len(fit_mode) and len(warm_mode):
                    lever(f"warm ClientApp processes ({nodes_} SuperNodes)", float(fit_mode.iloc[0]),
                          float(warm_mode.iloc[0]), "deployed round (after round 1): flower-superexec (a new flwr-clientapp "
                          "a message) vs flower-app-superexec (forked from a warm fork server)")
                per_tensor = sel[sel["setting"] == "warm-per-tensor"]["later_rounds_mean_s"]
                if len(per_tensor) and len(warm_mode):
                    lever(f"packed arrays ({nodes_} SuperNodes)", float(per_tensor.iloc[0]), float(warm_mode.iloc[0]),
                          "deployed round (after round 1), warm: pack-arrays false (one Flower Array a tensor) vs true")
            phases = tables["phases"]
            if base is not None and not phases.empty and max(counts) > (os.cpu_count() or 1) + 4:
                big = max(counts)
                sel = phases[(phases["phase"] == "fit") & (phases["supernodes"] == big) & (phases["setting"] == "insecure")]
                before = sel[sel["tree"] == "base"]["until_last_pull_s"].mean()
                after = sel[sel["tree"] == "branch"]["until_last_pull_s"].mean()
                lever(f"sender pool sized to the cohort ({big} SuperNodes)", float(before), float(after),
                      "fit phase: until the last SuperNode pulls its message, base (min(32, CPUs + 4) senders) vs branch")
            copies = copies_table(branch, models[-1] if models else "mlp-stack-10m", max(1, args.cold_repeats - 1))
            tables["copies"] = copies
            by = copies.set_index("client")
            lever(f"fewer copies, client side ({by['model'].iloc[0]}, seconds)", float(by.loc["numpy", "seconds"]),
                  float(by.loc["array", "seconds"]), "one fit's conversions: NumPyClient.to_client() vs ArrayClient")
            lever(f"fewer copies, client side ({by['model'].iloc[0]}, peak memory in models)",
                  float(by.loc["numpy", "peak_growth_models"]), float(by.loc["array", "peak_growth_models"]),
                  "peak memory growth during one fit's conversions, in model sizes")
            tables["levers"] = pd.DataFrame(lever_rows)

            # ---- large models
            model_rows = []
            if models:
                from benchmarks.large_model_app import large_app_dir, num_parameters

                for model in models:
                    model_bytes = 4 * num_parameters(model)
                    extra = large_model_job(model)
                    model_trees = [branch] + ([base] if base is not None and model == models[-1] and not args.quick else [])
                    for tree in model_trees:
                        app = large_app_dir(tree.path, root / f"app-{tree.label}-{model}")
                        for setting in ("simulation", "insecure", "warm"):
                            if tree is base and setting != "insecure":
                                continue
                            log.info("%s %s %s (%.0f MB, load %.1f) ...", tree.label, model, setting, model_bytes / 1e6, load())
                            try:
                                result = run_setting(setting, rounds, 2, root / f"{tree.label}-{model}-{setting}", tree,
                                                     project=app, extra=extra, model_bytes=model_bytes)
                            except (RuntimeError, TimeoutError) as err:  # recorded; the other runs still count
                                log.error("%s %s %s failed: %s", tree.label, model, setting, err)
                                model_rows.append({"model": model, "tree": tree.label, "setting": setting, "error": str(err)[:300]})
                                continue
                            model_rows.append({"model": model, **result.summary})
                            tables["models"] = pd.DataFrame(model_rows)
                    log.info("stock Flower %s insecure (load %.1f) ...", model, load())
                    model_rows.append(stock_flower_row(model, rounds, root / f"stock-{model}", model_bytes))
                    tables["models"] = pd.DataFrame(model_rows)
            tables["models"] = pd.DataFrame(model_rows)
    finally:
        remove_worktree(worktree)
        if args.keep:
            log.info("work directories (logs) kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)

    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.max_colwidth", 60)
    fmt = {"float_format": lambda v: f"{v:.2f}"}
    titles = {
        "rounds": "Seconds per round of the default job (metrics.csv 'seconds')",
        "phases": "Where a deployment round goes (mean over rounds, seconds)",
        "messages": "Where a SuperNode's time with one message goes (mean seconds per message)",
        "cold": "A cold ClientApp in a fresh process (median seconds)",
        "imports": "The biggest imports of flower_app.client_app (cumulative seconds)",
        "levers": "Each lever's gain, measured in this run (without / with)",
        "copies": "The client's conversions for one fit of a large model",
        "models": "Large models, 2 SuperNodes: seconds per round and useful GB/s",
    }
    for name, table in tables.items():
        if table.empty:
            continue
        print(f"\n{titles[name]}:")
        if name == "phases":
            print(table.groupby(["tree", "setting", "supernodes", "phase"]).mean(numeric_only=True).drop(columns="round")
                  .to_string(**fmt))
        else:
            print(table.to_string(index=name in ("messages", "cold"), **fmt))
    print(f"\nuptime at start: {uptime}\nuptime at end:   {uptime_end}\nCSV files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
