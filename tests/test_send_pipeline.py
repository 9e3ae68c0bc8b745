"""The send pipeline (websauna_tasks/dispatch.py): every way of sending goes through one publisher seam.

No service is needed (but for the dead letter's requeue at the end): the
apps name a Redis broker (so that the visibility timeout applies) but every
message stops at a publisher of the test's own, so nothing connects.
"""
from __future__ import annotations

import datetime
import json
import types

import pytest
import transaction
from celery import beat, signature
from celery.worker.request import Request as WorkerRequest
from kombu.message import Message
from kombu.serialization import dumps

from tests.apps import deferred_functions
from tests.test_dead_letter_entries import make_dead_letter
from websauna_tasks import (
    UndeclaredQueue,
    VisibilityTimeoutExceeded,
    defer,
    dispatch,
    get_celery,
    list_dead_letters,
    requeue_dead_letter,
)
from websauna_tasks.broker import _PlainSender
from websauna_tasks.iteration import SHARD_TASK_NAME, _send_shard
from websauna_tasks.outbox import Outbox
from websauna_tasks.reliability import delay_of, read_eta
from websauna_tasks.tasks import ScheduleOnCommitTask, WebsaunaTask
from websauna_tasks.testing import TaskClient

#: Naive ETAs in this zone would be 4 or 5 hours off if the app's zone were applied to them.
ZONE = "America/New_York"
BROKER = "redis://127.0.0.1:6379/15"


class Recording:
    """A publisher that keeps what the pipeline hands it, by the way it came."""

    def __init__(self, waits_in_broker: bool = False):
        self.waits_in_broker = waits_in_broker
        self.held: list[dispatch.PendingMessage] = []
        self.published: list[dispatch.PendingMessage] = []
        self.now: list[tuple[str, tuple, dict]] = []

    def hold(self, tm, message):
        self.held.append(message)

    def publish(self, messages, strict=False):
        self.published.extend(messages)

    def send_now(self, task, args, kwargs, options):
        task_id = options.get("task_id") or "now-id"
        self.now.append((task.name, tuple(args or ()), dict(kwargs or {})))
        return task.AsyncResult(task_id)

    def names(self) -> list[str]:
        return [message.task.name for message in self.published] + [name for name, _, _ in self.now]


@pytest.fixture
def router(make_app):
    config = {"broker_url": BROKER, "timezone": ZONE, "broker_transport_options": {"visibility_timeout": 3600}}
    return make_app(**{"websauna.celery_config": repr(config)})


@pytest.fixture
def app(router):
    return get_celery(router.registry)


@pytest.fixture
def recording(app):
    publisher = Recording()
    previous = dispatch.set_publisher(publisher, app)
    yield publisher
    dispatch.set_publisher(previous, app)


def worker_eta(app, eta: datetime.datetime) -> datetime.datetime:
    """The ETA a Celery worker of ``app`` gives a message sent with ``eta``: Celery's own Request reads it."""
    message = app.amqp.as_task_v2("id", "tests.add", args=(1, 2), eta=eta)
    content_type, encoding, body = dumps(message.body, serializer="json")
    raw = Message(body=body, headers=message.headers, content_type=content_type, content_encoding=encoding,
                  channel=None, delivery_info={})
    return WorkerRequest(raw, app=app, task=app.tasks["tests.add"]).eta


# -- every way of sending reaches the app's publisher ------------------------------------------------

def test_every_way_of_sending_goes_through_the_apps_publisher(router, app, recording):
    tm = transaction.TransactionManager(explicit=True)
    record, route_url = app.tasks["tests.record"], app.tasks["tests.route_url"]
    with tm:
        record.apply_async(("on commit",), tm=tm)
        defer(deferred_functions.record, "deferred", _tm=tm, _transactional=True, _registry=router.registry)
        _send_shard(types.SimpleNamespace(registry=router.registry, tm=tm), "iteration", 0, 0, None)
        assert recording.published == [], "held until the commit"
    record.apply_async(("now",), tm=None)
    route_url.delay()
    defer(deferred_functions.record, "deferred now", _transactional=False, _registry=router.registry)
    with transaction.manager:
        app.tasks["tests.add"].defer(1, 2)
    # Beat sends with producer= and no tm.
    entry = beat.ScheduleEntry("every minute", "tests.add", args=(3, 4), app=app)
    beat.Scheduler(app, lazy=True).apply_async(entry, producer=object())
    # The outbox relay publishes its rows the same way.
    row = types.SimpleNamespace(id="row-1", task_name="tests.add", args="[5, 6]", kwargs="{}", options="{}")
    Outbox(app, router.registry).publish_rows([row])

    assert [message.task.name for message in recording.held] == [
        "tests.record", "websauna_tasks.deferred", SHARD_TASK_NAME, "tests.add"]
    assert recording.names() == [
        "tests.record", "websauna_tasks.deferred", SHARD_TASK_NAME,  # the commit
        "tests.add",  # task.defer, at the thread's commit
        "tests.add",  # the outbox row
        "tests.record", "tests.route_url", "websauna_tasks.deferred", "tests.add",  # sent now; beat
    ]
    assert recording.now[-1] == ("tests.add", (3, 4), {})


def test_nothing_reaches_the_publisher_when_a_check_fails(router, app, recording):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        with pytest.raises(TypeError, match="cannot travel as JSON"):
            app.tasks["tests.record"].apply_async((object(),), tm=tm)
        with pytest.raises(TypeError, match="needs the transaction manager"):
            app.tasks["tests.record"].apply_async(("x",))
        with pytest.raises(TypeError, match=r"defer\(tests.apps.deferred_functions:record\)"):
            defer(deferred_functions.record, object(), _tm=tm, _registry=router.registry)
    assert recording.held == recording.published == recording.now == []


def test_a_capturing_publisher_does_not_check_the_delay_and_the_broker_does(app, recording):
    record = app.tasks["tests.record"]
    record.apply_async(("late",), tm=None, countdown=7200)  # captured: it never waits in Redis
    assert recording.now == [("tests.record", ("late",), {})]
    recording.waits_in_broker = True
    with pytest.raises(VisibilityTimeoutExceeded):
        record.apply_async(("late",), tm=None, countdown=7200)


# -- one reading of a naive eta: the worker's -------------------------------------------------------

def test_read_eta_is_the_workers_reading(app):
    naive = datetime.datetime(2031, 3, 4, 5, 6, 7)
    aware = datetime.datetime(2031, 3, 4, 5, 6, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=3)))
    for eta in (naive, aware):
        assert read_eta(app, eta) == worker_eta(app, eta)
        assert read_eta(app, eta.isoformat()) == worker_eta(app, eta)
    assert read_eta(app, None) is None and read_eta(app, "not a date") is None
    assert app.conf.timezone == ZONE


def test_a_naive_eta_is_read_the_same_by_apply_async_defer_and_the_test_client(router, app, recording):
    now = datetime.datetime.now(datetime.timezone.utc)
    naive = (now + datetime.timedelta(hours=2)).replace(tzinfo=None)
    expected = (worker_eta(app, naive) - now).total_seconds()
    recording.waits_in_broker = True  # the delay is checked against the visibility timeout (3600 s)
    with pytest.raises(VisibilityTimeoutExceeded) as by_apply_async:
        app.tasks["tests.record"].apply_async(("x",), tm=None, eta=naive)
    with pytest.raises(VisibilityTimeoutExceeded) as by_defer:
        defer(deferred_functions.record, "x", _eta=naive, _transactional=False, _registry=router.registry)
    for caught in (by_apply_async, by_defer):
        assert abs(caught.value.delay - expected) < 60, (caught.value.delay, expected)
    assert abs(delay_of({"eta": naive}, now, app=app) - expected) < 1

    soon = (now + datetime.timedelta(minutes=10)).replace(tzinfo=None)
    with TaskClient(apps=[app]) as client:
        first = app.tasks["tests.record"].apply_async(("y",), tm=None, eta=soon)
        second = defer(deferred_functions.record, "y", _eta=soon, _transactional=False, _registry=router.registry)
    jobs = client.jobs
    assert jobs[first.id].scheduled_at == jobs[second].scheduled_at == worker_eta(app, soon)


# -- the test client's seam -------------------------------------------------------------------------

def test_a_client_for_one_app_captures_through_its_publisher_only(router, app, make_app):
    other = get_celery(make_app(**{"websauna.celery_config": repr({"broker_url": BROKER})}).registry)
    with TaskClient(apps=[app]) as client:
        assert isinstance(dispatch.publisher_of(app), dispatch.CapturingPublisher)
        assert isinstance(dispatch.publisher_of(other), dispatch.BrokerPublisher)
        assert not dispatch.has_sink(), "no process-wide sink is set"
        sent = app.tasks["tests.route_url"].delay()
    assert list(client.jobs) == [sent.id]
    assert isinstance(dispatch.publisher_of(app), dispatch.BrokerPublisher)


def test_a_client_for_every_app_covers_apps_built_while_it_is_active(make_app):
    with TaskClient() as client:
        app = get_celery(make_app(**{"websauna.celery_config": repr({"broker_url": BROKER})}).registry)
        sent = app.tasks["tests.route_url"].delay()
        assert dispatch.set_message_sink(None) is client  # the old name reads the same seam
        dispatch.set_message_sink(client)
    assert list(client.jobs) == [sent.id]
    assert isinstance(dispatch.publisher_of(app), dispatch.BrokerPublisher)


def test_no_production_module_asks_whether_a_sink_is_set():
    import pathlib

    import websauna_tasks

    package = pathlib.Path(websauna_tasks.__file__).parent
    asking = sorted(path.name for path in package.rglob("*.py") if path.name != "dispatch.py" and any(
        name in path.read_text() for name in ("has_sink(", "captured(", "set_message_sink(", "_sink")))
    assert asking == []
    assert not hasattr(dispatch, "_sink")


def test_link_callbacks_of_a_captured_message_are_kept(app, recording):
    callback = signature("tests.add", args=(1,), app=app)
    app.tasks["tests.add"].apply_async((1, 2), tm=None, link=callback)
    assert recording.now == [("tests.add", (1, 2), {})]


# -- the fast sender ---------------------------------------------------------------------------------

def test_the_fast_sender_knows_our_send_now_by_identity(app):
    class Overriding(ScheduleOnCommitTask):
        def send_now(self, args=None, kwargs=None, **options):
            return super().send_now(args, kwargs, **options)

    def body():
        pass

    plain = app.tasks["tests.add"]
    assert _PlainSender._plain_task(plain)
    overriding = app.task(body, name="tests.overriding", base=Overriding, shared=False, lazy=False)
    assert not _PlainSender._plain_task(overriding)
    replaced = app.task(body, name="tests.replaced", base=WebsaunaTask, shared=False, lazy=False)
    type(replaced).send_now = lambda self, *args, **kwargs: None  # a test double replaced it after the fact
    assert not _PlainSender._plain_task(replaced)
    assert json.loads(json.dumps(sorted(dispatch.__all__)))  # the public names are listed


# -- a dead letter's way back ------------------------------------------------------------------------

def test_a_dead_letter_goes_back_only_to_a_declared_queue(make_app, redis_url, redis_client, queue_name):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    router = make_app(**{"websauna.celery_config": repr(config), "websauna_tasks.queues": repr([{"name": queue_name}]),
                         "websauna_tasks.deadletter_queue": f"{queue_name}.dead"})
    celery = get_celery(router.registry)
    try:
        task_id = make_dead_letter(celery, queue_name)
        with pytest.raises(UndeclaredQueue):
            requeue_dead_letter(celery, task_id, queue=f"{queue_name}.typo")
        assert [entry["id"] for entry in list_dead_letters(celery)] == [task_id], "kept after the refusal"
        assert redis_client.llen(f"{queue_name}.typo") == 0
        assert requeue_dead_letter(celery, task_id) is True
        assert [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue_name, 0, -1)] == [task_id]
    finally:
        redis_client.delete(f"{queue_name}.dead", f"{queue_name}.typo")
