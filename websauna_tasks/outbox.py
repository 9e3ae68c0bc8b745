"""The transactional outbox: a task message is a row written with the request's own writes.

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
  once by a thread of the process (the fast path, ``fast_path.py``, in a
  short transaction of its own), so the request never waits on the broker;
  whatever fails there stays in the table.
- A relay (a thread in every ``ws-celery ... worker``, or ``ws-celery INI --
  outbox-relay``) claims unsent rows in batches, publishes them through one
  producer, marks them sent in the same transaction and commits. On
  PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED``, so any number of relays
  (and fast paths) publish each row once; a broker or database outage makes
  it retry with capped exponential back-off, never drop. Sent rows are
  deleted after ``websauna_tasks.outbox_retention_seconds``.

The task id is the row's primary key, chosen before the INSERT, so
``apply_async()`` returns the id the worker will run under.

Delivery is at least once: a relay that dies between the broker's
acknowledgement and its own COMMIT publishes those rows again next time.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
import time
import typing as t

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from celery import bootsteps
from pyramid.exceptions import ConfigurationError

from .db import get_engine
from .dispatch import OUTBOX_ATTRIBUTE, PendingMessage, publish
from .fast_path import FastPath
from .redelivery import Redeliverer
from .request import get_current_request
from .settings import DEFAULT_OUTBOX_BATCH_SIZE as DEFAULT_BATCH_SIZE  # noqa: F401
from .settings import DEFAULT_OUTBOX_POLL_SECONDS as DEFAULT_POLL_SECONDS  # noqa: F401
from .settings import DEFAULT_OUTBOX_RETENTION_SECONDS as DEFAULT_RETENTION_SECONDS  # noqa: F401
from .settings import OUTBOX_BATCH_KEY as BATCH_KEY  # noqa: F401
from .settings import OUTBOX_IN_WORKER_KEY as IN_WORKER_KEY  # noqa: F401
from .settings import OUTBOX_KEY as OUTBOX_KEY
from .settings import OUTBOX_ON_COMMIT_KEY as ON_COMMIT_KEY  # noqa: F401
from .settings import OUTBOX_POLL_KEY as POLL_KEY  # noqa: F401
from .settings import OUTBOX_RETENTION_KEY as RETENTION_KEY  # noqa: F401
from .settings import TaskSettings, get_task_settings, parse_setting
from .threads import BackgroundLoop

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.registry import Registry
    from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

# Settings (declared and parsed in settings.py, imported above under their old names): OUTBOX_KEY,
# write on-commit messages to the outbox table (false); RETENTION_KEY, seconds a sent row is kept before
# the relay deletes it (one day); POLL_KEY, seconds between two looks at the table when nothing wakes
# the relay (5); BATCH_KEY, rows claimed and published per relay transaction (500); IN_WORKER_KEY, run a
# relay thread in each ``ws-celery ... worker`` main process (true); ON_COMMIT_KEY, publish a
# transaction's rows right after its commit (true).

#: Back-off after a failed relay round: base * 2**(failures - 1), capped.
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
#: PostgreSQL channel the writing transaction NOTIFYs and relays LISTEN on.
CHANNEL = "websauna_tasks_outbox"

_metadata = sa.MetaData()
outbox_table = sa.Table(
    "websauna_tasks_outbox", _metadata,
    # The task id: known before the INSERT, returned by apply_async().
    sa.Column("id", sa.String(64), primary_key=True),
    # Celery app name: two apps sharing a database relay their own rows only.
    sa.Column("app", sa.String(255), nullable=False),
    sa.Column("task_name", sa.String(255), nullable=False),
    sa.Column("args", sa.Text, nullable=False),
    sa.Column("kwargs", sa.Text, nullable=False),
    sa.Column("options", sa.Text, nullable=False),
    # Epoch seconds, as in names.py: no time zone to get wrong between databases.
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    # Times sent again because its task never finished (redelivery.py); the
    # maximum once a run failed for good.
    sa.Column("redeliveries", sa.Integer, nullable=False, server_default="0"),
)
# Unsent rows only, in claim order: the relay's query reads this and nothing else.
_pending_index = sa.Index(
    "ix_websauna_tasks_outbox_pending", outbox_table.c.app, outbox_table.c.created_at,
    postgresql_where=outbox_table.c.sent_at.is_(None), sqlite_where=outbox_table.c.sent_at.is_(None),
)
_sent_index = sa.Index("ix_websauna_tasks_outbox_sent", outbox_table.c.sent_at)


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


class OutboxError(Exception):
    """A message cannot go to the outbox (no session joined to the transaction, options not storable)."""


# -- settings -----------------------------------------------------------------------------------

def outbox_enabled(settings: t.Mapping[str, t.Any] | TaskSettings) -> bool:
    """``websauna_tasks.outbox`` of parsed settings, or of a settings mapping."""
    if isinstance(settings, TaskSettings):
        return settings.outbox
    return parse_setting(settings, OUTBOX_KEY)


def configure_outbox(registry: Registry, app: Celery) -> Outbox | None:
    """Turn the outbox on for ``app`` when the settings ask for it (called by includeme)."""
    if not get_task_settings(registry).outbox:
        return None
    outbox = Outbox(app, registry)
    setattr(app, OUTBOX_ATTRIBUTE, outbox)
    if outbox.relay_in_worker:
        app.steps["worker"].add(OutboxRelayStep)
    return outbox


def get_outbox(app: Celery) -> Outbox:
    outbox = getattr(app, OUTBOX_ATTRIBUTE, None)
    if outbox is None:
        raise ConfigurationError(f"the outbox is off: set {OUTBOX_KEY} = true in the application's settings")
    return outbox


# -- rows <-> messages --------------------------------------------------------------------------

_DATETIME = "__websauna_tasks_datetime__"


def _encode(value: t.Any) -> t.Any:
    if isinstance(value, datetime.datetime):
        return {_DATETIME: value.isoformat()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _decode(obj: dict) -> t.Any:
    if len(obj) == 1 and _DATETIME in obj:
        return datetime.datetime.fromisoformat(obj[_DATETIME])
    return obj


def _dumps(what: str, value: t.Any, message: PendingMessage) -> str:
    try:
        return json.dumps(value, default=_encode, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise OutboxError(
            f"cannot store the {what} of task {message.task.name} in the outbox as JSON ({exc}); "
            "pass JSON values (ids rather than objects), or turn websauna_tasks.outbox off") from None


def message_row(message: PendingMessage, now: float | None = None) -> dict[str, t.Any]:
    """The outbox row of ``message``; :class:`OutboxError` when something cannot be stored."""
    options = dict(message.options)
    # Publishing details of this process, meaningless in a relay: never stored.
    for key in ("producer", "connection", "publisher", "router"):
        options.pop(key, None)
    for key, value in options.items():
        # Signatures (link, link_error, chain) are dicts: stored as such, rebuilt by the relay.
        _dumps(f"option {key!r}", value, message)
    return {
        "id": message.task_id,
        "app": message.task.app.main or "",
        "task_name": message.task.name,
        "args": _dumps("arguments", list(message.args), message),
        "kwargs": _dumps("keyword arguments", message.kwargs, message),
        "options": _dumps("options", options, message),
        "created_at": time.time() if now is None else now,
        "sent_at": None,
    }


def _rebuild_options(app: Celery, raw: str) -> dict[str, t.Any]:
    options = json.loads(raw, object_hook=_decode)
    for key in ("link", "link_error"):
        value = options.get(key)
        if isinstance(value, list):
            options[key] = [app.signature(item) for item in value]
        elif isinstance(value, dict):
            options[key] = app.signature(value)
    return options


# -- creating the table -------------------------------------------------------------------------

_created: set[str] = set()
_created_lock = threading.Lock()


def ensure_table(engine: sa.Engine) -> None:
    """Create the outbox table and its indexes if missing, once per process and database.

    Several processes may get here at once: IF NOT EXISTS covers most of it,
    and PostgreSQL can still fail one of two concurrent creates (on its
    catalog's unique index), after which the table exists (as in names.py).
    """
    key = engine.url.render_as_string(hide_password=True)
    if key in _created:
        return
    with _created_lock:
        if key in _created:
            return
        # One transaction per statement, so that losing one race does not
        # undo the others. Not an AUTOCOMMIT engine: the relay's engine
        # already carries an isolation level, and SQLAlchemy keeps the first
        # of two chained ones (the DDL was silently rolled back).
        for ddl in (sa.schema.CreateTable(outbox_table, if_not_exists=True),
                    sa.schema.CreateIndex(_pending_index, if_not_exists=True),
                    sa.schema.CreateIndex(_sent_index, if_not_exists=True)):
            try:
                with engine.begin() as conn:
                    conn.execute(ddl)
            except sa.exc.DBAPIError:
                inspector = sa.inspect(engine)
                if not inspector.has_table(outbox_table.name):
                    raise
                if isinstance(ddl, sa.schema.CreateIndex) and ddl.element.name not in {
                        index["name"] for index in inspector.get_indexes(outbox_table.name)}:
                    raise
        _created.add(key)


# -- the outbox of one app ----------------------------------------------------------------------

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
        self._relay_engine: sa.Engine | None = None
        #: Sends again the rows of idempotent tasks that never finished (redelivery.py).
        self.redeliverer = Redeliverer(self, settings)
        #: Publishes each transaction's rows right after its commit, off the request's thread.
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
        ensure_table(engine)
        session.execute(sa.insert(outbox_table).values(**row))
        if engine.dialect.name == "postgresql":
            # Delivered to LISTENers when (and only if) this transaction commits;
            # PostgreSQL folds identical notifications of one transaction into one.
            session.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
        # A session of the app's own factory may start "active": a raw INSERT
        # must still be committed.
        zope.sqlalchemy.mark_changed(session, transaction_manager=tm)

    def session_for(self, tm: transaction.TransactionManager, message: PendingMessage) -> Session:
        """The SQLAlchemy session whose writes commit with ``tm``'s transaction."""
        request = get_current_request()
        if request is not None and getattr(request, "tm", None) is tm:
            try:
                return request.dbsession
            except ConfigurationError as exc:
                raise OutboxError(f"{OUTBOX_KEY}: {message.task.name} cannot be written to the outbox: {exc}") \
                    from None
        # No request of this transaction (a script's `with tm:`): a session
        # zope.sqlalchemy has already joined to it.
        sessions = _joined_sessions(tm)
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
        ensure_table(engine)
        table = outbox_table
        query = (sa.select(table.c.id, table.c.task_name, table.c.args, table.c.kwargs, table.c.options)
                 .where(table.c.sent_at.is_(None), table.c.app == self.app_name)
                 .order_by(table.c.created_at).limit(self.batch_size))
        if ids is not None:
            query = query.where(table.c.id.in_(ids))
        if engine.dialect.name == "postgresql":
            # Rows another relay holds are skipped, not waited for: each row
            # is published by whoever locked it, once.
            query = query.with_for_update(skip_locked=True)
        with engine.connect() as conn, conn.begin():
            rows = conn.execute(query).all()
            if not rows:
                return 0
            self.publish_rows(rows)
            conn.execute(sa.update(table).where(table.c.id.in_([row.id for row in rows]))
                         .values(sent_at=time.time()))
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
            args = json.loads(row.args, object_hook=_decode)
            kwargs = json.loads(row.kwargs, object_hook=_decode)
            options = _rebuild_options(app, row.options)
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
        ensure_table(engine)
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        table = outbox_table
        with engine.begin() as conn:
            result = conn.execute(sa.delete(table).where(
                table.c.app == self.app_name, table.c.sent_at.is_not(None), table.c.sent_at < cutoff))
        return result.rowcount or 0

    def pending_count(self) -> int:
        engine = self.relay_engine()
        ensure_table(engine)
        table = outbox_table
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)
                                .where(table.c.app == self.app_name, table.c.sent_at.is_(None))).scalar_one()

    def status(self, now: float | None = None) -> OutboxStatus:
        """Counts of this app's unsent and kept sent rows, and the age of the oldest unsent one."""
        engine = self.relay_engine()
        ensure_table(engine)
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


def _joined_sessions(tm: transaction.TransactionManager) -> list[Session]:
    try:
        txn = tm.get()
    except transaction.interfaces.NoTransaction:
        return []
    sessions = []
    for resource in getattr(txn, "_resources", ()):
        session = getattr(resource, "session", None)
        if isinstance(resource, zope.sqlalchemy.datamanager.SessionDataManager) and session is not None:
            sessions.append(session)
    return sessions


# -- the relay ----------------------------------------------------------------------------------

class _Listener:
    """A PostgreSQL connection LISTENing on :data:`CHANNEL` (psycopg 3 or psycopg2)."""

    def __init__(self, engine: sa.Engine):
        self.driver = engine.dialect.driver
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        if self.driver == "psycopg":
            import psycopg

            self.conn = psycopg.connect(*cargs, **cparams, autocommit=True)
        elif self.driver == "psycopg2":
            import psycopg2

            self.conn = psycopg2.connect(*cargs, **cparams)
            self.conn.autocommit = True
        else:
            raise RuntimeError(f"LISTEN needs psycopg or psycopg2, not {self.driver}")
        self.conn.cursor().execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> bool:
        """True when a notification arrived within ``timeout`` seconds."""
        if self.driver == "psycopg":
            got = False
            for _notify in self.conn.notifies(timeout=timeout, stop_after=1):
                got = True
            return got
        import select

        if not self.conn.notifies and select.select([self.conn], [], [], timeout) == ([], [], []):
            return False
        self.conn.poll()
        got = bool(self.conn.notifies)
        self.conn.notifies.clear()
        return got

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class OutboxRelay(BackgroundLoop):
    """Publishes an app's unsent outbox rows until stopped.

    Woken by PostgreSQL NOTIFY when a writing transaction commits, and every
    ``outbox_poll_seconds`` anyway (the only wake-up on SQLite). Any error
    (broker down, database gone) rolls the round back and is retried after
    a capped exponential back-off, forever; the first failure of an outage
    is logged at WARNING, its end at INFO.
    """

    #: Longest single wait, so that stop() is noticed quickly.
    WAIT_SLICE = 0.5
    PRUNE_EVERY_SECONDS = 60.0

    thread_name = "websauna_tasks-outbox-relay"

    def __init__(self, outbox: Outbox, listen: bool = True):
        self.outbox = outbox
        self.listen = listen
        super().__init__()
        self.failures = 0
        self.published = 0
        #: Set after every round, successful or not (tests wait on it).
        self.rounds = 0

    def run(self) -> None:
        outbox = self.outbox
        listener: _Listener | None = None
        next_prune = 0.0
        next_redelivery = 0.0
        logger.info("websauna_tasks outbox relay started (app %s, batch %d, poll %.3gs)",
                    outbox.app_name, outbox.batch_size, outbox.poll_seconds)
        try:
            while not self.stopping.is_set():
                try:
                    engine = outbox.relay_engine()
                    if listener is None and self.listen and engine.dialect.name == "postgresql":
                        # LISTEN before draining: a commit in between still wakes us.
                        listener = _Listener(engine)
                    published = outbox.drain()
                    if published:
                        self.published += published
                        logger.debug("websauna_tasks outbox relay: published %d message(s)", published)
                    if outbox.redeliverer.enabled and time.monotonic() >= next_redelivery:
                        outbox.redeliverer.run()
                        next_redelivery = time.monotonic() + outbox.redeliverer.interval
                    if time.monotonic() >= next_prune:
                        outbox.prune()
                        next_prune = time.monotonic() + min(self.PRUNE_EVERY_SECONDS,
                                                            max(1.0, outbox.retention_seconds))
                except Exception as exc:
                    self.failures += 1
                    self.rounds += 1
                    if self.failures == 1:
                        logger.warning("websauna_tasks outbox relay: cannot publish (%s: %s); retrying with back-off, "
                                       "unsent messages stay in the outbox", type(exc).__name__, exc)
                    else:
                        logger.debug("websauna_tasks outbox relay: attempt %d failed: %r", self.failures, exc)
                    if listener is not None:
                        listener.close()
                        listener = None
                    self.stopping.wait(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (self.failures - 1)))
                    continue
                self.rounds += 1
                if self.failures:
                    logger.info("websauna_tasks outbox relay: publishing again after %d failed attempt(s)",
                                self.failures)
                    self.failures = 0
                self._wait(listener)
        finally:
            if listener is not None:
                listener.close()
            logger.info("websauna_tasks outbox relay stopped (app %s)", outbox.app_name)

    def _wait(self, listener: _Listener | None) -> None:
        deadline = time.monotonic() + self.outbox.poll_seconds
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if listener is None:
                self.stopping.wait(min(left, self.WAIT_SLICE))
            elif listener.wait(min(left, self.WAIT_SLICE)):
                return


class OutboxRelayStep(bootsteps.StartStopStep):
    """Runs an :class:`OutboxRelay` thread in the worker's main process.

    A step of the *worker* blueprint, which only the main process runs:
    prefork children never start one (``worker_process_init`` would start a
    relay per child, each with its own LISTEN connection, for no gain, and a
    thread started before a fork does not survive in the child anyway). It
    starts after the pool, so no child is forked while the thread is first
    opening its connections, and stops on warm and cold shutdown.
    """

    requires = ("celery.worker.components:Pool",)
    label = "websauna_tasks outbox relay"

    def __init__(self, parent: t.Any, **kwargs: t.Any):
        super().__init__(parent, **kwargs)
        self.relay: OutboxRelay | None = None

    def include_if(self, parent: t.Any) -> bool:
        return getattr(parent.app, OUTBOX_ATTRIBUTE, None) is not None

    def create(self, parent: t.Any) -> OutboxRelay:
        self.relay = OutboxRelay(get_outbox(parent.app))
        return self.relay

    def terminate(self, parent: t.Any) -> None:
        self.stop(parent)


def run_relay(app: Celery, stop: threading.Event | None = None) -> OutboxRelay:
    """Run a relay in the calling thread until ``stop`` is set (``ws-celery INI -- outbox-relay``)."""
    relay = OutboxRelay(get_outbox(app))
    if stop is not None:
        relay.stopping = stop
    relay.run()
    return relay
