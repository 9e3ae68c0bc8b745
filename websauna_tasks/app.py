"""Parsed settings -> the Celery app."""
from __future__ import annotations

import typing as t

from celery import Celery

from .reliability import check_transport_options
from .schedule import normalize_beat_schedule
from .settings import APP_NAME_KEY as APP_NAME_KEY  # noqa: F401  (its home before settings.py)
from .tasks import WebsaunaTask

#: ``broker_transport`` for ``redis://`` brokers unless the settings name one: a lost Redis
#: connection stays a connection error (websauna_tasks.redis_transport). A string, so that
#: building an app imports no transport.
REDIS_TRANSPORT = "websauna_tasks.redis_transport:Transport"

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
    if not app.conf.broker_transport and _redis_broker(app):
        app.conf.broker_transport = REDIS_TRANSPORT
    check_transport_options(app)  # Redis timeouts that Celery asks to align (websauna_tasks.reliability)
    return app


def _redis_broker(app: Celery) -> bool:
    """Whether every broker URL the app may connect to (failover, read, write) is ``redis://``.

    ``broker_transport`` applies to all of them, so one URL of another kind
    would be opened with the wrong transport. ``rediss://`` is left to kombu:
    its default TLS options are added only when the transport is named by the
    URL's scheme, and an explicit transport would connect without TLS.
    """
    urls: list[t.Any] = []
    for setting in ("broker_url", "broker_read_url", "broker_write_url"):
        value = getattr(app.conf, setting)
        urls.extend(value if isinstance(value, (list, tuple)) else [value])
    parts = [part.strip() for url in urls for part in str(url or "").split(";")]
    return all(part.startswith("redis://") for part in parts)
