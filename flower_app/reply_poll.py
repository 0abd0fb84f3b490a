"""`PollingGrid`: Flower's `Grid`, with replies collected every 0.25 s instead of every 3 s.

Flower 1.42's deployment grid (`HttpGrid.send_and_receive`) pushes a message and then asks the
SuperLink for the reply every 3 s, so each phase of a round ends on average 1.5 s after its last
reply (the legacy server runs one `send_and_receive` per client, each in its own thread, each
polling on its own). `PollingGrid` wraps any `Grid` through its public interface only: messages
are pushed as before, and one poller thread per grid asks for every outstanding reply at once every
`interval` seconds (one request per interval, however many clients wait), handing each reply to
the thread that waits for it. A reply already there when its thread starts waiting (an in-process
grid) is taken at once. Timeouts behave as in Flower's loop (replies that have not come back by
then are left out); an error from the grid while polling reaches every waiting thread, as it would
reach each of Flower's own loops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

REPLY_POLL_INTERVAL_S = 0.25


class _Waiter:
    def __init__(self, ids: set[str]) -> None:
        self.missing = set(ids)
        self.replies: list[Message] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def add(self, reply: Message) -> None:
        self.replies.append(reply)
        self.missing.discard(reply.metadata.reply_to_message_id)
        if not self.missing:
            self.done.set()


class PollingGrid(Grid):
    """A `Grid` that delegates to ``inner`` and collects replies in one shared, faster poll."""

    def __init__(self, inner: Grid, interval: float = REPLY_POLL_INTERVAL_S) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.inner = inner
        self.interval = interval
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiter] = {}  # message id -> who waits for its reply
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- delegated as they are
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # ------------------------------------------------------------------------- the faster loop
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = {str(i) for i in self.inner.push_messages(messages)}
        if not ids:
            return []
        waiter = _Waiter(ids)
        for reply in self.inner.pull_messages(list(ids)):  # already there (an in-process grid)
            waiter.add(reply)
        if waiter.done.is_set():
            return waiter.replies
        with self._lock:
            for i in waiter.missing:
                self._waiting[i] = waiter
            self._ensure_poller()
        self._wake.set()
        waiter.done.wait(timeout=timeout)
        with self._lock:
            for i in list(waiter.missing):
                self._waiting.pop(i, None)
        if waiter.error is not None:
            raise waiter.error
        return list(waiter.replies)

    def _ensure_poller(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._poll, name="reply-poller", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                ids = list(self._waiting)
                if not ids and time.monotonic() - idle_since > 30.0:
                    self._thread = None  # the next send_and_receive starts a new one
                    return
            if not ids:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            idle_since = time.monotonic()
            try:
                replies = list(self.inner.pull_messages(ids))
            except Exception as err:  # noqa: BLE001 - handed to every waiting thread, as Flower's loop raises it
                with self._lock:
                    waiters = set(self._waiting.values())
                    self._waiting.clear()
                for waiter in waiters:
                    waiter.error = err
                    waiter.done.set()
                continue
            with self._lock:
                for reply in replies:
                    key = reply.metadata.reply_to_message_id
                    if key in self._waiting:
                        self._waiting.pop(key).add(reply)
            time.sleep(self.interval)
