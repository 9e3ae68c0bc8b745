"""Turning observability on from the settings (called by ``includeme``).

- ``websauna_tasks.metrics = true``: a :class:`~.metrics.MetricsObserver`
  on the app, the route ``websauna_tasks.metrics_path`` in the web app,
  and, with ``websauna_tasks.metrics_port``, the worker's own endpoint.
  prometheus_client missing is a :class:`ConfigurationError`: metrics were
  asked for.

The same INI starts the web app and the worker, so both get the same
observers.
"""
from __future__ import annotations

import typing as t

from pyramid.exceptions import ConfigurationError
from pyramid.security import NO_PERMISSION_REQUIRED

from ..settings import METRICS_KEY, get_task_settings
from .hooks import add_observer

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.config import Configurator

__all__ = ["configure_observability", "METRICS_ROUTE"]

#: The name of the metrics route (``request.route_url(METRICS_ROUTE)``).
METRICS_ROUTE = "websauna_tasks_metrics"


def configure_observability(config: Configurator, app: Celery) -> None:
    """Put the observers the settings ask for on ``app``; add the metrics route and the worker's endpoint."""
    settings = get_task_settings(config.registry)
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
