"""The Pyramid request a task run gets in the worker (or in eager mode)."""
from __future__ import annotations

import contextlib
import contextvars
import typing as t

import transaction
from pyramid.interfaces import IRequestFactory
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.scripting import prepare

#: Setting: base URL for ``request.route_url()`` inside tasks.
SITE_URL_KEY = "websauna.site_url"

_current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "websauna_tasks_request", default=None
)


def make_task_request(registry: Registry, path: str = "/") -> Request:
    """A blank request routable with ``websauna.site_url`` and its own explicit TM.

    The transaction manager is explicit and private to this request so a task
    can never commit or abort somebody else's thread-local transaction (eager
    tasks run inside the web thread, after its commit).
    """
    site_url = registry.settings.get(SITE_URL_KEY) or "http://localhost"
    factory = registry.queryUtility(IRequestFactory, default=Request)
    request = factory.blank(path, base_url=site_url.rstrip("/"))
    request.registry = registry
    request.tm = transaction.TransactionManager(explicit=True)
    return request


@contextlib.contextmanager
def task_request(registry: Registry) -> t.Iterator[Request]:
    """Yield a fresh request for one task run and close it afterwards.

    ``pyramid.scripting.prepare`` applies the request methods (``dbsession``,
    ``celery``...), pushes the thread locals so ``get_current_request()``
    works, and its closer runs the finished callbacks, which is where the
    database session is closed and its connection returned to the pool.
    """
    request = make_task_request(registry)
    env = prepare(request=request, registry=registry)
    token = _current_request.set(request)
    try:
        yield request
    finally:
        _current_request.reset(token)
        try:
            if _in_transaction(request.tm):
                request.tm.abort()
        finally:
            env["closer"]()


def _in_transaction(tm: transaction.TransactionManager) -> bool:
    try:
        tm.get()
    except transaction.interfaces.NoTransaction:
        return False
    return True


def current_task_request() -> Request | None:
    """The request of the task run executing in this context, if any."""
    return _current_request.get()
