"""Dead letters: messages a worker will not run, kept with a reason so that an operator can act.

The worker's intake (intake.py) decides what cannot run: what Celery itself
refuses (a task the worker does not know, ``unknown_task``; no task name,
``unknown_message``; a content type kombu refuses, such as pickle, or an
invalid message, ``invalid_task``; a body that cannot be decoded,
``undecodable``) and what its own gate refuses (``malformed``,
``too_large``, ``refused_deferred``, ``unreadable``, ``intake_error``).
:func:`dead_letter` keeps the copy: the raw message, as kombu stored it,
with the kind, a reason and the time, logged at ERROR with its id and task
name. A copy rather than Celery's signals: decode errors send none, and the
signals come after the message was already dropped.

On Redis (the broker, or any transport whose broker URL is ``redis://``) the
dead letters are JSON entries of the list ``websauna_tasks.deadletter``
(setting ``websauna_tasks.deadletter_queue``), oldest first. Operators read
them with :func:`list_dead_letters`, put one back with
:func:`requeue_dead_letter` (after deploying the missing task, say) and
remove entries with :func:`drop_dead_letter` and :func:`prune_dead_letters`
(also ``ws-celery INI -- dead-letters``). With another broker the message is
only in the ERROR log line.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
import typing as t
import uuid
from datetime import datetime, timezone

from pyramid.exceptions import ConfigurationError

from .dispatch import check_requeue
from .settings import REDIS_SCHEMES
from .state import app_state, find_state

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.registry import Registry

logger = logging.getLogger(__name__)

#: Setting: name of the Redis list that holds dead letters.
DEADLETTER_QUEUE_KEY = "websauna_tasks.deadletter_queue"
DEFAULT_DEADLETTER_QUEUE = "websauna_tasks.deadletter"


class DeadLetters:
    """Where one app's dead letters go: a Redis list, or only the log."""

    def __init__(self, app: Celery, key: str):
        self.app = app
        self.key = key
        self._client: t.Any = None

    @property
    def redis_url(self) -> str | None:
        broker = self.app.conf.broker_url
        if isinstance(broker, (list, tuple)):
            broker = broker[0] if broker else None
        broker = str(broker or "").split(";")[0].strip()
        return broker if broker.startswith(REDIS_SCHEMES) else None

    @property
    def client(self) -> t.Any:
        if self._client is None:
            url = self.redis_url
            if url is None:
                return None
            import redis

            self._client = redis.Redis.from_url(url)
        return self._client

    def store(self, entry: dict[str, t.Any]) -> bool:
        client = self.client
        if client is None:
            return False
        client.rpush(self.key, json.dumps(entry, default=repr))
        return True


def configure_deadletter(registry: Registry, app: Celery) -> DeadLetters:
    """Read ``websauna_tasks.deadletter_queue``; the worker's intake (intake.py) writes there."""
    from .settings import get_task_settings  # parsed and checked there, with the queue names (settings.py)

    letters = DeadLetters(app, get_task_settings(registry).deadletter_queue)
    app_state(app).dead_letters = letters
    return letters


def get_dead_letters(app: Celery) -> DeadLetters:
    state = find_state(app)
    if state is None or state.dead_letters is None:
        raise ConfigurationError("dead letters need config.include('websauna_tasks')")
    return state.dead_letters


def _app_of(registry_or_app: t.Any) -> Celery:
    from .registry import ICeleryApp

    query = getattr(registry_or_app, "queryUtility", None)
    if query is None:
        return registry_or_app
    app = query(ICeleryApp)
    if app is None:
        raise ConfigurationError("dead letters need config.include('websauna_tasks')")
    return app


# -- the worker side: intake.py decides, this keeps the copy ---------------------------------------------------

def _reason(kind: str, name: str | None, message: t.Any, exc: BaseException | None) -> str:
    if kind == "unknown_task":
        return f"unknown task {name!r} (not registered in this worker)"
    if kind == "unknown_message":
        return "not a task message (no task name in its headers or body)"
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else "no detail"
    content_type = getattr(message, "content_type", None)
    if kind == "undecodable":
        return f"cannot decode the body (content type {content_type!r}): {detail}"
    return f"invalid task message (content type {content_type!r}): {detail}"


def _text(value: t.Any) -> str | None:
    return value[:500] if isinstance(value, str) else None


def raw_message(message: t.Any) -> t.Any:
    """The message as the transport stored it (kombu's Redis envelope), else rebuilt from its parts."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return raw
    body = getattr(message, "body", None)
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    headers = getattr(message, "headers", None)
    return {
        "body": base64.b64encode(body).decode("ascii") if isinstance(body, (bytes, bytearray, memoryview)) else body,
        "content-type": getattr(message, "content_type", None),
        "content-encoding": getattr(message, "content_encoding", None),
        "headers": dict(headers) if isinstance(headers, dict) else headers,
        "properties": dict(getattr(message, "properties", None) or {}, body_encoding="base64"),
    }


def dead_letter(letters: DeadLetters, message: t.Any, kind: str, exc: BaseException | None = None, *,
                reason: str | None = None, max_bytes: int = 0) -> dict:
    """Log ``message`` at ERROR and copy it, with a reason and the time, to the dead letters; never raises.

    ``reason`` replaces the one derived from ``kind`` and ``exc``. A raw
    message longer than ``max_bytes`` (JSON text; 0: any length) is kept as
    its first ``max_bytes`` characters under ``message_head``, with
    ``message`` None: the dead letters must not hold what the limit refused.
    """
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    delivery_info = getattr(message, "delivery_info", None)
    delivery_info = delivery_info if isinstance(delivery_info, dict) else {}
    properties = getattr(message, "properties", None)
    properties = properties if isinstance(properties, dict) else {}
    # Forged headers may hold anything: only strings are recorded as names.
    name = _text(headers.get("task"))
    task_id = _text(headers.get("id")) or _text(properties.get("correlation_id"))
    queue = _text(delivery_info.get("routing_key"))
    if reason is None:
        reason = _reason(kind, name, message, exc)
    now = time.time()
    entry = {
        "kind": kind, "reason": reason, "id": task_id, "task": name, "queue": queue,
        "exchange": _text(delivery_info.get("exchange")),
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat(), "timestamp": now, "message": None,
    }
    try:
        raw = raw_message(message)
        if max_bytes:
            text = json.dumps(raw, default=repr)
            if len(text) > max_bytes:
                raw = None
                entry["message_head"] = text[:max_bytes]
                entry["message_size"] = len(text)
        entry["message"] = raw
        stored = letters.store(entry)
    except Exception:
        logger.exception("websauna_tasks: could not store a dead letter in %s; the message follows in this log: %s",
                         letters.key, json.dumps(entry, default=repr))
        return entry
    if stored:
        logger.error("websauna_tasks: message id %s task %s from queue %s moved to dead letters (%s): %s",
                     task_id, name, queue, letters.key, reason)
    else:
        logger.error("websauna_tasks: message id %s task %s from queue %s dropped (%s); no Redis for dead "
                     "letters, the message: %s", task_id, name, queue, reason, json.dumps(entry, default=repr))
    return entry


# -- for operators --------------------------------------------------------------------------------------------------

#: ``kind`` of the dict that stands for a list entry that is not a dead letter as workers write them.
UNREADABLE_ENTRY = "unreadable_entry"
_RAW_PREVIEW_CHARS = 200


def list_dead_letters(registry_or_app: t.Any, start: int = 0, stop: int = -1) -> list[dict[str, t.Any]]:
    """Dead letters, oldest first (``start``/``stop`` as in Redis LRANGE); [] when there is no Redis.

    An entry that cannot be read (not JSON, not an object, a field of the wrong
    type) is listed as ``{"kind": "unreadable_entry", "id": "unreadable-<16 hex>",
    "reason": ..., "raw": <its first 200 characters>, "size": <its bytes>}``
    with the other keys of a dead letter null (docs/bad_input.md); that id, a
    hash of the entry, works with :func:`drop_dead_letter`.
    """
    letters = get_dead_letters(_app_of(registry_or_app))
    client = letters.client
    if client is None:
        return []
    return [_read_entry(raw) for raw in client.lrange(letters.key, start, stop)]


def requeue_dead_letter(registry_or_app: t.Any, task_id: str, queue: str | None = None) -> bool:
    """Put the dead letter of ``task_id`` back on its queue (or ``queue``) and remove it; False if not found.

    Only for the Redis transport, whose queues are lists of the envelopes kept
    here. Unreadable entries, and letters that keep no whole message, are never
    requeued. The target queue meets the send pipeline's queue check
    (``dispatch.check_requeue``): an undeclared one raises ``UndeclaredQueue``.
    """
    app = _app_of(registry_or_app)
    letters = get_dead_letters(app)
    client = letters.client
    if client is None:
        return False
    for raw, entry in _entries(client, letters.key):
        if (entry["kind"] == UNREADABLE_ENTRY or entry.get("id") != task_id
                or not isinstance(entry.get("message"), dict)):
            continue
        target = queue or entry.get("queue")
        if not target:
            raise ValueError(f"dead letter {task_id}: no queue recorded, pass queue=")
        check_requeue(app, target)
        message = entry["message"]
        properties = dict(message.get("properties") or {})
        properties["delivery_tag"] = str(uuid.uuid4())
        properties["delivery_info"] = dict(properties.get("delivery_info") or {}, routing_key=target)
        message = dict(message, properties=properties)
        # One atomic step: of two operators requeueing the same letter at
        # once, only the one whose removal succeeds pushes the message.
        if not client.eval(_MOVE_SCRIPT, 2, letters.key, target, raw, json.dumps(message)):
            continue
        logger.info("websauna_tasks: dead letter %s requeued to %s", task_id, target)
        return True
    return False


_MOVE_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[2])
    return 1
end
return 0
"""


def _entries(client: t.Any, key: str) -> t.Iterator[tuple[bytes, dict[str, t.Any]]]:
    # Something other than a worker may have written to the list: such an
    # entry comes as its unreadable-entry dict rather than stopping the walk.
    for raw in client.lrange(key, 0, -1):
        yield raw, _read_entry(raw)


_NULL = type(None)
#: The fields the operator functions rely on: their JSON types, and whether they must be there. The
#: others (task, time, timestamp...) are only shown, or read with a fallback, whatever they hold.
_ENTRY_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "kind": ((str,), True), "reason": ((str,), True), "id": ((str, _NULL), False), "queue": ((str, _NULL), False),
    "message": ((dict, _NULL), False),
}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", _NULL: "null"}


def _json_type(value: t.Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


#: Deeper than any entry a worker writes, far enough below the recursion limit to print what is read.
_MAX_DEPTH = 200


def _deeper_than(value: t.Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _entry_problem(entry: t.Any) -> str | None:
    """Why ``entry`` (parsed JSON) is not a dead letter the operator functions can use; None if it is."""
    if _deeper_than(entry, _MAX_DEPTH):
        # json.loads() takes a few hundred levels more than str() or json.dumps() can then print.
        return f"JSON nested more than {_MAX_DEPTH} levels deep"
    if not isinstance(entry, dict):
        return f"{_json_type(entry)}, not an object"
    for field, (types, required) in _ENTRY_FIELDS.items():
        if field not in entry:
            if required:
                return f"no {field!r} field"
            continue
        value = entry[field]
        # bool is an int to Python, not a number to JSON.
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(dict.fromkeys(_JSON_TYPES[kind] for kind in types))
            return f"{field!r} is {_json_type(value)}, not {wanted}"
    message = entry.get("message")
    if message is not None:
        # What requeue_dead_letter() builds the new envelope from.
        properties = message.get("properties")
        if properties is not None and not isinstance(properties, dict):
            return f"'message.properties' is {_json_type(properties)}, not an object"
        info = (properties or {}).get("delivery_info")
        if info is not None and not isinstance(info, dict):
            return f"'message.properties.delivery_info' is {_json_type(info)}, not an object"
    stamp = entry.get("timestamp")
    if isinstance(stamp, int) and not isinstance(stamp, bool) and abs(stamp) > 1e300:
        # prune_dead_letters() compares it as a float: a bigger int has none.
        return "'timestamp' is a number too large to be a time"
    if entry["kind"] == UNREADABLE_ENTRY:
        # The kind marks what list_dead_letters() could not read: a stored entry may not claim it.
        return f"its kind is {UNREADABLE_ENTRY!r}, which marks entries that cannot be read"
    return None


def _read_entry(raw: bytes) -> dict[str, t.Any]:
    """The dead letter stored as ``raw``, or the unreadable-entry dict that stands for it; never raises."""
    try:
        entry = json.loads(raw)
    except RecursionError:
        problem = "JSON nested too deeply to read"
    except ValueError as exc:  # UnicodeDecodeError and json's own errors
        problem = f"not JSON ({exc})"
    else:
        problem = _entry_problem(entry)
        if problem is None:
            return entry
    # Bytes enough for the preview only: an entry may be megabytes long.
    head = raw[:4 * _RAW_PREVIEW_CHARS]
    preview = head.decode("utf-8", "replace") if isinstance(head, bytes) else str(head)
    # Every key a worker's entry has, null where nothing is known: code that
    # reads letter["time"] or letter["task"] goes on working.
    return {"kind": UNREADABLE_ENTRY, "reason": problem[:_RAW_PREVIEW_CHARS],
            "id": f"unreadable-{hashlib.sha256(raw).hexdigest()[:16]}", "task": None, "queue": None,
            "exchange": None, "time": None, "timestamp": None, "message": None,
            "raw": preview[:_RAW_PREVIEW_CHARS], "size": len(raw)}


def drop_dead_letter(registry_or_app: t.Any, task_id: str) -> bool:
    """Remove the (oldest) dead letter of ``task_id``; False if there is none, or no Redis.

    ``task_id`` may be the ``unreadable-...`` id list_dead_letters() gives an unreadable entry.
    """
    letters = get_dead_letters(_app_of(registry_or_app))
    client = letters.client
    if client is None:
        return False
    for raw, entry in _entries(client, letters.key):
        # LREM of the exact bytes: entries workers append meanwhile are untouched,
        # and 0 means another operator removed this one first.
        if entry.get("id") == task_id and client.lrem(letters.key, 1, raw):
            logger.info("websauna_tasks: dead letter %s dropped from %s", task_id, letters.key)
            return True
    return False


def _recorded_at(entry: dict[str, t.Any]) -> float | None:
    stamp = entry.get("timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
        return float(stamp)
    try:
        when = datetime.fromisoformat(str(entry.get("time")))
    except ValueError:
        return None
    # A time without an offset is read as UTC, as dead_letter() writes it.
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def prune_dead_letters(registry_or_app: t.Any, older_than_seconds: float) -> int:
    """Remove dead letters recorded more than ``older_than_seconds`` ago; the number removed.

    Entries with no readable time, unreadable entries among them, are kept. Safe while workers append: each
    old entry is removed by its exact value (LREM), the list is never rewritten.
    """
    if not math.isfinite(older_than_seconds) or older_than_seconds < 0:
        raise ValueError(f"older_than_seconds must be a finite number >= 0, got {older_than_seconds!r}")
    letters = get_dead_letters(_app_of(registry_or_app))
    client = letters.client
    if client is None:
        return 0
    cutoff = time.time() - older_than_seconds
    old = [raw for raw, entry in _entries(client, letters.key)
           if (recorded := _recorded_at(entry)) is not None and recorded < cutoff]
    if not old:
        return 0
    pipe = client.pipeline(transaction=False)
    for raw in old:
        pipe.lrem(letters.key, 1, raw)
    removed = sum(pipe.execute())
    logger.info("websauna_tasks: %d dead letter(s) older than %ss pruned from %s", removed, older_than_seconds,
                letters.key)
    return removed
