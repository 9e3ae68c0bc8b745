"""Idempotent tasks: at-least-once delivery, exactly-once effects.

``@task(base=TransactionalTask, idempotent=True)`` (or ``idempotent = True``
on a subclass of :class:`~websauna_tasks.TransactionalTask`) makes each run
first insert its task id into ``websauna_tasks_done``, through
``request.dbsession``, in the run's own transaction:

- the row commits with the body's writes, or not at all: a run that raises,
  is aborted or whose worker dies leaves no row, and its redelivery runs;
- a redelivery of a run that committed finds the row and skips the body
  (it returns None and logs "already done" at INFO);
- on PostgreSQL a duplicate running *at the same time* waits on the primary
  key until the first run ends: after its commit the insert does nothing
  (skip), after its abort the insert goes through (run).

The insert is ``INSERT ... ON CONFLICT DO NOTHING`` on PostgreSQL and
SQLite, so no error aborts the run's transaction; other databases insert in
a savepoint and read an ``IntegrityError`` as "already done". The table is
created (``IF NOT EXISTS``) on first use unless
``websauna_tasks.idempotency_create_table = false`` or
``websauna_tasks.create_tables = never`` (then create it with
``ws-celery INI -- init`` or your migrations, from :mod:`websauna_tasks.schema`;
its absence is then a :class:`~websauna_tasks.schema.MissingTables` error). Old rows are removed by
:func:`prune_done`, which keeps ``websauna_tasks.idempotency_retention_seconds``
(default 7 days); every worker whose app has an idempotent task calls it
each ``websauna_tasks.idempotency_prune_interval_seconds`` (default one
hour) from its main process. See ``docs/RELIABILITY.md``.
"""
from __future__ import annotations

import datetime
import logging
import threading
import typing as t
import weakref

import sqlalchemy as sa
from celery import bootsteps
from pyramid.exceptions import ConfigurationError

from .payload import stores_payloads

# The done-table is defined with the library's other tables and keeps its names here; ``metadata``
# (its MetaData before) is the library's one MetaData now, holding every table of schema.py
# (module __getattr__ below).
from .schema import DONE_TABLE_NAME as DONE_TABLE_NAME
from .schema import done_table as done_table
from .schema import ensure_tables, on_conflict_insert

# The settings keep their names here (settings.py declares and parses them): seconds a done-row is
# kept by prune_done() (7 days); create websauna_tasks_done on first use (true); seconds between two
# prunes by each worker (3600; 0: never).
from .settings import DEFAULT_IDEMPOTENCY_PRUNE_INTERVAL_SECONDS as DEFAULT_PRUNE_INTERVAL_SECONDS  # noqa: F401
from .settings import DEFAULT_IDEMPOTENCY_RETENTION_SECONDS as DEFAULT_RETENTION_SECONDS  # noqa: F401
from .settings import IDEMPOTENCY_CREATE_TABLE_KEY as CREATE_TABLE_KEY  # noqa: F401
from .settings import IDEMPOTENCY_PRUNE_INTERVAL_KEY as PRUNE_INTERVAL_KEY  # noqa: F401
from .settings import IDEMPOTENCY_RETENTION_KEY as RETENTION_KEY
from .settings import TaskSettings, get_task_settings, parse_setting
from .state import app_state, registry_of
from .threads import BackgroundLoop

if t.TYPE_CHECKING:
    from celery import Celery, Task
    from pyramid.registry import Registry
    from pyramid.request import Request
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)


_created: weakref.WeakSet[Engine] = weakref.WeakSet()
_created_lock = threading.Lock()


def check_idempotent_class(cls: type, transactional_base: type) -> None:
    """At class creation: ``idempotent`` needs the run's transaction to record the id in."""
    if cls.__dict__.get("idempotent") and not issubclass(cls, transactional_base):
        raise ConfigurationError(
            f"{cls.__module__}.{cls.__qualname__}: idempotent=True needs base=TransactionalTask or "
            "RetryableTransactionTask: the task id is recorded in the run's transaction, with its writes")


def __getattr__(name: str) -> sa.MetaData:
    # Read from schema when asked for, not imported: reading schema.metadata loads every dialect.
    if name == "metadata":
        from . import schema

        return schema.metadata
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _engine_of(session: Session) -> Engine:
    bind = session.get_bind()
    return getattr(bind, "engine", bind)


def ensure_table(engine: Engine, create: bool = True) -> None:
    """Create ``websauna_tasks_done`` unless it exists (``create=False``: check it does), once per engine."""
    with _created_lock:
        if engine in _created:
            return
    ensure_tables(engine, [done_table], create)
    with _created_lock:
        _created.add(engine)


def record_run(session: Session, task_id: str, task_name: str) -> bool:
    """Insert the done-row in the session's transaction: True if inserted, False if it was there."""
    values = {"task_id": task_id, "task_name": task_name,
              "done_at": datetime.datetime.now(datetime.timezone.utc)}
    insert = on_conflict_insert(_engine_of(session).dialect.name)
    if insert is not None:
        statement = (insert(done_table).values(**values).on_conflict_do_nothing(index_elements=["task_id"])
                     .returning(done_table.c.task_id))  # rowcount is -1 here with psycopg 3 and SQLAlchemy 2.1
        return session.execute(statement).first() is not None
    try:
        with session.begin_nested():
            session.execute(sa.insert(done_table).values(**values))
    except sa.exc.IntegrityError:
        return False
    return True


def claim_run(request: Request, task: Task) -> bool:
    """Called in the run's transaction, before the body: False when this task id already committed."""
    task_id = task.request.id
    if not task_id:
        return True
    session = request.dbsession
    settings = get_task_settings(request.registry)
    ensure_table(_engine_of(session), settings.create_tables == "auto" and settings.idempotency_create_table)
    if record_run(session, task_id, task.name):
        return True
    logger.info("%s[%s]: already done (a previous delivery committed); skipping the body", task.name, task_id)
    return False


def retention_seconds(settings: t.Mapping[str, t.Any] | TaskSettings) -> float:
    """``websauna_tasks.idempotency_retention_seconds`` of parsed settings, or of a settings mapping."""
    if isinstance(settings, TaskSettings):
        return settings.idempotency_retention_seconds
    return parse_setting(settings, RETENTION_KEY)


def prune_done(registry: Registry, older_than_seconds: float | None = None,
               engine: Engine | None = None) -> int:
    """Delete done-rows older than the retention; returns how many.

    Run it from a periodic task. A row must outlive every redelivery of its
    message: keep the retention well above the broker's visibility timeout
    plus the longest countdown you use.
    """
    from .db import get_engine

    engine = engine or get_engine(registry)
    if engine is None:
        raise ConfigurationError("prune_done() needs sqlalchemy.url in the settings, or engine=")
    seconds = retention_seconds(get_task_settings(registry)) if older_than_seconds is None else older_than_seconds
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=float(seconds))
    if not sa.inspect(engine).has_table(DONE_TABLE_NAME):
        return 0
    with engine.begin() as conn:
        return conn.execute(sa.delete(done_table).where(done_table.c.done_at < cutoff)).rowcount


# -- pruning in the worker ------------------------------------------------------------------------

def configure_idempotency(registry: Registry, app: Celery) -> None:
    """Let workers prune the done-rows unless the interval is 0 (called by includeme)."""
    if get_task_settings(registry).idempotency_prune_interval_seconds > 0:
        app.steps["worker"].add(DonePruneStep)


def prune_interval_seconds(settings: t.Mapping[str, t.Any] | TaskSettings) -> float:
    """``websauna_tasks.idempotency_prune_interval_seconds`` of parsed settings, or of a settings mapping."""
    if isinstance(settings, TaskSettings):
        return settings.idempotency_prune_interval_seconds
    return parse_setting(settings, PRUNE_INTERVAL_KEY)


class DonePruner(BackgroundLoop):
    """A thread calling :func:`prune_done` every interval until stopped; errors wait for the next round."""

    thread_name = "websauna_tasks-done-pruner"

    def __init__(self, registry: Registry, interval: float, done: bool = True, payloads: bool = False):
        self.registry = registry
        self.interval = interval
        #: What each round prunes: the done-rows, and the stored payloads past their retention (claim_check.py).
        self.done = done
        self.payloads = payloads
        super().__init__()
        #: Rounds done and rows deleted so far (tests and metrics read them).
        self.rounds = 0
        self.deleted = 0
        self.deleted_payloads = 0

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            if self.payloads:
                self._prune_payloads()
            if not self.done:
                self.rounds += 1
                continue
            try:
                deleted = prune_done(self.registry)
            except Exception as exc:
                # The database may be down for a while; the next round tries again.
                logger.warning("websauna_tasks: could not prune %s (%s: %s); trying again in %gs",
                               DONE_TABLE_NAME, type(exc).__name__, exc, self.interval)
            else:
                self.deleted += deleted
                if deleted:
                    logger.info("websauna_tasks: pruned %d row(s) of %s", deleted, DONE_TABLE_NAME)
            self.rounds += 1


    def _prune_payloads(self) -> None:
        from .claim_check import PAYLOADS_TABLE_NAME, prune_stored_payloads

        try:
            self.deleted_payloads += prune_stored_payloads(self.registry)
        except Exception as exc:
            logger.warning("websauna_tasks: could not prune %s (%s: %s); trying again in %gs",
                           PAYLOADS_TABLE_NAME, type(exc).__name__, exc, self.interval)


class DonePruneStep(bootsteps.StartStopStep):
    """Runs a :class:`DonePruner` in the worker's main process when the app has an idempotent task or stores payloads.

    Several workers prune the same table now and then: each DELETE removes
    what the others left, and none depends on the others running.
    """

    requires = ("celery.worker.components:Pool",)
    label = "websauna_tasks done-row pruning"

    def include_if(self, parent: t.Any) -> bool:
        from .db import get_engine

        app = parent.app
        registry = registry_of(app)
        if registry is None or get_engine(registry) is None:
            return False
        return _has_idempotent_task(app) or stores_payloads(app)

    def create(self, parent: t.Any) -> DonePruner:
        app = parent.app
        registry = app_state(app).registry
        return DonePruner(registry, get_task_settings(registry).idempotency_prune_interval_seconds,
                          done=_has_idempotent_task(app), payloads=stores_payloads(app))


def _has_idempotent_task(app: Celery) -> bool:
    return any(getattr(task, "idempotent", False) for task in app.tasks.values())
