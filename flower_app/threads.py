"""How many threads a client's torch may use: the node-config key ``torch-threads`` and its default.

A SuperNode's ClientApp process starts torch with one intra-op thread per core of the machine.
When several SuperNodes share one host (a test bench, a node per GPU, a lab machine), every
client process then runs as many threads as there are cores and they all fight over them: on a
2-core machine, two clients with two threads each made a small CNN's local epochs 6 to 25 times
slower than one thread each (OpenMP threads spin while they wait for a core that is busy).

``torch-threads`` (node config, e.g. ``--node-config "partition-id=0 torch-threads=4"``):

- a whole number >= 1: exactly that many threads;
- ``0`` or ``"auto"`` (the default when the key is absent): if ``OMP_NUM_THREADS`` is set (Ray's
  simulation sets it to the CPUs of each actor; an operator may set it) torch keeps what it made of
  it; otherwise the CPUs this process may use (its affinity mask and a cgroup CPU quota, as in a
  container with ``--cpus``) divided by the number of SuperNodes running on this host
  (``flower-supernode`` processes this process can see), at least 1.

Nothing here imports Flower; `resolve_threads` is pure (its inputs are passed in) and
`apply_threads` applies it to torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

NODE_KEY = "torch-threads"
AUTO = "auto"


class ThreadsError(ValueError):
    """A bad ``torch-threads`` node-config value; the message names the key and the valid values."""


def parse_threads(node_config: Mapping[str, object]) -> int:
    """The node config's ``torch-threads``: a count >= 1, or 0 for automatic (also when absent)."""
    if NODE_KEY not in node_config:
        return 0
    value = node_config[NODE_KEY]
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ThreadsError(
            f"node-config key '{NODE_KEY}' must be a whole number >= 1 (threads of this node's torch), "
            f"or 0 / \"{AUTO}\" for cores / SuperNodes on this host; got {value!r}"
        )
    return value


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def local_supernodes() -> int:
    """``flower-supernode`` processes visible on this host (/proc), at least 1; 1 where /proc is unknown."""
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 1
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read(4096).split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(os.path.basename(a) == b"flower-supernode" for a in argv[:2]):
            count += 1
    return max(1, count)


def resolve_threads(requested: int, env: Mapping[str, str], cpus: int, supernodes: int) -> int | None:
    """The thread count to set, or None to leave torch as it is (``OMP_NUM_THREADS`` decides)."""
    if requested >= 1:
        return requested
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpus // max(1, supernodes))


def apply_threads(node_config: Mapping[str, object]) -> int:
    """Set torch's intra-op threads for this node's client per ``torch-threads``; returns the count in use."""
    import torch

    requested = parse_threads(node_config)
    count = resolve_threads(requested, os.environ, usable_cpus(), local_supernodes() if requested == 0 else 1)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
        log.debug("torch threads: %d (node-config %s=%s)", count, NODE_KEY, node_config.get(NODE_KEY, AUTO))
    return torch.get_num_threads()
