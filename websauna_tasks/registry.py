"""Where the Celery app lives on the Pyramid registry."""
from __future__ import annotations

import typing as t

from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry
from zope.interface import Interface

if t.TYPE_CHECKING:
    from celery import Celery


class ICeleryApp(Interface):
    """Marker for the registry utility holding the application's Celery app."""


def get_celery(registry: Registry) -> "Celery":
    """The Celery app that ``config.include("websauna_tasks")`` built."""
    app = registry.queryUtility(ICeleryApp)
    if app is None:
        raise ConfigurationError(
            "no Celery app on this registry: add config.include('websauna_tasks') "
            "to the application's main() before config.scan()"
        )
    return app


def set_celery(registry: Registry, app: "Celery") -> None:
    registry.registerUtility(app, ICeleryApp)


def as_registry(request_or_registry: t.Any, caller: str) -> Registry:
    """The registry of a request, or the registry itself: the argument of ``get_redis``/``get_secrets``."""
    if isinstance(request_or_registry, Registry):
        return request_or_registry
    registry = getattr(request_or_registry, "registry", None)
    if isinstance(registry, Registry):
        return registry
    raise TypeError(f"{caller}() takes a request or a registry, got {request_or_registry!r}")
