"""The outbox's fast path: rows are published right after their commit, from a thread of the process.

The rows are already committed when the fast path sees them, so it is only
about latency: whatever it does not publish, the relay does (woken by
NOTIFY on PostgreSQL, by its poll on SQLite). That is why it runs in a
thread instead of the committing request: a broker that is down costs a
publish several seconds (redis-py retries a refused connection with
back-off, kombu retries on top), and no request should wait for that.

After a failure the fast path pauses: rows committed meanwhile are left to
the relay instead of queueing behind a broker that is known to be down.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import typing as t

if t.TYPE_CHECKING:
    import sqlalchemy as sa

logger = logging.getLogger(__name__)

#: After a failed publish, rows are left to the relay for this long.
PAUSE_SECONDS = 10.0
#: How long a process that exits waits for rows it committed to be published.
EXIT_FLUSH_SECONDS = 5.0

Publish = t.Callable[[list[str], "sa.Engine | None"], int]


class FastPath:
    """A per-process publishing thread fed with the ids of committed rows, in commit order."""

    def __init__(self, publish: Publish, batch_size: int, name: str, prepare: t.Callable[[], None] | None = None):
        self._publish = publish
        self._prepare = prepare
        self.batch_size = batch_size
        self.name = name
        self.paused_until = 0.0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pid: int | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._submitted = 0
        self._finished = 0
        self._atexit_registered = False

    def submit(self, task_ids: list[str], engine: sa.Engine | None) -> None:
        if not task_ids or time.monotonic() < self.paused_until:
            # The broker failed a moment ago: the relay has these rows.
            return
        with self._lock:
            self._start_if_needed()
            self._submitted += 1
            self._queue.put((list(task_ids), engine))

    def flush(self, timeout: float = EXIT_FLUSH_SECONDS) -> bool:
        """Wait until everything submitted so far has been tried; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._pid != os.getpid():
                return True
            target = self._submitted
            while self._finished < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._done.wait(left):
                    return self._finished >= target
            return True

    def _start_if_needed(self) -> None:
        pid = os.getpid()
        if self._pid == pid and self._thread is not None and self._thread.is_alive():
            return
        if self._pid != pid:
            # Forked: the parent's thread does not exist here, and what it
            # had queued is the parent's to publish (or the relay's).
            self._queue = queue.SimpleQueue()
            self._submitted = self._finished = 0
        self._pid = pid
        if self._prepare is not None:
            # Imports the first publish would make (kombu loads its transport,
            # and redis-py starts a thread pool module): a script that commits
            # and exits at once has its rows published during interpreter
            # shutdown, when Python no longer lets such modules load.
            self._prepare()
        self._thread = threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                        name=f"websauna_tasks-outbox-fast-path-{self.name}")
        self._thread.start()
        if not self._atexit_registered:
            # A script that commits and exits should not leave its rows to
            # wait for the relay's next poll.
            atexit.register(self.flush)
            self._atexit_registered = True

    def _run(self, work: queue.SimpleQueue) -> None:
        while True:
            items = [work.get()]
            count = len(items[0][0])
            # Whatever else has been committed meanwhile goes in the same round.
            while count < self.batch_size:
                try:
                    items.append(work.get_nowait())
                except queue.Empty:
                    break
                count += len(items[-1][0])
            # In commit order; rows written through another engine go in a round of their own.
            ids: list[str] = []
            engine = items[0][1]
            for item_ids, item_engine in items:
                if item_engine is not engine:
                    self._publish_ids(ids, engine)
                    ids, engine = [], item_engine
                ids.extend(item_ids)
            self._publish_ids(ids, engine)
            with self._lock:
                self._finished += len(items)
                self._done.notify_all()

    def _publish_ids(self, task_ids: list[str], engine: sa.Engine | None) -> None:
        if time.monotonic() < self.paused_until:
            return
        try:
            for start in range(0, len(task_ids), self.batch_size):
                self._publish(task_ids[start:start + self.batch_size], engine)
        except Exception as exc:
            self.paused_until = time.monotonic() + PAUSE_SECONDS
            logger.warning("websauna_tasks outbox: could not publish %d message(s) after commit (%s: %s); "
                           "they are kept in the outbox for the relay", len(task_ids), type(exc).__name__, exc)
