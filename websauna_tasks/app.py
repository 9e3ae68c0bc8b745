"""Parsed settings -> the Celery app."""
from __future__ import annotations

import typing as t

from celery import Celery

from .reliability import check_transport_options
from .schedule import normalize_beat_schedule
from .tasks import WebsaunaTask

#: Setting: the Celery app's ``main`` name (shows in worker banners and task names of __main__).
APP_NAME_KEY = "websauna_tasks.app_name"

# Sensible, safe defaults that the INI may override.
DEFAULTS: dict[str, t.Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "broker_connection_retry_on_startup": True,
    # TransactionalTask and RetryableTransactionTask are acks_late: every
    # prefetched message is held unacknowledged by this worker, waits behind
    # the running ones (past a Redis visibility_timeout it is delivered to
    # another worker as well) and, when the worker dies, all are redelivered
    # together. One per pool process keeps that to the messages being run.
    # Celery's default is 4; docs/RELIABILITY.md says when to raise it.
    "worker_prefetch_multiplier": 1,
}


def make_celery(config: t.Mapping[str, t.Any], name: str = "websauna_tasks") -> Celery:
    """A Celery app configured from an already parsed (safe) config dict."""
    # set_as_current: code that uses Celery's default app, such as a bare
    # celery.result.AsyncResult(task_id), should find this one.
    app = Celery(name, loader="websauna_tasks.loader:WebsaunaLoader", task_cls=WebsaunaTask,
                 set_as_current=True)
    conf = dict(DEFAULTS)
    conf.update(config)
    # Always this app's own dict (normalize_beat_schedule returns a new one):
    # @task(periodic=...) adds its entries to it when config.scan() binds the
    # task, and must never write into a dict that another app can see.
    conf["beat_schedule"] = normalize_beat_schedule(conf.get("beat_schedule", {}))
    app.conf.update(conf)
    check_transport_options(app)  # Redis timeouts that Celery asks to align (websauna_tasks.reliability)
    return app
