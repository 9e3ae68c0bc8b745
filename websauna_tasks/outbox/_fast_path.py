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

import collections
import logging
import threading
import time
import typing as t

from ..threads import BackgroundLoop

if t.TYPE_CHECKING:
    import sqlalchemy as sa

# The outbox's one logger, whichever of its modules speaks.
logger = logging.getLogger(__package__)

#: After a failed publish, rows are left to the relay for this long.
PAUSE_SECONDS = 10.0
#: How long a process that exits waits for rows it committed to be published.
EXIT_FLUSH_SECONDS = 5.0

Publish = t.Callable[[list[str], "sa.Engine | None"], int]
#: The ids of one transaction's rows, and the engine they were written through.
Commit = tuple[list[str], "sa.Engine | None"]


class FastPath(BackgroundLoop):
    """A per-process publishing thread fed with the ids of committed rows, in commit order."""

    # A script that commits and exits should not leave its rows to wait for the relay's next poll.
    stop_at_exit = EXIT_FLUSH_SECONDS

    def __init__(self, publish: Publish, batch_size: int, name: str, prepare: t.Callable[[], None] | None = None):
        super().__init__(f"websauna_tasks-outbox-fast-path-{name}")
        self._publish = publish
        self._prepare = prepare
        self.batch_size = batch_size
        self.name = name
        self.paused_until = 0.0
        self._init_queue()

    def _init_queue(self) -> None:
        # Guards the commits waiting and the two counters flush() compares.
        self._done = threading.Condition()
        self._waiting: collections.deque[Commit] = collections.deque()
        self._submitted = 0
        self._finished = 0

    def submit(self, task_ids: list[str], engine: sa.Engine | None) -> None:
        if not task_ids or time.monotonic() < self.paused_until:
            # The broker failed a moment ago: the relay has these rows.
            return
        self.ensure_running()
        with self._done:
            self._submitted += 1
            self._waiting.append((list(task_ids), engine))
        self.wake()

    def flush(self, timeout: float = EXIT_FLUSH_SECONDS) -> bool:
        """Wait until everything submitted so far has been tried; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._done:
            if not self.started_here:
                return True
            target = self._submitted
            while self._finished < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._done.wait(left):
                    return self._finished >= target
            return True

    def start(self) -> None:
        if self._prepare is not None:
            # Imports the first publish would make (kombu loads its transport,
            # and redis-py starts a thread pool module): a script that commits
            # and exits at once has its rows published during interpreter
            # shutdown, when Python no longer lets such modules load.
            self._prepare()
        super().start()

    def forked(self) -> None:
        # What the parent had waiting is the parent's to publish (or the
        # relay's); its lock may have been held by a thread that is not here.
        self._init_queue()

    def run(self) -> None:
        while True:
            commits = self._take()
            if not commits:
                if self.stopping.is_set():
                    return
                self.wait()
                continue
            # In commit order; rows written through another engine go in a round of their own.
            ids: list[str] = []
            engine = commits[0][1]
            for commit_ids, commit_engine in commits:
                if commit_engine is not engine:
                    self._publish_ids(ids, engine)
                    ids, engine = [], commit_engine
                ids.extend(commit_ids)
            self._publish_ids(ids, engine)
            with self._done:
                self._finished += len(commits)
                self._done.notify_all()

    def _take(self) -> list[Commit]:
        """The oldest waiting commit, and whatever else waits behind it up to a batch of rows."""
        commits: list[Commit] = []
        count = 0
        with self._done:
            while self._waiting and (not commits or count < self.batch_size):
                commits.append(self._waiting.popleft())
                count += len(commits[-1][0])
        return commits

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
