"""The websauna_tasks example application.

Post a message on ``/``; a task scheduled on commit marks it processed, and a
periodic task from the INI's ``beat_schedule`` counts heartbeats. A plain function
counts a message's words later through ``defer()``, a periodic task declared in code
counts the messages, ``/tasks/{id}`` shows any task's result, and a
``run_after_response`` callback notes each posted message's response. Run it with
``scripts/run-example`` (real worker and beat, SQLite everywhere) or
``pserve development.ini`` (eager mode). See docs/example.md.
"""
from __future__ import annotations

import datetime
import os
import socket
import typing as t

from pyramid.config import Configurator
from pyramid.csrf import CookieCSRFStoragePolicy
from pyramid.router import Router
from pyramid.settings import asbool
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from websauna_tasks import TaskFinished, get_celery
from websauna_tasks.db import get_engine
from websauna_tasks.unreachable import database_unreachable

from .models import AFTER_RESPONSE_LOG, AfterResponseLog, TaskRun, create_tables, utcnow

#: ``example.console = true`` (conf/example.ini) mounts the operator console at /_tasks.
CONSOLE_KEY = "example.console"
#: Rows of example_task_runs kept: the page shows the newest tasks only.
KEEP_RUNS = datetime.timedelta(hours=1)


def sqlite_file(url: str | None) -> str | None:
    """The file of a ``sqlite:///`` (``sqla+sqlite:///``, ``db+sqlite:///``) URL; None for anything else."""
    if not url:
        return None
    url = url.removeprefix("sqla+").removeprefix("sqlalchemy+").removeprefix("db+")
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # not a URL SQLAlchemy understands, so not a SQLite file
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def make_sqlite_dirs(*urls: str | None) -> None:
    # SQLite creates the file but not its directory: a fresh clone has no var/.
    for url in urls:
        path = sqlite_file(url)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def main(global_config: t.Mapping[str, str], **settings: str) -> Router:
    try:
        return make_app(settings)
    except DBAPIError as exc:
        # pserve prints the traceback of any other exception: a database that is not there
        # (no server, no role "example") is one line naming it, and the exit status 1.
        raise SystemExit(f"websauna_tasks_example: {database_unreachable(settings.get('sqlalchemy.url'), exc)}") \
            from None


def record_run(event: TaskFinished) -> None:
    """Note which worker process ran each task, for the home page: TaskFinished comes after every run."""
    if event.task_id is None:
        return
    context = event.task.request
    hostname = getattr(context, "hostname", None) or f"eager@{socket.gethostname()}"
    request = event.request
    # The run's own transaction has ended: this write is one of its own.
    with request.tm:
        dbsession = request.dbsession
        dbsession.merge(TaskRun(task_id=event.task_id, task_name=event.task.name, hostname=hostname,
                                pid=os.getpid(), state=event.state, finished_at=utcnow()))
        dbsession.query(TaskRun).filter(TaskRun.finished_at < utcnow() - KEEP_RUNS).delete()


def make_app(settings: dict[str, str]) -> Router:
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("pyramid_retry")
    config.include("websauna_tasks")
    config.add_route("home", "/")
    config.add_route("post_message", "/messages", request_method="POST")
    config.add_route("message", r"/messages/{id:\d+}")
    config.add_route("count_words", r"/messages/{id:\d+}/words", request_method="POST")
    config.add_route("fail", "/fail", request_method="POST")
    config.add_route("task", "/tasks/{id}")
    config.scan(".tasks")
    config.scan(".views")
    config.registry[AFTER_RESPONSE_LOG] = AfterResponseLog()
    config.add_subscriber(record_run, TaskFinished)
    if asbool(settings.get(CONSOLE_KEY)):
        # The console's forms carry a CSRF token; the example has no sessions, so it lives in a cookie.
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
        # Without a security policy the console refuses to mount unless the INI sets
        # websauna_tasks.console_insecure = true: a development machine only (docs/console.md).
        config.include("websauna_tasks.console")

    celery_conf = get_celery(config.registry).conf
    result_backend = celery_conf.result_backend
    make_sqlite_dirs(settings.get("sqlalchemy.url"), celery_conf.broker_url,
                     result_backend if isinstance(result_backend, str) else None)
    engine = get_engine(config.registry)
    if engine is not None:
        create_tables(engine)
    return config.make_wsgi_app()
