"""An app that subscribes to ``TaskFinished`` and reads ``get_secrets`` (tests/test_task_finished_and_secrets.py).

Every event is appended, as JSON, to the list ``events_app.record`` names:
in Redis through ``get_redis(request)`` when ``events_app.record`` starts with
``redis:``, else to :data:`RECORDED` in this process (eager mode, direct calls).
"""
from __future__ import annotations

import json
import typing as t

from celery.exceptions import Ignore
from pyramid.config import Configurator
from sqlalchemy import text

from websauna_tasks import (
    TaskFinished,
    TransactionalTask,
    WebsaunaTask,
    get_current_request,
    get_redis,
    get_secrets,
    task,
)

RECORDED: list[dict[str, t.Any]] = []


def main(global_config: dict, **settings: str):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.add_subscriber(record_finished, TaskFinished)
    if settings.get("events_app.failing_subscriber"):
        config.add_subscriber(failing_subscriber, TaskFinished)
    config.scan("tests.apps.events_app")
    return config.make_wsgi_app()


def record_finished(event: TaskFinished) -> None:
    request = event.request
    entry = {
        "task": event.task.name,
        "id": event.task_id,
        "state": event.state,
        "result": event.result,
        "exception": type(event.exception).__name__ if event.exception is not None else None,
        # The run's own request, still open: the current one, and its database usable.
        "is_run_request": request is get_current_request(),
    }
    if request.registry.settings.get("sqlalchemy.url"):
        with request.tm:
            entry["db"] = request.dbsession.execute(text("SELECT 41 + 1")).scalar()
    target = request.registry.settings.get("events_app.record", "")
    if target.startswith("redis:"):
        get_redis(request).rpush(target[len("redis:"):], json.dumps(entry))
    else:
        RECORDED.append(entry)


def failing_subscriber(event: TaskFinished) -> None:
    raise RuntimeError("a subscriber that fails")


@task(name="events_app.succeeds", base=TransactionalTask, bind=True)
def succeeds(self: TransactionalTask, value: int) -> int:
    return value * 2


@task(name="events_app.fails", base=WebsaunaTask, bind=True)
def fails(self: WebsaunaTask) -> None:
    raise ValueError("the body failed")


@task(name="events_app.retries_once", base=WebsaunaTask, bind=True, max_retries=1)
def retries_once(self: WebsaunaTask) -> str:
    if not self.request.retries:
        raise self.retry(countdown=0)
    return "second attempt"


@task(name="events_app.ignored", base=WebsaunaTask, bind=True)
def ignored(self: WebsaunaTask) -> None:
    raise Ignore()


@task(name="events_app.reads_secret", base=WebsaunaTask, bind=True)
def reads_secret(self: WebsaunaTask, key: str) -> str:
    # Websauna's call, as the seed's Slack example makes it.
    return get_secrets(self.get_request().registry)[key]
