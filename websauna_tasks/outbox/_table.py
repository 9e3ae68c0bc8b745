"""The outbox table, and a message's row: what is stored, and how it is read back.

Arguments, keyword arguments and options are stored as JSON; ``datetime``
values (``eta``, ``expires``) as ``{tag: ISO text}``, so that they come back
as datetimes; ``link`` / ``link_error`` signatures in their dict form,
rebuilt with ``app.signature()`` when read.
"""
from __future__ import annotations

import datetime
import json
import threading
import time
import typing as t

import sqlalchemy as sa

from ..schema import ensure_tables, outbox_table

if t.TYPE_CHECKING:
    from celery import Celery

    from ..dispatch import PendingMessage

#: PostgreSQL channel the writing transaction NOTIFYs and relays LISTEN on.
CHANNEL = "websauna_tasks_outbox"

# outbox_table is defined with the library's other tables (schema.py) and keeps its name here.


class OutboxError(Exception):
    """A message cannot go to the outbox (no session joined to the transaction, options not storable)."""


# -- creating the table -------------------------------------------------------------------------

_created: set[str] = set()
_created_lock = threading.Lock()


def ensure_table(engine: sa.Engine, create: bool = True) -> None:
    """Create the outbox table and its indexes if missing (or, ``create=False``, check they are there).

    Once per process and database: the relay and every write call this.
    """
    key = engine.url.render_as_string(hide_password=True)
    if key in _created:
        return
    with _created_lock:
        if key in _created:
            return
        ensure_tables(engine, [outbox_table], create)
        _created.add(key)


# -- a message as a row -------------------------------------------------------------------------

_DATETIME = "__websauna_tasks_datetime__"


def _encode(value: t.Any) -> t.Any:
    if isinstance(value, datetime.datetime):
        return {_DATETIME: value.isoformat()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _decode(obj: dict) -> t.Any:
    if len(obj) == 1 and _DATETIME in obj:
        return datetime.datetime.fromisoformat(obj[_DATETIME])
    return obj


# Built once: json.dumps with ``default`` or ``separators`` builds a new encoder at every call.
_encode_json = json.JSONEncoder(default=_encode, separators=(",", ":")).encode


def _dumps(what: str, value: t.Any, message: PendingMessage) -> str:
    try:
        return _encode_json(value)
    except (TypeError, ValueError) as exc:
        raise OutboxError(
            f"cannot store the {what} of task {message.task.name} in the outbox as JSON ({exc}); "
            "pass JSON values (ids rather than objects), or turn websauna_tasks.outbox off") from None


def _dumps_options(options: dict[str, t.Any], message: PendingMessage) -> str:
    try:
        return _encode_json(options)
    except (TypeError, ValueError):
        # Encoded whole first, one call for the usual storable options; the
        # error names the option that cannot be stored.
        for key, value in options.items():
            _dumps(f"option {key!r}", value, message)
        return _dumps("options", options, message)


#: Options of the sending process only (a producer, a connection): never stored.
_LOCAL_OPTIONS = frozenset({"producer", "connection", "publisher", "router"})


def message_row(message: PendingMessage, now: float | None = None) -> dict[str, t.Any]:
    """The outbox row of ``message``; :class:`OutboxError` when something cannot be stored."""
    options = message.options
    if not _LOCAL_OPTIONS.isdisjoint(options):
        # Publishing details of this process, meaningless in a relay: never stored.
        options = {key: value for key, value in options.items() if key not in _LOCAL_OPTIONS}
    # The options first: an option that cannot be stored is named even when an argument cannot be either.
    stored_options = _dumps_options(options, message)
    return {
        "id": message.task_id,
        "app": message.task.app.main or "",
        "task_name": message.task.name,
        "args": _dumps("arguments", list(message.args), message),
        "kwargs": _dumps("keyword arguments", message.kwargs, message),
        # Signatures (link, link_error, chain) are dicts: stored as such, rebuilt by the relay.
        "options": stored_options,
        "created_at": time.time() if now is None else now,
        "sent_at": None,
    }


# -- a row as a message -------------------------------------------------------------------------

def load_column(raw: str) -> t.Any:
    """One stored JSON column (args, kwargs, options) as it was before storing, datetimes included."""
    return json.loads(raw, object_hook=_decode)


def read_row(app: Celery, row: t.Any) -> tuple[list[t.Any], dict[str, t.Any], dict[str, t.Any]]:
    """The arguments, keyword arguments and options of a row (id, task_name, args, kwargs, options)."""
    options = load_column(row.options)
    for key in ("link", "link_error"):
        value = options.get(key)
        if isinstance(value, list):
            options[key] = [app.signature(item) for item in value]
        elif isinstance(value, dict):
            options[key] = app.signature(value)
    return load_column(row.args), load_column(row.kwargs), options
