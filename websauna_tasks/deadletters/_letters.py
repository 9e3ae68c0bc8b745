"""One app's dead letters: which store keeps them, the worker's copy, and the operator functions.

The store follows the broker. A Redis broker keeps them in a Redis list
(``websauna_tasks.deadletter_queue``, _redis.py), next to the queues a
requeue moves them back to. Any other broker (RabbitMQ, kombu's SQLAlchemy
transport) keeps them in the table ``websauna_tasks_dead_letters`` of the
application's database (_sql.py), and a requeue publishes through the send
pipeline. With neither, a worker can only log what it refused, and the
operator functions raise :class:`NoDeadLetterStore` rather than report an
empty list that does not exist.

The operator functions are written once, over either store: same entries,
same ids (unreadable ones included), same results.
"""
from __future__ import annotations

import logging
import math
import time
import typing as t

from kombu.utils.url import maybe_sanitize_url
from pyramid.exceptions import ConfigurationError

from ..dispatch import check_requeue
from ..redis_client import first_broker_url
from ..settings import REDIS_SCHEMES, get_task_settings
from ..state import app_state, find_state
from ._entries import UNREADABLE_ENTRY, entry_text, make_entry, safe_text, with_history
from ._redis import RedisStore
from ._sql import SQLStore

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.registry import Registry

logger = logging.getLogger("websauna_tasks.deadletter")

Store = t.Union[RedisStore, SQLStore]


class NoDeadLetterStore(ConfigurationError):
    """The broker is not Redis and the application has no database: dead letters have nowhere to be kept."""


def redis_broker_url(app: Celery) -> str | None:
    """The app's broker URL when it is Redis (its dead letters are a list there), else None (a table)."""
    broker = first_broker_url(app.conf.broker_url)
    return broker if broker.startswith(REDIS_SCHEMES) else None


class DeadLetters:
    """Where one app's dead letters go: a Redis list on a Redis broker, else a table of the app's database."""

    def __init__(self, app: Celery, key: str, registry: Registry | None = None):
        self.app = app
        self.key = key
        self.registry = registry
        self._store: Store | None = None

    @property
    def redis_url(self) -> str | None:
        """The Redis broker that keeps the list, or None when the letters are not on Redis."""
        return redis_broker_url(self.app)

    @property
    def client(self) -> t.Any:
        """The Redis client of the list, or None when the letters are not on Redis."""
        store = self.find_store()
        return store.client if isinstance(store, RedisStore) else None

    def find_store(self) -> Store | None:
        """The store, chosen on first use (the engine is made after this object), or None when there is none."""
        if self._store is None:
            url = self.redis_url
            if url is not None:
                self._store = RedisStore(url, self.key)
            elif self.registry is not None:
                from ..db import get_engine

                engine = get_engine(self.registry)
                if engine is not None:
                    create = get_task_settings(self.registry).create_tables == "auto"
                    self._store = SQLStore(engine, self.key, create)
        return self._store

    @property
    def backend(self) -> Store:
        """The store; :class:`NoDeadLetterStore` naming what to configure when there is none."""
        store = self.find_store()
        if store is None:
            broker = maybe_sanitize_url(str(self.app.conf.broker_url))
            raise NoDeadLetterStore(
                f"dead letters have nowhere to be kept: the broker ({broker}) is not Redis and the application has no "
                "database; set sqlalchemy.url (the letters then go to the table websauna_tasks_dead_letters) or use a "
                "Redis broker (docs/bad_input.md)")
        return store

    @property
    def where(self) -> str:
        """Where the letters are, for messages: the Redis key, or the table and list name."""
        store = self.find_store()
        return store.where if store is not None else "nowhere (only the worker's ERROR log)"

    def store(self, entry: dict[str, t.Any]) -> bool:
        """Append ``entry``; False when there is no store (the caller logs it instead)."""
        store = self.find_store()
        if store is None:
            return False
        store.append(entry_text(entry), entry)
        return True

    def find(self, task_id: str) -> list[dict[str, t.Any]]:
        """Every entry whose id is ``task_id`` (unreadable ones by their ``unreadable-...`` id), oldest first."""
        return [entry for _handle, entry in self.backend.find(task_id)]


def configure_deadletter(registry: Registry, app: Celery) -> DeadLetters:
    """Read ``websauna_tasks.deadletter_queue``; the worker's intake (intake.py) writes there."""
    letters = DeadLetters(app, get_task_settings(registry).deadletter_queue, registry)
    app_state(app).dead_letters = letters
    return letters


def get_dead_letters(app: Celery) -> DeadLetters:
    """The :class:`DeadLetters` of ``app``; ConfigurationError for an app includeme did not build."""
    state = find_state(app)
    if state is None or state.dead_letters is None:
        raise ConfigurationError("dead letters need config.include('websauna_tasks')")
    return state.dead_letters


def _app_of(registry_or_app: t.Any) -> Celery:
    from ..registry import ICeleryApp

    query = getattr(registry_or_app, "queryUtility", None)
    if query is None:
        return registry_or_app
    app = query(ICeleryApp)
    if app is None:
        raise ConfigurationError("dead letters need config.include('websauna_tasks')")
    return app


# -- the worker side: intake.py decides, this keeps the copy ---------------------------------------------------

def dead_letter(letters: DeadLetters, message: t.Any, kind: str, exc: BaseException | None = None, *,
                reason: str | None = None, max_bytes: int = 0) -> dict:
    """Log ``message`` at ERROR and copy it, with a reason and the time, to the dead letters; never raises.

    ``reason`` replaces the one derived from ``kind`` and ``exc``. A raw
    message longer than ``max_bytes`` (JSON text; 0: any length) is kept as
    its first ``max_bytes`` characters under ``message_head``, with
    ``message`` None: the dead letters must not hold what the limit refused.
    """
    entry = make_entry(message, kind, exc, reason, max_bytes)
    task_id, name, queue = entry["id"], entry["task"], entry["queue"]
    try:
        stored = letters.store(entry)
    except Exception:
        logger.exception("websauna_tasks: could not store a dead letter in %s; the message follows in this log: %s",
                         letters.where, safe_text(entry))
        return entry
    if stored:
        logger.error("websauna_tasks: message id %s task %s from queue %s moved to dead letters (%s): %s",
                     task_id, name, queue, letters.where, entry["reason"])
    else:
        logger.error("websauna_tasks: message id %s task %s from queue %s dropped (%s); no Redis broker and no "
                     "database for dead letters, the message: %s", task_id, name, queue, entry["reason"],
                     safe_text(entry))
    return entry


# -- for operators --------------------------------------------------------------------------------------------------

def list_dead_letters(registry_or_app: t.Any, start: int = 0, stop: int = -1, *,
                      kind: str | None = None) -> list[dict[str, t.Any]]:
    """Dead letters, oldest first: ``start``/``stop`` as in Redis LRANGE, both included, negative from the end.

    ``kind`` keeps those of one kind (``unknown_task``, ``malformed``...;
    ``start``/``stop`` then count among them). An entry that cannot be read
    (not JSON, not an object, a field of the wrong type, a table row whose
    columns disagree with its entry) is listed as ``{"kind": "unreadable_entry",
    "id": "unreadable-<16 hex>", "reason": ..., "raw": <its first 200
    characters>, "size": <its bytes>}`` with the other keys of a dead letter
    null (docs/bad_input.md); that id, a hash of the entry, works with
    :func:`drop_dead_letter`. :class:`NoDeadLetterStore` when the broker is not
    Redis and there is no database.
    """
    return get_dead_letters(_app_of(registry_or_app)).backend.read(start, stop, kind)


def requeue_dead_letter(registry_or_app: t.Any, task_id: str, queue: str | None = None) -> bool:
    """Put the dead letter of ``task_id`` back on its queue (or ``queue``) and remove it; False if not found.

    On a Redis broker the envelope moves to the queue's list in one step; on
    any other the message is published to the queue through the broker, as
    it came (its body is not re-encoded), and the row is deleted in the same
    transaction. Unreadable entries, and letters that keep no whole message,
    are never requeued. The target queue meets the send pipeline's queue check
    (``dispatch.check_requeue``): an undeclared one raises ``UndeclaredQueue``.
    """
    app = _app_of(registry_or_app)
    store = get_dead_letters(app).backend
    for handle, entry in store.find(task_id):
        if entry["kind"] == UNREADABLE_ENTRY or not isinstance(entry.get("message"), dict):
            continue
        target = queue or entry.get("queue")
        if not target:
            raise ValueError(f"dead letter {task_id}: no queue recorded, pass queue=")
        check_requeue(app, target)
        # The message goes back stamped with when it was first dead-lettered: its next entry, if it fails
        # again, keeps that first time and counts one more.
        if not store.requeue(app, handle, with_history(entry), target):
            continue
        logger.info("websauna_tasks: dead letter %s requeued to %s", task_id, target)
        return True
    return False


def drop_dead_letter(registry_or_app: t.Any, task_id: str) -> bool:
    """Remove the (oldest) dead letter of ``task_id``; False if there is none.

    ``task_id`` may be the ``unreadable-...`` id list_dead_letters() gives an unreadable entry.
    """
    store = get_dead_letters(_app_of(registry_or_app)).backend
    for handle, _entry in store.find(task_id):
        # By the exact entry (Redis LREM of its bytes, the row's seq): entries
        # appended meanwhile are untouched, and False means another operator
        # removed this one first.
        if store.remove(handle):
            logger.info("websauna_tasks: dead letter %s dropped from %s", task_id, store.where)
            return True
    return False


def prune_dead_letters(registry_or_app: t.Any, older_than_seconds: float) -> int:
    """Remove dead letters recorded more than ``older_than_seconds`` ago; the number removed.

    Entries with no readable time, unreadable entries among them, are kept.
    Safe while workers append: each old entry is removed by itself (Redis
    LREM of its bytes, a row by its seq), nothing is rewritten.
    """
    if not math.isfinite(older_than_seconds) or older_than_seconds < 0:
        raise ValueError(f"older_than_seconds must be a finite number >= 0, got {older_than_seconds!r}")
    store = get_dead_letters(_app_of(registry_or_app)).backend
    old = store.older_than(time.time() - older_than_seconds)
    if not old:
        return 0
    removed = store.remove_all(old)
    logger.info("websauna_tasks: %d dead letter(s) older than %ss pruned from %s", removed, older_than_seconds,
                store.where)
    return removed
