"""ScheduleOnCommitTask: messages reach the broker (real Redis) only after commit."""
from __future__ import annotations

import logging

import pytest
import transaction
import webtest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests import sample_tasks
from tests.conftest import queued_messages


@pytest.fixture
def app(make_app, redis_url, database_url, queue_name, db):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return make_app(**{"websauna.celery_config": repr(config), "sqlalchemy.url": database_url, "retry.attempts": "3"})


@pytest.fixture
def tm():
    return transaction.TransactionManager(explicit=True)


def sent_ids(redis_client, queue_name):
    return [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)]


def test_sent_only_after_commit_with_the_returned_id(app, tm, redis_client, queue_name):
    with tm:
        result = sample_tasks.add.apply_async(args=(1, 2), tm=tm)
        assert result.id
        assert sent_ids(redis_client, queue_name) == []
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == [result.id]
    assert messages[0]["headers"]["task"] == "tests.add"


def test_nothing_sent_on_abort(app, tm, redis_client, queue_name):
    with pytest.raises(ValueError):
        with tm:
            sample_tasks.add.apply_async(args=(1, 2), tm=tm)
            raise ValueError("view failed")
    assert sent_ids(redis_client, queue_name) == []


def test_nothing_sent_when_doomed(app, tm, redis_client, queue_name):
    tm.begin()
    sample_tasks.add.apply_async(args=(1, 2), tm=tm)
    tm.doom()
    with pytest.raises(transaction.interfaces.DoomedTransaction):
        tm.commit()
    tm.abort()
    assert sent_ids(redis_client, queue_name) == []


def test_nothing_sent_when_commit_fails_with_integrity_error(app, tm, redis_client, queue_name):
    router = app
    from pyramid.scripting import prepare

    from websauna_tasks.request import make_task_request

    request = make_task_request(router.registry)
    env = prepare(request=request, registry=router.registry)
    try:
        with request.tm:
            request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('dup')"))
        with pytest.raises(IntegrityError):
            with request.tm:
                sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
                # The duplicate only fails when the transaction commits.
                request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('dup')"))
    finally:
        env["closer"]()
    assert sent_ids(redis_client, queue_name) == []


def test_savepoint_rollback_drops_messages_queued_after_it(app, tm, redis_client, queue_name):
    with tm:
        kept = sample_tasks.add.apply_async(args=(1, 1), tm=tm)
        savepoint = tm.savepoint()
        sample_tasks.add.apply_async(args=(2, 2), tm=tm)
        savepoint.rollback()
        also_kept = sample_tasks.add.apply_async(args=(3, 3), tm=tm)
    assert sent_ids(redis_client, queue_name) == [kept.id, also_kept.id]


def test_savepoint_taken_before_the_first_message(app, tm, redis_client, queue_name):
    with tm:
        savepoint = tm.savepoint()
        sample_tasks.add.apply_async(args=(2, 2), tm=tm)
        savepoint.rollback()
    assert sent_ids(redis_client, queue_name) == []


def test_missing_tm_is_a_clear_error_and_tm_none_sends_now(app, redis_client, queue_name):
    with pytest.raises(TypeError, match="tm=request.tm"):
        sample_tasks.add.apply_async(args=(1, 2))
    with pytest.raises(TypeError, match="tm=request.tm"):
        sample_tasks.add.delay(1, 2)
    result = sample_tasks.add.apply_async(args=(1, 2), tm=None)
    assert sent_ids(redis_client, queue_name) == [result.id]


def test_beat_style_call_with_producer_needs_no_tm(app, redis_client, queue_name):
    celery_app = sample_tasks.add.app
    with celery_app.producer_or_acquire() as producer:
        result = sample_tasks.add.apply_async((1, 2), {}, producer=producer)
    assert sent_ids(redis_client, queue_name) == [result.id]


def test_wrong_arguments_fail_at_call_time_not_after_commit(app, tm, redis_client, queue_name):
    with pytest.raises(TypeError, match="tests.add"):
        with tm:
            sample_tasks.add.apply_async(args=(1, 2, 3), tm=tm)
    assert sent_ids(redis_client, queue_name) == []


def test_many_messages_published_in_one_round(app, tm, redis_client, queue_name):
    celery_app = sample_tasks.add.app
    acquired = []
    original = celery_app.producer_pool.acquire

    def counting_acquire(*args, **kwargs):
        acquired.append(1)
        return original(*args, **kwargs)

    celery_app.producer_pool.acquire = counting_acquire
    try:
        with tm:
            ids = [sample_tasks.add.apply_async(args=(i, i), tm=tm).id for i in range(50)]
    finally:
        celery_app.producer_pool.acquire = original
    assert sent_ids(redis_client, queue_name) == ids
    assert len(acquired) == 1


def test_view_commit_sends_view_error_does_not(app, redis_client, queue_name, db):
    testapp = webtest.TestApp(app)
    task_id = testapp.get("/write/one").text
    assert sent_ids(redis_client, queue_name) == [task_id]
    with pytest.raises(RuntimeError):
        testapp.get("/write-fail/two")
    assert sent_ids(redis_client, queue_name) == [task_id]
    with db.connect() as conn:
        assert conn.execute(text("SELECT value FROM ws_test_rows")).scalars().all() == ["one"]


def test_failed_pyramid_retry_attempt_does_not_publish(app, redis_client, queue_name):
    testapp = webtest.TestApp(app)
    task_id = testapp.get("/flaky/x").text
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == [task_id]
    # The message is the one queued by the second attempt (retry_attempt == 1).
    assert messages[0]["headers"]["argsrepr"] == "('x', 1)"


def test_publish_error_after_commit_is_logged_with_task_details(make_app, tm, caplog):
    config = {
        "broker_url": "redis://127.0.0.1:1/0",  # nothing listens on port 1
        "task_publish_retry": False,
        "broker_connection_timeout": 0.5,
        "broker_connection_retry": False,
    }
    make_app(**{"websauna.celery_config": repr(config)})
    with caplog.at_level(logging.ERROR, logger="websauna_tasks"):
        with tm:
            result = sample_tasks.add.apply_async(args=(40, 2), tm=tm)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("websauna_tasks")]
    assert errors, "a failed publish must be logged"
    message = errors[0].getMessage()
    assert "tests.add" in message and result.id in message and "(40, 2)" in message


def test_plain_websauna_task_sends_now_or_after_commit_when_given_tm(app, tm, redis_client, queue_name):
    now = sample_tasks.route_url.apply_async()
    assert sent_ids(redis_client, queue_name) == [now.id]
    with tm:
        later = sample_tasks.route_url.apply_async(tm=tm)
        assert sent_ids(redis_client, queue_name) == [now.id]
    assert sent_ids(redis_client, queue_name) == [now.id, later.id]
