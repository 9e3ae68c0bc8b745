"""``defer_iteration_with_finalize()``: sharded iteration over a model's rows (djangae's, on Celery).

How it is put together, and why:

- The call validates everything it can without a database (the callback and
  finalize against the defer allow-list, the query's shape, its primary key,
  the arguments as JSON) and defers one step, :func:`start_iteration`, through
  :func:`websauna_tasks.defer`: ``_queue`` and ``_transactional`` therefore
  mean exactly what they mean for ``defer()``, and the caller needs no
  database connection of its own.
- The start step (one transaction) splits ``[min pk, max pk]`` of the query
  into ranges, writes one progress row per shard and sends one shard task per
  range when it commits.
- A shard is the Celery task ``websauna_tasks.iteration_shard``, bound to the
  app by ``includeme``. It is a task rather than a deferred function because
  deferred functions run inside one transaction (``TransactionalTask``) and a
  shard needs many: each batch is its own transaction holding the shard's
  progress row ``FOR UPDATE``, so the callback's writes (through
  ``request.dbsession``) and the cursor commit or roll back together. The
  message carries only ``(iteration id, shard index, run)``; what to call
  lives in the database, checked against the allow-list again before any
  import.
- ``run`` fences runs: every re-defer increments it in the same transaction
  that sends the new message, and a message whose ``run`` is no longer the
  shard's stops at its first batch. A duplicate delivery can therefore never
  start a second chain for one shard.
- The shard that finishes last claims finalize with a conditional UPDATE on
  the iteration row, after incrementing ``shards_done`` on that same row: the
  increment serialises concurrently finishing shards (under READ COMMITTED the
  second waits and sees the first; under REPEATABLE READ / SERIALIZABLE it
  gets a serialization failure and its batch is retried), so the last one
  always sees all shards done and exactly one claim succeeds.
"""
from __future__ import annotations

import contextvars
import logging
import time
import typing as t
import uuid
from dataclasses import asdict, dataclass

import sqlalchemy as sa
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.threadlocal import get_current_registry
from transaction.interfaces import NoTransaction

from .db import get_engine
from .defer import (
    DeferNotAllowed,
    allowed_prefixes,
    check_allowed,
    defer,
    deferrable,
    function_path,
    queue_option,
    resolve_path,
)
from .registry import ICeleryApp
from .request import get_current_request
from .schema import SHARD_RUNNING, iterations_table, shards_table
from .schema import ensure_tables as ensure_schema_tables
from .settings import DEFAULT_ITERATION_BATCH_SIZE as DEFAULT_BATCH_SIZE  # noqa: F401
from .settings import DEFAULT_ITERATION_MAX_FAILURES as DEFAULT_MAX_FAILURES  # noqa: F401
from .settings import DEFAULT_ITERATION_TIME_BUDGET as DEFAULT_TIME_BUDGET  # noqa: F401
from .settings import ITERATION_BATCH_SIZE_KEY as BATCH_SIZE_KEY  # noqa: F401
from .settings import ITERATION_MAX_FAILURES_KEY as MAX_FAILURES_KEY  # noqa: F401
from .settings import ITERATION_TIME_BUDGET_KEY as TIME_BUDGET_KEY  # noqa: F401
from .settings import get_task_settings
from .tasks import WebsaunaTask, is_transient, task

logger = logging.getLogger(__name__)

#: The Celery task that runs one shard.
SHARD_TASK_NAME = "websauna_tasks.iteration_shard"
# Settings (declared and parsed in settings.py, imported above under their old names): TIME_BUDGET_KEY,
# seconds a shard run may work before it re-defers itself (570, djangae's 9.5 minutes); BATCH_SIZE_KEY,
# rows per batch, one transaction each, when _batch_size is not given (100); MAX_FAILURES_KEY, failures
# in a row without progress after which a shard is marked failed (10).
#: Longest back-off (seconds) of the Celery retry after a failure without progress.
MAX_RETRY_COUNTDOWN = 60.0
# Serialization failures / deadlocks retried inside one run before they count as a failure.
_CONFLICT_ATTEMPTS = 5

RUNNING, DONE, FAILED = SHARD_RUNNING, "done", "failed"

_shard_index: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "websauna_tasks_shard_index", default=None)


def get_deferred_shard_index() -> int | None:
    """The index (0-based) of the shard whose callback is running; None outside a callback."""
    return _shard_index.get()


class IterationQueryError(ValueError):
    """The query of ``defer_iteration_with_finalize`` cannot be found, built or iterated."""


# -- the progress tables --------------------------------------------------------------------

# iterations_table and shards_table are defined with the library's other tables (schema.py) and
# keep their names here.

_TABLES_KEY = "websauna_tasks.iteration_tables_ready"


def _engine_for(registry: Registry, request: Request | None = None) -> sa.Engine:
    engine = get_engine(registry)
    if engine is None and request is not None:
        # A custom websauna_tasks.dbsession_factory: its session knows its engine.
        bind = request.dbsession.get_bind()
        engine = bind if isinstance(bind, sa.Engine) else bind.engine
    if engine is None:
        raise ConfigurationError("sharded iteration needs sqlalchemy.url (its progress lives in the database)")
    return engine


def ensure_tables(engine: sa.Engine, create: bool = True) -> None:
    """Create the progress tables if they are missing (``create=False``: check they are there)."""
    ensure_schema_tables(engine, [iterations_table, shards_table], create)


def _tables_ready(registry: Registry, engine: sa.Engine) -> None:
    if not registry.get(_TABLES_KEY):
        ensure_tables(engine, get_task_settings(registry).create_tables == "auto")
        registry[_TABLES_KEY] = True


# -- settings ----------------------------------------------------------------------------------

def time_budget(registry: Registry) -> float:
    return get_task_settings(registry).iteration_time_budget_seconds


def max_failures(registry: Registry) -> int:
    return get_task_settings(registry).iteration_max_failures


def default_batch_size(registry: Registry) -> int:
    return get_task_settings(registry).iteration_batch_size


# -- the query as JSON -------------------------------------------------------------------------

QueryArgument = t.Union[type, str, t.Callable[..., t.Any], t.Mapping[str, t.Any]]


def _load_allowed(path: t.Any, prefixes: t.Iterable[str], what: str) -> t.Any:
    """Import ``module:qualname`` only if the defer allow-list permits it (checked before importing)."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise IterationQueryError(f"{what}: expected 'package.module:name', got {path!r}")
    try:
        check_allowed(path, prefixes)
    except DeferNotAllowed as exc:
        raise DeferNotAllowed(f"{what}: {exc}") from None
    try:
        return resolve_path(path)
    except DeferNotAllowed:
        raise
    except (ImportError, AttributeError) as exc:
        raise IterationQueryError(f"{what}: {path} cannot be found ({type(exc).__name__}: {exc})") from None


def _class_path(cls: type) -> str:
    path = f"{cls.__module__}:{cls.__qualname__}"
    if "<" in cls.__qualname__:
        raise IterationQueryError(f"{cls!r} is not a module-level class, so a worker cannot find it again")
    return path


def query_spec(query: QueryArgument) -> dict[str, t.Any]:
    """The JSON form of what ``defer_iteration_with_finalize`` accepts as ``query``.

    - a mapped class ``Order`` -> ``{"model": "myapp.models:Order"}``;
    - a module-level factory function -> ``{"factory": "myapp.jobs:open_orders"}``;
    - a string ``"module:name"`` naming either of them;
    - the dict itself: ``{"model": ..., "filters": {column: value}}`` or
      ``{"factory": ..., "args": [...], "kwargs": {...}}``.
    """
    if isinstance(query, sa.sql.Select):
        raise TypeError(
            "defer_iteration_with_finalize(): a select() cannot travel as JSON; return it from a module-level "
            "factory function and pass the function (or 'module:name', or {'factory': ..., 'args': [...]})")
    if isinstance(query, t.Mapping):
        spec = dict(query)
        kind = "model" if "model" in spec else "factory" if "factory" in spec else None
        allowed = {"model": {"model", "filters"}, "factory": {"factory", "args", "kwargs"}}.get(kind or "", set())
        if kind is None or set(spec) - allowed:
            raise IterationQueryError(
                "query dict: expected {'model': ..., 'filters': {...}} or {'factory': ..., 'args': [...], "
                f"'kwargs': {{...}}}}, got keys {sorted(spec)}")
        target = spec[kind]
        if isinstance(target, type):
            spec[kind] = _class_path(target)
        elif callable(target):
            spec[kind] = _function_path(target, "query factory")
        if kind == "model":
            filters = spec.setdefault("filters", {})
            if not isinstance(filters, t.Mapping) or not all(isinstance(key, str) for key in filters):
                raise IterationQueryError(f"query filters: expected a dict of column name to value, got {filters!r}")
            spec["filters"] = dict(filters)
        else:
            spec["args"] = list(spec.get("args") or ())
            spec["kwargs"] = dict(spec.get("kwargs") or {})
        return spec
    if isinstance(query, str):
        # Model or factory: known once it is imported (by _build_query).
        return {"path": query}
    if isinstance(query, type):
        if sa.inspect(query, raiseerr=False) is None:
            raise IterationQueryError(f"{query!r} is not a mapped SQLAlchemy class")
        return {"model": _class_path(query), "filters": {}}
    if callable(query):
        return {"factory": _function_path(query, "query factory"), "args": [], "kwargs": {}}
    raise TypeError(f"defer_iteration_with_finalize(): cannot iterate over {query!r}: pass a mapped class, "
                    "a factory function returning select(Model), 'module:name' or a query dict")


def _function_path(fn: t.Callable[..., t.Any], what: str) -> str:
    try:
        return function_path(fn)
    except TypeError as exc:
        raise TypeError(f"defer_iteration_with_finalize(): {what}: {exc}") from None


class _Query:
    """The statement a spec stands for, its model and its integer primary key column."""

    def __init__(self, spec: dict[str, t.Any], prefixes: t.Iterable[str]):
        prefixes = tuple(prefixes)
        spec = dict(spec)
        if "path" in spec:
            path = spec.pop("path")
            target = _load_allowed(path, prefixes, "query")
            if isinstance(target, type):
                spec = {"model": path, "filters": {}}
            elif callable(target):
                spec = {"factory": path, "args": [], "kwargs": {}}
            else:
                raise IterationQueryError(f"query: {path} is neither a mapped class nor a factory function")
        if "model" in spec:
            model = _load_allowed(spec["model"], prefixes, "query model")
            mapper = sa.inspect(model, raiseerr=False) if isinstance(model, type) else None
            if mapper is None:
                raise IterationQueryError(f"query model: {spec['model']} is not a mapped SQLAlchemy class")
            statement = sa.select(model)
            for name, value in (spec.get("filters") or {}).items():
                if name not in mapper.column_attrs:
                    raise IterationQueryError(f"query filters: {spec['model']} has no column attribute {name!r}")
                column = getattr(model, name)
                if value is None:
                    statement = statement.where(column.is_(None))
                elif isinstance(value, list):
                    statement = statement.where(column.in_(value))
                else:
                    statement = statement.where(column == value)
        elif "factory" in spec:
            factory = _load_allowed(spec["factory"], prefixes, "query factory")
            if not callable(factory) or isinstance(factory, type):
                raise IterationQueryError(f"query factory: {spec['factory']} is not a function")
            args, kwargs = spec.get("args") or [], spec.get("kwargs") or {}
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise IterationQueryError(f"query factory {spec['factory']}: args must be a list, kwargs a dict")
            statement = factory(*args, **kwargs)
            if not isinstance(statement, sa.sql.Select):
                raise IterationQueryError(
                    f"query factory {spec['factory']} returned {type(statement).__name__}, not a select()")
            model = _single_entity(statement, spec["factory"])
            # LIMIT/OFFSET would apply to each batch, not to the iteration.
            if getattr(statement, "_limit_clause", None) is not None or \
                    getattr(statement, "_offset_clause", None) is not None:
                raise IterationQueryError(f"query factory {spec['factory']}: limit()/offset() cannot be sharded")
        else:
            raise IterationQueryError(f"query: unknown spec {spec!r}")
        self.spec = spec
        self.model = model
        self.statement = statement.order_by(None)
        self.pk, self.pk_key = _integer_primary_key(model)

    def bounds(self) -> sa.Select:
        return self.statement.with_only_columns(sa.func.min(self.pk), sa.func.max(self.pk),
                                                maintain_column_froms=True)

    def count(self, first: int, last: int) -> sa.Select:
        # DISTINCT: a factory's join may repeat a row; it is processed once.
        return (self.statement.where(self.pk >= first, self.pk <= last)
                .with_only_columns(sa.func.count(sa.distinct(self.pk)), maintain_column_froms=True))

    def batch(self, after: int, last: int, limit: int) -> sa.Select:
        return self.statement.where(self.pk > after, self.pk <= last).order_by(self.pk).limit(limit)


def _single_entity(statement: sa.Select, where: str) -> type:
    descriptions = statement.column_descriptions
    entity = descriptions[0].get("entity") if len(descriptions) == 1 else None
    if entity is None or descriptions[0].get("expr") is not entity or not isinstance(entity, type):
        raise IterationQueryError(
            f"query factory {where}: must return select(Model) of exactly one mapped class, "
            f"got columns {[d.get('name') for d in descriptions]}")
    return entity


def _integer_primary_key(model: type) -> tuple[sa.Column, str]:
    mapper = sa.inspect(model)
    keys = mapper.primary_key
    described = ", ".join(f"{column.name} {column.type}" for column in keys)
    if len(keys) != 1 or not isinstance(keys[0].type, sa.Integer):
        raise IterationQueryError(
            f"{model.__module__}:{model.__qualname__} has primary key ({described}); sharded iteration needs a "
            "single integer primary key column (shards are primary key ranges)")
    return keys[0], mapper.get_property_by_column(keys[0]).key


def _split(first: int, last: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ranges of equal width covering ``[first, last]`` (fewer if it is narrower)."""
    width = last - first + 1
    count = max(1, min(shards, width))
    return [(first + width * i // count, first + width * (i + 1) // count - 1) for i in range(count)]


# -- the call -------------------------------------------------------------------------------------

def _in_transaction(tm: t.Any) -> bool:
    try:
        tm.get()
    except NoTransaction:
        return False
    return True


def _end_transaction(tm: t.Any) -> None:
    """Abort what a failed batch left on the manager (a failed commit is not freed by ``with tm``)."""
    if _in_transaction(tm):
        tm.abort()


def _registry_of(registry: Registry | None) -> Registry:
    if registry is not None:
        return registry
    request = get_current_request()
    return request.registry if request is not None else get_current_registry()


def _check_json(value: t.Any, where: str) -> None:
    # kombu's encoder is what both the message and the stored arguments use.
    try:
        json_dumps(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"defer_iteration_with_finalize(): {where} ({type(value).__name__}) cannot travel "
                        f"as JSON: {exc}") from None


def defer_iteration_with_finalize(
        query: QueryArgument, callback: t.Callable[..., t.Any], finalize: t.Callable[..., t.Any], *args: t.Any,
        _shards: int = 5, _queue: str | None = "default", _transactional: bool | None = False,
        _batch_size: int | None = None, _tm: t.Any = None, _registry: Registry | None = None,
        **kwargs: t.Any) -> str:
    """Call ``callback(row, *args, **kwargs)`` for each row of ``query``, in shards; then ``finalize(*args, **kwargs)``.

    Returns the iteration id (for :func:`iteration_progress`). ``_queue``,
    ``_transactional`` and ``_tm`` apply to the start message as in
    :func:`websauna_tasks.defer` (``_transactional=False``, djangae's
    default, sends it now); shards and finalize go to the same queue.
    Errors in the arguments raise here: ``DeferNotAllowed`` (callback or
    finalize outside the allow-list), ``IterationQueryError`` (query not
    found, not ``select(Model)``, primary key not a single integer column),
    ``TypeError`` (not JSON, not a module-level function), ``ValueError``.
    """
    unknown = sorted(key for key in kwargs if key.startswith("_"))
    if unknown:
        raise TypeError(f"defer_iteration_with_finalize(): unknown option(s) {', '.join(unknown)}")
    if not isinstance(_shards, int) or isinstance(_shards, bool) or _shards < 1:
        raise ValueError(f"defer_iteration_with_finalize(): _shards must be a positive int, got {_shards!r}")
    if _batch_size is not None and (not isinstance(_batch_size, int) or _batch_size < 1):
        raise ValueError(f"defer_iteration_with_finalize(): _batch_size must be a positive int, got {_batch_size!r}")
    registry = _registry_of(_registry)
    app = registry.queryUtility(ICeleryApp)
    if app is None or SHARD_TASK_NAME not in app.tasks:
        raise ConfigurationError("defer_iteration_with_finalize() needs config.include('websauna_tasks') "
                                 "(inside a request or task of the app, or pass _registry=)")
    prefixes = allowed_prefixes(registry)
    paths = {}
    for what, fn in (("callback", callback), ("finalize", finalize)):
        paths[what] = _function_path(fn, what)
        try:
            check_allowed(paths[what], prefixes)
        except DeferNotAllowed as exc:
            raise DeferNotAllowed(f"defer_iteration_with_finalize(): {what}: {exc}") from None
    for index, value in enumerate(args):
        _check_json(value, f"argument {index + 1}")
    for key, value in kwargs.items():
        _check_json(value, f"keyword argument {key!r}")
    spec = query_spec(query)
    _check_json(spec, "query")
    # Built here, not only in the worker: a missing factory or a text primary
    # key shows up in the caller. A factory is called for that: it only
    # builds a statement.
    built = _Query(spec, prefixes)
    plan = {"callback": paths["callback"], "finalize": paths["finalize"], "query": built.spec,
            "args": list(args), "kwargs": dict(kwargs), "shards": _shards, "batch_size": _batch_size,
            "queue": _queue}
    iteration_id = uuid.uuid4().hex
    defer(start_iteration, iteration_id, plan, _queue=_queue, _transactional=_transactional, _tm=_tm,
          _registry=registry)
    return iteration_id


@deferrable
def start_iteration(iteration_id: str, plan: dict[str, t.Any]) -> int:
    """The deferred first step: write the shards' progress rows and send one task per shard.

    Runs in defer's transaction: the rows and the shard messages (sent when
    it commits) exist together or not at all. Returns the number of shards.
    """
    request = get_current_request()
    if request is None:  # pragma: no cover - defer always gives one
        raise RuntimeError("start_iteration() runs as a deferred call")
    registry = request.registry
    _tables_ready(registry, _engine_for(registry, request))
    session = request.dbsession
    if session.execute(sa.select(iterations_table.c.id).where(iterations_table.c.id == iteration_id)).first():
        logger.warning("websauna_tasks: iteration %s was already started (duplicate message)", iteration_id)
        return 0
    prefixes = allowed_prefixes(registry)
    # The message may be forged: everything it names is checked again here.
    finalize = _load_allowed(plan.get("finalize"), prefixes, "finalize")
    _load_allowed(plan.get("callback"), prefixes, "callback")
    query = _Query(plan["query"], prefixes)
    args, kwargs = list(plan.get("args") or []), dict(plan.get("kwargs") or {})
    batch_size = int(plan.get("batch_size") or default_batch_size(registry))
    low, high = session.execute(query.bounds()).one()
    ranges = _split(int(low), int(high), int(plan.get("shards") or 5)) if low is not None else []
    now = time.time()
    session.execute(sa.insert(iterations_table).values(
        id=iteration_id, callback=plan["callback"], finalize=plan["finalize"], query=json_dumps(query.spec),
        arguments=json_dumps({"args": args, "kwargs": kwargs}), queue=plan.get("queue"), batch_size=batch_size,
        shard_count=len(ranges), shards_done=0, finalized=not ranges, created_at=now,
        finished_at=now if not ranges else None))
    for index, (first, last) in enumerate(ranges):
        total = session.execute(query.count(first, last)).scalar_one()
        session.execute(sa.insert(shards_table).values(
            iteration_id=iteration_id, shard_index=index, first_pk=first, last_pk=last, cursor_pk=first - 1,
            rows_done=0, total=total, state=RUNNING, run=0, redefers=0, failures=0, updated_at=now))
    if not ranges:
        # Nothing to iterate: finalize now, once (finalized was set above).
        _defer_finalize(request, iteration_id, finalize, plan.get("queue"), args, kwargs)
        return 0
    for index in range(len(ranges)):
        _send_shard(request, iteration_id, index, 0, plan.get("queue"))
    logger.info("websauna_tasks: iteration %s started: %d shards over pk %s..%s, %s", iteration_id,
                len(ranges), low, high, query.spec)
    return len(ranges)


def _send_shard(request: Request, iteration_id: str, index: int, run: int, queue: str | None) -> None:
    app = request.registry.getUtility(ICeleryApp)
    options: dict[str, t.Any] = {}
    routed = queue_option(app, queue)
    if routed is not None:
        options["queue"] = routed
    app.tasks[SHARD_TASK_NAME].apply_async((iteration_id, index, run), tm=request.tm, **options)


def _defer_finalize(request: Request, iteration_id: str, finalize: t.Callable[..., t.Any], queue: str | None,
                    args: list, kwargs: dict) -> None:
    task_id = defer(finalize, *args, _queue=queue, _transactional=True, _tm=request.tm,
                    _registry=request.registry, **kwargs)
    request.dbsession.execute(sa.update(iterations_table).where(iterations_table.c.id == iteration_id)
                              .values(finalize_task_id=task_id))
    logger.info("websauna_tasks: iteration %s: all shards done, finalize deferred as %s", iteration_id, task_id)


# -- a shard run --------------------------------------------------------------------------------

@task(name=SHARD_TASK_NAME, base=WebsaunaTask, bind=True, serializer="json", acks_late=True,
      max_retries=None, ignore_result=True)
def run_shard(self: t.Any, iteration_id: str, shard_index: int, run: int) -> str:
    """One run of one shard: batches until done, out of time (re-defer) or failed."""
    return _ShardRun(self, self.get_request(), iteration_id, int(shard_index), int(run)).go()


class _ShardRun:
    def __init__(self, task: t.Any, request: Request, iteration_id: str, index: int, run: int):
        self.task = task
        self.request = request
        self.iteration_id = iteration_id
        self.index = index
        self.run = run
        self.started = time.monotonic()
        self.budget = time_budget(request.registry)
        # Known once the iteration's row is read (go()); a failure before that re-defers to the default queue.
        self.queue: str | None = None

    def _where(self) -> t.Any:
        return sa.and_(shards_table.c.iteration_id == self.iteration_id, shards_table.c.shard_index == self.index)

    def _lock(self) -> t.Any:
        """This shard's progress row, locked until the transaction ends; None if this run is not current."""
        row = self.request.dbsession.execute(
            sa.select(shards_table).where(self._where()).with_for_update()).one_or_none()
        if row is None or row.state != RUNNING or row.run != self.run:
            return None
        return row

    def go(self) -> str:
        try:
            with self.request.tm:
                plan = self.request.dbsession.execute(
                    sa.select(iterations_table).where(iterations_table.c.id == self.iteration_id)).one_or_none()
        except Exception as exc:
            _end_transaction(self.request.tm)
            return self._after_error(exc, progressed=False)
        if plan is None:
            logger.warning("websauna_tasks: iteration %s is gone; shard %d stops", self.iteration_id, self.index)
            return "missing"
        prefixes = allowed_prefixes(self.request.registry)
        try:
            self.callback = _load_allowed(plan.callback, prefixes, "callback")
            self.finalize = _load_allowed(plan.finalize, prefixes, "finalize")
            self.query = _Query(json_loads(plan.query), prefixes)
        except (DeferNotAllowed, IterationQueryError) as exc:
            # Another run would meet the same refusal: fail the shard now.
            logger.error("websauna_tasks: iteration %s shard %d refused: %s", self.iteration_id, self.index, exc)
            self._record_failure(exc, give_up=True)
            raise
        arguments = json_loads(plan.arguments)
        self.args, self.kwargs = list(arguments["args"]), dict(arguments["kwargs"])
        self.batch_size, self.queue = plan.batch_size, plan.queue

        progressed = False
        conflicts = 0
        while True:
            try:
                state, processed = self._batch()
            except Exception as exc:
                # (Asked before the abort below: zope.sqlalchemy answers from the open transaction.)
                transient = is_transient(self.request.tm, exc)
                # A commit that failed leaves its transaction on the manager.
                _end_transaction(self.request.tm)
                if transient and conflicts < _CONFLICT_ATTEMPTS:
                    # A serialization failure or deadlock rolled the batch back
                    # whole: run it again in a fresh transaction.
                    conflicts += 1
                    time.sleep(0.05 * 2 ** conflicts)
                    continue
                return self._after_error(exc, progressed)
            conflicts = 0
            progressed = progressed or processed > 0
            if state != "continue":
                return state

    def _batch(self) -> tuple[str, int]:
        """One transaction: lock the progress row, call back for the next rows, move the cursor."""
        request = self.request
        with request.tm:
            shard = self._lock()
            if shard is None:
                return "stale", 0
            session = request.dbsession
            rows = session.scalars(self.query.batch(shard.cursor_pk, shard.last_pk, self.batch_size)).unique().all()
            token = _shard_index.set(self.index)
            try:
                for row in rows:
                    self.callback(row, *self.args, **self.kwargs)
                # The callback's ORM changes fail here, inside the batch.
                session.flush()
            finally:
                _shard_index.reset(token)
            now = time.time()
            values: dict[str, t.Any] = {"updated_at": now}
            cursor = shard.cursor_pk
            if rows:
                cursor = max(getattr(row, self.query.pk_key) for row in rows)
                values.update(cursor_pk=cursor, rows_done=shard.rows_done + len(rows), failures=0)
            if not rows or cursor >= shard.last_pk:
                values.update(state=DONE, finished_at=now)
                self._update(values)
                self._shard_finished(now)
                state = "done"
            elif time.monotonic() - self.started >= self.budget:
                values.update(run=self.run + 1, redefers=shard.redefers + 1)
                self._update(values)
                _send_shard(request, self.iteration_id, self.index, self.run + 1, self.queue)
                logger.info("websauna_tasks: iteration %s shard %d: time budget used (%.1fs), continues after "
                            "pk %s in a new task", self.iteration_id, self.index, self.budget, cursor)
                state = "redeferred"
            else:
                self._update(values)
                state = "continue"
        return state, len(rows)

    def _update(self, values: dict[str, t.Any]) -> None:
        self.request.dbsession.execute(sa.update(shards_table).where(self._where()).values(**values))

    def _shard_finished(self, now: float) -> None:
        iterations = iterations_table
        session = self.request.dbsession
        # The increment locks the iteration row: a shard finishing at the same
        # time waits for this transaction and then counts this shard as done.
        session.execute(sa.update(iterations).where(iterations.c.id == self.iteration_id)
                        .values(shards_done=iterations.c.shards_done + 1))
        claimed = session.execute(
            sa.update(iterations)
            .where(iterations.c.id == self.iteration_id, iterations.c.finalized.is_(False),
                   iterations.c.shards_done >= iterations.c.shard_count)
            .values(finalized=True, finished_at=now)).rowcount
        if claimed == 1:
            _defer_finalize(self.request, self.iteration_id, self.finalize, self.queue, self.args, self.kwargs)

    def _record_failure(self, exc: BaseException, give_up: bool = False,
                        progressed: bool = False) -> tuple[str, int]:
        """In a new transaction: count the failure; mark failed, re-defer, or ask for a retry."""
        limit = max_failures(self.request.registry)
        with self.request.tm:
            shard = self._lock()
            if shard is None:
                return "stale", 0
            failures = shard.failures + 1
            values: dict[str, t.Any] = {"failures": failures, "updated_at": time.time(),
                                        "last_error": f"{type(exc).__name__}: {exc}"[:2000]}
            if give_up or failures >= limit:
                values.update(state=FAILED, finished_at=time.time())
                action = "failed"
            elif progressed or self.task.request.is_eager:
                # Eager runs propagate errors, so Celery cannot retry them:
                # an eager shard goes on at once in a new run instead.
                values.update(run=self.run + 1, redefers=shard.redefers + 1)
                _send_shard(self.request, self.iteration_id, self.index, self.run + 1, self.queue)
                action = "redeferred"
            else:
                action = "retry"
            self._update(values)
        return action, failures

    def _after_error(self, exc: Exception, progressed: bool) -> str:
        try:
            action, failures = self._record_failure(exc, progressed=progressed)
        except Exception:
            _end_transaction(self.request.tm)
            logger.exception("websauna_tasks: iteration %s shard %d: could not record a failure (%r)",
                             self.iteration_id, self.index, exc)
            # The database itself may be away: let Celery try again later,
            # bounded by the message's own retry count as nothing else counts.
            if self.task.request.retries + 1 >= max_failures(self.request.registry):
                raise exc from None
            raise self.task.retry(exc=exc, countdown=MAX_RETRY_COUNTDOWN) from None
        if action == "stale":
            logger.warning("websauna_tasks: iteration %s shard %d failed (%r) but a newer run owns it",
                           self.iteration_id, self.index, exc)
            return "stale"
        if action == "failed":
            logger.error("websauna_tasks: iteration %s shard %d: %r, failure %d in a row since its last committed "
                         "batch; the shard is marked failed and finalize will not run", self.iteration_id,
                         self.index, exc, failures, exc_info=exc)
            raise exc
        if action == "redeferred":
            logger.warning("websauna_tasks: iteration %s shard %d: %s; continuing in a new task",
                           self.iteration_id, self.index,
                           f"{exc!r} after progress" if progressed else f"eager run failed with {exc!r}",
                           exc_info=exc)
            return "redeferred"
        countdown = min(MAX_RETRY_COUNTDOWN, 2.0 ** (failures - 1))
        logger.warning("websauna_tasks: iteration %s shard %d: %r before any progress in this run (failure %d); "
                       "Celery retries it in %.0fs", self.iteration_id, self.index, exc, failures, countdown)
        raise self.task.retry(exc=exc, countdown=countdown)


# -- progress ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardProgress:
    """One shard's row: its primary key range, how far it got, and how it went."""

    index: int
    first_pk: int
    last_pk: int
    cursor_pk: int
    rows_done: int
    total: int
    state: str
    redefers: int
    failures: int
    last_error: str | None
    #: Epoch seconds of the last batch or failure: a running shard whose value stops moving has stalled.
    updated_at: float


@dataclass(frozen=True)
class IterationProgress:
    """What :func:`iteration_progress` returns; ``as_dict()`` gives it as JSON-ready dicts."""

    iteration_id: str
    #: ``running``, ``done`` (every shard done) or ``failed`` (a shard gave up).
    state: str
    rows_done: int
    total: int
    finalized: bool
    finalize_task_id: str | None
    shards: tuple[ShardProgress, ...]

    def as_dict(self) -> dict[str, t.Any]:
        return asdict(self)


def iteration_progress(iteration_id: str, registry: Registry | None = None) -> IterationProgress | None:
    """Rows done / total per shard and in all, and the state; None until the start step has run.

    Reads committed rows through a connection of its own, so it can be
    polled from a view, a script (``registry=bootstrap(ini)["registry"]``)
    or a test while the shards run.
    """
    registry = _registry_of(registry)
    engine = _engine_for(registry, get_current_request())
    if not registry.get(_TABLES_KEY):
        if not sa.inspect(engine).has_table(shards_table.name):
            return None
        registry[_TABLES_KEY] = True
    with engine.connect() as conn:
        head = conn.execute(sa.select(iterations_table).where(iterations_table.c.id == iteration_id)).one_or_none()
        if head is None:
            return None
        rows = conn.execute(sa.select(shards_table).where(shards_table.c.iteration_id == iteration_id)
                            .order_by(shards_table.c.shard_index)).all()
    shards = tuple(ShardProgress(
        index=row.shard_index, first_pk=row.first_pk, last_pk=row.last_pk, cursor_pk=row.cursor_pk,
        rows_done=row.rows_done, total=row.total, state=row.state, redefers=row.redefers,
        failures=row.failures, last_error=row.last_error, updated_at=row.updated_at) for row in rows)
    if any(shard.state == FAILED for shard in shards):
        state = FAILED
    elif all(shard.state == DONE for shard in shards):
        state = DONE
    else:
        state = RUNNING
    return IterationProgress(
        iteration_id=iteration_id, state=state, rows_done=sum(shard.rows_done for shard in shards),
        total=sum(shard.total for shard in shards), finalized=bool(head.finalized),
        finalize_task_id=head.finalize_task_id, shards=shards)
