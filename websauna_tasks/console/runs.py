"""Recent task runs for the Tasks page: recorded by the console itself, on Redis.

Celery's result backends answer "what became of task X", not "what ran
lately": on Redis the results are ``celery-task-meta-<id>`` keys in no
order, and a SCAN for them would read every key of the database, with no
worker, pid or runtime in them unless ``result_extended`` is on. So the
console subscribes to :class:`~websauna_tasks.events.TaskFinished` (notified
in the worker after every run of our tasks) and keeps each run as one JSON
entry in a capped Redis list (``websauna_tasks.console_recent_runs``
entries, newest first): id, task, state, runtime, worker host and pid,
queue, exception and the head of its traceback. One LPUSH and one LTRIM
per run, in the worker, after the run's transaction.

Without Redis (the example's SQLite broker) the runs come from a
``db+...`` result backend's table, newest first, when there is one;
anything else shows search by id only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
import typing as t

from ..events import TaskFinished
from ..redis_client import get_redis, redis_url
from ._common import failure

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig

logger = logging.getLogger(__name__)

#: Characters of a traceback kept with a run: its end, where the exception is.
TRACEBACK_CHARS = 4000
#: The attribute of Celery's task context the start of a run is noted on.
STARTED_ATTRIBUTE = "websauna_tasks_console_started"


def runs_key(app: Celery) -> str:
    return f"websauna_tasks:console:runs:{app.main}"


def record_runs(config: Configurator, console: ConsoleConfig) -> None:
    """Keep each run in Redis (when there is one and recent_runs is not 0)."""
    if console.recent_runs <= 0:
        return
    try:
        redis_url(config.registry)
    except Exception:  # no Redis: the Tasks page reads a database result backend, or searches by id only
        return
    from celery.signals import task_prerun

    task_prerun.connect(_note_start, weak=False, dispatch_uid="websauna_tasks.console.runs.start")
    config.add_subscriber(_recorder(console.recent_runs), TaskFinished)


def _note_start(task: t.Any = None, **_: t.Any) -> None:
    context = getattr(task, "request", None)
    if context is not None:
        setattr(context, STARTED_ATTRIBUTE, time.time())


def _recorder(keep: int) -> t.Callable[[TaskFinished], None]:
    def record(event: TaskFinished) -> None:
        if event.task_id is None:  # called directly: no message, nothing an operator could look up
            return
        try:
            entry = run_entry(event)
            client = get_redis(event.request)
            pipe = client.pipeline(transaction=False)
            key = runs_key(event.task.app)
            pipe.lpush(key, json.dumps(entry))
            pipe.ltrim(key, 0, keep - 1)
            pipe.execute()
        except Exception:
            # The run is over and its outcome stands: only the console's history misses it.
            logger.warning("websauna_tasks console: could not record the run of %s[%s]", event.task.name,
                           event.task_id, exc_info=True)

    return record


def run_entry(event: TaskFinished) -> dict[str, t.Any]:
    context = event.task.request
    started = getattr(context, STARTED_ATTRIBUTE, None)
    finished = time.time()
    exc = event.exception
    text = ""
    if exc is not None and event.state == "FAILURE":
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-TRACEBACK_CHARS:]
    info = getattr(context, "delivery_info", None) or {}
    return {"id": event.task_id, "task": event.task.name, "state": event.state, "finished": finished,
            "runtime": finished - started if isinstance(started, float) else None,
            "host": getattr(context, "hostname", None), "pid": os.getpid(),
            "queue": info.get("routing_key") if isinstance(info, dict) else None,
            "exception": failure(exc) if exc is not None else None, "traceback": text}


@dataclasses.dataclass
class Runs:
    items: list[dict[str, t.Any]]
    #: Where they come from, for the page: "the console's run log", "the result backend's table"...
    source: str
    notice: str = ""


def recent_runs(request: Request, limit: int = 100, task_id: str | None = None) -> Runs:
    """The newest runs (of ``task_id`` only, when given), newest first."""
    from ..registry import get_celery

    app = get_celery(request.registry)
    try:
        client = get_redis(request)
    except Exception:
        client = None
    if client is not None:
        try:
            raw = client.lrange(runs_key(app), 0, -1 if task_id else limit - 1)
        except Exception as exc:
            return Runs([], "", f"the run log could not be read: {failure(exc)}")
        items = [item for item in (_read(entry) for entry in raw) if item is not None]
        if task_id:
            items = [item for item in items if item.get("id") == task_id]
        return Runs(items[:limit], "the console's run log (Redis)")
    return _database_backend_runs(app, limit, task_id)


def _read(raw: bytes) -> dict[str, t.Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _database_backend_runs(app: Celery, limit: int, task_id: str | None) -> Runs:
    backend = app.backend
    if not hasattr(backend, "ResultSession") or not hasattr(backend, "task_cls"):
        return Runs([], "", "recent runs are kept when the application has Redis (the console's run log) or a "
                            "db+ result backend; search by id asks the result backend")
    model = backend.task_cls
    session = backend.ResultSession()
    try:
        query = session.query(model).order_by(model.date_done.desc(), model.id.desc())
        if task_id:
            query = query.filter(model.task_id == task_id)
        rows = query.limit(limit).all()
    except Exception as exc:  # no table yet (nothing has run), or the database is down
        return Runs([], "", f"the result backend's table could not be read: {type(exc).__name__}")
    finally:
        session.close()
    items = []
    for row in rows:
        items.append({"id": row.task_id, "task": getattr(row, "name", None), "state": row.status,
                      "finished": row.date_done, "runtime": None, "host": getattr(row, "worker", None), "pid": None,
                      "queue": getattr(row, "queue", None), "exception": None,
                      "traceback": (row.traceback or "")[-TRACEBACK_CHARS:]})
    return Runs(items, "the result backend's table")
