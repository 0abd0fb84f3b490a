"""PollingGrid: every waiting thread gets its own replies, from one shared poll; timeouts and errors as Flower's loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from flower_app.reply_poll import PollingGrid


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    # Messages take their run and sender from here (Flower's runtimes set it for a real ServerApp).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class SlowGrid(Grid):
    """Replies to a message ``delay`` seconds after it is pushed; counts pull requests."""

    def __init__(self, delay: float, fail_pulls_after: float | None = None) -> None:
        self.delay = delay
        self.fail_pulls_after = fail_pulls_after
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.ready: dict[str, tuple[float, Message]] = {}
        self.pulls = 0
        self.next_id = 0

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        with self.lock:
            for m in messages:
                self.next_id += 1
                mid = f"m{self.next_id}"
                reply = Message(RecordDict(), reply_to=m)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.ready[mid] = (time.monotonic() + self.delay, reply)
                ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self.lock:
            self.pulls += 1
            if self.fail_pulls_after is not None and time.monotonic() - self.started > self.fail_pulls_after:
                raise ConnectionError("SuperLink unreachable")
            now = time.monotonic()
            out = [self.ready.pop(i)[1] for i in list(message_ids) if i in self.ready and self.ready[i][0] <= now]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("PollingGrid must not use the inner grid's loop")


def _message() -> Message:
    return Message(content=RecordDict(), dst_node_id=1, message_type="train")


def test_many_threads_get_their_own_replies_from_one_shared_poll() -> None:
    inner = SlowGrid(delay=0.6)
    grid = PollingGrid(inner, interval=0.05)
    got: dict[int, list[str]] = {}

    def send(i: int) -> None:
        got[i] = [r.metadata.reply_to_message_id for r in grid.send_and_receive([_message(), _message()])]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - started
    assert sorted(len(v) for v in got.values()) == [2] * 8
    assert len({mid for v in got.values() for mid in v}) == 16  # every reply once, to its sender
    assert elapsed < 3.0  # Flower's own loop would take at least 3 s (its first wait)
    # One immediate pull per sender, then one request per interval for all of them together.
    assert inner.pulls <= 8 + elapsed / 0.05 + 2


def test_a_reply_already_there_needs_no_wait() -> None:
    inner = SlowGrid(delay=0.0)
    grid = PollingGrid(inner, interval=10.0)
    started = time.monotonic()
    assert len(list(grid.send_and_receive([_message()]))) == 1
    assert time.monotonic() - started < 1.0


def test_a_timeout_returns_what_came_back() -> None:
    grid = PollingGrid(SlowGrid(delay=5.0), interval=0.05)
    started = time.monotonic()
    assert list(grid.send_and_receive([_message()], timeout=0.3)) == []
    assert time.monotonic() - started < 2.0
    assert not grid._waiting  # nothing left registered


def test_an_error_while_polling_reaches_the_waiting_thread() -> None:
    grid = PollingGrid(SlowGrid(delay=5.0, fail_pulls_after=0.2), interval=0.05)
    with pytest.raises(ConnectionError, match="unreachable"):
        grid.send_and_receive([_message()], timeout=10)


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        PollingGrid(SlowGrid(0.0), interval=0)
