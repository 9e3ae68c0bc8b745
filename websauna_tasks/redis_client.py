"""``get_redis(request)``: the application's Redis client, one per process.

Websauna's examples keep task results in Redis with ``get_redis(request)``
(``websauna.system.core.redis``); this is the same call. The client connects
to ``websauna_tasks.redis_url``, or to the broker when that is Redis and the
setting is left out.

One client per process: redis-py's client is thread-safe and pools its
connections, so every request and task run of a process shares it. A
client made before a fork (by the app at startup, or in a Celery worker's
main process before its prefork children exist) is never used by the child:
the client remembers the pid that made it, and a process with another pid
makes its own. The child leaves the parent's client alone rather than close
it, since its sockets are the parent's too.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import typing as t

from pyramid.exceptions import ConfigurationError

from .registry import as_registry, get_celery
from .settings import REDIS_SCHEMES, REDIS_URL_KEY, get_task_settings
from .state import app_state

if t.TYPE_CHECKING:
    import redis

__all__ = ["get_redis", "redis_url", "ProcessClient"]


@dataclasses.dataclass(frozen=True)
class ProcessClient:
    """A Redis client and the process that made it (kept in the app's ``AppState.redis``)."""

    pid: int
    client: redis.Redis


_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A lock another thread held at the moment of the fork stays held forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def first_broker_url(broker_url: t.Any) -> str:
    """The first URL of ``broker_url`` (a URL, ``a;b`` failover URLs, or a list of them)."""
    if isinstance(broker_url, (list, tuple)):
        broker_url = broker_url[0] if broker_url else ""
    return str(broker_url or "").split(";")[0].strip()


def redis_url(request_or_registry: t.Any) -> str:
    """The URL :func:`get_redis` connects to: ``websauna_tasks.redis_url``, else the broker when it is Redis.

    :raises ConfigurationError: neither is set to a Redis URL.
    """
    registry = as_registry(request_or_registry, "get_redis")
    configured = get_task_settings(registry).redis_url
    if configured:
        return configured
    broker = first_broker_url(get_celery(registry).conf.broker_url)
    if broker.startswith(REDIS_SCHEMES):
        return broker
    scheme = broker.partition("://")[0] or "none"
    raise ConfigurationError(
        f"get_redis(): {REDIS_URL_KEY} is not set and the broker ({scheme}://) is not Redis; "
        f"set {REDIS_URL_KEY} = redis://host:6379/0")


def get_redis(request_or_registry: t.Any) -> redis.Redis:
    """This process's Redis client for the application of ``request_or_registry`` (a request or a registry).

    The same client on every call in one process; a new one in a forked
    child. Replies are bytes, as Websauna's were.

    :raises ConfigurationError: no Redis to connect to (see :func:`redis_url`),
        or ``websauna_tasks`` was not included.
    """
    registry = as_registry(request_or_registry, "get_redis")
    state = app_state(get_celery(registry))
    pid = os.getpid()
    made = state.redis
    if made is not None and made.pid == pid:
        return made.client
    with _lock:
        made = state.redis
        if made is None or made.pid != pid:
            import redis

            made = state.redis = ProcessClient(pid, redis.Redis.from_url(redis_url(registry)))
    return made.client
