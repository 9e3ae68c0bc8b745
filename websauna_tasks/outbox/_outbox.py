"""The outbox of one app: its on-commit messages are rows written with the request's own writes.

Without it, messages wait in memory until the commit and are published in
``transaction``'s after-commit hook; a broker error there is logged and
swallowed, and the task is lost while the request's rows stay committed.
With ``websauna_tasks.outbox = true``:

- ``apply_async(..., tm=request.tm)`` INSERTs the message (task name, id,
  arguments and options as JSON) into ``websauna_tasks_outbox`` through the
  session joined to ``tm``, so the row commits or rolls back (abort, failed
  commit, savepoint rollback) with everything else the request wrote. On
  PostgreSQL a ``NOTIFY`` in the same transaction wakes the relays when, and
  only when, it commits.
- After a successful commit the rows of that transaction are published at
  once by a thread of the process (the fast path, ``_fast_path.py``, in a
  short transaction of its own), so the request never waits on the broker;
  whatever fails there stays in the table.
- A relay (``_relay.py``: a thread in every ``ws-celery ... worker``, or
  ``ws-celery INI -- outbox-relay``) claims unsent rows in batches, publishes
  them through one producer, marks them sent in the same transaction and
  commits. On PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED``, so any
  number of relays (and fast paths) publish each row once; a broker or
  database outage makes it retry with capped exponential back-off, never
  drop. Sent rows are deleted after ``websauna_tasks.outbox_retention_seconds``.

The task id is the row's primary key, chosen before the INSERT, so
``apply_async()`` returns the id the worker will run under.

Delivery is at least once: a relay that dies between the broker's
acknowledgement and its own COMMIT publishes those rows again next time.
"""
from __future__ import annotations

import dataclasses
import time
import typing as t

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from pyramid.exceptions import ConfigurationError

from ..broker import PendingMessage
from ..db import get_engine, transaction_sessions
from ..dispatch import outbox_of, publish
from ..observability import hooks
from ..settings import OUTBOX_KEY, TaskSettings, get_task_settings, parse_setting
from ._fast_path import FastPath
from ._redelivery import Redeliverer
from ._table import CHANNEL, OutboxError, ensure_table, message_row, outbox_table, read_row

if t.TYPE_CHECKING:
    from celery import Celery, Task
    from pyramid.registry import Registry
    from sqlalchemy.orm import Session


@dataclasses.dataclass(frozen=True)
class OutboxStatus:
    """One app's rows in the outbox table at one moment (``ws-celery INI -- outbox-status``)."""

    #: Rows committed and not yet handed to the broker.
    unsent: int
    #: Seconds since the oldest unsent row was written; None when nothing is unsent.
    oldest_unsent_age: float | None
    #: Sent rows not yet deleted (they go after ``retention_seconds``).
    sent_kept: int
    retention_seconds: float


def outbox_enabled(settings: t.Mapping[str, t.Any] | TaskSettings) -> bool:
    """``websauna_tasks.outbox`` of parsed settings, or of a settings mapping."""
    if isinstance(settings, TaskSettings):
        return settings.outbox
    return parse_setting(settings, OUTBOX_KEY)


def find_outbox(app: Celery) -> Outbox | None:
    """The outbox of ``app``; None when it is off."""
    return outbox_of(app)


def get_outbox(app: Celery) -> Outbox:
    outbox = find_outbox(app)
    if outbox is None:
        raise ConfigurationError(f"the outbox is off: set {OUTBOX_KEY} = true in the application's settings")
    return outbox


def note_failed_run(task: Task, task_id: str) -> None:
    """A run of an idempotent task failed for good: its outbox row (if any) is not to be sent again."""
    outbox = find_outbox(task.app)
    if outbox is not None:
        outbox.redeliverer.note_failed_run(task, task_id)


# Statements built once: building one (and its cache key) cost about as much
# CPU as running it. Compiled forms are cached by SQLAlchemy per engine.
_INSERT = sa.insert(outbox_table)
#: PostgreSQL: notifies the relays, when (and only if) the row's transaction
#: commits; identical notifications of one transaction are folded into one.
_INSERT_AND_NOTIFY = _INSERT.returning(sa.func.pg_notify(CHANNEL, ""))
_MARK_SENT = (sa.update(outbox_table).where(outbox_table.c.id.in_(sa.bindparam("ids", expanding=True)))
              .values(sent_at=sa.bindparam("sent")))
_claim_statements: dict[tuple[str, bool], sa.Select] = {}


def _claim_statement(dialect_name: str, by_ids: bool) -> sa.Select:
    """Up to ``:limit`` unsent rows of ``:app`` (of ``:ids`` when ``by_ids``), oldest first, locked on PostgreSQL."""
    key = (dialect_name, by_ids)
    query = _claim_statements.get(key)
    if query is None:
        table = outbox_table
        query = (sa.select(table.c.id, table.c.task_name, table.c.args, table.c.kwargs, table.c.options,
                           table.c.created_at)
                 .where(table.c.sent_at.is_(None), table.c.app == sa.bindparam("app"))
                 .order_by(table.c.created_at).limit(sa.bindparam("limit", type_=sa.Integer)))
        if by_ids:
            query = query.where(table.c.id.in_(sa.bindparam("ids", expanding=True)))
        if dialect_name == "postgresql":
            # Rows another relay holds are skipped, not waited for: each row
            # is published by whoever locked it, once.
            query = query.with_for_update(skip_locked=True)
        _claim_statements[key] = query
    return query


class Outbox:
    """Writes an app's on-commit messages as rows and publishes unsent rows."""

    def __init__(self, app: Celery, registry: Registry):
        settings = get_task_settings(registry)
        self.app = app
        self.registry = registry
        self.retention_seconds = settings.outbox_retention_seconds
        self.poll_seconds = settings.outbox_poll_seconds
        self.batch_size = settings.outbox_batch_size
        self.relay_in_worker = settings.outbox_relay_in_worker
        self.publish_on_commit = settings.outbox_publish_on_commit
        #: websauna_tasks.create_tables = auto: the table is made on first use; never: it must be there.
        self.create_tables = settings.create_tables == "auto"
        self._relay_engine: sa.Engine | None = None
        #: Sends again the rows of idempotent tasks that never finished.
        self.redeliverer = Redeliverer(self, settings)
        #: Publishes each transaction's rows right after its commit, off the request's thread.
        # Through publish_pending looked up at each call: a test (or a counter) may wrap it.
        self.fast_path = FastPath(lambda ids, engine: self.publish_pending(ids, engine=engine), self.batch_size,
                                  self.app_name, prepare=self._load_transport)

    @property
    def app_name(self) -> str:
        return self.app.main or ""

    def _load_transport(self) -> None:
        connection = self.app.connection_for_write()
        try:
            connection.transport  # creating it imports the client library; no I/O
        finally:
            connection.release()

    # -- writing, inside the request's transaction --------------------------------------------
    def write(self, tm: transaction.TransactionManager, message: PendingMessage) -> None:
        """INSERT ``message`` through the session joined to ``tm`` (called by dispatch.schedule)."""
        row = message_row(message)
        session = self.session_for(tm, message)
        bind = session.get_bind()
        engine = getattr(bind, "engine", bind)
        ensure_table(engine, self.create_tables)
        if engine.dialect.name == "postgresql":
            # The NOTIFY rides on the INSERT: one statement, one round trip.
            session.execute(_INSERT_AND_NOTIFY, row).close()
        else:
            session.execute(_INSERT, row)
        # A session of the app's own factory may start "active": a raw INSERT
        # must still be committed.
        zope.sqlalchemy.mark_changed(session, transaction_manager=tm)

    def session_for(self, tm: transaction.TransactionManager, message: PendingMessage) -> Session:
        """The SQLAlchemy session whose writes commit with ``tm``'s transaction."""
        try:
            sessions = transaction_sessions(tm)
        except ConfigurationError as exc:
            raise OutboxError(f"{OUTBOX_KEY}: {message.task.name} cannot be written to the outbox: {exc}") from None
        if len(sessions) == 1:
            return sessions[0]
        if not sessions:
            raise OutboxError(
                f"{OUTBOX_KEY} is on, but no database session is joined to the transaction of {message.task.name}: "
                "schedule with tm=request.tm inside a request or a task run, or use your zope.sqlalchemy "
                "session in that transaction before apply_async()")
        raise OutboxError(
            f"{OUTBOX_KEY}: the transaction of {message.task.name} has {len(sessions)} database sessions; "
            "schedule with tm=request.tm from the request whose dbsession holds the outbox table")

    # -- publishing ---------------------------------------------------------------------------
    def relay_engine(self) -> sa.Engine:
        if self._relay_engine is None:
            engine = get_engine(self.registry)
            if engine is None:
                raise ConfigurationError(f"{OUTBOX_KEY}: the relay needs sqlalchemy.url in the settings")
            # READ COMMITTED whatever the app's level: a SERIALIZABLE claim
            # would turn SKIP LOCKED races into serialization failures.
            if engine.dialect.name == "postgresql":
                engine = engine.execution_options(isolation_level="READ COMMITTED")
            self._relay_engine = engine
        return self._relay_engine

    def after_commit(self, task_ids: list[str], engine: sa.Engine | None = None) -> None:
        """Hand the rows a transaction has just committed to the fast path (which never raises)."""
        if self.publish_on_commit:
            self.fast_path.submit(task_ids, engine)

    def publish_pending(self, ids: list[str] | None = None, engine: sa.Engine | None = None) -> int:
        """Claim up to a batch of unsent rows (``ids`` only, if given), publish them, mark them sent.

        Returns the number published. Raises (having rolled back: the rows
        stay unsent) when the broker or the database fails.
        """
        engine = engine or self.relay_engine()
        ensure_table(engine, self.create_tables)
        params: dict[str, t.Any] = {"app": self.app_name, "limit": self.batch_size}
        if ids is not None:
            params["ids"] = ids
        with engine.connect() as conn, conn.begin():
            rows = conn.execute(_claim_statement(engine.dialect.name, ids is not None), params).all()
            if not rows:
                return 0
            self.publish_rows(rows)
            sent_at = time.time()
            conn.execute(_MARK_SENT, {"ids": [row.id for row in rows], "sent": sent_at})
        if hooks.watching:
            observer = hooks.observer_of(self.app)
            if observer is not None:
                hooks.safely(observer.published, [row.created_at for row in rows], sent_at)
        return len(rows)

    def publish_rows(self, rows: t.Sequence[t.Any]) -> None:
        """Publish rows (id, task_name, args, kwargs, options) under their ids; raise if any fails.

        Through the send pipeline's publishing path (``dispatch.publish``),
        one round on Redis, so that if it fails none of these is marked sent.
        The rows were checked when they were written: nothing is checked again.
        """
        app = self.app
        messages: list[PendingMessage] = []
        unknown = []
        for row in rows:
            args, kwargs, options = read_row(app, row)
            task = app.tasks.get(row.task_name)
            if task is None:
                unknown.append((row, args, kwargs, options))
            else:
                messages.append(PendingMessage(task, tuple(args), kwargs, options, row.id))
        publish(messages, strict=True)
        if unknown:
            # A task this process does not know (not scanned here): only its
            # name can travel, through Celery's send_task.
            with app.producer_or_acquire() as producer:
                for row, args, kwargs, options in unknown:
                    app.send_task(row.task_name, args, kwargs, task_id=row.id, producer=producer, **options)

    def drain(self) -> int:
        """Publish every unsent row, batch after batch; the number published."""
        total = 0
        while True:
            count = self.publish_pending()
            total += count
            if count < self.batch_size:
                return total

    def prune(self, now: float | None = None) -> int:
        """Delete sent rows older than the retention; the number deleted."""
        engine = self.relay_engine()
        ensure_table(engine, self.create_tables)
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        table = outbox_table
        with engine.begin() as conn:
            result = conn.execute(sa.delete(table).where(
                table.c.app == self.app_name, table.c.sent_at.is_not(None), table.c.sent_at < cutoff))
        return result.rowcount or 0

    def pending_count(self) -> int:
        engine = self.relay_engine()
        ensure_table(engine, self.create_tables)
        table = outbox_table
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)
                                .where(table.c.app == self.app_name, table.c.sent_at.is_(None))).scalar_one()

    def status(self, now: float | None = None) -> OutboxStatus:
        """Counts of this app's unsent and kept sent rows, and the age of the oldest unsent one."""
        engine = self.relay_engine()
        ensure_table(engine, self.create_tables)
        table = outbox_table
        unsent = table.c.sent_at.is_(None)
        # One statement, so the three figures describe the same snapshot.
        query = sa.select(sa.func.count().filter(unsent), sa.func.min(table.c.created_at).filter(unsent),
                          sa.func.count().filter(table.c.sent_at.is_not(None))).where(table.c.app == self.app_name)
        with engine.connect() as conn:
            pending, oldest, sent = conn.execute(query).one()
        age = None if oldest is None else max(0.0, (time.time() if now is None else now) - oldest)
        return OutboxStatus(unsent=pending, oldest_unsent_age=age, sent_kept=sent,
                            retention_seconds=self.retention_seconds)
