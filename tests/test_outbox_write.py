"""What the outbox writes and claims, statement by statement (websauna_tasks.outbox).

The row stays what it was (compact JSON, datetimes tagged, publishing
handles left out, the unstorable option named), and the request's
transaction pays one statement for it on PostgreSQL: the NOTIFY that
wakes the relays rides on the INSERT. The claim's limit and app are
parameters of a statement built once, read at every call.
"""
from __future__ import annotations

import datetime
import types
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import text

from tests.apps import sample_tasks
from tests.conftest import queued_messages
from tests.outbox_helpers import outbox_rows
from websauna_tasks.broker import PendingMessage
from websauna_tasks.db import get_engine
from websauna_tasks.outbox import CHANNEL, OutboxError, get_outbox, message_row
from websauna_tasks.registry import get_celery
from websauna_tasks.request import task_request


def _message(args=(1, "x"), kwargs=None, **options) -> PendingMessage:
    task = types.SimpleNamespace(name="tests.sample", app=types.SimpleNamespace(main="sample-app"))
    return PendingMessage(task, args, kwargs if kwargs is not None else {"a": [1, 2]}, options, "the-id")  # type: ignore[arg-type]


# -- the row (no database) ------------------------------------------------------------------------

def test_a_row_is_compact_json_with_datetimes_tagged_and_no_publishing_handles():
    eta = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    message = _message(eta=eta, headers={"h": 1}, producer=object(), connection=object())
    options_before = dict(message.options)
    row = message_row(message, now=12.5)
    assert row == {
        "id": "the-id", "app": "sample-app", "task_name": "tests.sample",
        "args": '[1,"x"]', "kwargs": '{"a":[1,2]}',
        "options": '{"eta":{"__websauna_tasks_datetime__":"2030-01-02T03:04:05+00:00"},"headers":{"h":1}}',
        "created_at": 12.5, "sent_at": None,
    }
    assert message.options == options_before, "the caller's options are not changed"


def test_a_row_without_options_stores_an_empty_object():
    assert message_row(_message(), now=1.0)["options"] == "{}"


def test_an_option_that_cannot_be_stored_is_named_even_when_an_argument_cannot_be_either():
    with pytest.raises(OutboxError, match=r"the option 'headers' of task tests\.sample"):
        message_row(_message(args=(uuid.uuid4(),), headers={"x": {1, 2}}))
    with pytest.raises(OutboxError, match=r"the arguments of task tests\.sample"):
        message_row(_message(args=(uuid.uuid4(),), headers={"x": 1}))
    with pytest.raises(OutboxError, match=r"the keyword arguments of task tests\.sample"):
        message_row(_message(kwargs={"when": datetime.date(2030, 1, 1)}))


# -- PostgreSQL -----------------------------------------------------------------------------------

@pytest.fixture
def app_name(queue_name):
    return f"outbox-write-{queue_name}"


@pytest.fixture
def router(make_app, redis_url, database_url, queue_name, db, app_name):
    return make_app(**{
        "websauna.celery_config": repr({"broker_url": redis_url, "task_default_queue": queue_name}),
        "sqlalchemy.url": database_url,
        "websauna_tasks.app_name": app_name,
        "websauna_tasks.outbox": "true",
        # Rows stay unsent until the test publishes them.
        "websauna_tasks.outbox_publish_on_commit": "false",
    })


def _commit(router, count: int) -> list[str]:
    with task_request(router.registry) as request:
        with request.tm:
            return [sample_tasks.add.apply_async(args=(number, 1), tm=request.tm).id for number in range(count)]


def test_writing_a_row_is_one_statement_and_its_notify_arrives_with_the_commit(router, database_url, app_name):
    _commit(router, 1)  # the table exists, the connection is warm
    engine = get_engine(router.registry)
    statements: list[str] = []
    listener = psycopg.connect(sa.engine.make_url(database_url).set(drivername="postgresql")
                               .render_as_string(hide_password=False), autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        with task_request(router.registry) as request:
            with request.tm:
                request.dbsession.execute(text("SELECT 1"))

                def record(conn, cursor, statement, parameters, context, executemany):
                    statements.append(statement)

                sa.event.listen(engine, "before_cursor_execute", record)
                try:
                    task_id = sample_tasks.add.apply_async(args=(1, 2), tm=request.tm).id
                finally:
                    sa.event.remove(engine, "before_cursor_execute", record)
                assert list(listener.notifies(timeout=0.05)) == [], "nothing is delivered before the commit"
        notified = list(listener.notifies(timeout=10, stop_after=1))
    finally:
        listener.close()
    assert len(statements) == 1, statements
    assert statements[0].startswith("INSERT INTO websauna_tasks_outbox") and "pg_notify" in statements[0]
    assert [notify.channel for notify in notified] == [CHANNEL]
    assert task_id in [row[0] for row in outbox_rows(engine, app_name)]


def test_an_aborted_write_notifies_nobody(router, database_url, app_name):
    _commit(router, 1)
    listener = psycopg.connect(sa.engine.make_url(database_url).set(drivername="postgresql")
                               .render_as_string(hide_password=False), autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        with task_request(router.registry) as request:
            with pytest.raises(ValueError):
                with request.tm:
                    sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
                    raise ValueError("the view failed")
        committed = _commit(router, 1)
        # Notifications come in commit order: the committed one is the first, and the only one.
        notified = list(listener.notifies(timeout=10, stop_after=1))
        notified += list(listener.notifies(timeout=0.2))
    finally:
        listener.close()
    assert len(notified) == 1
    assert [row[0] for row in outbox_rows(get_engine(router.registry), app_name)][-1:] == committed


def test_the_claim_reads_the_batch_size_the_ids_and_the_app_at_each_call(router, redis_client, queue_name,
                                                                        app_name):
    engine = get_engine(router.registry)
    ids = _commit(router, 5)
    with engine.begin() as conn:
        # A row of another app in the same table: never this app's to publish.
        conn.execute(text("INSERT INTO websauna_tasks_outbox (id, app, task_name, args, kwargs, options, created_at) "
                          "SELECT 'other-' || id, 'another-app', task_name, args, kwargs, options, created_at - 1 "
                          "FROM websauna_tasks_outbox WHERE id = :id"), {"id": ids[0]})
    outbox = get_outbox(get_celery(router.registry))
    assert outbox.publish_pending(ids=[ids[3], "not-a-row"]) == 1
    outbox.batch_size = 2
    assert outbox.publish_pending() == 2
    outbox.batch_size = 500
    assert outbox.publish_pending() == 2
    assert outbox.publish_pending() == 0
    sent = [message["headers"]["id"] for message in queued_messages(redis_client, queue_name)]
    assert sent == [ids[3], ids[0], ids[1], ids[2], ids[4]]
    assert all(row[2] is not None for row in outbox_rows(engine, app_name))
    assert [row[2] for row in outbox_rows(engine, "another-app")] == [None]
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM websauna_tasks_outbox WHERE app = 'another-app'"))
