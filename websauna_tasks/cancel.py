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

With Redis, the intake does not ask the store for each message: each
worker keeps the live marks in memory (:class:`RedisCancelWatch`). A cancel
writes its key, an index entry and a pub/sub announcement in one script, so
the announcement is never seen before the key exists. The worker subscribes
first and then loads the index, so a cancel is either in what it loaded or
announced after it subscribed; it reads the announcements waiting on its
socket before each message (a poll, no round trip), and checks the
subscription with a PING once a second. While the subscription is down,
unconfirmed, or the marks are too many to keep (:data:`MAX_LOCAL_MARKS`),
each message is looked up with one ``EXISTS``, as without the watch.

With only a database, PostgreSQL through psycopg 3 does the same with
``LISTEN``/``NOTIFY`` (:class:`SQLCancelWatch`: the cancel's row is
committed before its notification); any other database (SQLite) costs one
primary-key SELECT per message. When the store cannot be read the message
runs (a cancel is a request, an outage of its store must not stop every
task) and the failure is logged.
"""
from __future__ import annotations

import json
import logging
import os
import select
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
from .registry import as_registry, get_celery
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
#: Most live marks a worker keeps in memory; with more, its intake looks each message up in the store instead.
MAX_LOCAL_MARKS = 50_000
#: Least time between two PINGs on the watch's subscription: a subscription confirmed longer ago is checked first.
WATCH_CONFIRM_SECONDS = 1.0
#: How long the watch waits before subscribing again after a failure (each message is looked up meanwhile).
WATCH_RETRY_SECONDS = 1.0
#: The client name of the watch's connection, followed by ``-PID``: operators (and tests) find it in CLIENT LIST.
WATCH_CLIENT_NAME = "websauna_tasks-cancel-watch"

_STORE_KEY = "websauna_tasks.cancel_store_instance"
_LOCK = threading.Lock()


class CancelStore(t.Protocol):
    def add(self, task_id: str, seconds: float) -> None:
        """Mark ``task_id`` cancelled for ``seconds``."""

    def contains(self, task_id: str) -> bool:
        """Whether ``task_id`` is marked cancelled now."""


# KEYS: the mark, the index, ARGV: id, milliseconds, channel. One script, so the announcement never precedes
# the mark, and the index's scores are the server's clock, the same clock the mark's TTL runs on.
_CANCEL_SCRIPT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ms = tonumber(ARGV[2])
redis.call('SET', KEYS[1], '1', 'PX', ms)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
redis.call('ZADD', KEYS[2], now_ms + ms, ARGV[1])
if redis.call('PTTL', KEYS[2]) < ms then
    redis.call('PEXPIRE', KEYS[2], ms)
end
redis.call('PUBLISH', ARGV[3], ARGV[2] .. ' ' .. ARGV[1])
"""


class RedisCancelStore:
    def __init__(self, registry: Registry, prefix: str, app_name: str = ""):
        self.registry = registry
        self.prefix = prefix
        # Outside the marks' prefix, so that no task id can name them.
        self.index = f"websauna_tasks:cancels:{app_name}"
        self.channel = f"websauna_tasks:cancels:{app_name}"
        self._script: t.Any = None
        self._watch: tuple[int, RedisCancelWatch] | None = None

    @property
    def client(self) -> t.Any:
        # get_redis: one client per process, a fresh one after a fork (prefork children).
        return get_redis(self.registry)

    def add(self, task_id: str, seconds: float) -> None:
        client = self.client
        if self._script is None:
            self._script = client.register_script(_CANCEL_SCRIPT)
        self._script(keys=[self.prefix + task_id, self.index],
                     args=[task_id, max(1, int(seconds * 1000)), self.channel], client=client)

    def contains(self, task_id: str) -> bool:
        return bool(self.client.exists(self.prefix + task_id))

    def watch(self) -> RedisCancelWatch:
        """This process's watch (the intake's check); a new one after a fork, whose socket is not the parent's."""
        made = self._watch
        pid = os.getpid()
        if made is None or made[0] != pid:
            with _LOCK:
                made = self._watch
                if made is None or made[0] != pid:
                    made = self._watch = (pid, RedisCancelWatch(self))
        return made[1]


def _nothing() -> int:
    return 0


class CancelWatch:
    """One worker's copy of the live marks, kept current by the store's announcements (see the module's docstring).

    The subclass subscribes and loads (:meth:`_subscribe`), reads what is
    waiting without a round trip (:meth:`_drain`) and confirms the
    subscription with one (:meth:`_confirm`). Used by one thread at a time,
    the consumer's: another thread that finds it busy asks the store.
    """

    what = "the store"

    def __init__(self, store: t.Any, max_marks: int = MAX_LOCAL_MARKS):
        self.store = store
        self.max_marks = max_marks
        self.marks: dict[str, float] = {}  # id -> time.monotonic() at which the mark expires
        self.connection: t.Any = None
        self.confirmed_at = 0.0
        self.next_attempt = 0.0
        self.failures = 0
        self.lock = threading.Lock()

    @property
    def live(self) -> bool:
        """Whether the intake answers from memory now (False: each message is looked up in the store)."""
        return self.connection is not None

    def contains(self, task_id: str) -> bool:
        if not self.lock.acquire(blocking=False):
            return self.store.contains(task_id)
        try:
            if self.connection is None and not self._start():
                return self.store.contains(task_id)
            try:
                if time.monotonic() - self.confirmed_at > WATCH_CONFIRM_SECONDS:
                    self._confirm()
                    self.confirmed_at = time.monotonic()
                else:
                    self._drain()
            except Exception as exc:
                self._stop(f"the subscription failed: {type(exc).__name__}: {exc}")
                return self.store.contains(task_id)
            if self.connection is None:  # too many marks arrived: back to the store
                return self.store.contains(task_id)
            until = self.marks.get(task_id)
            return until is not None and until > time.monotonic()
        finally:
            self.lock.release()

    def _start(self) -> bool:
        now = time.monotonic()
        if now < self.next_attempt:
            return False
        # Doubling up to 30 s: a store that refuses the watch is not asked again on every message.
        self.next_attempt = now + min(30.0, WATCH_RETRY_SECONDS * 2 ** min(self.failures, 5))
        self.failures += 1
        try:
            # Subscribed first, loaded second: a cancel is in what is loaded, or announced after the subscription.
            marks = self._subscribe()
        except Exception as exc:
            self._close()
            logger.warning("websauna_tasks: cancel watch not started, each message is looked up in %s: %s: %s",
                           self.what, type(exc).__name__, exc)
            return False
        if marks is None:
            self._close()
            self.next_attempt = now + 60.0
            logger.warning("websauna_tasks: more than %d tasks are cancelled: each message is looked up in %s",
                           self.max_marks, self.what)
            return False
        self.marks = marks
        self.failures = 0
        self.confirmed_at = time.monotonic()
        logger.info("websauna_tasks: cancel watch subscribed as client %s (%d live marks)", self.client_name(),
                    len(marks))
        return True

    def _take(self, announcement: str) -> None:
        """One announcement, ``MILLISECONDS ID``: anything else is ignored (anybody may announce)."""
        ms, _, task_id = announcement.partition(" ")
        if not ms.isdigit() or not task_id or len(task_id) > MAX_TASK_ID_LENGTH:
            return
        until = time.monotonic() + int(ms[:15]) / 1000
        self.marks[task_id] = max(until, self.marks.get(task_id, 0.0))
        if len(self.marks) > self.max_marks:
            now = time.monotonic()
            self.marks = {key: when for key, when in self.marks.items() if when > now}
            if len(self.marks) > self.max_marks:
                self._stop(f"more than {self.max_marks} tasks are cancelled")
                self.next_attempt = time.monotonic() + 60.0

    def _stop(self, why: str) -> None:
        if self.connection is not None:
            self._close()
            logger.warning("websauna_tasks: cancel watch stopped, each message is looked up in %s until it is "
                           "back: %s", self.what, why)
        self.connection = None
        self.marks = {}

    def client_name(self) -> t.Any:
        return None

    def _subscribe(self) -> dict[str, float] | None:
        """Connect and subscribe (setting ``self.connection``), then load the live marks; None when too many."""
        raise NotImplementedError

    def _drain(self) -> None:
        raise NotImplementedError

    def _confirm(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass


class RedisCancelWatch(CancelWatch):
    """The watch of the Redis store: pub/sub on a connection of its own."""

    what = "Redis"

    def __init__(self, store: RedisCancelStore, max_marks: int = MAX_LOCAL_MARKS):
        super().__init__(store, max_marks)
        self.client_id: int | None = None  # the subscription's CLIENT ID, for CLIENT KILL ID in tests

    def client_name(self) -> t.Any:
        return self.client_id

    def _subscribe(self) -> dict[str, float] | None:
        import redis

        # A connection of its own, RESP2 and without redis-py's reconnects: a silent reconnect would
        # resubscribe and hide the announcements missed meanwhile; here any failure is seen and stops the watch.
        pool = redis.ConnectionPool.from_url(
            redis_url(self.store.registry), protocol=2, socket_timeout=2.0, socket_connect_timeout=2.0,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        connection = self.connection = pool.make_connection()
        connection.connect()
        connection.send_command("CLIENT", "SETNAME", f"{WATCH_CLIENT_NAME}-{os.getpid()}")
        connection.read_response()
        connection.send_command("CLIENT", "ID")
        self.client_id = connection.read_response()
        connection.send_command("SUBSCRIBE", self.store.channel)
        reply = connection.read_response()
        if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
            raise ValueError(f"unexpected reply to SUBSCRIBE: {reply!r}"[:200])
        client = self.store.client
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        found = client.zrangebyscore(self.store.index, now_ms, "+inf", start=0, num=self.max_marks + 1,
                                     withscores=True)
        if len(found) > self.max_marks:
            return None
        now = time.monotonic()
        return {member.decode(): now + (score - now_ms) / 1000 for member, score in found}

    def _drain(self) -> None:
        """Take the announcements waiting on the socket: one poll when there are none."""
        connection = self.connection
        sock = connection._sock
        # An SSL socket may hold decrypted bytes select() does not see.
        if not getattr(sock, "pending", _nothing)() and not select.select([sock], [], [], 0)[0]:
            return
        while connection.can_read(timeout=0):
            self._reply(connection.read_response())

    def _confirm(self) -> None:
        """PING through the subscription and read up to its answer: everything announced before is then taken."""
        connection = self.connection
        connection.send_command("PING")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            reply = connection.read_response()
            if isinstance(reply, list) and reply and reply[0] == b"pong":
                return
            self._reply(reply)
        raise TimeoutError("no answer to PING within 2 s")

    def _reply(self, reply: t.Any) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message" and isinstance(reply[2], bytes):
            self._take(reply[2].decode("utf-8", "replace"))

    def _close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.disconnect()
            except Exception:
                pass


#: PostgreSQL's NOTIFY channel of the SQL store: one for every app, the payload names the app.
NOTIFY_CHANNEL = "websauna_tasks_cancels"


class SQLCancelStore:
    """Marks as rows; autocommit, as the name claims: visible to every worker at once, in no caller's transaction.

    On PostgreSQL through psycopg 3 each cancel is announced with ``NOTIFY``
    after its row is written, for the workers' :class:`SQLCancelWatch`.
    """

    def __init__(self, engine: sa.Engine, app_name: str, create_table: bool):
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.app_name = app_name
        self.create_table = create_table
        self.notifies = engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        self._ready = False
        self._watch: tuple[int, SQLCancelWatch] | None = None

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
            if self.notifies:
                # After the row's commit (autocommit): a worker never hears of a mark it could not read.
                payload = json.dumps([self.app_name, max(1, int(seconds * 1000)), task_id])
                conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, payload)))

    def contains(self, task_id: str) -> bool:
        table = cancellations_table
        with self._connect() as conn:
            return conn.execute(sa.select(table.c.expires_at).where(
                table.c.app == self.app_name, table.c.task_id == task_id,
                table.c.expires_at > time.time())).first() is not None

    def watch(self) -> SQLCancelWatch | None:
        """This process's watch on PostgreSQL (psycopg 3), else None: then each message is looked up."""
        if not self.notifies:
            return None
        made = self._watch
        pid = os.getpid()
        if made is None or made[0] != pid:
            with _LOCK:
                made = self._watch
                if made is None or made[0] != pid:
                    made = self._watch = (pid, SQLCancelWatch(self))
        return made[1]


class SQLCancelWatch(CancelWatch):
    """The watch of the SQL store on PostgreSQL: ``LISTEN`` on a connection of its own, taken out of the pool."""

    what = "the database"

    def client_name(self) -> t.Any:
        return self.backend_pid

    backend_pid: int | None = None  # the listening server process, for pg_terminate_backend in tests

    def _subscribe(self) -> dict[str, float] | None:
        store = self.store
        store._connect().close()  # the table, created on first use
        connection = self.connection = store.engine.connect()
        driver = connection.connection.driver_connection
        # Read by psycopg while a statement of this connection runs (the load, the confirmation).
        driver.add_notify_handler(lambda notify: self._notice(notify.payload))
        connection.exec_driver_sql(f'LISTEN "{NOTIFY_CHANNEL}"')
        self.backend_pid = driver.pgconn.backend_pid
        table = cancellations_table
        now = time.time()
        rows = connection.execute(sa.select(table.c.task_id, table.c.expires_at).where(
            table.c.app == store.app_name, table.c.expires_at > now).limit(self.max_marks + 1)).all()
        if len(rows) > self.max_marks:
            return None
        start = time.monotonic()
        return {task_id: start + (expires_at - now) for task_id, expires_at in rows}

    def _drain(self) -> None:
        """Take the notifications waiting on the socket: one poll when there are none."""
        pgconn = self.connection.connection.driver_connection.pgconn
        for _ in range(64):
            if not select.select([pgconn.socket], [], [], 0)[0]:
                break
            # Raises once the server has closed the connection (an error message first, then the end).
            pgconn.consume_input()
        while (notify := pgconn.notifies()) is not None:
            self._notice(notify.extra.decode("utf-8", "replace"))

    def _confirm(self) -> None:
        """One statement through the listening connection: the notifications sent before it are then taken."""
        self.connection.exec_driver_sql("SELECT 1")
        self._drain()

    def _notice(self, payload: str) -> None:
        try:
            app, ms, task_id = json.loads(payload)
        except (ValueError, TypeError):
            return  # anybody may NOTIFY
        if app == self.store.app_name and isinstance(ms, int) and not isinstance(ms, bool) and \
                isinstance(task_id, str):
            self._take(f"{ms} {task_id}")

    def _close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.invalidate()  # not back to the pool: it listens
                connection.close()
            except Exception:
                pass


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
        return RedisCancelStore(registry, f"websauna_tasks:cancel:{app.main}:", app.main or "")
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
    state = find_state(where)  # a Celery app built by includeme
    if state is not None:
        return state.registry
    try:
        return as_registry(where, "cancel")
    except TypeError:
        raise TypeError(f"expected a registry, a request or a websauna_tasks Celery app, "
                        f"got {type(where).__name__}") from None


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


def cancelled_message(registry: Registry, task_id: t.Any, watched: bool = False) -> bool:
    """Whether a message's id is marked; False for an id that cannot be one, or on failure.

    ``watched``: the intake's check, answered by this process's
    :class:`RedisCancelWatch` when the store is Redis (a task body's
    ``is_cancelled`` asks the store: a prefork child should not subscribe).
    """
    if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID_LENGTH:
        return False
    try:
        store = get_cancel_store(registry)
        watch = store.watch() if watched and isinstance(store, (RedisCancelStore, SQLCancelStore)) else None
        if watch is not None:
            return watch.contains(task_id)
        return store.contains(task_id)
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
    if not cancelled_message(registry, task_id, watched=True):
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
