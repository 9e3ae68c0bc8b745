"""An app with metrics and tracing on (tests/test_observability.py).

Its web requests run in a span of their own (a tween standing in for an
instrumented Pyramid), its views send ``observed.*`` tasks on commit, after
an abort and inside a rolled-back savepoint. With ``observed_app.span_file``
the process writes every finished span, as one JSON line, to that file: how
a ws-celery worker's spans reach the test in another process.
"""
from __future__ import annotations

import json
import os
import threading
import time
import typing as t

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from pyramid.config import Configurator
from pyramid.response import Response
from transaction.interfaces import TransientError

from websauna_tasks import RetryableTransactionTask, TransactionalTask, WebsaunaTask, get_redis, task

TRACER = "tests.observed_app"


class FileSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line (ids in hex, as W3C headers write them)."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: t.Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            lines.append(json.dumps({
                "name": span.name, "pid": os.getpid(),
                "trace_id": format(span.context.trace_id, "032x"), "span_id": format(span.context.span_id, "016x"),
                "parent_span_id": format(span.parent.span_id, "016x") if span.parent is not None else None,
                "attributes": dict(span.attributes or {}),
            }) + "\n")
        with self.lock, open(self.path, "a") as file:
            file.write("".join(lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def install_span_file(path: str) -> None:
    """This process's tracer provider writes its spans to ``path`` (set once per process: OpenTelemetry's rule)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    trace.set_tracer_provider(provider)


def main(global_config: dict, **settings: str):
    span_file = settings.get("observed_app.span_file")
    if span_file:
        install_span_file(span_file)
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.add_tween("tests.apps.observed_app.span_tween_factory")
    config.add_route("send", "/send")
    config.add_view(send, route_name="send")
    config.add_route("abort", "/abort")
    config.add_view(abort, route_name="abort")
    config.add_route("savepoint", "/savepoint")
    config.add_view(savepoint, route_name="savepoint")
    config.add_route("refuse", "/refuse")
    config.add_view(refuse, route_name="refuse")
    config.scan("tests.apps.observed_app")
    return config.make_wsgi_app()


def span_tween_factory(handler: t.Callable, registry: t.Any) -> t.Callable:
    def tween(request: t.Any) -> t.Any:
        with trace.get_tracer(TRACER).start_as_current_span(f"{request.method} {request.path}") as span:
            response = handler(request)
            # The test learns its request's span from here.
            response.headers["X-Trace-Id"] = format(span.get_span_context().trace_id, "032x")
            response.headers["X-Span-Id"] = format(span.get_span_context().span_id, "016x")
            return response

    return tween


def send(request: t.Any) -> Response:
    count = int(request.params.get("count", "1"))
    name = request.params.get("task", "work")
    target = {"work": work, "fails": fails, "retries_once": retries_once, "slow": slow}[name]
    ids = [target.apply_async(args=_args(name, request, index), tm=request.tm).id for index in range(count)]
    return Response(json=ids)


def _args(name: str, request: t.Any, index: int) -> tuple:
    if name == "slow":
        return (float(request.params.get("seconds", "0.2")),)
    if name == "work":
        return (index,)
    return ()


def abort(request: t.Any) -> Response:
    work.apply_async(args=(0,), tm=request.tm)
    request.tm.abort()
    request.tm.begin()
    return Response("aborted")


def savepoint(request: t.Any) -> Response:
    """One message rolled back with a savepoint; with ``kept=1`` one sent before it, which commits."""
    if request.params.get("kept"):
        # The dispatch queue joins the transaction before the savepoint (the other case: after it).
        work.apply_async(args=(1,), tm=request.tm)
    point = request.tm.savepoint()
    work.apply_async(args=(0,), tm=request.tm)
    point.rollback()
    return Response("rolled back")


def refuse(request: t.Any) -> Response:
    """Send what each check of the send pipeline refuses; the names of the errors, in order."""
    cases: list[tuple[tuple, dict]] = [
        ((object(),), {"tm": request.tm}),  # payload: not JSON
        ((1,), {"tm": request.tm, "queue": "no-such-queue"}),  # queue: not declared
        ((1,), {}),  # tm: left out on a task that needs one
        ((1, 2, 3), {"tm": request.tm}),  # call: does not fit the signature
        ((1,), {"tm": request.tm, "unique_name": "observed-once", "raise_if_enqueued": True}),  # name: taken
    ]
    if request.params.get("delay"):
        cases.append(((1,), {"tm": request.tm, "countdown": 10 ** 8}))  # delay: past the visibility timeout
    work.apply_async(args=(1,), tm=request.tm, unique_name="observed-once")
    refused = []
    for args, options in cases:
        try:
            work.apply_async(args=args, **options)
        except Exception as exc:
            refused.append(type(exc).__name__)
        else:
            refused.append(None)
    return Response(json=refused)


def _record(self: WebsaunaTask, **extra: t.Any) -> None:
    target = self.get_request().registry.settings.get("observed_app.record")
    if not target:
        return
    span = trace.get_current_span().get_span_context()
    entry = {"id": self.request.id, "pid": os.getpid(), "trace_id": format(span.trace_id, "032x"), **extra}
    get_redis(self.get_request()).rpush(target, json.dumps(entry))


@task(name="observed.work", base=TransactionalTask, bind=True, typing=True)
def work(self: TransactionalTask, value: int) -> int:
    _record(self, value=value)
    return value


@task(name="observed.fails", base=WebsaunaTask, bind=True)
def fails(self: WebsaunaTask) -> None:
    raise ValueError("fails on purpose")


@task(name="observed.retries_once", base=WebsaunaTask, bind=True, max_retries=1)
def retries_once(self: WebsaunaTask) -> str:
    if not self.request.retries:
        raise self.retry(countdown=0)
    return "again"


@task(name="observed.slow", base=WebsaunaTask, bind=True)
def slow(self: WebsaunaTask, seconds: float) -> int:
    # Long enough that a prefork worker's two children both take messages.
    time.sleep(seconds)
    _record(self)
    return os.getpid()


#: Attempts of observed.conflicts_once in this process, by task id.
CONFLICTS: dict[str, int] = {}


@task(name="observed.conflicts_once", base=RetryableTransactionTask, bind=True, retry_backoff_base=0.001)
def conflicts_once(self: RetryableTransactionTask) -> int:
    attempt = CONFLICTS[self.request.id] = CONFLICTS.get(self.request.id, 0) + 1
    if attempt == 1:
        raise TransientError("a conflict, as PostgreSQL would report a serialization failure")
    return attempt
