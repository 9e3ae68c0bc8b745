"""A dead letter as an entry: how a worker writes one, and how an operator reads one back, whatever was stored.

Both stores (a Redis list, a SQL table) keep an entry as its JSON text, so
everything about the entry's shape lives here, once: the worker side
(:func:`make_entry`, :func:`raw_message`) and the reading side
(:func:`read_entry`, which never raises and turns anything that is not an
entry a worker could have written into the unreadable-entry dict).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import time
import typing as t
from datetime import datetime, timezone

#: ``kind`` of the dict that stands for a stored entry that is not a dead letter as workers write them.
UNREADABLE_ENTRY = "unreadable_entry"
#: The longest reason and raw preview an unreadable entry shows.
RAW_PREVIEW_CHARS = 200
#: What ``id`` of an unreadable entry starts with; the rest is a hash of its bytes.
UNREADABLE_PREFIX = "unreadable-"


#: The header a requeue stamps on the message it sends back: ``{"first": epoch seconds, "times": n}``, when the
#: message was first dead-lettered and how many times. Entries are never rewritten (a removal is by the entry's
#: exact bytes), so the history travels with the message, and its next entry starts from it.
HISTORY_HEADER = "websauna_tasks_dead_lettered"
#: More dead-letterings than any message gets: a header claiming more was not written by a requeue.
MAX_TIMES = 1_000_000


# -- the worker side ------------------------------------------------------------------------------------------

def reason_for(kind: str, name: str | None, message: t.Any, exc: BaseException | None) -> str:
    """The reason of one of Celery's own refusals, written for an operator."""
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
    """The message as the transport stored it (kombu's envelope on Redis and SQL), else rebuilt from its parts.

    The rebuilt form (AMQP) has the same envelope shape, its body base64, so
    that a requeue reads both alike. kombu has already inflated a compressed
    AMQP body that it could inflate: its ``compression`` header is left out
    then, or the copy would claim a compression its body no longer has.
    """
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return raw
    body = getattr(message, "body", None)
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    headers = getattr(message, "headers", None)
    if isinstance(headers, dict):
        headers = dict(headers)
        if "compression" in headers and not getattr(message, "errors", None):
            del headers["compression"]
    properties = dict(getattr(message, "properties", None) or {})
    # AMQP repeats the headers and the content type among its properties: kept once, above.
    for duplicate in ("application_headers", "content_type", "content_encoding"):
        properties.pop(duplicate, None)
    return {
        "body": base64.b64encode(body).decode("ascii") if isinstance(body, (bytes, bytearray, memoryview)) else body,
        "content-type": getattr(message, "content_type", None),
        "content-encoding": getattr(message, "content_encoding", None),
        "headers": headers,
        "properties": dict(properties, body_encoding="base64"),
    }


def _number(value: t.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def history(headers: dict[str, t.Any], now: float) -> tuple[float, int]:
    """``(first seen, times before)`` from a requeued message's :data:`HISTORY_HEADER`; ``(now, 0)`` without one.

    Anyone who can publish can forge the header: a value a requeue could not
    have written (not a time before now, a count below 1 or absurd) counts as
    no history, and the letter starts afresh.
    """
    value = headers.get(HISTORY_HEADER)
    if isinstance(value, dict):
        first, times = value.get("first"), value.get("times")
        if _number(first) and 0 < first <= now and isinstance(times, int) and not isinstance(times, bool) \
                and 1 <= times < MAX_TIMES:
            return float(first), times
    return now, 0


def seen(entry: dict[str, t.Any]) -> tuple[float | None, float | None, int]:
    """``(first seen, last seen, times)`` of a letter: last seen is when this entry was recorded.

    An entry written before the history was kept, or holding odd values,
    reads as seen once, at its recorded time.
    """
    last = recorded_at(entry)
    first, times = entry.get("first_seen"), entry.get("times")
    if last is None or not _number(first) or first > last or not isinstance(times, int) or isinstance(times, bool) \
            or not 1 <= times <= MAX_TIMES:
        return last, last, 1
    return float(first), last, times


def with_history(entry: dict[str, t.Any]) -> dict[str, t.Any]:
    """``entry`` whose message carries :data:`HISTORY_HEADER`, for a requeue (its headers left as they are if odd)."""
    message = entry["message"]
    headers = message.get("headers")
    first, _last, times = seen(entry)
    if not isinstance(headers, dict) or first is None:
        return entry
    headers = dict(headers, **{HISTORY_HEADER: {"first": first, "times": times}})
    return dict(entry, message=dict(message, headers=headers))


def make_entry(message: t.Any, kind: str, exc: BaseException | None, reason: str | None,
               max_bytes: int) -> dict[str, t.Any]:
    """The entry of ``message``: kind, reason, ids, time and the raw message (its head when over ``max_bytes``).

    Never raises for what the message holds: a raw message that cannot be
    copied leaves ``message`` None and says why under ``message_error``.
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
    if reason is None:
        reason = reason_for(kind, name, message, exc)
    now = time.time()
    first, times = history(headers, now)
    entry: dict[str, t.Any] = {
        "kind": kind, "reason": reason, "id": task_id, "task": name,
        "queue": _text(delivery_info.get("routing_key")), "exchange": _text(delivery_info.get("exchange")),
        "time": datetime.fromtimestamp(now, timezone.utc).isoformat(), "timestamp": now,
        "first_seen": first, "times": times + 1, "message": None,
    }
    try:
        raw = raw_message(message)
        if max_bytes:
            text = json.dumps(raw, default=repr)
            if len(text) > max_bytes:
                raw = None
                entry["message_head"] = text[:max_bytes]
                entry["message_size"] = len(text)
    except Exception as exc:  # parts too deep or too odd for json: the letter is kept without them
        raw = None
        entry["message_error"] = f"the raw message could not be copied: {type(exc).__name__}: {exc}"[:200]
    entry["message"] = raw
    return entry


def entry_text(entry: dict[str, t.Any]) -> str:
    """The stored form of an entry: JSON, ASCII only (no NUL or lone surrogate reaches a database or a log)."""
    return json.dumps(entry, default=repr)


def safe_text(entry: dict[str, t.Any], limit: int = 100_000) -> str:
    """An entry for the log when it could not be stored: its JSON, else its repr, at most ``limit`` characters."""
    try:
        text = entry_text(entry)
    except Exception:  # a structure too deep or too odd for json: the log still gets something
        try:
            text = repr(entry)
        except Exception:
            text = f"<entry of kind {entry.get('kind')!r}, id {entry.get('id')!r}>"
    return text[:limit]


# -- the reading side ---------------------------------------------------------------------------------------------

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
MAX_ENTRY_DEPTH = 200


def _deeper_than(value: t.Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def entry_problem(entry: t.Any) -> str | None:
    """Why ``entry`` (parsed JSON) is not a dead letter the operator functions can use; None if it is."""
    if _deeper_than(entry, MAX_ENTRY_DEPTH):
        # json.loads() takes a few hundred levels more than str() or json.dumps() can then print.
        return f"JSON nested more than {MAX_ENTRY_DEPTH} levels deep"
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
        # What a requeue builds the new envelope from.
        properties = message.get("properties")
        if properties is not None and not isinstance(properties, dict):
            return f"'message.properties' is {_json_type(properties)}, not an object"
        info = (properties or {}).get("delivery_info")
        if info is not None and not isinstance(info, dict):
            return f"'message.properties.delivery_info' is {_json_type(info)}, not an object"
    stamp = entry.get("timestamp")
    if isinstance(stamp, int) and not isinstance(stamp, bool) and abs(stamp) > 1e300:
        # prune compares it as a float: a bigger int has none.
        return "'timestamp' is a number too large to be a time"
    if entry["kind"] == UNREADABLE_ENTRY:
        # The kind marks what list_dead_letters() could not read: a stored entry may not claim it.
        return f"its kind is {UNREADABLE_ENTRY!r}, which marks entries that cannot be read"
    return None


def unreadable_id(raw: bytes) -> str:
    """The stable id of an unreadable entry: a hash of its bytes, so that drop finds it again."""
    return f"{UNREADABLE_PREFIX}{hashlib.sha256(raw).hexdigest()[:16]}"


def unreadable(raw: bytes, problem: str) -> dict[str, t.Any]:
    """The dict that stands for the stored entry ``raw`` that cannot be read because of ``problem``."""
    # Bytes enough for the preview only: an entry may be megabytes long.
    preview = raw[:4 * RAW_PREVIEW_CHARS].decode("utf-8", "replace")
    # Every key a worker's entry has, null where nothing is known: code that
    # reads letter["time"] or letter["task"] goes on working.
    return {"kind": UNREADABLE_ENTRY, "reason": problem[:RAW_PREVIEW_CHARS], "id": unreadable_id(raw), "task": None,
            "queue": None, "exchange": None, "time": None, "timestamp": None, "message": None,
            "raw": preview[:RAW_PREVIEW_CHARS], "size": len(raw)}


def read_entry(raw: bytes | str) -> dict[str, t.Any]:
    """The dead letter stored as ``raw``, or the unreadable-entry dict that stands for it; never raises."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        entry = json.loads(raw)
    except RecursionError:
        problem = "JSON nested too deeply to read"
    except ValueError as exc:  # UnicodeDecodeError and json's own errors
        problem = f"not JSON ({exc})"
    else:
        problem = entry_problem(entry)
        if problem is None:
            return entry
    return unreadable(raw, problem)


def recorded_at(entry: dict[str, t.Any]) -> float | None:
    """When ``entry`` was recorded, in epoch seconds: its ``timestamp``, else its ``time``; None if neither reads."""
    stamp = entry.get("timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
        return float(stamp)
    try:
        when = datetime.fromisoformat(str(entry.get("time")))
    except ValueError:
        return None
    # A time without an offset is read as UTC, as make_entry() writes it.
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
