"""``websauna_tasks.create_tables = never``: the application starts only when its tables are there.

With ``never`` the library creates nothing itself (schema.py's tables come from
``ws-celery INI -- init`` or the application's migrations), so a missing
table would otherwise surface as a SQL error in the first request or task
that needs it, long after the deploy. ``includeme`` subscribes
:func:`check_schema` to ``ApplicationCreated``: it runs in
``make_wsgi_app()`` (which pserve and ws-celery both call), after
``config.scan()`` has bound the tasks, and raises
:class:`~websauna_tasks.schema.MissingTables` naming what is missing and the
command to run.

Only the tables of the features in use are required (:func:`tables_in_use`):
an application without the outbox needs no outbox table. Those the
configuration cannot predict are checked again when first used, with the
same error.
"""
from __future__ import annotations

import contextlib
import contextvars
import typing as t

import sqlalchemy as sa
from pyramid.exceptions import ConfigurationError

from .db import get_engine
from .deadletters import redis_broker_url
from .names import store_choice
from .schema import (
    check_tables,
    dead_letters_table,
    done_table,
    iterations_table,
    masked_url,
    names_table,
    outbox_table,
    payloads_table,
    shards_table,
)
from .settings import CREATE_TABLES_KEY, get_task_settings

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator
    from pyramid.registry import Registry

#: The command that makes the tables: loading the application for it must not demand them first.
INIT_COMMAND_NAME = "init"

_skipped: contextvars.ContextVar[bool] = contextvars.ContextVar("websauna_tasks_schema_check_skipped", default=False)


@contextlib.contextmanager
def loading_for(command: str) -> t.Iterator[None]:
    """Load an application for ws-celery's ``command``: ``init`` skips the startup check it exists to satisfy."""
    token = _skipped.set(command == INIT_COMMAND_NAME)
    try:
        yield
    finally:
        _skipped.reset(token)


def tables_in_use(registry: Registry, app: Celery) -> list[sa.Table]:
    """The library's tables that ``app``'s configuration and tasks need now.

    - the outbox table, when ``websauna_tasks.outbox`` is on;
    - the done-table, when a task is idempotent (the outbox's redelivery reads
      it for those tasks only);
    - the names table, when task-name claims live in the SQL database;
    - the dead letters' table, when the broker is not Redis (a Redis broker
      keeps them in a list): a worker refusing a message must have it;
    - the stored payloads' table, when ``websauna_tasks.payload_store_threshold_bytes``
      is set (claim_check.py);
    - sharded iteration's two tables, always: any code may call
      ``defer_iteration_with_finalize()``, and its worker would otherwise
      find them missing long after startup.
    """
    settings = get_task_settings(registry)
    tables = [iterations_table, shards_table]
    if settings.outbox:
        tables.append(outbox_table)
    if any(getattr(task, "idempotent", False) for task in app.tasks.values()):
        tables.append(done_table)
    try:
        name_store = store_choice(registry, app)
    except ConfigurationError:
        name_store = ""  # no store at all: unique names fail on use, with their own error
    if name_store == "sql":
        tables.append(names_table)
    if redis_broker_url(app) is None:
        tables.append(dead_letters_table)
    if settings.payload_store_threshold_bytes:
        tables.append(payloads_table)
    return sorted(tables, key=lambda table: table.name)


def check_schema(registry: Registry, app: Celery) -> None:
    """With ``create_tables = never``: raise MissingTables unless the tables in use exist with their columns."""
    if _skipped.get() or get_task_settings(registry).create_tables != "never":
        return
    engine = get_engine(registry)
    if engine is None:
        # A dbsession_factory function: no engine before a request; the tables are checked on first use.
        return
    try:
        check_tables(engine, tables_in_use(registry, app))
    except sa.exc.DBAPIError as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise ConfigurationError(f"{CREATE_TABLES_KEY} = never: cannot check the library's tables in "
                                 f"{masked_url(engine)}: {reason}") from None


def configure_schema_check(config: Configurator, app: Celery) -> None:
    """Check the tables when the application is made (called by includeme)."""
    from pyramid.interfaces import IApplicationCreated

    registry = config.registry
    # On ApplicationCreated rather than as an action: its error reaches the
    # caller as raised, not wrapped in Pyramid's "Line 0 of file None".
    config.add_subscriber(lambda _event: check_schema(registry, app), IApplicationCreated)
