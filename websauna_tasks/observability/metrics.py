"""Prometheus metrics (``websauna_tasks.metrics = true``): what is counted, and where it is served.

Counters and histograms are the process's own, in prometheus_client's
default registry, made once per process whichever app turns them on
(several apps in one process share them, and the first one's duration
buckets). They are fed by the app's :class:`MetricsObserver`, called by the
library's hooks (``hooks.py``).

What is only known by asking the database (the outbox's backlog and the age
of its oldest unsent row) is read when scraped, by :class:`OutboxCollector`.

Prefork workers: with ``PROMETHEUS_MULTIPROC_DIR`` in the environment (set
before the worker starts, an empty directory) every process writes its
counts to files there, and whoever serves the metrics serves the sum over
all of them (``MultiProcessCollector``): the web app's route, and the
worker's own endpoint (``websauna_tasks.metrics_port``), a thread of its
main process.

Importing this module imports prometheus_client: only ``configure.py``
does, and only when the settings turn metrics on.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

from celery import bootsteps
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ..events import run_state
from ..settings import get_task_settings
from ..state import find_state
from .hooks import Observer

if t.TYPE_CHECKING:
    from celery import Celery, Task
    from pyramid.request import Request
    from pyramid.response import Response

    from ..broker import PendingMessage
    from ..settings import TaskSettings

__all__ = ["MetricsObserver", "OutboxCollector", "MetricsEndpointStep", "process_metrics", "exposition",
           "MetricsView", "multiprocess_dir", "CONTENT_TYPE_LATEST"]

logger = logging.getLogger(__name__)

#: Label value of a run whose message named no queue (called directly, eager without one).
NO_QUEUE = ""


class ProcessMetrics:
    """The counters and histograms of this process (one set, however many apps)."""

    def __init__(self, buckets: t.Sequence[float]):
        self.runs = Counter(
            "websauna_tasks_runs", "Task runs, by how they ended (state: SUCCESS, FAILURE, RETRY, IGNORED, REJECTED)",
            ["task", "queue", "state"])
        self.run_duration = Histogram(
            "websauna_tasks_run_duration_seconds", "Time a run took, its request and transaction included",
            ["task", "queue"], buckets=tuple(buckets))
        self.dispatches = Counter(
            "websauna_tasks_dispatches",
            "Messages that passed the send pipeline's checks, by what became of them (outcome: now, committed, "
            "aborted, savepoint, commit_failed)", ["task", "outcome"])
        self.refused = Counter(
            "websauna_tasks_dispatch_refused", "Messages refused by a check of the send pipeline",
            ["task", "check"])
        self.conflict_retries = Counter(
            "websauna_tasks_conflict_retries",
            "Transactions of a RetryableTransactionTask run again after a serialization failure or deadlock",
            ["task"])
        self.publish_latency = Histogram(
            "websauna_tasks_outbox_publish_latency_seconds",
            "Time from an outbox row's write to its publication by the fast path or the relay",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0))
        self.dead_letters = Counter(
            "websauna_tasks_dead_letters", "Messages the worker's intake kept in the dead letters, by kind",
            ["kind"])
        self.queue_wait = Histogram(
            "websauna_tasks_queue_wait_seconds",
            "Time a run waited for its declared queue's slot or rate (outcome: ran, requeued)",
            ["queue", "outcome"], buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))


_metrics: ProcessMetrics | None = None
_metrics_lock = threading.Lock()


def process_metrics(buckets: t.Sequence[float]) -> ProcessMetrics:
    """This process's metrics, made on first use (with ``buckets`` for run durations)."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = ProcessMetrics(buckets)
    return _metrics


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when prometheus_client's multiprocess mode is on, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _queue_of(task: Task) -> str:
    context = task.request
    info = getattr(context, "delivery_info", None) if context is not None else None
    queue = info.get("routing_key") if isinstance(info, dict) else None
    if not isinstance(queue, str) or not queue:
        queue = getattr(task, "queue", None)
    return queue if isinstance(queue, str) else NO_QUEUE


class MetricsObserver(Observer):
    """Counts what the hooks report, into :class:`ProcessMetrics`."""

    def __init__(self, metrics: ProcessMetrics):
        self.metrics = metrics
        # (task, queue, state) -> its run counter and duration histogram: labels() takes
        # a lock and builds its key at every call, a dict lookup does not.
        self._run_children: dict[tuple[str, str, str], tuple[t.Any, t.Any]] = {}

    def refused(self, task_name: str, check: str) -> None:
        self.metrics.refused.labels(task_name, check).inc()

    def dispatched(self, messages: t.Sequence[PendingMessage], outcome: str) -> None:
        counts: dict[str, int] = {}
        for message in messages:
            counts[message.task.name] = counts.get(message.task.name, 0) + 1
        for name, count in counts.items():
            self.metrics.dispatches.labels(name, outcome).inc(count)

    def run(self, task: Task, body: t.Callable[[], t.Any]) -> t.Any:
        started = time.perf_counter()
        try:
            result = body()
        except BaseException as exc:
            self._count(task, run_state(exc), time.perf_counter() - started)
            raise
        self._count(task, "SUCCESS", time.perf_counter() - started)
        return result

    def _count(self, task: Task, state: str, seconds: float) -> None:
        try:
            key = (task.name, _queue_of(task), state)
            children = self._run_children.get(key)
            if children is None:
                children = (self.metrics.runs.labels(*key), self.metrics.run_duration.labels(*key[:2]))
                self._run_children[key] = children
            children[0].inc()
            children[1].observe(seconds)
        except Exception:
            # The run's outcome stands whatever the counting does.
            logger.exception("websauna_tasks: could not count a run of %s", task.name)

    def conflict_retried(self, task: Task, attempt: int) -> None:
        self.metrics.conflict_retries.labels(task.name).inc()

    def published(self, created_at: t.Sequence[float], now: float) -> None:
        histogram = self.metrics.publish_latency
        for written in created_at:
            histogram.observe(max(0.0, now - written))

    def dead_lettered(self, kind: str) -> None:
        self.metrics.dead_letters.labels(kind).inc()

    def queue_waited(self, queue: str, seconds: float, outcome: str) -> None:
        self.metrics.queue_wait.labels(queue, outcome).observe(seconds)


class OutboxCollector(Collector):
    """The outbox's backlog and the age of its oldest unsent row, asked of the database at each scrape."""

    def __init__(self, app: Celery):
        self.app = app

    def collect(self) -> t.Iterator[GaugeMetricFamily]:
        state = find_state(self.app)
        outbox = state.outbox if state is not None else None
        if outbox is None:
            return
        unsent = GaugeMetricFamily("websauna_tasks_outbox_unsent", "Outbox rows committed and not yet published")
        age = GaugeMetricFamily("websauna_tasks_outbox_oldest_unsent_age_seconds",
                                "Age of the oldest unsent outbox row (0 when none)")
        up = GaugeMetricFamily("websauna_tasks_outbox_status_up",
                               "1 when the outbox table could be read for this scrape, else 0")
        try:
            status = outbox.status()
        except Exception as exc:
            # A scrape during a database outage must still answer, saying so.
            logger.warning("websauna_tasks: metrics could not read the outbox: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        unsent.add_metric([], status.unsent)
        age.add_metric([], status.oldest_unsent_age or 0.0)
        up.add_metric([], 1)
        yield from (unsent, age, up)


class _ProcessRegistry(Collector):
    """The default registry's metrics, handed on (outside multiprocess mode)."""

    def collect(self) -> t.Iterator[t.Any]:
        return REGISTRY.collect()


def exposition_registry(app: Celery) -> CollectorRegistry:
    """What one app serves: this process's metrics (or every process's, in multiprocess mode) and its outbox."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir() is not None:
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessRegistry())
    registry.register(OutboxCollector(app))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text a scrape gets."""
    return generate_latest(registry)


class MetricsView:
    """The web app's metrics route (``websauna_tasks.metrics_path``), serving one app's exposition registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def __call__(self, request: Request) -> Response:
        from pyramid.response import Response

        response = Response(body=exposition(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        # A scrape must see the counts of now, never a cache's.
        response.cache_control = "no-store"
        return response


class MetricsEndpointStep(bootsteps.StartStopStep):
    """The worker's own metrics endpoint (``websauna_tasks.metrics_port``), a thread of its main process.

    A step of the *worker* blueprint, which only the main process runs: one
    endpoint per worker, and in multiprocess mode it serves the sum of every
    prefork child's counts. A port already taken is logged at ERROR and the
    worker goes on without the endpoint: its tasks matter more than its
    metrics.
    """

    label = "websauna_tasks metrics endpoint"

    def __init__(self, parent: t.Any, **kwargs: t.Any):
        super().__init__(parent, **kwargs)
        self.server: t.Any = None
        self.thread: threading.Thread | None = None

    def include_if(self, parent: t.Any) -> bool:
        settings = _settings_of(parent.app)
        return settings is not None and settings.metrics and settings.metrics_port > 0

    def start(self, parent: t.Any) -> None:
        settings = t.cast("TaskSettings", _settings_of(parent.app))
        try:
            self.server, self.thread = start_http_server(settings.metrics_port, settings.metrics_address,
                                                         registry=exposition_registry(parent.app))
        except OSError as exc:
            logger.error("websauna_tasks: cannot serve metrics on %s:%d (%s); the worker runs without its "
                         "metrics endpoint", settings.metrics_address, settings.metrics_port, exc)
            return
        logger.info("websauna_tasks: metrics on http://%s:%d/metrics%s", settings.metrics_address,
                    settings.metrics_port, " (multiprocess: every child's counts)" if multiprocess_dir() else "")

    def stop(self, parent: t.Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def terminate(self, parent: t.Any) -> None:
        self.stop(parent)


def _settings_of(app: Celery) -> TaskSettings | None:
    state = find_state(app)
    return get_task_settings(state.registry) if state is not None else None
