"""The worker's per-task run path (issue 14, fair rows): what was made cheaper still behaves the same.

- A run's body sees its Celery context without ``celery.Task.__call__``'s
  copy of it, as a plain Celery task does; a task called directly, even from
  inside its own run, still gets a context (and ``self.request.request``) of
  its own, and the outer run's is left as it was.
- ``TaskFinished`` builds no event when nobody subscribes, and a subscriber
  added afterwards is notified.
- Tracing without a tracer provider runs the body without a span, unless the
  message carries a trace context to pass on.
"""
from __future__ import annotations

import pytest

from tests.apps import run_path_app as app_module
from websauna_tasks.events import TaskFinished

pytestmark = pytest.mark.unit

SETTINGS = {"websauna.celery_config": "{'broker_url': 'memory://'}"}


@pytest.fixture
def app(built_apps):
    router = app_module.main({}, **SETTINGS)
    built_apps.append(router)
    return router


def test_a_direct_call_from_inside_a_run_has_its_own_context_and_leaves_the_outer_one(app):
    report = app_module.nested.apply((1,), task_id="outer-id", throw=True).get()
    assert report["args"] == [1] and report["id"] == "outer-id"
    assert report["own_request"] and report["current"]
    # The outer run's self.request.request is still its own after the inner call (it was overwritten before).
    assert report["kept_request"]
    inner = report["inner"]
    assert inner["args"] == [0] and inner["own_request"] and inner["kept_request"] and inner["current"]
    assert app_module.nested.request_stack.top is None


def test_a_direct_call_gets_a_context_of_its_own(app):
    report = app_module.nested(0)
    assert report["args"] == [0] and report["own_request"] and report["current"]
    assert app_module.nested.request_stack.top is None


def test_the_body_runs_on_the_runs_context_as_a_plain_celery_task_does(app):
    seen = []
    app.registry.registerHandler(lambda event: seen.append(getattr(event.task.request, "note", None)),
                                 (TaskFinished,))
    assert app_module.sets_context.apply(task_id="ctx-id", throw=True).get() == "ctx-id"
    assert seen == ["set by the body"]


def test_task_finished_reaches_a_subscriber_added_after_runs_without_one(app):
    assert app_module.sets_context.apply(throw=True).get()  # nobody subscribed: no event built
    seen = []
    app.registry.registerHandler(lambda event: seen.append((event.task_id, event.state)), (TaskFinished,))
    result = app_module.sets_context.apply(task_id="later-id", throw=True)
    assert seen == [("later-id", "SUCCESS")]
    assert result.get() == "later-id"


class _SpanSpy:
    """A tracer that records the spans it was asked for."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start_as_current_span(self, name: str, **_: object):
        import contextlib

        self.started.append(name)

        class _Span:
            def set_attribute(self, *_: object) -> None:
                pass

        return contextlib.nullcontext(_Span())


class _Task:
    name = "t"

    def __init__(self, **context: object) -> None:
        from celery.app.task import Context

        self.request = Context(**{"id": "task-id", "headers": {}, **context})


@pytest.mark.parametrize("context, provider, spans", [
    ({}, False, 0),  # no provider, nothing to carry on: no span
    ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, False, 1),  # carried on
    ({"headers": {"traceparent": "forged"}}, False, 1),  # an eager run's headers count too
    ({}, True, 1),  # a provider records every run
])
def test_tracing_without_a_provider_spans_only_runs_with_a_context_to_carry(monkeypatch, context, provider, spans):
    from websauna_tasks.observability import tracing

    observer = tracing.TracingObserver()
    spy = observer.tracer = _SpanSpy()
    monkeypatch.setattr(tracing, "_no_provider", lambda: not provider)
    assert observer.run(_Task(**context), lambda: "ran") == "ran"
    assert len(spy.started) == spans


def test_a_tracer_given_to_the_observer_always_gets_the_span(monkeypatch):
    from websauna_tasks.observability import tracing

    spy = _SpanSpy()
    observer = tracing.TracingObserver(tracer=spy)
    monkeypatch.setattr(tracing, "_no_provider", lambda: True)
    assert observer.run(_Task(), lambda: "ran") == "ran"
    assert spy.started == ["run t"]


def test_the_api_without_a_provider_counts_as_none():
    from opentelemetry import trace

    from websauna_tasks.observability import tracing

    assert type(trace.NoOpTracerProvider()) in tracing._NON_RECORDING_PROVIDERS
    assert type(trace.ProxyTracerProvider()) in tracing._NON_RECORDING_PROVIDERS
