"""What a warm process runs in tests/test_superexec.py instead of Flower's ``run_clientapp``.

Light on purpose: the fork server's children import this module. Each target takes the keyword
arguments the executor passes to ``run_clientapp``; the task's token names the file it writes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

_SEEN: list[int] = []  # grows in a process that ran a task before: it must never be seen


def record(**kwargs: Any) -> None:
    """Write what this process was given and what it has already imported."""
    _SEEN.append(1)
    facts = {"kwargs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in kwargs.items()},
             "pid": os.getpid(), "ppid": os.getppid(), "tasks_seen": len(_SEEN),
             "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("json", "flwr", "flower_app", "torch"))}
    path = kwargs["token"]
    with open(path + ".tmp", "w") as f:
        json.dump(facts, f)
    os.replace(path + ".tmp", path)


def crash(**kwargs: Any) -> None:
    """Die as a process killed by the kernel would (out of memory, a segfault in native code)."""
    del kwargs
    os.kill(os.getpid(), signal.SIGKILL)
