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

if t.TYPE_CHECKING:
    from celery import Celery

    from ..dispatch import PendingMessage

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
    # Times sent again because its task never finished (redelivery); the
    # maximum once a run failed for good.
    sa.Column("redeliveries", sa.Integer, nullable=False, server_default="0"),
)
# Unsent rows only, in claim order: the relay's query reads this and nothing else.
_pending_index = sa.Index(
    "ix_websauna_tasks_outbox_pending", outbox_table.c.app, outbox_table.c.created_at,
    postgresql_where=outbox_table.c.sent_at.is_(None), sqlite_where=outbox_table.c.sent_at.is_(None),
)
_sent_index = sa.Index("ix_websauna_tasks_outbox_sent", outbox_table.c.sent_at)


class OutboxError(Exception):
    """A message cannot go to the outbox (no session joined to the transaction, options not storable)."""


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
