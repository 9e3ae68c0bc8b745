"""Turning observability on from the settings (called by ``includeme``).

- ``websauna_tasks.metrics = true``: a :class:`~.metrics.MetricsObserver`
  on the app, the route ``websauna_tasks.metrics_path`` in the web app,
  and, with ``websauna_tasks.metrics_port``, the worker's own endpoint.
  prometheus_client missing is a :class:`ConfigurationError`: metrics were
  asked for.
- ``websauna_tasks.tracing = true`` (the default): a
  :class:`~.tracing.TracingObserver` when opentelemetry-api is importable;
  without it, nothing, at no cost.

The same INI starts the web app and the worker, so both get the same
observers.
"""
from __future__ import annotations

import importlib.util
import typing as t

from pyramid.exceptions import ConfigurationError
from pyramid.security import NO_PERMISSION_REQUIRED

from ..settings import METRICS_KEY, get_task_settings
from .hooks import add_observer

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator

__all__ = ["configure_observability", "tracing_available", "METRICS_ROUTE"]

#: The name of the metrics route (``request.route_url(METRICS_ROUTE)``).
METRICS_ROUTE = "websauna_tasks_metrics"


def tracing_available() -> bool:
    """True when opentelemetry-api can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        return False


def configure_observability(config: Configurator, app: Celery) -> None:
    """Put the observers the settings ask for on ``app``; add the metrics route and the worker's endpoint."""
    settings = get_task_settings(config.registry)
    # Tracing first: its run span then encloses the run the metrics time.
    if settings.tracing and tracing_available():
        from .tracing import TracingObserver

        add_observer(app, TracingObserver())
    if settings.metrics:
        try:
            from . import metrics
        except ImportError as exc:
            raise ConfigurationError(
                f"{METRICS_KEY} = true needs prometheus_client: pip install 'websauna_tasks[metrics]' ({exc})"
            ) from None
        add_observer(app, metrics.MetricsObserver(metrics.process_metrics(settings.metrics_duration_buckets)))
        config.add_route(METRICS_ROUTE, settings.metrics_path)
        config.add_view(metrics.MetricsView(metrics.exposition_registry(app)), route_name=METRICS_ROUTE,
                        request_method=("GET", "HEAD"),
                        permission=settings.metrics_permission or NO_PERMISSION_REQUIRED)
        if settings.metrics_port:
            app.steps["worker"].add(metrics.MetricsEndpointStep)
