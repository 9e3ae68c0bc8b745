"""Bad input gets a clear error and loses nothing (docs/bad_input.md).

In the caller: arguments that are not JSON and payloads over
``websauna_tasks.max_payload_bytes`` are refused before anything is claimed,
scheduled or sent. In a real ws-celery worker: pickle is never loaded, and
messages for unknown tasks or with broken bodies end in the dead-letter list
while the worker goes on with the next task.
"""
from __future__ import annotations

import base64
import datetime
import decimal
import json
import pickle
import re
import uuid

import pytest
import transaction
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from tests.apps import deferred_functions, sample_tasks
from tests.conftest import queued_messages
from websauna_tasks import PayloadTooLarge, defer, get_celery, list_dead_letters, requeue_dead_letter
from websauna_tasks.payload import DEFAULT_MAX_PAYLOAD_BYTES, MAX_PAYLOAD_KEY, check_payload
from websauna_tasks.testing import wait_for


class Opaque:
    """Not JSON."""


def settings_for(redis_url, database_url, queue_name, **extra):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna.site_url": "https://example.com/app",
                "websauna_tasks.deadletter_queue": f"{queue_name}.dead",
                # Unknown tasks are dead letters at once here; the grace of a deploy: tests/test_rolling_deploys.py.
                "websauna_tasks.unknown_task_grace_seconds": "0"}
    settings.update(extra)
    return settings


@pytest.fixture
def build(make_app, redis_url, database_url, queue_name, db):
    def factory(**extra):
        return make_app(**settings_for(redis_url, database_url, queue_name, **extra))
    return factory


@pytest.fixture
def app(build):
    return build()


@pytest.fixture
def tm():
    return transaction.TransactionManager(explicit=True)


def queued(redis_client, queue_name):
    return queued_messages(redis_client, queue_name)


def args_of(message):
    return json.loads(base64.b64decode(message["body"]))[0]


# -- not JSON: refused in the caller, naming the argument ---------------------------------------------------------

def test_apply_async_with_tm_refuses_a_non_json_argument_naming_it(app, tm, redis_client, queue_name):
    with tm:
        with pytest.raises(TypeError, match=r"^tests\.add: argument 2 \(Opaque\) cannot travel as JSON"):
            sample_tasks.add.apply_async(args=(1, Opaque()), tm=tm)
        sample_tasks.add.apply_async(args=(1, 2), tm=tm)
    assert [args_of(m) for m in queued(redis_client, queue_name)] == [[1, 2]]


def test_apply_async_now_refuses_a_non_json_keyword_argument_naming_it(app, redis_client, queue_name):
    with pytest.raises(TypeError, match=r"tests\.add: keyword argument 'b' \(set\) cannot travel as JSON"):
        sample_tasks.add.apply_async(args=(1,), kwargs={"b": {1, 2}}, tm=None)
    with pytest.raises(TypeError, match=r"^tests\.add: keyword 1 \(int\) is not a string"):
        sample_tasks.add.apply_async(kwargs={1: 2}, tm=None)
    assert queued(redis_client, queue_name) == []


def test_task_defer_and_defer_refuse_non_json_arguments(app, tm, redis_client, queue_name):
    with tm:
        with pytest.raises(TypeError, match=r"tests\.add: argument 1 \(Opaque\)"):
            sample_tasks.add.defer(Opaque(), 2)
    with pytest.raises(TypeError, match=r"defer\(tests\.apps\.deferred_functions:record\): keyword argument 'note' "
                                        r"\(Opaque\) cannot travel as JSON"):
        defer(deferred_functions.record, "x", note=Opaque(), _registry=app.registry, _transactional=False)
    assert queued(redis_client, queue_name) == []


def test_circular_and_nested_values_are_named(app):
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match=r"argument 1 \(list\) cannot travel as JSON: Circular reference"):
        sample_tasks.add.apply_async(args=(loop, 1), tm=None)
    with pytest.raises(TypeError, match=r"keyword argument 'b' \(dict\)"):
        sample_tasks.add.apply_async(args=(1,), kwargs={"b": {"deep": [Opaque()]}}, tm=None)


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), {"nested": [1.0, float("inf")]},
                                   datetime.datetime(2024, 1, 1), decimal.Decimal("NaN")],
                         ids=["nan", "-inf", "nested inf", "datetime beside", "Decimal NaN"])
def test_non_finite_numbers_are_a_value_error_naming_the_argument(app, tm, redis_client, queue_name, value):
    # A datetime sends the encoding down kombu's slower path: the NaN beside it must be refused there too.
    # kombu carries a Decimal as its text, so Decimal("NaN") is not a JSON number, and is sent.
    args = (value, float("nan")) if isinstance(value, datetime.datetime) else (1, value)
    where = "argument 2 (float)" if isinstance(value, datetime.datetime) else f"argument 2 ({type(value).__name__})"
    if isinstance(value, decimal.Decimal):
        sample_tasks.add.apply_async(args=args, tm=None)
        sent = [args_of(m) for m in queued(redis_client, queue_name)]
        assert sent == [[1, {"__type__": "decimal", "__value__": "NaN"}]]
        return
    with tm:
        with pytest.raises(ValueError, match=rf"^tests\.add: {re.escape(where)} holds a non-finite number"):
            sample_tasks.add.apply_async(args=args, tm=tm)
    with pytest.raises(ValueError, match="non-finite"):
        sample_tasks.add.apply_async(args=(1,), kwargs={"b": value} if not isinstance(value, datetime.datetime)
                                     else {"b": float("nan"), "c": value}, tm=None)
    assert queued(redis_client, queue_name) == []


def test_values_kombu_json_carries_are_accepted(app, redis_client, queue_name):
    now = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    sample_tasks.add.apply_async(args=(now, decimal.Decimal("1.5")), kwargs={}, tm=None)
    sample_tasks.add.apply_async(args=(uuid.UUID(int=1), [1, {"a": None}]), tm=None)
    assert len(queued(redis_client, queue_name)) == 2


# -- too large: refused in the caller, nothing sent or claimed -----------------------------------------------------

def test_oversize_payload_refused_with_task_size_and_setting_nothing_sent_or_claimed(app, tm, redis_client,
                                                                                  queue_name):
    big = "x" * DEFAULT_MAX_PAYLOAD_BYTES
    with tm:
        with pytest.raises(PayloadTooLarge) as info:
            sample_tasks.add.apply_async(args=(big, 1), tm=tm, unique_name=f"{queue_name}-big")
    message = str(info.value)
    assert message.startswith("tests.add: ")
    assert f"{len(json.dumps([[big, 1], {}]))} bytes" in message
    assert f"{MAX_PAYLOAD_KEY} = {DEFAULT_MAX_PAYLOAD_BYTES}" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(PayloadTooLarge):
        sample_tasks.add.apply_async(args=(big, 1), tm=None, unique_name=f"{queue_name}-big")
    assert queued(redis_client, queue_name) == []
    # The name was never claimed: the next call with it is sent, under its own id.
    result = sample_tasks.add.apply_async(args=("small", 1), tm=None, unique_name=f"{queue_name}-big")
    assert [m["headers"]["id"] for m in queued(redis_client, queue_name)] == [result.id]


def test_defer_oversize_refused_before_claiming_its_name(app, redis_client, queue_name):
    with pytest.raises(PayloadTooLarge, match=r"^defer\(tests\.apps\.deferred_functions:record\): "):
        defer(deferred_functions.record, "y" * (DEFAULT_MAX_PAYLOAD_BYTES + 1), _name=f"{queue_name}-defer",
              _registry=app.registry, _transactional=False)
    task_id = defer(deferred_functions.record, "small", _name=f"{queue_name}-defer", _registry=app.registry,
                    _transactional=False)
    assert [m["headers"]["id"] for m in queued(redis_client, queue_name)] == [task_id]


def test_setting_is_respected(build, redis_client, queue_name):
    build(**{MAX_PAYLOAD_KEY: "100"})
    sample_tasks.add.apply_async(args=("a" * 87, 1), tm=None)  # 100 bytes
    with pytest.raises(PayloadTooLarge, match=f"101 bytes of JSON, more than {MAX_PAYLOAD_KEY} = 100"):
        sample_tasks.add.apply_async(args=("a" * 88, 1), tm=None)
    build(**{MAX_PAYLOAD_KEY: "0"})  # no limit
    sample_tasks.add.apply_async(args=("a" * (DEFAULT_MAX_PAYLOAD_BYTES * 2), 1), tm=None)
    assert len(queued(redis_client, queue_name)) == 2


@pytest.mark.parametrize("raw", ["lots", "-1", "1.5"])
def test_bad_setting_is_a_configuration_error(build, raw):
    with pytest.raises(ConfigurationError, match=MAX_PAYLOAD_KEY):
        build(**{MAX_PAYLOAD_KEY: raw})


def test_check_payload_returns_the_size(app):
    assert check_payload(get_celery(app.registry), "t", (1, "é"), {"k": None}) == len('[[1, "\\u00e9"], {"k": null}]')


# -- the worker: JSON only, unrunnable messages moved aside --------------------------------------------------------

class WritesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def effects(db):
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(text("SELECT task_id, value FROM ws_test_effects ORDER BY id"))]


@pytest.mark.slow
def test_worker_refuses_pickle_and_moves_unknown_and_broken_messages_aside(
        build, redis_url, database_url, redis_client, queue_name, dead_key, db, tmp_path, write_ini,
        ws_celery_worker_factory, subprocess_env):
    settings = settings_for(redis_url, database_url, queue_name)
    router = build()
    celery = get_celery(router.registry)
    marker = tmp_path / "unpickled"
    # Written before the worker starts, read by it in this order.
    pickled = celery.send_task("tests.record", args=(WritesAFileWhenUnpickled(str(marker)),), serializer="pickle",
                               queue=queue_name)
    unknown = celery.send_task("tests.no_such_task", args=(1,), queue=queue_name)
    broken = celery.send_task("tests.record", args=("broken",), queue=queue_name)
    stored = [json.loads(raw) for raw in redis_client.lrange(queue_name, 0, -1)]
    index = next(i for i, m in enumerate(stored) if m["headers"]["id"] == broken.id)
    stored[index]["body"] = base64.b64encode(b'[["broken"], {}, {').decode()
    redis_client.lset(queue_name, index, json.dumps(stored[index]))
    # The payload is live: unpickling it here does create the file.
    pickle.loads(base64.b64decode(stored[[m["headers"]["id"] for m in stored].index(pickled.id)]["body"]))[0][0].close()
    assert marker.exists()
    marker.unlink()  # the worker must not make it again
    good = sample_tasks.record.apply_async(args=("after",), tm=None)

    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", "-l", "info", "--without-gossip",
                                      "--without-mingle", env=subprocess_env)
    wait_for(lambda: effects(db) == [(good.id, "after")])
    letters = wait_for(lambda: len(list_dead_letters(router.registry)) == 3 and list_dead_letters(router.registry))
    by_id = {letter["id"]: letter for letter in letters}
    assert set(by_id) == {pickled.id, unknown.id, broken.id}

    assert by_id[pickled.id]["kind"] == "invalid_task"
    assert "ContentDisallowed" in by_id[pickled.id]["reason"]
    assert by_id[pickled.id]["message"]["content-type"] == "application/x-python-serialize"
    assert not marker.exists(), "the pickled payload was loaded"

    assert by_id[unknown.id]["kind"] == "unknown_task"
    assert by_id[unknown.id]["reason"] == "unknown task 'tests.no_such_task' (not registered in this worker)"
    assert by_id[unknown.id]["task"] == "tests.no_such_task"
    assert by_id[unknown.id]["queue"] == queue_name
    assert by_id[unknown.id]["message"]["headers"]["id"] == unknown.id

    assert by_id[broken.id]["kind"] == "undecodable"
    assert "DecodeError" in by_id[broken.id]["reason"]
    assert base64.b64decode(by_id[broken.id]["message"]["body"]) == b'[["broken"], {}, {'
    for letter in letters:
        assert letter["time"] and letter["timestamp"] > 0

    assert redis_client.llen(queue_name) == 0
    assert "moved to dead letters" in worker.output()
    # Still running, still working.
    again = sample_tasks.record.apply_async(args=("again",), tm=None)
    wait_for(lambda: (again.id, "again") in effects(db))
    assert worker.process.poll() is None

    # An operator puts one back: the worker meets it again and moves it aside again.
    assert requeue_dead_letter(router.registry, unknown.id) is True
    assert requeue_dead_letter(router.registry, "no-such-id") is False
    wait_for(lambda: [letter["id"] for letter in list_dead_letters(router.registry)].count(unknown.id) == 1
             and len(list_dead_letters(router.registry)) == 3 and redis_client.llen(queue_name) == 0)
    assert [letter["id"] for letter in list_dead_letters(router.registry)][-1] == unknown.id
    assert ("broken",) not in [(value,) for _id, value in effects(db)]

