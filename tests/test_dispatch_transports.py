"""Publishing after commit on real brokers: batched on Redis, message by message on RabbitMQ.

The Redis fast path builds messages itself (websauna_tasks/broker.py
``_PlainSender``); these tests hold it to what Celery would have written,
byte for byte apart from kombu's random delivery tag, and make sure a real
worker runs what it wrote.
"""
from __future__ import annotations

import base64
import collections
import datetime
import decimal
import json
import logging
import os
import time

import kombu
import pytest
import redis
import transaction
from celery import signals
from celery.utils import uuid as celery_uuid
from sqlalchemy import text

from tests.apps import sample_tasks
from tests.conftest import queued_messages, service_missing
from websauna_tasks import broker, dispatch, get_celery
from websauna_tasks.tasks import WebsaunaTask

AMQP_URL = os.environ.get("WS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + sep + step holds priorities 3, 6, 9

Pair = collections.namedtuple("Pair", "left right")


@pytest.fixture
def celery_app(make_app, redis_url, database_url, queue_name, db):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    router = make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url})
    return get_celery(router.registry)


@pytest.fixture(autouse=True)
def no_bindings_left(redis_client, queue_name):
    """kombu records the bindings of each declared queue; remove this test's from the shared Redis."""
    yield
    for queue in (queue_name, f"{queue_name}-other"):
        redis_client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


@pytest.fixture
def tm():
    return transaction.TransactionManager(explicit=True)


def count_celery_sends(celery_app):
    """Ids of the messages sent by Celery's own send_task_message: the fast path does not use it.

    (A spy on ``app.send_task`` would turn the fast path off: it steps aside
    for anything that replaces Celery's publishing functions.)
    """
    calls = []
    original = celery_app.amqp.send_task_message

    def counting(producer, name, message, **kwargs):
        calls.append(message.headers["id"])
        return original(producer, name, message, **kwargs)

    celery_app.amqp.send_task_message = counting
    return calls


@pytest.fixture
def send_task_calls(celery_app):
    calls = count_celery_sends(celery_app)
    yield calls
    del celery_app.amqp.send_task_message


@pytest.fixture
def pipelines(monkeypatch):
    """LPUSH count of each Redis pipeline that published messages (a pipeline is one round trip).

    Pipelines without LPUSH (kombu declaring a queue binding) are not counted.
    """
    sizes = []
    original = redis.client.Pipeline.execute

    def counting(self, *args, **kwargs):
        pushes = sum(1 for command_args, _options in self.command_stack if command_args[0] == "LPUSH")
        if pushes:
            sizes.append(pushes)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    return sizes


def all_queued(client, queue):
    """Messages of a queue and its priority lists, as kombu stored them."""
    messages = []
    for key in [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in (3, 6, 9)]:
        messages += queued_messages(client, key)
    return messages


def drain(client, queue):
    messages = all_queued(client, queue)
    client.delete(queue, *[f"{queue}{PRIORITY_SEP}{step}" for step in (3, 6, 9)])
    return messages


def comparable(envelope):
    envelope = dict(envelope, properties=dict(envelope["properties"]))
    del envelope["properties"]["delivery_tag"]  # a fresh uuid per publish
    return envelope


@pytest.mark.parametrize("options", [
    {},
    {"priority": 5},
    {"headers": {"x-trace": "abc"}},
    {"ignore_result": True},
    {"time_limit": 30, "soft_time_limit": 20},
    {"shadow": "tests.add[nice]"},
    {"compression": "zlib"},
    {"queue": "OTHER"},
], ids=lambda options: ",".join(options) or "plain")
def test_batched_message_is_what_celery_writes(celery_app, tm, redis_client, queue_name, send_task_calls,
                                               options):
    options = {key: (f"{queue_name}-other" if value == "OTHER" else value) for key, value in options.items()}
    target = options.get("queue", queue_name)
    try:
        with tm:
            first = sample_tasks.add.apply_async(args=(1, 2), kwargs={}, tm=tm, **options)
            second = sample_tasks.add.apply_async(args=(3, 4), tm=tm, **options)
        assert send_task_calls == [], "plain messages must not go through Celery's send_task"
        batched = drain(redis_client, target)
        assert [m["headers"]["id"] for m in batched] == [first.id, second.id]

        sample_tasks.add.apply_async(args=(1, 2), task_id=first.id, tm=None, **options)
        assert send_task_calls == [first.id]
        (reference,) = drain(redis_client, target)
        assert comparable(batched[0]) == comparable(reference)
    finally:
        drain(redis_client, target)


@pytest.fixture
def echo(celery_app):
    """A task taking any arguments."""
    def echo_arguments(*args, **kwargs):
        return None

    return celery_app.task(name="tests.echo_arguments", base=WebsaunaTask, shared=False)(echo_arguments)


@pytest.mark.parametrize("args, kwargs", [
    ((1, 2), {}),
    (("it's", "a\nb"), {}),
    (("back\\slash", "é \u2028 😀"), {}),
    ((1.5, None), {"extra": True}),
    ((), {"a": "x", "b": [1, {"c": "é"}]}),
    ((datetime.datetime(2026, 12, 7, 12, 0), decimal.Decimal("1.10")), {}),
    ((True, "x" * 2000), {}),
    ((collections.OrderedDict(a=1), Pair(1, 2)), {}),
    ([1, 2], collections.OrderedDict()),
], ids=["ints", "quote-newline", "backslash-unicode", "float-none-kw", "kwargs-nested", "datetime-decimal",
        "truncated-repr", "subclasses", "list-ordereddict"])
def test_batched_arguments_are_what_celery_writes(echo, tm, redis_client, queue_name, send_task_calls, args, kwargs):
    # The argsrepr/kwargsrepr headers and the body: the fast path writes them without saferepr and kombu's dumps.
    with tm:
        sent = echo.apply_async(args=args, kwargs=kwargs, tm=tm)
    assert send_task_calls == []
    (batched,) = drain(redis_client, queue_name)
    echo.apply_async(args=args, kwargs=kwargs, task_id=sent.id, tm=None)
    assert send_task_calls == [sent.id]
    (reference,) = drain(redis_client, queue_name)
    assert comparable(batched)["headers"] == comparable(reference)["headers"]
    assert comparable(batched) == comparable(reference)


@pytest.fixture
def worker_task(celery_app):
    """A task in the middle of a worker's run: messages sent now name it as their parent."""
    from celery._state import _task_stack

    parent = celery_app.tasks["tests.add"]
    parent.push_request(id="parent-id", root_id="root-id", delivery_info={"priority": 7}, called_directly=False)
    _task_stack.push(parent)
    yield parent
    _task_stack.pop()
    parent.pop_request()


@pytest.mark.parametrize("inherit", [False, True], ids=["plain", "inherit-priority"])
@pytest.mark.parametrize("options", [{}, {"priority": 2}, {"headers": {"x-trace": "abc"}}],
                         ids=["no-options", "priority", "headers"])
def test_batched_message_of_a_running_task_is_what_celery_writes(celery_app, worker_task, tm, redis_client,
                                                                 queue_name, send_task_calls, inherit, options):
    celery_app.conf.task_inherit_parent_priority = inherit
    with tm:
        sent = sample_tasks.add.apply_async(args=(1, 2), tm=tm, **options)
        sample_tasks.add.apply_async(args=(2, 3), tm=tm, **options)  # the second uses the round's plan
    assert send_task_calls == []
    batched = all_queued(redis_client, queue_name)
    drain(redis_client, queue_name)
    sample_tasks.add.apply_async(args=(1, 2), task_id=sent.id, tm=None, **options)
    assert send_task_calls == [sent.id]
    (reference,) = drain(redis_client, queue_name)
    assert reference["headers"]["parent_id"] == "parent-id" and reference["headers"]["root_id"] == "root-id"
    assert comparable(batched[0]) == comparable(reference)
    assert [child.id for child in worker_task.request.children[-3:]] == [sent.id, batched[1]["headers"]["id"],
                                                                         sent.id]


def test_a_replaced_json_serializer_writes_the_batched_body(celery_app, tm, redis_client, queue_name, monkeypatch):
    # The fast path writes plain JSON itself only while "json" is kombu's own encoder.
    from kombu.serialization import registry
    from kombu.utils.json import dumps as kombu_dumps

    def spaced(value):
        return kombu_dumps(value, separators=(" ,", " : "))

    original = registry._encoders["json"]
    monkeypatch.setitem(registry._encoders, "json", original._replace(encoder=spaced))
    with tm:
        sample_tasks.add.apply_async(args=(1, 2), tm=tm)
    (message,) = drain(redis_client, queue_name)
    assert base64.b64decode(message["body"]).startswith(b"[[1 ,2] ,{} ,{")


def test_one_pipeline_per_commit_of_many_tasks(celery_app, tm, redis_client, queue_name, pipelines):
    with tm:
        ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(250)]
    assert pipelines == [250]
    assert [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)] == ids


def test_a_queue_is_declared_once_per_connection(celery_app, tm, redis_client, queue_name, monkeypatch):
    # kombu's maybe_declare costs ~20 us even when it has nothing to do: a commit of one task calls it only
    # when the connection has not declared the queue (a new connection, or one kombu reset).
    declares = []
    original = kombu.Producer.maybe_declare

    def counting(self, entity, *args, **kwargs):
        declares.append(entity.name)
        return original(self, entity, *args, **kwargs)

    monkeypatch.setattr(kombu.Producer, "maybe_declare", counting)
    for index in range(3):
        with tm:
            sample_tasks.add.apply_async(args=(index, index), tm=tm)
    assert declares == [queue_name]
    assert redis_client.exists(f"_kombu.binding.{queue_name}")
    with celery_app.producer_or_acquire() as producer:
        producer.connection.declared_entities.clear()
    with tm:
        sample_tasks.add.apply_async(args=(9, 9), tm=tm)
    assert declares == [queue_name, queue_name]
    assert len(drain(redis_client, queue_name)) == 4


def test_huge_commit_goes_in_chunks(celery_app, tm, redis_client, queue_name, pipelines, monkeypatch):
    monkeypatch.setattr(broker, "CHUNK_SIZE", 100)
    with tm:
        ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(250)]
    assert pipelines == [100, 100, 50]
    assert [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)] == ids


def test_options_the_fast_path_does_not_handle_go_through_celery_in_the_same_round(
        celery_app, tm, redis_client, queue_name, send_task_calls, pipelines):
    with tm:
        plain = sample_tasks.add.apply_async(args=(1, 1), tm=tm)
        delayed = sample_tasks.add.apply_async(args=(2, 2), countdown=60, tm=tm)
        expiring = sample_tasks.add.apply_async(args=(3, 3), expires=600, tm=tm)
        last = sample_tasks.add.apply_async(args=(4, 4), tm=tm)
    assert send_task_calls == [delayed.id, expiring.id]
    assert pipelines == [4]
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == [plain.id, delayed.id, expiring.id, last.id]
    assert messages[0]["headers"]["eta"] is None
    assert messages[1]["headers"]["eta"] is not None
    assert messages[2]["headers"]["expires"] is not None


def test_a_route_naming_an_exchange_goes_through_celery(make_app, redis_url, queue_name, tm, redis_client):
    routes = {"tests.add": {"queue": queue_name, "exchange": queue_name, "routing_key": queue_name}}
    config = {"broker_url": redis_url, "task_default_queue": queue_name, "task_routes": routes}
    celery_app = get_celery(make_app(**{"websauna.celery_config": repr(config)}).registry)
    calls = count_celery_sends(celery_app)
    with tm:
        ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(2)]
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == ids
    assert len(calls) == 2
    # Sent through the named exchange, as Celery does, not the anonymous one.
    assert messages[0]["properties"]["delivery_info"] == {"exchange": queue_name, "routing_key": queue_name}


def test_a_message_that_cannot_be_sent_is_logged_and_the_others_go(celery_app, tm, redis_client, queue_name,
                                                                   caplog):
    with caplog.at_level(logging.ERROR, logger="websauna_tasks"), tm:
        before = sample_tasks.add.apply_async(args=(1, 1), tm=tm)
        # Not JSON serializable: apply_async refuses it now (payload.py), so it is scheduled
        # past that check, to exercise a publish that fails after the commit.
        broken = sample_tasks.add.AsyncResult(celery_uuid())
        dispatch.schedule(tm, dispatch.PendingMessage(celery_app.tasks["tests.add"], (object(), 1), {}, {}, broken.id))
        after = sample_tasks.add.apply_async(args=(2, 2), tm=tm)
    assert [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)] == [before.id, after.id]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and broken.id in errors[0] and "tests.add" in errors[0]


def test_publish_signal_receivers_still_see_every_message(celery_app, tm, redis_client, queue_name):
    # Tracing integrations add headers in before_task_publish: the fast path must step aside.
    def add_trace_header(headers=None, **kwargs):
        headers["x-trace"] = "from-signal"

    signals.before_task_publish.connect(add_trace_header, weak=False)
    try:
        with tm:
            ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(3)]
    finally:
        signals.before_task_publish.disconnect(add_trace_header)
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == ids
    assert {m["headers"].get("x-trace") for m in messages} == {"from-signal"}


def test_a_replaced_send_task_still_sees_every_message(celery_app, tm, redis_client, queue_name):
    # What instrumentation or a test double does; the fast path must not go around it.
    seen = []
    original = celery_app.send_task

    def recording(name, *args, **kwargs):
        seen.append(kwargs["task_id"])
        return original(name, *args, **kwargs)

    celery_app.send_task = recording
    try:
        with tm:
            ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(3)]
    finally:
        del celery_app.send_task
    assert seen == ids
    assert [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)] == ids


@pytest.fixture
def amqp_url():
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        service_missing(f"RabbitMQ at {AMQP_URL}", exc)
    return AMQP_URL


def test_rabbitmq_receives_every_message_of_a_commit_in_order(make_app, amqp_url, queue_name, tm):
    config = {"broker_url": amqp_url, "task_default_queue": queue_name}
    make_app(**{"websauna.celery_config": repr(config)})
    try:
        with tm:
            ids = [sample_tasks.add.apply_async(args=(i, 1), tm=tm).id for i in range(20)]
        received = []
        with kombu.Connection(amqp_url) as conn:
            channel = conn.default_channel
            deadline = time.monotonic() + 10
            while len(received) < len(ids) and time.monotonic() < deadline:
                message = channel.basic_get(queue_name, no_ack=True)
                if message is None:
                    time.sleep(0.05)
                    continue
                received.append((message.headers["id"], json.loads(message.body)[0]))
        assert received == [(task_id, [i, 1]) for i, task_id in enumerate(ids)]
    finally:
        with kombu.Connection(amqp_url) as conn:
            channel = conn.default_channel
            channel.queue_delete(queue_name)
            channel.exchange_delete(queue_name)


def effects(db):
    with db.connect() as conn:
        return {tuple(row) for row in conn.execute(text("SELECT task_id, value FROM ws_test_effects"))}


@pytest.mark.slow
def test_worker_runs_200_tasks_queued_in_one_transaction(celery_app, redis_url, database_url, queue_name, db,
                                                         tm, write_ini, ws_celery_worker_factory, subprocess_env,
                                                         redis_client):
    # Plain, prioritised (another Redis list) and delayed (Celery's own path) messages in one commit.
    with tm:
        expected = set()
        for i in range(200):
            options = {"priority": 7} if i % 10 == 3 else {"countdown": 0.2} if i % 50 == 7 else {}
            result = sample_tasks.record.apply_async(args=(f"v{i}",), tm=tm, **options)
            expected.add((result.id, f"v{i}"))
    assert len(all_queued(redis_client, queue_name)) == 200
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    ini = write_ini({"websauna.celery_config": repr(config), "sqlalchemy.url": database_url})
    try:
        ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", "--without-mingle", "--without-gossip",
                                 env=subprocess_env)
        deadline = time.monotonic() + 60
        while len(effects(db)) < 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert effects(db) == expected
    finally:
        drain(redis_client, queue_name)
