"""The library's tables, as one SQLAlchemy ``MetaData``, and how they are created or checked.

Every table websauna_tasks keeps in the application's database is defined
here, once; the modules that use one import it from here (and still export
it under the name they always had: ``outbox.outbox_table``,
``idempotency.done_table``, ``names.names_table``,
``iteration.iterations_table`` / ``shards_table``; ``deadletters``
uses ``dead_letters_table``, ``cancel`` ``cancellations_table``, ``claim_check``
``payloads_table``).

:data:`metadata` is what an application hands to Alembic next to its own
(``target_metadata = [Base.metadata, websauna_tasks.schema.metadata]``),
``ws-celery INI -- init`` creates the tables from it, and ``init --sql``
prints their DDL. ``websauna_tasks.create_tables`` says whether the library
may also create a missing table on first use (``auto``, the default) or
must find it there (``never``): docs/schema.md.
"""
from __future__ import annotations

import functools
import importlib
import typing as t

import sqlalchemy as sa
from pyramid.exceptions import ConfigurationError

#: The command that creates the tables, named by every "missing table" error.
INIT_COMMAND = "ws-celery INI -- init"

# Public as ``metadata`` through the module's __getattr__ below, which completes it first.
_metadata = sa.MetaData()

# -- the outbox (outbox/): a task message as a row of the request's transaction ------------------------

OUTBOX_TABLE_NAME = "websauna_tasks_outbox"

outbox_table = sa.Table(
    OUTBOX_TABLE_NAME, _metadata,
    # The task id: known before the INSERT, returned by apply_async().
    sa.Column("id", sa.String(64), primary_key=True),
    # Celery app name: two apps sharing a database relay their own rows only.
    sa.Column("app", sa.String(255), nullable=False),
    sa.Column("task_name", sa.String(255), nullable=False),
    sa.Column("args", sa.Text, nullable=False),
    sa.Column("kwargs", sa.Text, nullable=False),
    sa.Column("options", sa.Text, nullable=False),
    # Epoch seconds, as in the names table: no time zone to get wrong between databases.
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    # Times sent again because its task never finished (redelivery); the
    # maximum once a run failed for good.
    sa.Column("redeliveries", sa.Integer, nullable=False, server_default="0"),
)
#: Unsent rows only, in claim order: the relay's query reads this and nothing else. Partial on
#: PostgreSQL and SQLite (WHERE sent_at IS NULL), through dialect options attached by
#: :func:`use_dialects`, not given here: see there.
outbox_pending_index = sa.Index("ix_websauna_tasks_outbox_pending", outbox_table.c.app, outbox_table.c.created_at)
outbox_sent_index = sa.Index("ix_websauna_tasks_outbox_sent", outbox_table.c.sent_at)

# -- done-rows (idempotency.py): one per committed run of an idempotent task ----------------------------

DONE_TABLE_NAME = "websauna_tasks_done"

done_table = sa.Table(
    DONE_TABLE_NAME, _metadata,
    sa.Column("task_id", sa.String(255), primary_key=True),
    sa.Column("task_name", sa.String(255), nullable=False),
    sa.Column("done_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# -- task-name claims (names.py), when they live in the SQL database -----------------------------------

NAMES_TABLE_NAME = "websauna_tasks_names"

names_table = sa.Table(
    NAMES_TABLE_NAME, _metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    # Epoch seconds: no time zone to get wrong between SQLite and PostgreSQL.
    sa.Column("expires_at", sa.Float, nullable=False),
)

# -- sharded iteration's progress (iteration.py) -------------------------------------------------------

ITERATIONS_TABLE_NAME = "websauna_tasks_iterations"
SHARDS_TABLE_NAME = "websauna_tasks_iteration_shards"
#: A shard's state while it has rows left.
SHARD_RUNNING = "running"

iterations_table = sa.Table(
    ITERATIONS_TABLE_NAME, _metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("callback", sa.Text, nullable=False),
    sa.Column("finalize", sa.Text, nullable=False),
    sa.Column("query", sa.Text, nullable=False),        # the JSON query spec
    sa.Column("arguments", sa.Text, nullable=False),    # kombu JSON of {"args": [...], "kwargs": {...}}
    sa.Column("queue", sa.String(255)),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("shard_count", sa.Integer, nullable=False),
    # Incremented by each finishing shard on this row: see iteration.py's docstring.
    sa.Column("shards_done", sa.Integer, nullable=False, default=0),
    sa.Column("finalized", sa.Boolean, nullable=False, default=False),
    sa.Column("finalize_task_id", sa.String(64)),
    # Epoch seconds: no time zone to get wrong between SQLite and PostgreSQL.
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
)
shards_table = sa.Table(
    SHARDS_TABLE_NAME, _metadata,
    sa.Column("iteration_id", sa.String(64), sa.ForeignKey(iterations_table.c.id, ondelete="CASCADE"),
              primary_key=True),
    sa.Column("shard_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("first_pk", sa.BigInteger, nullable=False),
    sa.Column("last_pk", sa.BigInteger, nullable=False),
    # The last primary key processed (first_pk - 1 before the first batch).
    sa.Column("cursor_pk", sa.BigInteger, nullable=False),
    sa.Column("rows_done", sa.BigInteger, nullable=False, default=0),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, default=SHARD_RUNNING),
    sa.Column("run", sa.Integer, nullable=False, default=0),
    sa.Column("redefers", sa.Integer, nullable=False, default=0),
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
)

# -- dead letters (deadletters/), when the broker is not Redis --------------------------------------------

DEAD_LETTERS_TABLE_NAME = "websauna_tasks_dead_letters"

dead_letters_table = sa.Table(
    DEAD_LETTERS_TABLE_NAME, _metadata,
    # Oldest first: the order of the list, and the key its indexes page by.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    # websauna_tasks.deadletter_queue: apps sharing a database keep their letters apart, as on Redis.
    sa.Column("list_name", sa.String(255), nullable=False),
    sa.Column("task_id", sa.String(512)),
    sa.Column("kind", sa.String(64), nullable=False),
    # Epoch seconds, the entry's own time: what prune compares.
    sa.Column("recorded_at", sa.Float),
    # The entry's JSON text, as the Redis list keeps it: the truth the columns above only find.
    sa.Column("entry", sa.Text, nullable=False),
)
#: A list's rows in order: listing and pages, from either end.
dead_letters_list_index = sa.Index("ix_websauna_tasks_dead_letters_list", dead_letters_table.c.list_name,
                                   dead_letters_table.c.seq)
#: requeue and drop by task id.
dead_letters_task_index = sa.Index("ix_websauna_tasks_dead_letters_task", dead_letters_table.c.list_name,
                                   dead_letters_table.c.task_id)
#: A list's rows of one kind, in order: the kind filter.
dead_letters_kind_index = sa.Index("ix_websauna_tasks_dead_letters_kind", dead_letters_table.c.list_name,
                                   dead_letters_table.c.kind, dead_letters_table.c.seq)
#: prune: the rows older than a time.
dead_letters_time_index = sa.Index("ix_websauna_tasks_dead_letters_time", dead_letters_table.c.list_name,
                                   dead_letters_table.c.recorded_at)

# -- cancellations (cancel.py), when there is no Redis to keep them in ---------------------------------------

CANCELLATIONS_TABLE_NAME = "websauna_tasks_cancellations"

cancellations_table = sa.Table(
    CANCELLATIONS_TABLE_NAME, _metadata,
    # The Celery app's name and the task id, as the Redis key holds them: apps sharing a database stay apart.
    sa.Column("app", sa.String(255), primary_key=True),
    sa.Column("task_id", sa.String(255), primary_key=True),
    # Epoch seconds: the mark is ignored, then pruned, after this.
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

# -- stored payloads (claim_check.py): the arguments of a message too large for the broker ----------------

PAYLOADS_TABLE_NAME = "websauna_tasks_payloads"

payloads_table = sa.Table(
    PAYLOADS_TABLE_NAME, _metadata,
    # The task id: the message's reference header must name its own id, so a forged one cannot borrow
    # another task's arguments; a retry of the task writes its arguments over the same row.
    sa.Column("id", sa.String(255), primary_key=True),
    # The message's task: a row read for another task is refused.
    sa.Column("task_name", sa.String(255), nullable=False),
    # kombu's JSON of [args, kwargs], the text an inline message would have carried.
    sa.Column("payload", sa.Text, nullable=False),
    # Epoch seconds: no time zone to get wrong between databases.
    sa.Column("created_at", sa.Float, nullable=False),
    # created_at + the message's countdown + the retention: pruned after this.
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

#: Every table, parents before the tables that refer to them.
TABLES: tuple[sa.Table, ...] = tuple(_metadata.sorted_tables)


# -- dialect-specific parts ----------------------------------------------------------------------------

#: The databases the library writes dialect-specific SQL for: partial indexes, INSERT ... ON CONFLICT.
DIALECTS = ("postgresql", "sqlite")

#: Each partial index and its WHERE, as the ``<dialect>_where`` option of :data:`DIALECTS`.
_PARTIAL_INDEXES = ((outbox_pending_index, outbox_table.c.sent_at.is_(None)),)


def _add_dialect_options(*dialect_names: str) -> None:
    """Attach the partial indexes' WHERE for those of ``dialect_names`` in :data:`DIALECTS`.

    Not given to ``sa.Index()``: SQLAlchemy validates a ``<dialect>_<option>``
    argument by importing that dialect, so every process importing the tables
    (a worker using one database) would hold both dialects (2.4 MB for
    PostgreSQL's, 0.6 MB for SQLite's). ``dialect_kwargs`` is SQLAlchemy's
    way to add them later; they are added where DDL is made or compared:
    for the engine's dialect by create_missing() and ddl_statements(), for
    every dialect when ``metadata`` is read (Alembic, ``create_all``).
    """
    for name in dialect_names:
        if name in DIALECTS:
            for index, where in _PARTIAL_INDEXES:
                index.dialect_kwargs[f"{name}_where"] = where


def _before_create(table: sa.Table, connection: sa.Connection, **kw: t.Any) -> None:
    # ``outbox_table.create(engine)`` or ``create_all`` on the tables' own MetaData reach neither
    # create_missing() nor ``metadata``: the table's DDL event still gives its indexes their WHERE.
    _add_dialect_options(connection.dialect.name)


for _table in {index.table for index, _ in _PARTIAL_INDEXES}:
    sa.event.listen(_table, "before_create", _before_create)


def __getattr__(name: str) -> sa.MetaData:
    # ``metadata`` is what the application's tools make or compare DDL from, for any dialect
    # (Alembic's autogenerate renders the options it finds): complete first. The library itself
    # uses the tables, so a worker never gets here.
    if name == "metadata":
        _add_dialect_options(*DIALECTS)
        return _metadata
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def on_conflict_insert(dialect_name: str) -> t.Callable[[sa.Table], t.Any] | None:
    """``insert()`` of the dialect ``dialect_name``, the one with ``on_conflict_do_*``; None outside :data:`DIALECTS`.

    Imported on use, for the engine's own dialect (loaded by the engine
    already), rather than both at import: see :func:`_add_dialect_options`.
    """
    if dialect_name not in DIALECTS:
        return None
    return importlib.import_module(f"sqlalchemy.dialects.{dialect_name}").insert


# -- missing tables ----------------------------------------------------------------------------------

class MissingTables(ConfigurationError):
    """``websauna_tasks.create_tables = never`` and tables (or columns) of the library are not in the database."""

    def __init__(self, missing: t.Sequence[str], url: str = ""):
        self.missing = list(missing)
        where = f" in {url}" if url else ""
        super().__init__(
            f"websauna_tasks.create_tables = never, and the database{where} lacks {', '.join(self.missing)}: "
            f"run `{INIT_COMMAND}` (or your migrations; docs/schema.md) to create them")


def masked_url(engine: sa.Engine) -> str:
    """The engine's URL with its password hidden: it goes into errors and logs."""
    return engine.url.render_as_string(hide_password=True)


def missing_parts(engine: sa.Engine, tables: t.Iterable[sa.Table] = TABLES) -> list[str]:
    """What the database lacks of ``tables``: ``table`` for a missing table, ``table.column`` for a column."""
    inspector = sa.inspect(engine)
    missing = []
    for table in tables:
        if not inspector.has_table(table.name, schema=table.schema):
            missing.append(f"table {table.name}")
            continue
        present = {column["name"] for column in inspector.get_columns(table.name, schema=table.schema)}
        missing.extend(f"column {table.name}.{column.name}" for column in table.columns if column.name not in present)
    return missing


def check_tables(engine: sa.Engine, tables: t.Iterable[sa.Table] = TABLES) -> None:
    """Raise :class:`MissingTables` unless every table of ``tables``, with all its columns, exists."""
    missing = missing_parts(engine, tables)
    if missing:
        raise MissingTables(missing, masked_url(engine))


def create_missing(engine: sa.Engine, tables: t.Iterable[sa.Table] = TABLES) -> list[str]:
    """Create those of ``tables`` (and their indexes) that do not exist; the names of what was created.

    Several processes may get here at once: IF NOT EXISTS covers most of it,
    and PostgreSQL can still fail one of two concurrent creates (on its
    catalog's unique index), after which the table exists; such a failure is
    taken as "created by the other one". One transaction per statement, so
    that losing one race does not undo the others. Not an AUTOCOMMIT engine:
    the outbox relay's engine already carries an isolation level, and
    SQLAlchemy keeps the first of two chained ones.
    """
    _add_dialect_options(engine.dialect.name)
    created = []
    for table in tables:
        inspector = sa.inspect(engine)
        if not inspector.has_table(table.name, schema=table.schema):
            if _run_ddl(engine, sa.schema.CreateTable(table, if_not_exists=True),
                        lambda table=table: sa.inspect(engine).has_table(table.name, schema=table.schema)):
                created.append(table.name)
            inspector = sa.inspect(engine)
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            if index.name in _index_names(inspector, table):
                continue
            if _run_ddl(engine, sa.schema.CreateIndex(index, if_not_exists=True),
                        lambda table=table, index=index: index.name in _index_names(sa.inspect(engine), table)):
                created.append(str(index.name))
    return created


def _index_names(inspector: sa.Inspector, table: sa.Table) -> set[str]:
    return {index["name"] for index in inspector.get_indexes(table.name, schema=table.schema)}


def _run_ddl(engine: sa.Engine, ddl: sa.schema.ExecutableDDLElement, exists: t.Callable[[], bool]) -> bool:
    """Run ``ddl`` in its own transaction: True when it ran, False when another process got there first."""
    try:
        with engine.begin() as conn:
            conn.execute(ddl)
    except sa.exc.DBAPIError:
        if not exists():
            raise
        return False
    return True


def ensure_tables(engine: sa.Engine, tables: t.Iterable[sa.Table], create: bool) -> None:
    """Create what is missing of ``tables`` when ``create``; else check it is all there (:class:`MissingTables`)."""
    if create:
        create_missing(engine, tables)
    else:
        check_tables(engine, tables)


def ddl_statements(dialect: sa.Dialect, tables: t.Iterable[sa.Table] = TABLES) -> list[str]:
    """The ``CREATE TABLE`` and ``CREATE INDEX`` statements of ``tables`` in ``dialect``'s SQL, one per item."""
    _add_dialect_options(dialect.name)
    statements = []
    for table in tables:
        statements.append(str(sa.schema.CreateTable(table).compile(dialect=dialect)).strip())
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            statements.append(str(sa.schema.CreateIndex(index).compile(dialect=dialect)).strip())
    return statements
