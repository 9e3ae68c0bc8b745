"""The example's tables.

Only new tables are ever added, never new columns: ``create_tables`` runs ``CREATE TABLE IF NOT
EXISTS`` at startup, which adds a missing table to an existing ``var/example.sqlite`` but would
never add a column to an existing one (a real application would use migrations).
"""
from __future__ import annotations

import collections
import datetime
import threading

from pyramid.registry import Registry
from sqlalchemy import Boolean, DateTime, Integer, String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateIndex, CreateTable


def utcnow() -> datetime.datetime:
    # Naive UTC: SQLite has no time zones, and every process writes the same way.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # noqa: UP017 (datetime.UTC is 3.11+)


class Base(DeclarativeBase):
    pass


class Message(Base):
    """A row the web request writes; a task fills in the ``processed_*`` columns."""

    __tablename__ = "example_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow)
    #: The id apply_async() returned before the commit...
    scheduled_task_id: Mapped[str | None] = mapped_column(String(64))
    #: ...and the id the task saw when it ran: they are the same.
    processed_by_task_id: Mapped[str | None] = mapped_column(String(64))
    processed_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    #: The task's "work": the text in capitals.
    shouted: Mapped[str | None] = mapped_column(String(200))
    #: request.route_url() made inside the task, from websauna.site_url.
    link: Mapped[str | None] = mapped_column(String(500))

    @property
    def processed(self) -> bool:
        return self.processed_at is not None


class Heartbeat(Base):
    """One row (id 1) counting the runs of the periodic task beat sends."""

    __tablename__ = "example_heartbeat"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    beats: Mapped[int] = mapped_column(Integer, default=0)
    last_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    last_task_id: Mapped[str | None] = mapped_column(String(64))


class WordCount(Base):
    """What the deferred ``count_words(message_id)`` wrote: one row per message."""

    __tablename__ = "example_word_counts"

    message_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    words: Mapped[int] = mapped_column(Integer)
    #: How many times the function ran for this message: one per task, whatever the clicks.
    runs: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(64))
    counted_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)


class WordCountRequest(Base):
    """One click on "Count the words": the task id defer() gave back, and whether it was new."""

    __tablename__ = "example_word_count_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(Integer, index=True)
    task_id: Mapped[str] = mapped_column(String(64))
    #: True when a task of the same name was still pending and defer() sent nothing.
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    requested_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow)


class MessageStats(Base):
    """One row (id 1) written by the periodic task declared in code, ``example.count_messages``."""

    __tablename__ = "example_message_stats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    runs: Mapped[int] = mapped_column(Integer, default=0)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    last_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    last_task_id: Mapped[str | None] = mapped_column(String(64))


class TaskRun(Base):
    """Which worker process ran a task: written after each run by a ``TaskFinished`` subscriber (__init__.py)."""

    __tablename__ = "example_task_runs"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(200))
    #: The worker's node name (celery@host), or "eager@host" when the web process ran it.
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    finished_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow, index=True)


def create_tables(engine: Engine) -> None:
    """Create the tables if missing; a real application would use migrations.

    ``IF NOT EXISTS`` instead of ``metadata.create_all``: the web server, the
    worker and beat all load the app at the same moment, and create_all's
    check-then-create races between processes on a fresh database.
    """
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            conn.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))


#: Registry key of the AfterResponseLog (one per application, made in main()).
AFTER_RESPONSE_LOG = "websauna_tasks_example.after_response_log"


class AfterResponseLog:
    """What run_after_response callbacks did in this web process: a count and the last lines, in memory."""

    def __init__(self, keep: int = 5) -> None:
        self._lock = threading.Lock()  # callbacks run in the server's worker threads
        self.count = 0
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)

    def add(self, line: str) -> None:
        with self._lock:
            self.count += 1
            self.lines.append(f"{utcnow():%H:%M:%S} UTC {line}")

    def snapshot(self) -> tuple[int, list[str]]:
        with self._lock:
            return self.count, list(self.lines)


def after_response_log(registry: Registry) -> AfterResponseLog:
    return registry[AFTER_RESPONSE_LOG]
