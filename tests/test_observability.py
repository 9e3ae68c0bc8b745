"""Metrics and tracing (websauna_tasks/observability/): issue 11, points 3 and 4.

The app is tests/apps/observed_app.py. Unit tests run it eagerly on an
in-memory broker; the integration tests use Redis, PostgreSQL and real
ws-celery workers, and scrape what a prefork worker's children counted.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import textwrap
import time
import typing as t
import urllib.request
import uuid

import pytest
import transaction
import webtest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from pyramid.authorization import Allow, Authenticated
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError

from tests.apps import observed_app
from tests.servers import free_port
from websauna_tasks import get_celery
from websauna_tasks.observability import hooks
from websauna_tasks.outbox import get_outbox
from websauna_tasks.testing import wait_for

EAGER = {"websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}",
         "websauna_tasks.metrics": "true"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


class Gate(SimpleSpanProcessor):
    """Exports only while a test that reads spans runs: the other tests' runs leave nothing in memory."""

    open = False

    def on_end(self, span) -> None:
        if self.open:
            super().on_end(span)


@pytest.fixture(scope="session")
def span_gate() -> tuple[Gate, InMemorySpanExporter]:
    """This process's tracer provider, exporting to memory (OpenTelemetry allows one provider per process)."""
    exporter = InMemorySpanExporter()
    gate = Gate(exporter)
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(gate)
    return gate, exporter


@pytest.fixture
def spans(span_gate) -> t.Iterator[InMemorySpanExporter]:
    gate, exporter = span_gate
    exporter.clear()
    gate.open = True
    yield exporter
    gate.open = False
    exporter.clear()


@pytest.fixture
def eager(built_apps):
    def build(**extra: str) -> webtest.TestApp:
        router = observed_app.main({}, **{**EAGER, **extra})
        built_apps.append(router)
        return webtest.TestApp(router)

    return build


# -- settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, raw", [
    ("websauna_tasks.metrics_port", "70000"),
    ("websauna_tasks.metrics_port", "-1"),
    ("websauna_tasks.metrics_port", "9100.5"),
    ("websauna_tasks.metrics_port", "http"),
    ("websauna_tasks.metrics_port", "nan"),
    ("websauna_tasks.metrics_duration_buckets", "0.1 nan 1"),
    ("websauna_tasks.metrics_duration_buckets", "0.1 inf"),
    ("websauna_tasks.metrics_duration_buckets", "-1 0.5"),
    ("websauna_tasks.metrics_duration_buckets", "0 1"),
    ("websauna_tasks.metrics_duration_buckets", "1 0.5"),
    ("websauna_tasks.metrics_duration_buckets", "1e309"),
    ("websauna_tasks.metrics_duration_buckets", "fast slow"),
    ("websauna_tasks.metrics_path", "metrics"),
    ("websauna_tasks.metrics_path", "/me trics"),
    ("websauna_tasks.metrics_path", "/metrics?x=1"),
    ("websauna_tasks.metrics_address", "0.0.0.0 9100"),
    ("websauna_tasks.metrics", "ture"),
    ("websauna_tasks.tracing", "maybe"),
])
def test_bad_observability_settings_stop_startup_naming_the_key(key, raw):
    config = Configurator(settings={**EAGER, key: raw})
    with pytest.raises(ConfigurationError) as caught:
        config.include("websauna_tasks")
    assert str(caught.value).startswith(key), caught.value


def test_buckets_are_read_in_any_spelling():
    from websauna_tasks.settings import parse_settings

    parsed = parse_settings({"websauna_tasks.metrics_duration_buckets": " 0.01, 0.1 1  30 "})
    assert parsed.metrics_duration_buckets == (0.01, 0.1, 1.0, 30.0)


# -- zero cost when off -------------------------------------------------------------------------------------------

ZERO_COST = textwrap.dedent("""
    import sys
    import transaction
    from pyramid.config import Configurator
    from websauna_tasks import get_celery, task
    from websauna_tasks.observability import hooks

    config = Configurator(settings={
        "websauna.celery_config": "{'broker_url': 'memory://', 'task_always_eager': True}",
        "websauna_tasks.tracing": "false"})
    config.include("pyramid_tm")
    config.include("websauna_tasks")

    @task(name="zero.cost")
    def zero(value):
        return value

    zero.bind_to_app(get_celery(config.registry))
    with transaction.manager:
        zero.apply_async((1,), tm=transaction.manager)
    assert zero.apply_async((2,), tm=None).get() == 2
    # (redis-py 8 imports opentelemetry itself when it is installed: only what this library loads is asked.)
    ours = ("websauna_tasks.observability.metrics", "websauna_tasks.observability.tracing")
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "prometheus_client" or name in ours)
    print(hooks.watching, loaded)
""")


def test_with_metrics_and_tracing_off_neither_library_is_imported_and_nothing_watches(subprocess_env):
    done = subprocess.run([sys.executable, "-c", ZERO_COST], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **subprocess_env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False []"


# -- metrics, eagerly ---------------------------------------------------------------------------------------------

def test_runs_and_dispatches_are_counted_by_task_queue_and_outcome(eager):
    app = eager()
    before = app.get("/metrics").text
    app.get("/send", params={"count": "3"})
    app.get("/abort")
    app.get("/savepoint")
    app.get("/savepoint", params={"kept": "1"})
    with pytest.raises(Exception):
        app.get("/send", params={"task": "fails"})
    after = app.get("/metrics")
    assert after.content_type == "text/plain"
    assert after.headers["Cache-Control"] == "no-store"
    text = after.text

    def delta(name: str, **labels: str) -> float:
        return value(text, name, **labels) - value(before, name, **labels)

    assert delta("websauna_tasks_dispatches_total", task="observed.work", outcome="committed") == 4
    assert delta("websauna_tasks_dispatches_total", task="observed.work", outcome="aborted") == 1
    assert delta("websauna_tasks_dispatches_total", task="observed.work", outcome="savepoint") == 2
    assert delta("websauna_tasks_runs_total", task="observed.work", queue="", state="SUCCESS") == 4
    assert delta("websauna_tasks_runs_total", task="observed.fails", queue="", state="FAILURE") == 1
    assert delta("websauna_tasks_run_duration_seconds_count", task="observed.work", queue="") == 4
    assert delta("websauna_tasks_run_duration_seconds_sum", task="observed.work", queue="") > 0


def test_a_retry_counts_as_a_retry_then_a_success(eager):
    app = eager()
    before = app.get("/metrics").text
    # Sent now: an eager retry raises out of a commit's publishing round (dispatch.EagerTaskError).
    assert observed_app.retries_once.apply_async(tm=None).get() == "again"
    text = app.get("/metrics").text
    for state in ("RETRY", "SUCCESS"):
        assert value(text, "websauna_tasks_runs_total", task="observed.retries_once", queue="", state=state) - \
            value(before, "websauna_tasks_runs_total", task="observed.retries_once", queue="", state=state) == 1


def test_a_conflict_retry_inside_a_run_is_counted(eager):
    app = eager()
    before = app.get("/metrics").text
    assert observed_app.conflicts_once.apply_async(tm=None).get() == 2
    text = app.get("/metrics").text
    assert value(text, "websauna_tasks_conflict_retries_total", task="observed.conflicts_once") - \
        value(before, "websauna_tasks_conflict_retries_total", task="observed.conflicts_once") == 1
    # One run, which succeeded: the conflict was retried inside it.
    assert value(text, "websauna_tasks_runs_total", task="observed.conflicts_once", queue="", state="SUCCESS") - \
        value(before, "websauna_tasks_runs_total", task="observed.conflicts_once", queue="", state="SUCCESS") == 1


def test_each_check_of_the_send_pipeline_counts_its_refusals(eager):
    app = eager(**{"websauna_tasks.queues": "[{'name': 'celery'}]", "websauna_tasks.name_store": "memory"})
    before = app.get("/metrics").text
    refused = app.get("/refuse").json
    assert refused == ["TypeError", "UndeclaredQueue", "TypeError", "TypeError", "AlreadyEnqueued"]
    text = app.get("/metrics").text
    for check in ("payload", "queue", "tm", "call", "name"):
        counted = value(text, "websauna_tasks_dispatch_refused_total", task="observed.work", check=check) - \
            value(before, "websauna_tasks_dispatch_refused_total", task="observed.work", check=check)
        assert counted == 1, check


def test_the_route_and_its_permission_follow_the_settings(built_apps):
    class Policy:
        def identity(self, request):
            return None

        def authenticated_userid(self, request):
            return request.headers.get("X-User")

        def permits(self, request, context, permission):
            from pyramid.authorization import ACLHelper

            principals = ["system.Everyone"] + ([Authenticated] if request.headers.get("X-User") else [])
            return ACLHelper().permits(context, principals, permission)

        def remember(self, request, userid, **kw):
            return []

        def forget(self, request, **kw):
            return []

    class Root:
        __acl__ = [(Allow, Authenticated, "metrics.read")]

        def __init__(self, request):
            pass

    config = Configurator(settings={**EAGER, "websauna_tasks.metrics_path": "/_ops/metrics",
                                    "websauna_tasks.metrics_permission": "metrics.read"}, root_factory=Root)
    config.set_security_policy(Policy())
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    router = config.make_wsgi_app()
    built_apps.append(router)
    app = webtest.TestApp(router)
    app.get("/metrics", status=404)
    app.get("/_ops/metrics", status=403)
    assert "websauna_tasks_runs" in app.get("/_ops/metrics", headers={"X-User": "prometheus"}).text


def test_an_observer_that_fails_changes_nothing(eager, caplog):
    app = eager()
    celery = get_celery(app.app.registry)

    class Broken(hooks.Observer):
        def dispatched(self, messages, outcome):
            raise RuntimeError("broken observer")

    hooks.add_observer(celery, Broken())
    assert app.get("/send").json
    assert "broken observer" in caplog.text


# -- tracing, in this process ---------------------------------------------------------------------------------------

def run_spans(exporter: InMemorySpanExporter, name: str) -> list:
    return [span for span in exporter.get_finished_spans() if span.name == f"run {name}"]


def test_an_eager_run_on_commit_is_a_child_of_the_requests_span(eager, spans):
    spans.clear()
    app = eager()
    response = app.get("/send", params={"count": "2"})
    ran = run_spans(spans, "observed.work")
    assert len(ran) == 2
    for span in ran:
        assert format(span.context.trace_id, "032x") == response.headers["X-Trace-Id"]
        assert format(span.parent.span_id, "016x") == response.headers["X-Span-Id"]
        assert span.kind == trace.SpanKind.CONSUMER
        assert span.attributes["celery.state"] == "SUCCESS"
    assert {span.attributes["celery.task_id"] for span in ran} == set(response.json)


def test_the_message_itself_carries_the_senders_traceparent_past_the_commit(eager, spans):
    from websauna_tasks.dispatch import set_message_sink

    eager()
    captured = []

    class Sink:
        def capture(self, message):
            captured.append(message)

    previous = set_message_sink(Sink())
    try:
        with trace.get_tracer("test").start_as_current_span("sender") as sender:
            with transaction.manager:
                observed_app.work.apply_async((1,), tm=transaction.manager, headers={"mine": "kept"})
    finally:
        set_message_sink(previous)
    [message] = captured
    context = sender.get_span_context()
    headers = message.options["headers"]
    assert headers["traceparent"].split("-")[1:3] == [f"{context.trace_id:032x}", f"{context.span_id:016x}"]
    assert headers["mine"] == "kept"


def test_a_failed_run_is_an_error_span_and_a_retry_is_not(eager, spans):
    spans.clear()
    app = eager()
    with pytest.raises(Exception):
        app.get("/send", params={"task": "fails"})
    observed_app.retries_once.apply_async(tm=None)
    [failed] = run_spans(spans, "observed.fails")
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
    states = [span.attributes["celery.state"] for span in run_spans(spans, "observed.retries_once")]
    assert sorted(states) == ["RETRY", "SUCCESS"]


def test_without_a_span_nothing_is_injected(eager, spans):
    eager()
    options: dict = {"headers": {"mine": "kept"}}
    from websauna_tasks.observability.tracing import TracingObserver

    TracingObserver().outgoing(observed_app.work, options)
    assert options == {"headers": {"mine": "kept"}}
    with trace.get_tracer("test").start_as_current_span("outer"):
        TracingObserver().outgoing(observed_app.work, options)
    assert options["headers"]["mine"] == "kept"
    assert options["headers"]["traceparent"].startswith("00-")


# -- real services --------------------------------------------------------------------------------------------------

def settings_for(redis_url, database_url, queue_name, **extra: str) -> dict[str, str]:
    celery = {"broker_url": redis_url, "result_backend": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
            "websauna_tasks.metrics": "true", "websauna_tasks.app_name": f"obs-{queue_name}",
            "websauna_tasks.deadletter_queue": f"{queue_name}.dead", **extra}


def write_ini(tmp_path, settings: dict[str, str]) -> str:
    path = tmp_path / "observed.ini"
    path.write_text("[app:main]\nuse = call:tests.apps.observed_app:main\n" + "".join(
        f"{key} = {value.replace('%', '%%')}\n" for key, value in settings.items()))
    return str(path)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_outbox_backlog_age_and_publish_latency(redis_url, database_url, queue_name, redis_client, db,
                                                built_apps):
    settings = settings_for(redis_url, database_url, queue_name, **{
        "websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false"})
    router = observed_app.main({}, **settings)
    built_apps.append(router)
    app = webtest.TestApp(router)
    outbox = get_outbox(get_celery(router.registry))
    outbox.drain()
    before = app.get("/metrics").text
    assert value(before, "websauna_tasks_outbox_unsent") == 0
    assert value(before, "websauna_tasks_outbox_status_up") == 1
    app.get("/send", params={"count": "4"})
    backlog = app.get("/metrics").text
    assert value(backlog, "websauna_tasks_outbox_unsent") == 4
    assert value(backlog, "websauna_tasks_outbox_oldest_unsent_age_seconds") > 0
    assert outbox.drain() == 4
    after = app.get("/metrics").text
    assert value(after, "websauna_tasks_outbox_unsent") == 0
    assert value(after, "websauna_tasks_outbox_oldest_unsent_age_seconds") == 0
    published = value(after, "websauna_tasks_outbox_publish_latency_seconds_count") - \
        value(before, "websauna_tasks_outbox_publish_latency_seconds_count")
    assert published == 4
    assert value(after, "websauna_tasks_dispatches_total", task="observed.work", outcome="committed") - \
        value(before, "websauna_tasks_dispatches_total", task="observed.work", outcome="committed") == 4


def test_a_countdown_past_the_visibility_timeout_is_counted_as_a_delay_refusal(redis_url, database_url,
                                                                               queue_name, redis_client, built_apps):
    # The delay check needs a Redis broker (its visibility timeout); the other checks are counted eagerly above.
    router = observed_app.main({}, **settings_for(redis_url, database_url, queue_name))
    built_apps.append(router)
    app = webtest.TestApp(router)
    before = app.get("/metrics").text
    refused = app.get("/refuse", params={"delay": "1"}).json
    assert refused[-1] == "VisibilityTimeoutExceeded"
    text = app.get("/metrics").text
    for check in ("payload", "tm", "call", "name", "delay"):
        counted = value(text, "websauna_tasks_dispatch_refused_total", task="observed.work", check=check) - \
            value(before, "websauna_tasks_dispatch_refused_total", task="observed.work", check=check)
        assert counted == 1, check


def test_a_scrape_during_a_database_outage_says_so(redis_url, queue_name, built_apps):
    settings = settings_for(redis_url, "postgresql+psycopg://nobody@127.0.0.1:1/none", queue_name,
                            **{"websauna_tasks.outbox": "true"})
    router = observed_app.main({}, **settings)
    built_apps.append(router)
    text = webtest.TestApp(router).get("/metrics").text
    assert value(text, "websauna_tasks_outbox_status_up") == 0
    assert "websauna_tasks_runs" in text


def queued_headers(redis_client, queue_name) -> list[dict]:
    return [json.loads(raw)["headers"] for raw in reversed(redis_client.lrange(queue_name, 0, -1))]


def test_the_trace_context_is_stored_with_the_outbox_row_and_published_by_the_relay(
        redis_url, database_url, queue_name, redis_client, db, built_apps, spans):
    settings = settings_for(redis_url, database_url, queue_name, **{
        "websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false"})
    router = observed_app.main({}, **settings)
    built_apps.append(router)
    celery = get_celery(router.registry)
    outbox = get_outbox(celery)
    outbox.drain()
    redis_client.delete(queue_name)
    response = webtest.TestApp(router).get("/send")
    [task_id] = response.json
    with db.connect() as conn:
        stored = json.loads(conn.exec_driver_sql(
            "SELECT options FROM websauna_tasks_outbox WHERE id = %(id)s", {"id": task_id}).scalar_one())
    traceparent = stored["headers"]["traceparent"]
    assert traceparent.split("-")[1:3] == [response.headers["X-Trace-Id"], response.headers["X-Span-Id"]]
    assert outbox.drain() == 1
    [headers] = queued_headers(redis_client, queue_name)
    assert headers["id"] == task_id and headers["traceparent"] == traceparent
    # The message as the relay published it, run here as a worker runs it: its span continues the request's.
    spans.clear()
    observed_app.work.apply(args=(1,), task_id=task_id, headers={"traceparent": traceparent})
    [ran] = run_spans(spans, "observed.work")
    assert format(ran.context.trace_id, "032x") == response.headers["X-Trace-Id"]
    assert format(ran.parent.span_id, "016x") == response.headers["X-Span-Id"]


def spans_in(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def template_entry(celery, redis_client, queue_name) -> dict:
    """A genuine kombu envelope of observed.work, taken from a queue nobody consumes."""
    parked = f"{queue_name}.template"
    celery.send_task("observed.work", args=(0,), queue=parked)
    entry = json.loads(redis_client.rpop(parked))
    redis_client.delete(parked, f"_kombu.binding.{parked}")
    return entry


def forged(template: dict, value: int, **headers) -> tuple[str, str]:
    """``template`` with a new id, the body observed.work(value) and ``headers`` put over its own."""
    entry = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    entry["headers"] = dict(entry["headers"], id=task_id, root_id=task_id, **headers)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    entry["body"] = base64.b64encode(json.dumps([[value], {}, embed]).encode()).decode()
    entry["properties"] = dict(entry["properties"], delivery_tag=str(uuid.uuid4()), correlation_id=task_id)
    return json.dumps(entry), task_id


@pytest.mark.slow
def test_a_real_worker_continues_the_requests_trace_plain_and_through_the_outbox(
        redis_url, database_url, queue_name, redis_client, db, built_apps, tmp_path, ws_celery_worker_factory,
        subprocess_env, spans):
    span_file = tmp_path / "worker-spans.jsonl"
    record = f"{queue_name}:ran"
    plain = settings_for(redis_url, database_url, queue_name, **{"observed_app.record": record})
    outboxed = {**plain, "websauna_tasks.outbox": "true", "websauna_tasks.app_name": f"obs-{queue_name}-outbox"}
    web_plain = webtest.TestApp(observed_app.main({}, **plain))
    web_outbox = webtest.TestApp(observed_app.main({}, **outboxed))
    built_apps.extend([web_plain.app, web_outbox.app])
    # One worker runs both apps' messages (one queue); the outbox one's relay publishes the rows.
    ws_celery_worker_factory(write_ini(tmp_path, {**outboxed, "observed_app.span_file": str(span_file)}),
                             "worker", "-c", "2", env=subprocess_env)
    redis_client.delete(record)
    try:
        sent = {"plain": web_plain.get("/send", params={"count": "2"}),
                "outbox": web_outbox.get("/send", params={"count": "2"})}
        expected = {task_id: (path, response) for path, response in sent.items() for task_id in response.json}
        wait_for(lambda: len({s["attributes"].get("celery.task_id") for s in spans_in(span_file)} & set(expected))
                 == len(expected), timeout=60, describe=lambda: str(spans_in(span_file)))
        ran = {json.loads(raw)["id"]: json.loads(raw) for raw in redis_client.lrange(record, 0, -1)}
    finally:
        redis_client.delete(record)
    worker_spans = {s["attributes"]["celery.task_id"]: s for s in spans_in(span_file)
                    if s["name"] == "run observed.work"}
    for task_id, (path, response) in expected.items():
        span = worker_spans[task_id]
        assert span["pid"] != os.getpid()
        assert span["trace_id"] == response.headers["X-Trace-Id"], path
        assert span["parent_span_id"] == response.headers["X-Span-Id"], path
        # The body saw its run's span as the current one.
        assert ran[task_id]["trace_id"] == response.headers["X-Trace-Id"], path


@pytest.mark.slow
def test_a_forged_traceparent_is_ignored_and_the_run_gets_a_root_span(
        redis_url, database_url, queue_name, redis_client, db, built_apps, tmp_path, ws_celery_worker_factory,
        subprocess_env):
    span_file = tmp_path / "worker-spans.jsonl"
    record = f"{queue_name}:ran"
    settings = settings_for(redis_url, database_url, queue_name, **{"observed_app.record": record})
    router = observed_app.main({}, **settings)
    built_apps.append(router)
    celery = get_celery(router.registry)
    worker = ws_celery_worker_factory(write_ini(tmp_path, {**settings, "observed_app.span_file": str(span_file)}),
                                      "worker", "-P", "solo", env=subprocess_env)
    template = template_entry(celery, redis_client, queue_name)
    bad = ["00-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-0000000000000000-01",
           "00-00000000000000000000000000000000-0000000000000000-01",  # all-zero ids: invalid by the spec
           "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # version ff is forbidden
           "00-" + "a" * 32 + "-" + "b" * 16 + "-01" + "x" * 5000,
           "\x00\n", 12345, ["00-" + "a" * 32 + "-" + "b" * 16 + "-01"], {"nested": True}]
    redis_client.delete(record)
    try:
        ids = []
        for index, header in enumerate(bad):
            raw, task_id = forged(template, index, traceparent=header, tracestate="k=" + "v" * 10000)
            redis_client.lpush(queue_name, raw)
            ids.append(task_id)
        # And a genuine message after them: the worker is still taking messages.
        raw, last = forged(template, 99)
        redis_client.lpush(queue_name, raw)
        wait_for(lambda: redis_client.llen(record) >= len(bad) + 1, timeout=60, describe=worker.output)
        ran = {json.loads(raw)["id"] for raw in redis_client.lrange(record, 0, -1)}
    finally:
        redis_client.delete(record)
    assert ran == {*ids, last}
    assert worker.process.poll() is None
    worker_spans = {s["attributes"]["celery.task_id"]: s for s in spans_in(span_file)
                    if s["name"] == "run observed.work"}
    for task_id in ids:
        assert worker_spans[task_id]["parent_span_id"] is None, worker_spans[task_id]
    # Each is a trace of its own, not one forged trace shared by all.
    assert len({worker_spans[task_id]["trace_id"] for task_id in ids}) == len(ids)


@pytest.mark.slow
def test_a_prefork_workers_children_add_up_at_its_endpoint(
        redis_url, database_url, queue_name, redis_client, db, built_apps, tmp_path, ws_celery_worker_factory,
        subprocess_env):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    record = f"{queue_name}:ran"
    settings = settings_for(redis_url, database_url, queue_name, **{
        "observed_app.record": record, "websauna_tasks.metrics_port": str(port),
        "websauna_tasks.queues": repr([{"name": queue_name, "max_concurrent": 2}])})
    router = observed_app.main({}, **settings)
    built_apps.append(router)
    app = webtest.TestApp(router)
    celery = get_celery(router.registry)
    worker = ws_celery_worker_factory(
        write_ini(tmp_path, settings), "worker", "-c", "2", "--prefetch-multiplier", "1",
        env={**subprocess_env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)})
    template = template_entry(celery, redis_client, queue_name)
    redis_client.delete(record)
    count = 8
    try:
        app.get("/send", params={"task": "slow", "count": str(count), "seconds": "0.3"})
        app.get("/send", params={"task": "fails"})
        app.get("/send", params={"task": "retries_once"})
        redis_client.lpush(queue_name, forged(template, 1, task=["observed.work"])[0])  # malformed
        wait_for(lambda: redis_client.llen(record) >= count, timeout=60, describe=worker.output)
        pids = {json.loads(raw)["pid"] for raw in redis_client.lrange(record, 0, -1)}
    finally:
        redis_client.delete(record)
    assert len(pids) == 2, "both children should have run some"
    url = f"http://127.0.0.1:{port}/metrics"

    def counted() -> str | None:
        text = scrape(url)
        done = value(text, "websauna_tasks_runs_total", task="observed.retries_once", queue=queue_name,
                     state="SUCCESS") == 1 and value(text, "websauna_tasks_dead_letters_total", kind="malformed") == 1
        return text if done else None

    text = wait_for(counted, timeout=30, describe=lambda: scrape(url))
    assert value(text, "websauna_tasks_runs_total", task="observed.slow", queue=queue_name, state="SUCCESS") == count
    assert value(text, "websauna_tasks_run_duration_seconds_count", task="observed.slow", queue=queue_name) == count
    assert value(text, "websauna_tasks_run_duration_seconds_sum", task="observed.slow",
                 queue=queue_name) >= 0.3 * count
    assert value(text, "websauna_tasks_runs_total", task="observed.fails", queue=queue_name, state="FAILURE") == 1
    assert value(text, "websauna_tasks_runs_total", task="observed.retries_once", queue=queue_name,
                 state="RETRY") == 1
    waits = value(text, "websauna_tasks_queue_wait_seconds_count", queue=queue_name, outcome="ran") + \
        value(text, "websauna_tasks_queue_wait_seconds_count", queue=queue_name, outcome="requeued")
    assert waits >= count + 3
    # The counts came from both children's files, summed by the main process.
    assert len([name for name in os.listdir(multiproc) if name.startswith("counter_")]) >= 2


def test_a_taken_metrics_port_leaves_the_worker_running(redis_url, database_url, queue_name, redis_client, db,
                                                        built_apps, tmp_path, ws_celery_worker_factory,
                                                        subprocess_env):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        record = f"{queue_name}:ran"
        settings = settings_for(redis_url, database_url, queue_name, **{
            "observed_app.record": record, "websauna_tasks.metrics_port": str(port)})
        router = observed_app.main({}, **settings)
        built_apps.append(router)
        worker = ws_celery_worker_factory(write_ini(tmp_path, settings), "worker", "-P", "solo", env=subprocess_env)
        redis_client.delete(record)
        try:
            with transaction.manager:
                observed_app.work.apply_async(args=(5,), tm=transaction.manager)
            wait_for(lambda: redis_client.llen(record) >= 1, timeout=30, describe=worker.output)
        finally:
            redis_client.delete(record)
    assert "cannot serve metrics" in worker.output()


def test_a_workers_endpoint_reports_the_outbox_backlog_and_the_age_of_its_oldest_row(
        redis_url, database_url, queue_name, redis_client, db, built_apps, tmp_path, ws_celery_worker_factory,
        subprocess_env):
    """The gauges are read from the table at each scrape of the worker's own endpoint, not the web app's."""
    port = free_port()
    record = f"{queue_name}:ran"
    # No relay in this worker: the rows wait until the test drains them, so the backlog can be seen.
    settings = settings_for(redis_url, database_url, queue_name, **{
        "observed_app.record": record, "websauna_tasks.metrics_port": str(port),
        "websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false",
        "websauna_tasks.outbox_relay_in_worker": "false"})
    router = observed_app.main({}, **settings)
    built_apps.append(router)
    app = webtest.TestApp(router)
    outbox = get_outbox(get_celery(router.registry))
    outbox.drain()
    worker = ws_celery_worker_factory(write_ini(tmp_path, settings), "worker", "-P", "solo", env=subprocess_env)
    url = f"http://127.0.0.1:{port}/metrics"
    redis_client.delete(record)
    try:
        empty = wait_for(lambda: _scraped(url), timeout=60, describe=worker.output)
        assert value(empty, "websauna_tasks_outbox_status_up") == 1
        assert value(empty, "websauna_tasks_outbox_unsent") == 0
        assert value(empty, "websauna_tasks_outbox_oldest_unsent_age_seconds") == 0
        app.get("/send", params={"count": "3"})
        written = time.time()
        backlog = scrape(url)
        assert value(backlog, "websauna_tasks_outbox_unsent") == 3
        age = value(backlog, "websauna_tasks_outbox_oldest_unsent_age_seconds")
        assert 0 < age <= time.time() - written + 5
        # Older at the next scrape: read when scraped, not when the rows were written.
        def older() -> str | None:
            text = scrape(url)
            return text if value(text, "websauna_tasks_outbox_oldest_unsent_age_seconds") > age + 0.5 else None

        later = wait_for(older, timeout=10)
        assert value(later, "websauna_tasks_outbox_unsent") == 3
        assert outbox.drain() == 3
        wait_for(lambda: redis_client.llen(record) >= 3, timeout=60, describe=worker.output)
    finally:
        redis_client.delete(record)
    after = scrape(url)
    assert value(after, "websauna_tasks_outbox_unsent") == 0
    assert value(after, "websauna_tasks_outbox_oldest_unsent_age_seconds") == 0
    assert value(after, "websauna_tasks_runs_total", task="observed.work", queue=queue_name, state="SUCCESS") == 3


def _scraped(url: str) -> str | None:
    try:
        return scrape(url)
    except OSError:  # the endpoint starts with the worker
        return None
