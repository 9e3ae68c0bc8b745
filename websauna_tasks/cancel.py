"""Cancellation that outlives workers: ``cancel(task_id)`` and ``cancel_name(name)``.

Celery's ``revoke`` is a broadcast that each worker keeps in memory: a
worker started after it, or restarted, runs the task anyway. Here a cancel
is a mark in a store every process shares, and the worker's intake
(intake.py) looks the mark up for each message before Celery builds a
request: a marked message is acknowledged, its result set to ``REVOKED``
(as revoke does) and it never runs, whichever worker takes it and whenever.

The store: Redis when there is one (``websauna_tasks.redis_url``, else the
Redis broker: the store ``get_redis`` uses), one key per id with a TTL of
``websauna_tasks.cancel_retention_seconds``; else the table
``websauna_tasks_cancellations`` of the app's database (schema.py); an
in-process dict for ``memory://`` apps without a database.

A cancel of an id nobody has sent yet is kept like any other: the id of a
task with a countdown, or of a message still in the outbox relay, is
known before its message reaches a worker, and must be cancelled then too.
With the outbox on, an unsent row of that id is deleted as well, so it is
never published at all.

The intake's check is one Redis ``EXISTS`` (or one primary-key SELECT) per
message; when the store cannot be read the message runs (a cancel is a
request, an outage of its store must not stop every task) and the failure
is logged.
"""
from __future__ import annotations

import logging
import threading
import time
import typing as t

import sqlalchemy as sa
from celery.backends.base import DisabledBackend
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry
from pyramid.threadlocal import get_current_registry

from .db import get_engine
from .names import NAME_HEADER, get_name_store, release_name
from .outbox import find_outbox, outbox_table
from .redis_client import get_redis, redis_url
from .registry import get_celery
from .request import get_current_request
from .schema import cancellations_table, ensure_tables
from .settings import get_task_settings
from .state import find_state

if t.TYPE_CHECKING:
    from celery import Celery

__all__ = ["cancel", "cancel_name", "is_cancelled", "CancelStore", "get_cancel_store", "MAX_TASK_ID_LENGTH"]

logger = logging.getLogger(__name__)

#: Longest id a cancel accepts: Celery's ids are 36-character UUIDs; a longer header is never looked up.
MAX_TASK_ID_LENGTH = 255

_STORE_KEY = "websauna_tasks.cancel_store_instance"
_LOCK = threading.Lock()


class CancelStore(t.Protocol):
    def add(self, task_id: str, seconds: float) -> None:
        """Mark ``task_id`` cancelled for ``seconds``."""

    def contains(self, task_id: str) -> bool:
        """Whether ``task_id`` is marked cancelled now."""


class RedisCancelStore:
    def __init__(self, registry: Registry, prefix: str):
        self.registry = registry
        self.prefix = prefix

    @property
    def client(self) -> t.Any:
        # get_redis: one client per process, a fresh one after a fork (prefork children).
        return get_redis(self.registry)

    def add(self, task_id: str, seconds: float) -> None:
        self.client.set(self.prefix + task_id, b"1", px=max(1, int(seconds * 1000)))

    def contains(self, task_id: str) -> bool:
        return bool(self.client.exists(self.prefix + task_id))


class SQLCancelStore:
    """Marks as rows; autocommit, as the name claims: visible to every worker at once, in no caller's transaction."""

    def __init__(self, engine: sa.Engine, app_name: str, create_table: bool):
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.app_name = app_name
        self.create_table = create_table
        self._ready = False

    def _connect(self) -> sa.Connection:
        if not self._ready:
            ensure_tables(self.engine, [cancellations_table], self.create_table)
            self._ready = True
        return self.engine.connect()

    def add(self, task_id: str, seconds: float) -> None:
        table = cancellations_table
        now = time.time()
        key = (table.c.app == self.app_name) & (table.c.task_id == task_id)
        with self._connect() as conn:
            # Expired marks go here, with the index on expires_at: no pruning job to schedule.
            conn.execute(sa.delete(table).where(table.c.expires_at <= now))
            if not conn.execute(sa.update(table).where(key).values(expires_at=now + seconds)).rowcount:
                try:
                    conn.execute(sa.insert(table).values(app=self.app_name, task_id=task_id,
                                                         expires_at=now + seconds))
                except sa.exc.IntegrityError:  # a concurrent cancel of the same id: it is marked
                    pass

    def contains(self, task_id: str) -> bool:
        table = cancellations_table
        with self._connect() as conn:
            return conn.execute(sa.select(table.c.expires_at).where(
                table.c.app == self.app_name, table.c.task_id == task_id,
                table.c.expires_at > time.time())).first() is not None


class MemoryCancelStore:
    """For ``memory://`` apps without a database: nothing outside the process could see a mark anyway."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, task_id: str, seconds: float) -> None:
        with self.lock:
            now = time.monotonic()
            self.marks = {key: until for key, until in self.marks.items() if until > now}
            self.marks[task_id] = now + seconds

    def contains(self, task_id: str) -> bool:
        with self.lock:
            return self.marks.get(task_id, 0.0) > time.monotonic()


def get_cancel_store(registry: Registry) -> CancelStore:
    """The registry's store, made on first use (see the module's docstring for which)."""
    store = registry.get(_STORE_KEY)
    if store is None:
        with _LOCK:
            store = registry.get(_STORE_KEY)
            if store is None:
                store = registry[_STORE_KEY] = _make_store(registry)
    return store


def _make_store(registry: Registry) -> CancelStore:
    app = get_celery(registry)
    try:
        redis_url(registry)
    except ConfigurationError:
        pass
    else:
        return RedisCancelStore(registry, f"websauna_tasks:cancel:{app.main}:")
    engine = get_engine(registry)
    if engine is not None:
        return SQLCancelStore(engine, app.main or "", get_task_settings(registry).create_tables == "auto")
    if str(app.conf.broker_url or "").startswith("memory://"):
        return MemoryCancelStore()
    return NoCancelStore()


class NoCancelStore:
    """Neither Redis nor a database: nothing can be cancelled, and the intake's check costs nothing."""

    def add(self, task_id: str, seconds: float) -> None:
        raise ConfigurationError("cancel() needs a store every worker shares: a Redis broker, "
                                 "websauna_tasks.redis_url or sqlalchemy.url")

    def contains(self, task_id: str) -> bool:
        return False


def _registry(where: t.Any) -> Registry:
    if where is None:
        request = get_current_request()
        return request.registry if request is not None else get_current_registry()
    if isinstance(where, Registry):
        return where
    registry = getattr(where, "registry", None)  # a Pyramid request
    if isinstance(registry, Registry):
        return registry
    state = find_state(where)  # a Celery app built by includeme
    if state is not None:
        return state.registry
    raise TypeError(f"expected a registry, a request or a websauna_tasks Celery app, got {type(where).__name__}")


def check_task_id(task_id: t.Any) -> str:
    """``task_id`` if it can be a task id: TypeError for a non-string, ValueError for an empty or huge one."""
    if not isinstance(task_id, str):
        raise TypeError(f"a task id is a string, got {type(task_id).__name__}")
    if not task_id or len(task_id) > MAX_TASK_ID_LENGTH or not task_id.isprintable() or task_id != task_id.strip():
        raise ValueError(f"not a task id: {task_id[:80]!r} (1 to {MAX_TASK_ID_LENGTH} printable characters)")
    return task_id


def cancel(task_id: str, where: t.Any = None) -> bool:
    """Cancel the pending task ``task_id``: it will not run, whichever worker takes its message, and when.

    ``where`` is the registry, a request or the Celery app (default: the
    current request's, or Pyramid's current registry). The mark is kept for
    ``websauna_tasks.cancel_retention_seconds``, also for an id no message
    carries yet. A run already under way goes on, unless its body polls
    ``self.is_cancelled()``. True when an unsent outbox row of that id was
    deleted, so that its message was never published.
    """
    task_id = check_task_id(task_id)
    registry = _registry(where)
    get_cancel_store(registry).add(task_id, get_task_settings(registry).cancel_retention_seconds)
    return _drop_outbox_row(registry, task_id)


def _drop_outbox_row(registry: Registry, task_id: str) -> bool:
    app = get_celery(registry)
    if find_outbox(app) is None:
        return False
    engine = get_engine(registry)
    if engine is None:
        return False
    table = outbox_table
    try:
        with engine.begin() as conn:
            deleted = conn.execute(sa.delete(table).where(
                table.c.id == task_id, table.c.app == (app.main or ""), table.c.sent_at.is_(None))).rowcount
    except sa.exc.ProgrammingError:  # no outbox table yet: no row to delete
        return False
    return bool(deleted)


def cancel_name(name: str, where: t.Any = None) -> str | None:
    """Cancel the pending task holding the name ``name`` (``unique_name=`` / ``_name=``); its id, None when free.

    The name is released at once, so the next ``defer(..., _name=name)``
    schedules a new task instead of getting the cancelled one's id back.
    """
    if not isinstance(name, str):
        raise TypeError(f"a task name is a string, got {type(name).__name__}")
    if not name or len(name) > 200:
        raise ValueError(f"not a task name: {name[:80]!r}")
    registry = _registry(where)
    app = get_celery(registry)
    holder = get_name_store(registry, app).holder(name)
    if holder is None:
        return None
    cancel(holder, registry)
    release_name(app, name, holder)
    return holder


def is_cancelled(task_id: str, where: t.Any = None) -> bool:
    """Whether ``task_id`` is marked cancelled (``cancel``), within the retention."""
    task_id = check_task_id(task_id)
    return get_cancel_store(_registry(where)).contains(task_id)


def cancelled_message(registry: Registry, task_id: t.Any) -> bool:
    """The intake's check: whether a message's id is marked; False for an id that cannot be one, or on failure."""
    if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID_LENGTH:
        return False
    try:
        return get_cancel_store(registry).contains(task_id)
    except Exception as exc:
        logger.warning("websauna_tasks: could not check whether task %s is cancelled, running it: %s: %s",
                       task_id, type(exc).__name__, exc)
        return False


def skip_cancelled(app: Celery, registry: Registry, message: t.Any) -> bool:
    """The intake's step: True when ``message``'s task was cancelled, and then it is settled and must not run.

    Settled as Celery settles a revoked task: the result ``REVOKED``, the
    message acknowledged; the name it claimed is freed; one log line.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return False  # not protocol 2: Celery's own handlers refuse it
    task_id = headers.get("id")
    if not cancelled_message(registry, task_id):
        return False
    name = headers.get("task")
    logger.info("websauna_tasks: task %s[%s] was cancelled: acknowledged without running", name, task_id)
    if not isinstance(app.backend, DisabledBackend):
        try:
            app.backend.mark_as_revoked(task_id, "cancelled")
        except Exception:
            logger.exception("websauna_tasks: could not mark cancelled task %s as revoked", task_id)
    claimed = headers.get(NAME_HEADER)
    if isinstance(claimed, str) and claimed:
        try:
            release_name(app, claimed, task_id)
        except Exception:
            logger.exception("websauna_tasks: could not free the name of cancelled task %s", task_id)
    try:
        if not getattr(message, "acknowledged", True):
            message.ack()
    except Exception:
        logger.exception("websauna_tasks: could not acknowledge cancelled task %s", task_id)
    return True
