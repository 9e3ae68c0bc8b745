"""Large payloads (claim check): arguments too large for the broker travel as a row of the app's database.

djangae stores a deferred call too large for a task in the datastore and
sends its key; websauna_tasks refused anything over
``websauna_tasks.max_payload_bytes``. With
``websauna_tasks.payload_store_threshold_bytes`` set (off by default), the
send pipeline (dispatch.py) stores the arguments of a message whose JSON is
longer than the threshold in ``websauna_tasks_payloads`` and sends the
message with empty arguments and a :data:`PAYLOAD_HEADER` naming its own
task id. ``websauna_tasks.payload_store_max_bytes`` is then the limit above
which a payload is refused at the call (:class:`~websauna_tasks.payload.PayloadTooLarge`).

Writing, after every check of the send pipeline has passed (and the task
name is claimed):

- waiting for a commit: the row is written through the database session
  whose writes commit with ``tm`` (``request.dbsession``, or the session
  zope.sqlalchemy joined to the transaction; else a session of the app's
  engine joined to it), so the row commits, or is rolled back, with the
  request's writes and with the outbox row of the same message;
- sent now (``tm=None``, Celery's retries): written and committed before the
  message is published, and deleted again if the publish fails.

Everything else travels in the message as it would have: name, countdown,
ETA, queue, priority, links. The row's id is the task id, so a retry of a
stored task writes its (possibly new) arguments over the same row.

Reading, in the worker's intake (intake.py), before the signature check:
the row is loaded and put into the message in place of the empty arguments,
so rolling.py's check, Celery's request and the task all see the real
arguments. A reference that cannot be honoured is a dead letter, never a
crash: ``payload_missing`` (no row: pruned, already run, or written to
another database), ``payload_unavailable`` (the database could not be read;
requeue it once it is back), ``malformed`` (a header that is not this
message's own task id, a row of another task, a row that is not
``[args, kwargs]``) and ``too_large`` (a row longer than this worker's
``payload_store_max_bytes``). The load is a primary-key SELECT in the
consumer's thread: only messages that carry the header pay for it.

A row is deleted once its task has succeeded (at Celery's ``task_postrun`` of
a successful run, in the process that ran it). A run that fails for good
keeps its row until the retention (``websauna_tasks.payload_store_retention_seconds`` after the
message's countdown) so that its dead letter or a hand-made retry can still
run with it; every worker that stores payloads prunes expired rows in its
main process with the done-rows (idempotency.py's pruner, every
``websauna_tasks.idempotency_prune_interval_seconds``), and
``ws-celery INI -- stored-payloads prune`` does it by hand.
"""
from __future__ import annotations

import logging
import threading
import time
import typing as t

import sqlalchemy as sa
import zope.sqlalchemy
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads
from pyramid.exceptions import ConfigurationError
from sqlalchemy.orm import Session

from .broker import STORED_ARGUMENTS_HEADER
from .db import get_engine, transaction_sessions
from .names import connect_run_signals
from .payload import PayloadTooLarge, stores_payloads
from .schema import PAYLOADS_TABLE_NAME, ensure_tables, masked_url, on_conflict_insert, payloads_table
from .settings import (
    MIN_PAYLOAD_STORE_THRESHOLD_BYTES,
    PAYLOAD_STORE_MAX_KEY,
    PAYLOAD_STORE_RETENTION_KEY,
    PAYLOAD_STORE_THRESHOLD_KEY,
    get_task_settings,
)
from .state import app_state, find_state

if t.TYPE_CHECKING:
    from celery import Celery, Task
    from pyramid.registry import Registry

__all__ = [
    "PAYLOAD_HEADER", "PAYLOADS_TABLE_NAME", "ClaimCheck", "claim_check_of", "configure_claim_check",
    "prune_stored_payloads", "payloads_table", "stores_payloads", "MIN_PAYLOAD_STORE_THRESHOLD_BYTES",
    "PAYLOAD_STORE_THRESHOLD_KEY", "PAYLOAD_STORE_MAX_KEY", "PAYLOAD_STORE_RETENTION_KEY",
]

logger = logging.getLogger(__name__)

#: The message header of a stored payload: the message's own task id (the row's key).
PAYLOAD_HEADER = STORED_ARGUMENTS_HEADER

#: The longest task id a reference may name (the id column's length).
MAX_REFERENCE_LENGTH = 255


class ClaimCheck:
    """One app's stored payloads: written by the send pipeline, read by the intake, pruned by workers."""

    def __init__(self, app: Celery, registry: Registry):
        settings = get_task_settings(registry)
        self.app = app
        self.registry = registry
        #: 0: nothing is stored here; this process still loads what others stored.
        self.threshold = settings.payload_store_threshold_bytes
        self.max_bytes = settings.payload_store_max_bytes
        self.retention_seconds = settings.payload_store_retention_seconds
        self.create_tables = settings.create_tables == "auto"
        self._ready: set[str] = set()
        self._ready_lock = threading.Lock()
        #: The app's engine and its AUTOCOMMIT copy, for the intake's loads.
        self._reading: tuple[sa.Engine, sa.Engine] | None = None

    @property
    def engine(self) -> sa.Engine:
        engine = get_engine(self.registry)
        if engine is None:
            raise ConfigurationError(f"{PAYLOAD_STORE_THRESHOLD_KEY}: stored payloads need sqlalchemy.url")
        return engine

    def ensure_table(self, engine: sa.Engine) -> None:
        """Create the table when missing (``create_tables = auto``) or check it is there; once per database."""
        key = masked_url(engine)
        if key in self._ready:
            return
        with self._ready_lock:
            if key not in self._ready:
                ensure_tables(engine, [payloads_table], self.create_tables)
                self._ready.add(key)

    def _reader(self, engine: sa.Engine) -> sa.Engine:
        if self._reading is None or self._reading[0] is not engine:
            self._reading = (engine, engine.execution_options(isolation_level="AUTOCOMMIT"))
        return self._reading[1]

    # -- the send pipeline's side ----------------------------------------------------------------------------------

    def admit(self, label: str, size: int) -> bool:
        """True when a payload of ``size`` JSON bytes is to be stored; :class:`PayloadTooLarge` above the limit."""
        if not self.threshold:
            return False
        if size > self.max_bytes:
            raise PayloadTooLarge(
                f"{label}: the arguments encode to {size} bytes of JSON, more than {PAYLOAD_STORE_MAX_KEY} = "
                f"{self.max_bytes}; store large data elsewhere (object storage) and pass its id")
        return size > self.threshold

    def store(self, task: Task, task_id: str, args: t.Any, kwargs: t.Any, options: dict[str, t.Any],
              tm: t.Any, delay: float) -> None:
        """Write the row of ``task_id``'s arguments (with ``tm``'s transaction, or committed now) and mark ``options``.

        The caller sends the message with empty arguments afterwards.
        """
        dump = getattr(task, "_dump_pydantic_arguments", None)
        if dump is not None:  # what Celery would have put on the wire for a pydantic task
            args, kwargs = dump(tuple(args or ()), dict(kwargs or {}))
        now = time.time()
        row = {
            "id": task_id,
            "task_name": task.name,
            "payload": kombu_dumps([list(args or ()), dict(kwargs or {})]),
            "created_at": now,
            "expires_at": now + max(0.0, delay) + self.retention_seconds,
        }
        if tm is None:
            engine = self.engine
            self.ensure_table(engine)
            with engine.begin() as conn:
                _write_row(conn.execute, engine.dialect.name, row)
        else:
            session = _session_joined_to(tm, self.engine)
            bind = session.get_bind()
            engine = getattr(bind, "engine", bind)
            self.ensure_table(engine)
            _write_row(session.execute, engine.dialect.name, row)
            # A session that starts "active" (ours, or the app's own factory's) must still be committed.
            zope.sqlalchemy.mark_changed(session, transaction_manager=tm)
        options["headers"] = {**(options.get("headers") or {}), PAYLOAD_HEADER: task_id}

    def delete(self, task_id: str) -> int:
        """Delete the row of ``task_id`` (its task succeeded, or its message was never sent)."""
        engine = self.engine
        with engine.begin() as conn:
            return conn.execute(sa.delete(payloads_table).where(payloads_table.c.id == task_id)).rowcount or 0

    def prune(self, now: float | None = None) -> int:
        """Delete the rows past their retention; the number deleted."""
        engine = self.engine
        if not sa.inspect(engine).has_table(PAYLOADS_TABLE_NAME):
            return 0
        cutoff = time.time() if now is None else now
        with engine.begin() as conn:
            return conn.execute(sa.delete(payloads_table).where(payloads_table.c.expires_at < cutoff)).rowcount or 0

    def stored_count(self) -> int:
        """Rows in the table (every app's sharing the database)."""
        engine = self.engine
        if not sa.inspect(engine).has_table(PAYLOADS_TABLE_NAME):
            return 0
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(payloads_table)).scalar_one()

    # -- the intake's side --------------------------------------------------------------------------------------------

    def load_into(self, message: t.Any, headers: dict[str, t.Any]) -> tuple[str, str] | None:
        """Put the stored arguments into ``message``; ``(kind, reason)`` when they cannot be, None when done."""
        reference = headers.get(PAYLOAD_HEADER)
        task_id = headers.get("id")
        if not isinstance(reference, str):
            return "malformed", f"the {PAYLOAD_HEADER} header is a {type(reference).__name__}, not a task id"
        if reference != task_id or len(reference) > MAX_REFERENCE_LENGTH:
            # Only the message's own id is honoured: a forged header cannot run with another task's arguments.
            return "malformed", f"the {PAYLOAD_HEADER} header does not name this message's task id"
        if getattr(message, "content_type", None) != "application/json":
            return "malformed", f"a message with a stored payload must be JSON, not {message.content_type!r}"
        engine = self.engine
        query = sa.select(payloads_table.c.task_name, payloads_table.c.payload).where(payloads_table.c.id == reference)
        try:
            # One statement, no transaction around it: without BEGIN and the ROLLBACK on release, the load
            # is one round trip (the consumer's thread waits for it).
            with self._reader(engine).connect() as conn:
                row = conn.execute(query).first()
        except sa.exc.DBAPIError as exc:
            try:
                present = sa.inspect(engine).has_table(PAYLOADS_TABLE_NAME)
            except sa.exc.DBAPIError:
                present = True  # the database is down: unavailable, not missing
            if not present:
                return "payload_missing", (f"the stored payload of {reference} cannot be found: {masked_url(engine)} "
                                           f"has no table {PAYLOADS_TABLE_NAME} (stored in another database?)")
            return "payload_unavailable", (f"the stored payload of {reference} could not be read from "
                                           f"{masked_url(engine)}: {type(exc).__name__}: {exc}"[:1000])
        if row is None:
            return "payload_missing", (
                f"no stored payload for {reference} in {masked_url(engine)}: pruned after "
                f"{PAYLOAD_STORE_RETENTION_KEY}, deleted after a successful run, or stored in another database")
        if row.task_name != headers.get("task"):
            return "malformed", f"the stored payload of {reference} belongs to task {row.task_name[:200]!r}"
        text = row.payload
        if self.max_bytes and len(text) > self.max_bytes:
            return "too_large", (f"the stored payload of {reference} is {len(text)} bytes, more than "
                                 f"{PAYLOAD_STORE_MAX_KEY} = {self.max_bytes}")
        try:
            stored = kombu_loads(text)
        except Exception as exc:
            return "malformed", f"the stored payload of {reference} is not JSON: {type(exc).__name__}"[:1000]
        if not (isinstance(stored, list) and len(stored) == 2 and isinstance(stored[0], list)
                and isinstance(stored[1], dict)):
            return "malformed", f"the stored payload of {reference} is not the pair [args, kwargs]"
        try:
            sent = message.decode()
        except Exception:
            return None  # Celery refuses it with its own reason, as any undecodable body
        embed = sent[2] if isinstance(sent, (list, tuple)) and len(sent) == 3 else None
        # The body an inline message would have had: the stored text spliced, not encoded again.
        body = text.rstrip()
        if not body.endswith("]"):
            body = kombu_dumps(stored)
        message.body = f"{body[:-1]},{kombu_dumps(embed)}]".encode()
        message._decoded_cache = [stored[0], stored[1], embed]
        return None


# -- the app's part -----------------------------------------------------------------------------------------------

def configure_claim_check(registry: Registry, app: Celery) -> ClaimCheck | None:
    """Let ``app`` store payloads (when the threshold is set) and load them (when it has a database); includeme."""
    settings = get_task_settings(registry)
    if get_engine(registry) is None:
        if settings.payload_store_threshold_bytes:
            raise ConfigurationError(
                f"{PAYLOAD_STORE_THRESHOLD_KEY} = {settings.payload_store_threshold_bytes}: payloads are stored in "
                "the app's database, and sqlalchemy.url is not set")
        return None
    claim_check = ClaimCheck(app, registry)
    app_state(app).claim_check = claim_check
    # The deletion after a successful run rides on the receiver that frees task names.
    connect_run_signals(delete_after_success)
    return claim_check


def claim_check_of(app: t.Any) -> ClaimCheck | None:
    """``app``'s stored payloads, or None for an app without a database (or not built by includeme)."""
    state = find_state(app)
    return state.claim_check if state is not None else None


def to_store(app: t.Any, label: str, size: int) -> bool:
    """The send pipeline's question for a payload of ``size`` bytes: store it? PayloadTooLarge above the limit."""
    claim_check = claim_check_of(app)
    return claim_check is not None and claim_check.admit(label, size)


def forget_reference(options: dict[str, t.Any]) -> None:
    """A retry copies its run's headers: the reference of the run's stored payload is decided again."""
    headers = options.get("headers")
    if isinstance(headers, dict) and PAYLOAD_HEADER in headers:
        options["headers"] = {key: value for key, value in headers.items() if key != PAYLOAD_HEADER}


def prune_stored_payloads(registry_or_app: t.Any, now: float | None = None) -> int:
    """Delete stored payloads past their retention; the number deleted (0 for an app without a database)."""
    from .registry import get_celery

    app = registry_or_app if find_state(registry_or_app) is not None else get_celery(registry_or_app)
    claim_check = claim_check_of(app)
    if claim_check is None:
        return 0
    deleted = claim_check.prune(now)
    if deleted:
        logger.info("websauna_tasks: pruned %d stored payload(s) of %s", deleted, PAYLOADS_TABLE_NAME)
    return deleted


# -- helpers ------------------------------------------------------------------------------------------------------

def _write_row(execute: t.Callable[[t.Any], t.Any], dialect: str, row: dict[str, t.Any]) -> None:
    """Insert ``row``, or overwrite the row of its task id (a retry of a stored task)."""
    table = payloads_table
    changed = {key: value for key, value in row.items() if key != "id"}
    insert = on_conflict_insert(dialect)
    if insert is not None:
        execute(insert(table).values(**row).on_conflict_do_update(index_elements=[table.c.id], set_=changed))
        return
    # Elsewhere no upsert is portable: both statements run in the caller's one transaction.
    execute(sa.delete(table).where(table.c.id == row["id"]))
    execute(sa.insert(table).values(**row))


def _session_joined_to(tm: t.Any, engine: sa.Engine) -> Session:
    """The session whose writes commit with ``tm`` (the outbox's), else a session of ``engine`` joined to it."""
    try:
        sessions = transaction_sessions(tm)
    except ConfigurationError:  # request.dbsession cannot be made: ours will do
        sessions = []
    if len(sessions) == 1:
        return sessions[0]
    session = Session(bind=engine)
    zope.sqlalchemy.register(session, transaction_manager=tm)
    return session


def delete_after_success(task: Task, request: t.Any, reference: t.Any) -> None:
    """Delete the stored payload of a run that succeeded (names._after_run, Celery's ``task_postrun``)."""
    if reference != request.id:
        return
    claim_check = claim_check_of(task.app)
    if claim_check is None or getattr(task, "idempotent", False):
        # An idempotent task's duplicate delivery must still find its arguments to be skipped by its done-row.
        return
    try:
        claim_check.delete(reference)
    except Exception:
        # The task has run: its row waits for the prune instead.
        logger.exception("websauna_tasks: could not delete the stored payload of task %s", reference)


# The smallest size worth asking about, re-exported for dispatch.py's one comparison per message.
STORE_FLOOR = MIN_PAYLOAD_STORE_THRESHOLD_BYTES
