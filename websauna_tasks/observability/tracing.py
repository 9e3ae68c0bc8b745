"""OpenTelemetry: the sender's trace context travels with the message, and the run's span is its child.

At dispatch (after every check passed, before the message waits for the
commit or is written to the outbox) the current context is injected into
the message's headers through the propagator API, so with the default
propagator a W3C ``traceparent`` (and ``tracestate``) header. Those headers
are part of the message's options: the outbox stores them in its row's
options JSON, and the relay publishes them again as they were. In the
worker the run is wrapped in a ``CONSUMER`` span whose parent is extracted
from those headers.

Only this module imports opentelemetry, and only when the app's settings
ask for tracing and opentelemetry-api is installed (``configure.py``).
Without an SDK set up by the application, the API's tracer is a no-op
and nothing is injected.

A header that is not a well-formed ``traceparent`` (forged, truncated, not
a string) is ignored: the run gets a new root span and goes on.
"""
from __future__ import annotations

import logging
import typing as t

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, StatusCode

from ..events import run_state
from .hooks import Observer

if t.TYPE_CHECKING:
    from celery import Task

__all__ = ["TracingObserver", "TRACE_HEADERS"]

logger = logging.getLogger(__name__)

#: The headers the W3C propagator writes; what is read back from a message.
TRACE_HEADERS = ("traceparent", "tracestate")
#: Longer values are not looked at: a valid traceparent is 55 characters, a tracestate at most 512 by the spec.
MAX_HEADER_CHARS = 1024


class _StringsOnly(Getter[t.Mapping[str, t.Any]]):
    """Reads a carrier built from message headers, where a forged value may be anything but a string."""

    def get(self, carrier: t.Mapping[str, t.Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: t.Mapping[str, t.Any]) -> list[str]:
        return list(carrier)


_GETTER = _StringsOnly()


def _carrier_of(context: t.Any) -> dict[str, str]:
    """The trace headers of the message being run, as Celery kept them on the task's request ``context``."""
    if context is None:
        return {}
    headers = getattr(context, "headers", None)
    carrier = {}
    for key in TRACE_HEADERS:
        # A worker flattens message headers into the request; eager runs keep them in .headers.
        value = getattr(context, key, None)
        if value is None and isinstance(headers, dict):
            value = headers.get(key)
        if isinstance(value, str) and len(value) <= MAX_HEADER_CHARS:
            carrier[key] = value
    return carrier


def _no_provider() -> bool:
    """True while this process has no tracer provider that records (asked per run: one may be set later)."""
    # By exact type: isinstance() against these ABCs costs more than the rest of the check.
    return type(trace.get_tracer_provider()) in _NON_RECORDING_PROVIDERS


_NON_RECORDING_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def _has_trace_headers(context: t.Any) -> bool:
    """Whether the message being run carries a trace header (well-formed or not), as :func:`_carrier_of` reads them."""
    if context is None:
        return False
    headers = getattr(context, "headers", None)
    for key in TRACE_HEADERS:
        if getattr(context, key, None) is not None or (isinstance(headers, dict) and key in headers):
            return True
    return False


class TracingObserver(Observer):
    """Injects the current trace context at dispatch and runs each task in a span continuing it."""

    def __init__(self, tracer: trace.Tracer | None = None):
        # Before the application sets its provider this is the API's proxy,
        # which hands on to the provider set later: one lookup, not one per run.
        self.tracer = tracer or trace.get_tracer("websauna_tasks")
        #: The API's own tracer: its spans are no-ops until the application sets a provider (see run()).
        self._api_tracer = tracer is None

    def outgoing(self, task: Task, options: dict[str, t.Any]) -> None:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if carrier:
            # A new dict: the caller's headers option is not ours to change.
            options["headers"] = {**(options.get("headers") or {}), **carrier}

    def run(self, task: Task, body: t.Callable[[], t.Any]) -> t.Any:
        # task.request walks Celery's context stack on every read: read it once per run.
        context = task.request
        if self._api_tracer and _no_provider() and not _has_trace_headers(context):
            # No provider set (the API's proxy, or its no-op): the span would record nothing, and with no
            # sender's context to carry into the body it would change nothing the body can see. About a
            # quarter of a no-op task's run path in the worker (bench/run.py --profile).
            return body()
        parent = self.parent_context(task, context)
        attributes = {"celery.task_name": task.name}
        task_id = getattr(context, "id", None)
        if isinstance(task_id, str):
            attributes["celery.task_id"] = task_id
        with self.tracer.start_as_current_span(f"run {task.name}", context=parent, kind=SpanKind.CONSUMER,
                                               attributes=attributes, record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                result = body()
            except BaseException as exc:
                state = run_state(exc)
                span.set_attribute("celery.state", state)
                if state == "FAILURE":
                    span.record_exception(exc)
                    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200])
                raise
            span.set_attribute("celery.state", "SUCCESS")
            return result

    def parent_context(self, task: Task, context: t.Any = None) -> Context | None:
        """The sender's context from the message's headers; None (the current one) when it carries none.

        A header that is there but unreadable gives an empty context, so the
        run's span is a new root rather than a child of whatever is current.
        """
        if context is None:
            context = task.request
        carrier = _carrier_of(context)
        if "traceparent" not in carrier:
            has_header = getattr(context, "traceparent", None) is not None or \
                "traceparent" in (getattr(context, "headers", None) or {})
            return Context() if has_header else None
        try:
            return propagate.extract(carrier, getter=_GETTER, context=Context())
        except Exception:
            logger.warning("%s: unreadable trace headers ignored; the run starts a new trace", task.name)
            return Context()
