"""Outcome of every bad input the hardening suite (`tests/test_hardening_fuzz.py`) throws, by area.

Normal runs assert: a bad input must give a clear error (rejected or refused, with a reason that names
it) or be handled (used or ignored without harm). With ``HARDEN_TALLY=<file.json>`` in the environment
the property tests record each bad input's outcome instead of asserting, so that every example runs
even against code that crashes on some, and the counts are written to that file at exit. Run the suite
that way against the code before and after a change to compare (issue 10's closing note)::

    HARDEN_TALLY=/tmp/after.json python -m pytest tests/test_hardening_fuzz.py -q

Outcomes: ``clear_error`` (rejected or refused with a logged reason, or `ConfigError` naming the key),
``handled`` (used, or ignored, and nothing went wrong), ``crashed`` (an exception escaped the server's
entry point, or a parser raised something other than `ConfigError`), ``silently_wrong`` (accepted and
the model, the optimizer state or a reported figure is wrong: non-finite, poisoned, frozen, dominated
by one client, out of range), ``unclear_error`` (refused, but the message does not name the key).
"""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter, defaultdict

OUTCOMES = ("clear_error", "handled", "crashed", "silently_wrong", "unclear_error")
GOOD = ("clear_error", "handled")
TALLY_PATH = os.environ.get("HARDEN_TALLY", "")

_counts: dict[str, Counter[str]] = defaultdict(Counter)
_kinds: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
_examples: dict[str, list[str]] = defaultdict(list)


def tallying() -> bool:
    return bool(TALLY_PATH)


def record(area: str, kind: str, outcome: str, detail: str = "") -> None:
    """Count one bad input of ``kind`` in ``area``; outside tally mode, fail unless the outcome is good."""
    assert outcome in OUTCOMES, outcome
    if not tallying():
        assert outcome in GOOD, f"{area} / {kind}: {outcome}: {detail}"
        return
    _counts[area][outcome] += 1
    _kinds[area][kind][outcome] += 1
    if outcome not in GOOD and len(_examples[f"{area}/{kind}/{outcome}"]) < 3:
        _examples[f"{area}/{kind}/{outcome}"].append(detail[:300])


def _write() -> None:
    if not TALLY_PATH or not _counts:
        return
    data = {
        "areas": {area: {o: c[o] for o in OUTCOMES} | {"total": sum(c.values())} for area, c in sorted(_counts.items())},
        "kinds": {area: {k: dict(c) for k, c in sorted(kinds.items())} for area, kinds in sorted(_kinds.items())},
        "examples": dict(sorted(_examples.items())),
    }
    with open(TALLY_PATH, "w") as f:
        json.dump(data, f, indent=1)


atexit.register(_write)
