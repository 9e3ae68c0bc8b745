"""Task names that may be pending only once (djangae's ``_name``, Procrastinate's ``queueing_lock``).

A name is claimed when the task is scheduled, before the transaction
commits, so a second caller (another thread, another web process) sees it at
once and gets the first task's id back instead of queueing a duplicate. The
claim is released when the message is dropped (abort, savepoint rollback)
and, once the task has run, kept for ``websauna_tasks.name_retention_seconds``
(default 0: the name is free again as soon as the run ends).

The claims must be shared by every process that sends tasks, so they live
next to what those processes already share: the Redis broker when there is
one, else the application's SQL database (the embedded SQLite default, or
PostgreSQL behind RabbitMQ). ``memory://`` brokers, which only exist inside
one process, keep them in memory.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import typing as t

import sqlalchemy as sa
from celery.states import SUCCESS
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry

from .broker import STORED_ARGUMENTS_HEADER as PAYLOAD_HEADER
from .db import get_engine
from .schema import ensure_tables
from .schema import names_table as names_table  # defined with the library's other tables
from .settings import DEFAULT_NAME_PENDING_SECONDS as DEFAULT_PENDING_SECONDS  # noqa: F401
from .settings import NAME_PENDING_KEY as PENDING_KEY  # noqa: F401
from .settings import NAME_RETENTION_KEY as RETENTION_KEY  # noqa: F401
from .settings import NAME_STORE_KEY as NAME_STORE_KEY
from .settings import get_task_settings
from .state import app_state, registry_of

if t.TYPE_CHECKING:
    from celery import Celery

# Settings (declared and parsed in settings.py, imported above under their old names): NAME_STORE_KEY,
# where claims live: redis://..., sql (the sqlalchemy.url database) or memory; RETENTION_KEY, seconds a
# name stays taken after its task has run (0); PENDING_KEY, seconds a claim of a task that never runs
# is kept (one day), plus any countdown.

#: Message header carrying the claimed name to the worker.
NAME_HEADER = "websauna_tasks_name"

_STORE_KEY = "websauna_tasks.name_store_instance"
_LOCK = threading.Lock()


class AlreadyEnqueued(Exception):
    """A task with this name is pending (or ran within the retention); ``task_id`` is its id."""

    def __init__(self, name: str, task_id: str):
        super().__init__(f"a task named {name!r} is already enqueued (id {task_id})")
        self.name = name
        self.task_id = task_id


class NameStore(t.Protocol):
    def claim(self, name: str, task_id: str, ttl: float) -> str | None:
        """Take ``name`` for ``task_id``; return None when taken, else the id that holds it."""

    def release(self, name: str, task_id: str) -> None:
        """Free ``name`` if ``task_id`` still holds it."""

    def keep(self, name: str, task_id: str, seconds: float) -> None:
        """Let ``task_id``'s claim of ``name`` expire after ``seconds`` (now when 0)."""

    def holder(self, name: str) -> str | None:
        """The id of the task holding ``name``, None when it is free."""


class RedisNameStore:
    # Compare-and-act in one script: a claim that expired and was taken by
    # another task between a GET and a DEL must not be deleted.
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    _KEEP = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
             "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")

    def __init__(self, url: str, prefix: str):
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._release = self.client.register_script(self._RELEASE)
        self._keep = self.client.register_script(self._KEEP)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def claim(self, name: str, task_id: str, ttl: float) -> str | None:
        key = self._key(name)
        for _ in range(10):
            if self.client.set(key, task_id, nx=True, px=max(1, int(ttl * 1000))):
                return None
            holder = self.client.get(key)
            if holder is not None:
                return holder.decode()
            # Expired between SET and GET: try to take it again.
        raise RuntimeError(f"could not claim task name {name!r}: it keeps changing hands")

    def release(self, name: str, task_id: str) -> None:
        self._release(keys=[self._key(name)], args=[task_id])

    def keep(self, name: str, task_id: str, seconds: float) -> None:
        if seconds <= 0:
            self.release(name, task_id)
        else:
            self._keep(keys=[self._key(name)], args=[task_id, max(1, int(seconds * 1000))])

    def holder(self, name: str) -> str | None:
        held = self.client.get(self._key(name))
        return held.decode() if held is not None else None


class SQLNameStore:
    """Claims as rows; the primary key makes two concurrent claims of one name impossible.

    Every statement runs in autocommit: a claim must be visible to other
    processes at once and must not join (or be rolled back with) the
    caller's transaction, and an application engine set to SERIALIZABLE
    would otherwise add serialization failures to a one-row insert.
    """

    def __init__(self, engine: sa.Engine, prefix: str, create_table: bool = True):
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.prefix = prefix
        #: websauna_tasks.create_tables = auto: the table is made on first use; never: it must be there.
        self.create_table = create_table
        self._created = False

    def _connect(self) -> sa.Connection:
        if not self._created:
            ensure_tables(self.engine, [names_table], self.create_table)
            self._created = True
        return self.engine.connect()

    def claim(self, name: str, task_id: str, ttl: float) -> str | None:
        key = self.prefix + name
        table = names_table
        with self._connect() as conn:
            for _ in range(10):
                now = time.time()
                conn.execute(sa.delete(table).where(table.c.name == key, table.c.expires_at <= now))
                try:
                    conn.execute(sa.insert(table).values(name=key, task_id=task_id, expires_at=now + ttl))
                    return None
                except sa.exc.IntegrityError:
                    pass
                holder = conn.execute(sa.select(table.c.task_id).where(table.c.name == key)).scalar()
                if holder is not None:
                    return holder
        raise RuntimeError(f"could not claim task name {name!r}: it keeps changing hands")

    def release(self, name: str, task_id: str) -> None:
        table = names_table
        with self._connect() as conn:
            conn.execute(sa.delete(table).where(table.c.name == self.prefix + name, table.c.task_id == task_id))

    def keep(self, name: str, task_id: str, seconds: float) -> None:
        if seconds <= 0:
            self.release(name, task_id)
            return
        table = names_table
        with self._connect() as conn:
            conn.execute(sa.update(table)
                         .where(table.c.name == self.prefix + name, table.c.task_id == task_id)
                         .values(expires_at=time.time() + seconds))

    def holder(self, name: str) -> str | None:
        table = names_table
        with self._connect() as conn:
            return conn.execute(sa.select(table.c.task_id).where(
                table.c.name == self.prefix + name, table.c.expires_at > time.time())).scalar()


class MemoryNameStore:
    """For ``memory://`` brokers, which cannot reach another process either."""

    def __init__(self) -> None:
        self.claims: dict[str, tuple[str, float]] = {}
        self.lock = threading.Lock()

    def claim(self, name: str, task_id: str, ttl: float) -> str | None:
        with self.lock:
            now = time.monotonic()
            held = self.claims.get(name)
            if held is not None and held[1] > now:
                return held[0]
            self.claims[name] = (task_id, now + ttl)
            return None

    def release(self, name: str, task_id: str) -> None:
        with self.lock:
            if self.claims.get(name, ("",))[0] == task_id:
                del self.claims[name]

    def keep(self, name: str, task_id: str, seconds: float) -> None:
        with self.lock:
            held = self.claims.get(name)
            if held is not None and held[0] == task_id:
                if seconds <= 0:
                    del self.claims[name]
                else:
                    self.claims[name] = (task_id, time.monotonic() + seconds)

    def holder(self, name: str) -> str | None:
        with self.lock:
            held = self.claims.get(name)
        return held[0] if held is not None and held[1] > time.monotonic() else None


def get_name_store(registry: Registry, app: Celery) -> NameStore:
    """The registry's store, made on first use from ``websauna_tasks.name_store`` or the broker."""
    store = registry.get(_STORE_KEY)
    if store is None:
        with _LOCK:
            store = registry.get(_STORE_KEY)
            if store is None:
                store = registry[_STORE_KEY] = _make_store(registry, app)
    return store


def store_choice(registry: Registry, app: Celery) -> str:
    """Where ``app``'s name claims live: a Redis URL, ``sql`` or ``memory`` (the setting, else from the broker)."""
    choice = get_task_settings(registry).name_store
    broker = str(app.conf.broker_url or "")
    if not choice:
        if broker.startswith(("redis://", "rediss://", "unix://")):
            choice = broker
        elif get_engine(registry) is not None:
            choice = "sql"
        elif broker.startswith("memory://"):
            choice = "memory"
        else:
            raise ConfigurationError(
                f"task names (_name / unique_name) need a store shared by all processes: the broker "
                f"{broker.split('://')[0]}:// is not Redis and there is no sqlalchemy.url; set {NAME_STORE_KEY} "
                "to a redis:// URL or 'sql'")
    return choice


def _make_store(registry: Registry, app: Celery) -> NameStore:
    choice = store_choice(registry, app)
    prefix = f"websauna_tasks:name:{app.main}:"
    if choice.startswith(("redis://", "rediss://", "unix://")):
        return RedisNameStore(choice, prefix)
    if choice == "sql":
        engine = get_engine(registry)
        if engine is None:
            raise ConfigurationError(f"{NAME_STORE_KEY} = sql needs sqlalchemy.url")
        return SQLNameStore(engine, prefix, create_table=get_task_settings(registry).create_tables == "auto")
    if choice == "memory":
        return MemoryNameStore()
    raise ConfigurationError(f"{NAME_STORE_KEY}: expected a redis:// URL, 'sql' or 'memory', got {choice!r}")


def retention_seconds(registry: Registry) -> float:
    return get_task_settings(registry).name_retention_seconds


def pending_seconds(registry: Registry) -> float:
    return get_task_settings(registry).name_pending_seconds


def claim_name(app: Celery, name: t.Any, task_id: str, delay_seconds: float = 0.0,
               raise_if_enqueued: bool = False) -> str | None:
    """Claim ``name`` for ``task_id`` before it is scheduled; the holder's id when already taken."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"a task name must be a non-empty string of at most 200 characters, got {name!r}")
    registry = registry_of(app)
    if registry is None:
        raise ConfigurationError("task names need an app built by config.include('websauna_tasks')")
    store = get_name_store(registry, app)
    holder = store.claim(name, task_id, pending_seconds(registry) + max(0.0, delay_seconds))
    if holder is not None and raise_if_enqueued:
        raise AlreadyEnqueued(name, holder)
    return holder


def release_name(app: Celery, name: str, task_id: str) -> None:
    """The message of ``task_id`` will never be sent: free its name for the next caller."""
    get_name_store(app_state(app).registry, app).release(name, task_id)


def name_of_run(task: t.Any) -> str | None:
    """The claimed name a running task carries in its message headers, if any."""
    return _headers_of_run(task.request)[0]


def _headers_of_run(request: t.Any) -> tuple[t.Any, t.Any]:
    """The run's claimed name and stored payload reference, each None when its message has none."""
    # A worker flattens message headers into the request (Celery's Context keeps them in its __dict__,
    # read here without getattr's AttributeError for the usual message that has neither); eager apply()
    # keeps them in .headers.
    values = getattr(request, "__dict__", None)
    if values is None:
        name = getattr(request, NAME_HEADER, None)
        reference = getattr(request, PAYLOAD_HEADER, None)
        headers = getattr(request, "headers", None)
    else:
        name = values.get(NAME_HEADER)
        reference = values.get(PAYLOAD_HEADER)
        headers = values.get("headers")
    if headers:
        if name is None:
            name = headers.get(NAME_HEADER)
        if not reference:
            reference = headers.get(PAYLOAD_HEADER)
    return name, reference


def run_finished(task: t.Any, task_id: str, retrying: bool) -> None:
    """After a run: keep the name for the retention, or while a retry is still pending."""
    _keep_name(task, name_of_run(task), task_id, retrying)


def _keep_name(task: t.Any, name: t.Any, task_id: str, retrying: bool) -> None:
    registry = registry_of(task.app)
    if not name or registry is None or retrying:
        return
    get_name_store(registry, task.app).keep(name, task_id, retention_seconds(registry))


def _after_run(sender: t.Any = None, task_id: str | None = None, task: t.Any = None, state: str | None = None,
               **_: t.Any) -> None:
    """``task_postrun``: free the run's claimed name; after a success, delete its stored payload (claim_check.py).

    One receiver for both: Celery's ``Signal.send`` costs a few microseconds a run for each signal that
    has a receiver at all (the lock, the walk of its receivers), whether or not the run concerns us; a
    signal without receivers costs nothing. Connected for any task of any app (a plain Celery task's
    message may carry either header too), it returns after one look at the request when neither is there.
    """
    if task is None or task_id is None:
        return
    name, reference = _headers_of_run(task.request)
    if name is None and not reference:
        return
    # The row first, the name second: the order of task_success and task_postrun. SUCCESS is the state
    # Celery sent task_success for, unless an error is on its way out through the tracer's finally
    # (storing the result or the callbacks failed, on_success raised Reject): the run did not succeed for
    # Celery then (its message may come back) and the row stays, as it did without task_success.
    if reference and state == SUCCESS and _delete_payload is not None and sys.exc_info()[1] is None:
        try:
            _delete_payload(task, task.request, reference)
        except Exception:
            # Logged as Celery logged a receiver's error; the name is still freed.
            logging.getLogger(__name__).exception("websauna_tasks: after the run of task %s", task_id)
    if name is not None:
        try:
            _keep_name(task, name, task_id, retrying=state == "RETRY")
        except Exception:
            # Never fail a task that has already run because its name could not be freed.
            logging.getLogger(__name__).exception("websauna_tasks: could not free the name of task %s", task_id)


#: claim_check.delete_after_success once an app of this process can load stored payloads.
_delete_payload: t.Callable[[t.Any, t.Any, t.Any], None] | None = None


def connect_run_signals(delete_payload: t.Callable[[t.Any, t.Any, t.Any], None] | None = None) -> None:
    """Free claimed names and delete stored payloads when runs end (idempotent: one receiver per process).

    ``delete_payload(task, request, reference)``: called after a successful run whose message carried a
    stored payload's reference (claim_check.py passes it; names.py does not import claim_check).
    """
    global _delete_payload
    from celery.signals import task_postrun

    if delete_payload is not None:
        _delete_payload = delete_payload

    task_postrun.connect(_after_run, weak=False, dispatch_uid="websauna_tasks.names.after_run")
